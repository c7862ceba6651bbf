// The native CPU kernels on an Arm CPU, emulated: built for aarch64 (NEON) by tools/check_aarch64.py --run,
// linked with torch's aarch64 libraries and run under qemu-aarch64. Each kernel entry point (the
// triton_bn_cpu ops: training_forward, apply, backward) is called through PyTorch's dispatcher, as the
// Python layer calls it, and compared with a float64 reference that ATen computes in the same process
// (native_batch_norm and its backward, ATen's activations and their backward functions) on the same
// rounded inputs. Every dtype, three layouts (NCHW, channels_last, [N, C]), every activation, a residual.
// Prints one line per failing case and a summary; exits 1 when any case is off by more than its dtype's
// tolerance, relative to the reference's largest magnitude (the same kind of bound tests/ uses).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

c10::Stack call(const char* name, c10::Stack stack) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack;
}

const char* kActivations[] = {"identity", "relu", "leaky_relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish",
                              "sigmoid"};
constexpr double kSlope = 0.01;

at::Tensor activate(const at::Tensor& z, int64_t act) {
  switch (act) {
    case 0: return z;
    case 1: return at::relu(z);
    case 2: return at::leaky_relu(z, kSlope);
    case 3: return at::hardtanh(z, 0, 6);
    case 4: return at::silu(z);
    case 5: return at::gelu(z);
    case 6: return at::gelu(z, "tanh");
    case 7: return at::hardswish(z);
    default: return at::sigmoid(z);
  }
}

// dL/dz from dL/dy for y = act(z)
at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& z, int64_t act) {
  switch (act) {
    case 0: return g;
    case 1: return at::threshold_backward(g, at::relu(z), 0);
    case 2: return at::leaky_relu_backward(g, z, kSlope, false);
    case 3: return at::hardtanh_backward(g, z, 0, 6);
    case 4: return at::silu_backward(g, z);
    case 5: return at::gelu_backward(g, z);
    case 6: return at::gelu_backward(g, z, "tanh");
    case 7: return at::hardswish_backward(g, z);
    default: return at::sigmoid_backward(g, at::sigmoid(z));
  }
}

double tolerance(at::ScalarType dtype, bool backward) {
  switch (dtype) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return backward ? 1e-4 : 2e-5;
    case at::kHalf: return backward ? 1e-2 : 4e-3;
    default: return backward ? 6e-2 : 3e-2;  // bf16
  }
}

int failures = 0, checks = 0;

void expect_close(const at::Tensor& got, const at::Tensor& expected, double tol, const std::string& what) {
  ++checks;
  const at::Tensor g = got.to(at::kDouble), e = expected.to(at::kDouble);
  const double scale = std::max(e.abs().max().item<double>(), 1e-300);
  const double error = (g - e).abs().max().item<double>() / scale;
  const bool finite = g.isfinite().all().item<bool>();
  if (!(error <= tol) || !finite || g.sizes() != e.sizes()) {
    ++failures;
    std::printf("FAILED %s: relative error %.3g > %.3g%s\n", what.c_str(), error, tol, finite ? "" : " (not finite)");
  }
}

void run_case(at::ScalarType dtype, const std::string& layout, int64_t act, bool with_residual) {
  const std::vector<int64_t> shape = layout == "2d" ? std::vector<int64_t>{24, 37} : std::vector<int64_t>{4, 20, 5, 7};
  const int64_t C = shape[1];
  const auto as_layout = [&](const at::Tensor& t) {
    return layout == "channels_last" ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
  };
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // inputs rounded to dtype first; the reference reads the rounded values in float64
  const at::Tensor x = as_layout((at::randn(shape, at::kDouble) * 2 + 0.5).to(dtype));
  const at::Tensor weight = (at::rand({C}, at::kDouble) + 0.5).to(dtype), bias = at::randn({C}, at::kDouble).to(dtype);
  const at::Tensor residual = with_residual ? as_layout(at::randn(shape, at::kDouble).to(dtype)) : at::Tensor();
  const at::Tensor grad_y = as_layout(at::randn(shape, at::kDouble).to(dtype));
  const at::Tensor running_mean = at::randn({C}, at::kDouble).to(compute);
  const at::Tensor running_var = (at::rand({C}, at::kDouble) + 0.5).to(compute);
  const at::Tensor x64 = x.to(at::kDouble), w64 = weight.to(at::kDouble), b64 = bias.to(at::kDouble);
  const at::Tensor r64 = with_residual ? residual.to(at::kDouble) : at::Tensor();
  const double eps = 1e-5, momentum = 0.1;
  const std::string name = std::string(c10::toString(dtype)) + " " + layout + " " + kActivations[act] +
                           (with_residual ? " + residual" : "");
  const c10::IValue none;
  const c10::IValue res = with_residual ? c10::IValue(residual) : none;

  // training forward: y, the batch statistics, the running statistics moved
  at::Tensor rm64 = running_mean.to(at::kDouble).clone(), rv64 = running_var.to(at::kDouble).clone();  // (a copy: float64 stays the same tensor)
  auto [bn64, save_mean, save_invstd] = at::native_batch_norm(x64, w64, b64, rm64, rv64, true, momentum, eps);
  const at::Tensor z64 = with_residual ? bn64 + r64 : bn64;
  at::Tensor rm = running_mean.clone(), rv = running_var.clone();
  auto out = call("triton_bn_cpu::training_forward",
                  {x, weight, bias, res, rm, rv, momentum, eps, act, kSlope});
  const at::Tensor y = out[0].toTensor(), mean = out[1].toTensor(), invstd = out[2].toTensor();
  expect_close(y, activate(z64, act), tolerance(dtype, false), name + ": training forward y");
  expect_close(mean, save_mean, tolerance(dtype, false), name + ": batch mean");
  expect_close(invstd, save_invstd, tolerance(dtype, false), name + ": batch invstd");
  expect_close(rm, rm64, tolerance(dtype, false), name + ": running mean");
  expect_close(rv, rv64, tolerance(dtype, false), name + ": running var");

  // backward of the training forward (the batch statistics), every gradient
  const at::Tensor dz64 = activation_backward(grad_y.to(at::kDouble), z64, act);
  auto [dx64, dw64, db64] = at::native_batch_norm_backward(dz64, x64, w64, running_mean.to(at::kDouble),
                                                            running_var.to(at::kDouble), save_mean, save_invstd,
                                                            true, eps, {true, true, true});
  auto grads = call("triton_bn_cpu::backward", {grad_y, x, mean, invstd, none, weight, bias, res, eps, act, kSlope,
                                                true, true, true, with_residual})[0].toTensorVector();
  expect_close(grads[0], dx64, tolerance(dtype, true), name + ": grad x");
  expect_close(grads[1], dw64, tolerance(dtype, true), name + ": grad weight");
  expect_close(grads[2], db64, tolerance(dtype, true), name + ": grad bias");
  if (with_residual) expect_close(grads[3], dz64, tolerance(dtype, true), name + ": grad residual");

  // eval: the running statistics
  const at::Tensor eval64 = std::get<0>(at::native_batch_norm(x64, w64, b64, running_mean.to(at::kDouble),
                                                              running_var.to(at::kDouble), false, momentum, eps));
  const at::Tensor y_eval = call("triton_bn_cpu::apply", {x, running_mean, none, running_var, weight, bias, res, eps,
                                                          act, kSlope})[0].toTensor();
  expect_close(y_eval, activate(with_residual ? eval64 + r64 : eval64, act), tolerance(dtype, false),
               name + ": eval y");
  if (y.suggest_memory_format() != x.suggest_memory_format() ||
      y_eval.suggest_memory_format() != x.suggest_memory_format()) {
    ++failures;
    std::printf("FAILED %s: the output's memory format is not the input's\n", name.c_str());
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  at::set_num_threads(2);  // the parallel loops split rows and channels between threads
  const auto lanes = call("triton_bn_cpu::vector_lanes", {})[0].toIntVector();
  std::printf("aarch64 (emulated): activation vectors of %lld fp32 / %lld double lanes, %d threads\n",
              static_cast<long long>(lanes[0]), static_cast<long long>(lanes[1]), at::get_num_threads());
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (const std::string layout : {"nchw", "channels_last", "2d"}) {
      for (int64_t act = 0; act < 9; ++act) run_case(dtype, layout, act, false);
      for (const int64_t act : {0, 1, 4}) run_case(dtype, layout, act, true);
    }
  }
  std::printf("aarch64 (emulated): %d of %d checks within tolerance\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
