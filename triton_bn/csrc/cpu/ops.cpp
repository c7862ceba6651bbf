// The ops of the native CPU path (registered as torch.ops.triton_bn_cpu.*): argument checks, allocation,
// the per-channel vectors, the running-statistics update and the C++ autograd node, around the kernels of
// common.h. The only file that includes ATen's and the autograd's headers (their parsing alone is ~15 s).
#include "activation_ids.h"
#include "common.h"
#include "../node/batch_norm_backward.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace triton_bn_cpu {
namespace {

template <typename Body> void dispatch_dtype(at::ScalarType dtype, Body&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    case at::kHalf: body(c10::Half{}); break;
    case at::kDouble: body(double{}); break;
    default: TORCH_CHECK(false, "triton_bn_cpu: unsupported dtype ", dtype);
  }
}

// Whether x.movedim(1, -1) is contiguous (read from the strides: the view itself costs a microsecond,
// as much as a small eval call's whole arithmetic): dim 1 innermost, then the last dim to dim 2, then dim
// 0, each dense over the ones inside it (a dim of size 1 may have any stride, as for is_contiguous).
bool channels_innermost(const at::Tensor& x) {
  if (x.numel() == 0) return true;
  int64_t dense = 1;
  const auto dense_at = [&](int64_t dim) {
    const bool ok = x.size(dim) == 1 || x.stride(dim) == dense;
    dense *= x.size(dim);
    return ok;
  };
  if (!dense_at(1)) return false;
  for (int64_t dim = x.dim() - 1; dim >= 2; --dim) {
    if (!dense_at(dim)) return false;
  }
  return dense_at(0);
}

Geometry geometry_of(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "triton_bn_cpu: x must be a CPU tensor [N, C, *]");
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t R = C == 0 ? 0 : x.numel() / C;
  if (channels_innermost(x)) return {false, N, C, N == 0 ? 0 : R / N, R};
  TORCH_CHECK(x.is_contiguous(), "triton_bn_cpu: x must have its channels innermost (dense rows) or be contiguous");
  return {true, N, C, N == 0 ? 0 : R / N, R};
}

// (strides as triton_bn/backends/layout.py's like_input gives them: a tensor of at most one element has no layout)
void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.sizes() == x.sizes() && (t.numel() <= 1 || t.strides() == x.strides()) &&
              t.scalar_type() == x.scalar_type(),
              "triton_bn_cpu: ", name, " must have x's shape, strides and dtype");
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// The dtype of compute type A, as a tensor's.
template <typename A> constexpr at::ScalarType scalar_type_of() {
  return std::is_same_v<A, double> ? at::kDouble : at::kFloat;
}

// The compute type of x's dtype, as a tensor's (the dtype of the statistics and of dweight and dbias).
at::ScalarType compute_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor (of any dtype) in compute type A; `absent` for every channel where it is not given.
template <typename A>
std::vector<A> channel_values(const c10::optional<at::Tensor>& t, int64_t channels, A absent) {
  std::vector<A> out(channels, absent);
  if (!present(t)) return out;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "triton_bn_cpu: per-channel vectors must be [C]");
  // read in place, converted one value at a time (as Tensor.to converts: exact, or rounded to nearest from
  // double); a converted copy would cost two allocations per vector, per call
  const auto read = [&](auto tag) {
    using V = decltype(tag);
    const V* p = t->data_ptr<V>();
    const int64_t step = t->stride(0);
    A* __restrict__ values = out.data();
    if (step == 1) {
      for (int64_t c = 0; c < channels; ++c) values[c] = static_cast<A>(static_cast<acc_t<V>>(p[c]));
    } else {
      for (int64_t c = 0; c < channels; ++c) values[c] = static_cast<A>(static_cast<acc_t<V>>(p[c * step]));
    }
  };
  switch (t->scalar_type()) {
    case at::kFloat: read(float{}); break;
    case at::kDouble: read(double{}); break;
    case at::kBFloat16: read(c10::BFloat16{}); break;
    case at::kHalf: read(c10::Half{}); break;
    default: {
      const at::Tensor f = t->to(scalar_type_of<A>()).contiguous();
      std::copy(f.data_ptr<A>(), f.data_ptr<A>() + channels, out.begin());
    }
  }
  return out;
}

// scale = invstd * weight, shift = bias - mean * scale (invstd = stat, or 1 / sqrt(stat + eps) from a
// running variance), as PyTorch's CPU kernels form them.
template <typename A>
void coefficients(const std::vector<A>& mean, const std::vector<A>& invstd, const std::vector<A>& weight,
                  const std::vector<A>& bias, std::vector<A>& scale, std::vector<A>& shift) {
  const size_t C = mean.size();
  scale.resize(C);
  shift.resize(C);
  for (size_t c = 0; c < C; ++c) {
    scale[c] = invstd[c] * weight[c];
    shift[c] = bias[c] - mean[c] * scale[c];
  }
}

template <typename A> std::vector<A> invstd_of(const std::vector<A>& stat, bool batch_stats, double eps) {
  std::vector<A> invstd(stat);
  if (!batch_stats) {
    for (auto& v : invstd) v = A(1) / std::sqrt(v + static_cast<A>(eps));
  }
  return invstd;
}

// torch.lerp's formula: exact at both ends (a weight of 1 gives b itself).
template <typename A> inline A lerp(A a, A b, A w) { return w < A(0.5) ? a + w * (b - a) : b - (b - a) * (A(1) - w); }

// A training forward: (y, mean, invstd), the statistics of x (one read), the running statistics moved
// toward them (running += factor * (batch - running), the variance unbiased: nn.BatchNorm's update, as
// torch.lerp computes it), then y (one more read).
std::tuple<at::Tensor, at::Tensor, at::Tensor> training_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double factor, double eps, int64_t activation, double slope) {
  const Geometry g = geometry_of(x);
  const int64_t R = g.R, C = g.C;
  TORCH_CHECK(R > 0, "triton_bn_cpu: empty batch");
  // everything checked before the running statistics are written
  TORCH_CHECK(activation >= 0 && activation < kActivationCount, "triton_bn_cpu: unknown activation id ", activation);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
              x.scalar_type() == at::kDouble, "triton_bn_cpu: unsupported dtype ", x.scalar_type());
  if (present(residual)) check_like(*residual, "residual", x);
  const bool update = present(running_mean) != nullptr;
  for (const auto* t : {&running_mean, &running_var}) {
    TORCH_CHECK(!update || (present(*t) && (*t)->device().is_cpu() && (*t)->is_floating_point() &&
                            (*t)->dim() == 1 && (*t)->size(0) == C),
                "triton_bn_cpu: running statistics must both be floating-point CPU [C] tensors (or both absent)");
  }
  // the statistics in the compute type: fp32, or double for a float64 x
  const auto stats_options = x.options().dtype(compute_type_of(x));
  at::Tensor mean = at::empty({C}, stats_options), var = at::empty({C}, stats_options);  // var: scratch
  at::Tensor invstd = at::empty({C}, stats_options);
  at::Tensor y = at::empty_like(x);
  check_like(y, "y", x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    statistics<T>(x.data_ptr<T>(), g, mean.data_ptr<A>(), var.data_ptr<A>());
    std::vector<A> m(mean.data_ptr<A>(), mean.data_ptr<A>() + C);
    const A* v = var.data_ptr<A>();
    const std::vector<A> inv = invstd_of(std::vector<A>(v, v + C), false, eps);
    if (update) {
      // in the compute type; running statistics of another dtype (a model cast to bf16) or strides are
      // updated in a copy and written back, rounded once
      at::Tensor mean_acc = running_mean->to(scalar_type_of<A>()).contiguous();
      at::Tensor var_acc = running_var->to(scalar_type_of<A>()).contiguous();
      const A f = static_cast<A>(factor);
      const A unbias = R > 1 ? static_cast<A>(static_cast<double>(R) / (R - 1)) : A(NAN);
      A* rm = mean_acc.data_ptr<A>();
      A* rv = var_acc.data_ptr<A>();
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = lerp(rm[c], m[c], f);
        rv[c] = lerp(rv[c], v[c] * unbias, f);
      }
      if (!mean_acc.is_same(*running_mean)) running_mean->copy_(mean_acc);
      if (!var_acc.is_same(*running_var)) running_var->copy_(var_acc);
    }
    std::copy(inv.begin(), inv.end(), invstd.data_ptr<A>());
    std::vector<A> scale, shift;
    coefficients(m, inv, channel_values(weight, C, A(1)), channel_values(bias, C, A(0)), scale, shift);
    const T* res = present(residual) ? residual->data_ptr<T>() : nullptr;
    normalize<T>(x.data_ptr<T>(), res, y.data_ptr<T>(), g, scale, shift, activation, static_cast<A>(slope));
  });
  return {y, mean, invstd};
}

// y from given statistics: the running ones (batch_stats false: stat = running variance) or the batch's
// (stat = invstd).
at::Tensor apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& residual, double eps, bool batch_stats, int64_t activation,
                 double slope) {
  const Geometry g = geometry_of(x);
  const int64_t C = g.C;
  if (present(residual)) check_like(*residual, "residual", x);
  at::Tensor y = at::empty_like(x);
  check_like(y, "y", x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    std::vector<A> scale, shift;
    coefficients(channel_values(mean, C, A(0)), invstd_of(channel_values(stat, C, A(1)), batch_stats, eps),
                 channel_values(weight, C, A(1)), channel_values(bias, C, A(0)), scale, shift);
    const T* res = present(residual) ? residual->data_ptr<T>() : nullptr;
    normalize<T>(x.data_ptr<T>(), res, y.data_ptr<T>(), g, scale, shift, activation, static_cast<A>(slope));
  });
  return y;
}

// act(x) written over x, for an activation computed in vectors (activation_ids.h's computed_in_vectors: those
// lines read each vector of x before they write the same positions, so y may be x): what is left of a BN folded
// into the layer before it, on that layer's fresh output (dispatch.activation_pass). The table is the identity:
// scale 1, shift 0, so z = x exactly.
void activate_(at::Tensor x, int64_t activation, double slope) {
  TORCH_CHECK(computed_in_vectors(activation),
              "triton_bn_cpu: activate_ takes SiLU, GELU, GELU-tanh or sigmoid, not activation id ", activation);
  const Geometry g = geometry_of(x);  // an unsupported dtype: dispatch_dtype raises before anything is written
  if (x.numel() == 0) return;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const std::vector<A> scale(g.C, A(1)), shift(g.C, A(0));
    T* values = x.data_ptr<T>();
    normalize<T>(values, nullptr, values, g, scale, shift, activation, static_cast<A>(slope));
  });
}

std::vector<at::Tensor> triton_bn_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& stat, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                 double eps, bool batch_stats, int64_t activation, double slope, bool want_dx,
                                 bool want_dweight, bool want_dbias, bool want_dresidual) {
  const Geometry geometry = geometry_of(x);
  const int64_t C = geometry.C;
  check_like(grad_y, "grad_y", x);
  const bool has_residual = present(residual) && activation != kIdentity;
  if (has_residual) check_like(*residual, "residual", x);
  at::Tensor grad_x = want_dx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_residual = want_dresidual ? at::empty_like(x) : at::empty({0}, x.options());
  if (want_dx) check_like(grad_x, "grad_x", x);
  if (want_dresidual) check_like(grad_residual, "grad_residual", x);
  // dweight and dbias in the compute type (fp32, or double for a float64 x)
  const auto sums_options = x.options().dtype(compute_type_of(x));
  at::Tensor grad_weight = at::empty({want_dweight ? C : 0}, sums_options);
  at::Tensor grad_bias = at::empty({want_dbias ? C : 0}, sums_options);
  const bool need_sums = (want_dx && batch_stats) || want_dweight || want_dbias;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    BackwardCoefficients<A> k;
    k.mean = channel_values(mean, C, A(0));
    k.invstd = invstd_of(channel_values(stat, C, A(1)), batch_stats, eps);
    const std::vector<A> w = channel_values(weight, C, A(1));
    coefficients(k.mean, k.invstd, w, channel_values(bias, C, A(0)), k.scale, k.shift);
    const A aslope = static_cast<A>(slope);
    const T* dy = grad_y.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* res = has_residual ? residual->data_ptr<T>() : nullptr;
    backward<T>(dy, xp, res, want_dx ? grad_x.data_ptr<T>() : nullptr,
                want_dresidual ? grad_residual.data_ptr<T>() : nullptr,
                want_dweight ? grad_weight.data_ptr<A>() : nullptr, want_dbias ? grad_bias.data_ptr<A>() : nullptr,
                geometry, k, w, batch_stats, need_sums, activation, aslope);
  });
  return {grad_x, grad_weight, grad_bias, grad_residual};
}

// The ops take the two statistics by name, exactly one given: invstd (batch statistics) or the running
// variance (running statistics, a frozen table). The kernels read one vector and a flag saying which.
const at::Tensor& one_statistic(const c10::optional<at::Tensor>& invstd, const c10::optional<at::Tensor>& running_var,
                                bool& batch_stats) {
  TORCH_CHECK(present(invstd) != present(running_var),
              "triton_bn_cpu: give exactly one of invstd (batch statistics) and running_var (running ones)");
  batch_stats = present(invstd) != nullptr;
  return batch_stats ? *invstd : *running_var;
}

at::Tensor apply_op(const at::Tensor& x, const at::Tensor& mean, const c10::optional<at::Tensor>& invstd,
                    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, double eps,
                    int64_t activation, double slope) {
  bool batch_stats = false;
  const at::Tensor& stat = one_statistic(invstd, running_var, batch_stats);
  return apply(x, mean, stat, weight, bias, residual, eps, batch_stats, activation, slope);
}

// -- an eval call taken whole, its checks made here (functional.batch_norm's known eval call) ---------------
// What `functional.check_arguments` and `dispatch.batch_norm` decide for an eval call, answered in C++ for the
// plain case only: in Python those checks cost more host time than a small eval pass (the first touch of
// each tensor attribute from Python, perf/NOTES.md). An eval call writes nothing but y, so a call this
// refuses (an undefined result: None in Python) loses nothing: it goes the long way, which computes it or
// raises the documented error. Taken only when every one of these holds, else refused:
//   x: a plain dense CPU tensor (strided, no Python subclass dispatch, not nested), [N, C, *] with N*C*... > 0,
//      channels innermost or contiguous (native_cpu.serves), float64, or fp32/fp16/bf16 where the native
//      kernels serve those (kernel_dtypes: no Triton interpreter or stand-in driver, dispatch.backend_for);
//   running_mean, running_var: given; they, weight and bias (where given) [C] CPU tensors of one of the four
//      dtypes; nothing that needs a gradient (the autograd formula then records the call) and no running
//      statistic that requires grad with grad mode on (refused by functional);
//   residual: absent, or x's shape, strides and dtype (what the op takes as it is);
//   eps >= 0 (not NaN); activation one of the table's ids.
// (Whether torch.jit.trace records is asked in Python, before the call: inside an op the tracer has already
// recorded it and switched itself off.)
at::Tensor evaluate_call(const c10::optional<at::Tensor>& x_, const c10::optional<at::Tensor>& running_mean,
                         const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                         double eps, int64_t activation, double slope, bool kernel_dtypes) {
  const at::Tensor* x = present(x_);
  if (x == nullptr || !present(running_mean) || !present(running_var)) return {};
  const auto plain_cpu = [](const at::Tensor& t) {
    return t.layout() == at::kStrided && t.device().is_cpu() && !t.is_nested() &&
           !t.key_set().has(c10::DispatchKey::Python);
  };
  const at::ScalarType dtype = x->scalar_type();
  const bool dtype_served = dtype == at::kDouble ||
      (kernel_dtypes && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf));
  if (!dtype_served || !plain_cpu(*x) || x->dim() < 2 || x->numel() == 0) return {};
  if (!(x->is_contiguous() || channels_innermost(*x))) return {};
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && x->requires_grad()) return {};
  const int64_t C = x->size(1);
  for (const auto* t : {&running_mean, &running_var, &weight, &bias}) {
    const at::Tensor* p = present(*t);
    if (p == nullptr) continue;  // weight or bias absent (the statistics were checked above)
    const at::ScalarType s = p->scalar_type();
    if (!plain_cpu(*p) || p->dim() != 1 || p->size(0) != C || (grad_mode && p->requires_grad()) ||
        !(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf)) {
      return {};
    }
  }
  if (const at::Tensor* r = present(residual)) {
    if (!plain_cpu(*r) || r->sizes() != x->sizes() || r->strides() != x->strides() || r->scalar_type() != dtype ||
        (grad_mode && r->requires_grad())) {
      return {};
    }
  }
  if (!(eps >= 0) || !(activation >= 0 && activation < kActivationCount)) return {};
  return apply(*x, *present(running_mean), *present(running_var), weight, bias, residual, eps, false, activation,
               slope);
}

std::vector<at::Tensor> backward_op(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                    const c10::optional<at::Tensor>& invstd,
                                    const c10::optional<at::Tensor>& running_var,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& residual, double eps, int64_t activation,
                                    double slope, bool want_dx, bool want_dweight, bool want_dbias,
                                    bool want_dresidual) {
  bool batch_stats = false;
  const at::Tensor& stat = one_statistic(invstd, running_var, batch_stats);
  return triton_bn_backward(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, slope,
                            want_dx, want_dweight, want_dbias, want_dresidual);
}

// -- a training forward with its backward recorded in C++ ----------------------------------------------
// What triton_bn/autograd.py's TrainingBatchNormFunction does, with the node both devices share
// (csrc/node/batch_norm_backward.h): on a small layer the Python Function's forward and backward cost more
// host time than these kernels take (perf/NOTES.md). Same saved tensors (x, the mean and invstd in the
// compute type, weight, bias; the residual only when an activation follows it), same gradients, and the
// same refusal to be differentiated twice.

// The batch counted once the statistics are computed (a cumulative factor was read before the call).
void count_batch(const c10::optional<at::Tensor>& num_batches_tracked) {
  if (present(num_batches_tracked)) num_batches_tracked->add_(1);
}

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) { return present(t) ? *t : at::Tensor(); }
c10::optional<at::Tensor> optional(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

// The shared node with the CPU kernels behind it.
struct CpuBatchNormBackward : public triton_bn_node::BatchNormBackward {
  double eps = 0.0, slope = 0.0;
  int64_t activation = 0;

  std::string name() const override { return "BatchNormBackward (triton_bn native CPU)"; }

  std::array<at::Tensor, 4> run_kernels(const at::Tensor& grad_y, const triton_bn_node::SavedTensors& saved,
                                        const triton_bn_node::WantedGradients& wanted) override {
    auto grads = triton_bn_backward(grad_y, saved.x, saved.mean, saved.stat, optional(saved.weight),
                                    optional(saved.bias), optional(saved.residual), eps, true, activation, slope,
                                    wanted.x, wanted.weight, wanted.bias, wanted.residual);
    // dweight and dbias in the parameters' dtype (the kernels sum in the compute type)
    if (wanted.weight) grads[1] = grads[1].to(saved.weight.scalar_type());
    if (wanted.bias) grads[2] = grads[2].to(saved.bias.scalar_type());
    return {grads[0], grads[1], grads[2], grads[3]};
  }
};

at::Tensor training(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
                    double factor, double eps, int64_t activation, double slope) {
  auto y = std::get<0>(training_forward(x, weight, bias, residual, running_mean, running_var, factor, eps,
                                        activation, slope));
  count_batch(num_batches_tracked);
  return y;
}

// The Autograd kernel of `training`: the forward below the autograd key, then, where a gradient is needed,
// the node recorded on y.
at::Tensor training_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                             const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                             const c10::optional<at::Tensor>& num_batches_tracked, double factor, double eps,
                             int64_t activation, double slope) {
  const at::Tensor w = defined_or_empty(weight), b = defined_or_empty(bias), r = defined_or_empty(residual);
  triton_bn_node::refuse_forward_ad(x, w, b, r);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the kernels' outputs carry no history of their own
  auto [y, mean, invstd] = training_forward(x, weight, bias, residual, running_mean, running_var, factor, eps,
                                            activation, slope);
  count_batch(num_batches_tracked);
  if (!triton_bn_node::needs_gradient(x, w, b, r)) return y;
  auto node = triton_bn_node::make_node<CpuBatchNormBackward>();
  auto* cpu_node = static_cast<CpuBatchNormBackward*>(node.get());
  cpu_node->eps = eps;
  cpu_node->activation = activation;
  cpu_node->slope = slope;
  triton_bn_node::BatchNormBackward::record(node, y, x, w, b, r, mean, invstd, r.defined() && activation != kIdentity);
  return y;
}

// [fp32 lanes, double lanes] of the activations' vector type, as built (common.h): what tests and the bench
// read to show which ISA the build took.
std::vector<int64_t> vector_lanes() { return {activation_lanes_float(), activation_lanes_double()}; }

}  // namespace
}  // namespace triton_bn_cpu

using namespace triton_bn_cpu;

TORCH_LIBRARY(triton_bn_cpu, m) {
  m.def("training_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float factor, float eps, int activation, float slope) -> (Tensor, Tensor, Tensor)",
        &training_forward);
  m.def("apply(Tensor x, Tensor mean, Tensor? invstd, Tensor? running_var, Tensor? weight, Tensor? bias, "
        "Tensor? residual, float eps, int activation, float slope) -> Tensor", &apply_op);
  // functional.batch_norm's known eval call: y, or an undefined tensor (None) where the long way must decide
  m.def("evaluate_call(Tensor? x, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias, "
        "Tensor? residual, float eps, int activation, float slope, bool kernel_dtypes) -> Tensor", &evaluate_call);
  m.def("backward(Tensor grad_y, Tensor x, Tensor mean, Tensor? invstd, Tensor? running_var, Tensor? weight, "
        "Tensor? bias, Tensor? residual, float eps, int activation, float slope, bool want_dx, "
        "bool want_dweight, bool want_dbias, bool want_dresidual) -> Tensor[]", &backward_op);
  // training_forward + counting the batch, differentiable: its autograd kernel records CpuBatchNormBackward
  m.def("training(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float factor, float eps, int activation, "
        "float slope) -> Tensor");
  m.def("activate_(Tensor(a!) x, int activation, float slope) -> ()", &activate_);
  m.def("vector_lanes() -> int[]", &vector_lanes);
}

TORCH_LIBRARY_IMPL(triton_bn_cpu, CPU, m) { m.impl("training", &training); }
TORCH_LIBRARY_IMPL(triton_bn_cpu, Autograd, m) { m.impl("training", &training_autograd); }
