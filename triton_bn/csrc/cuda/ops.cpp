// The eager GPU path's ops (torch.ops.triton_bn_cuda.*): one call per forward, which checks the call
// against its plan, runs it, and when a gradient is needed records a C++ autograd node whose backward runs
// the backward plan. No Python runs in either, beyond the module's forward and its one call.
//
//   training(x, weight?, bias?, residual?, running_mean!?, running_var!?, num_batches_tracked!?, eps,
//            momentum, negative_slope, activation, cumulative) -> [y] or []
//                                  a training forward: statistics, running update, normalization (and the
//                                  batch counted)
//   apply(x, mean, stat, weight?, bias?, residual?, eps, negative_slope, activation) -> [y] or []
//                                  y from given statistics (eval, FrozenBatchNorm)
//   remember_training / remember_apply(the same tensors and flags, forward, backward): the plans (handles
//                                  from make_plan; backward -1: none) of calls like this one
// An empty result means no plan was made for a call like this one yet: the caller writes one and
// remembers it. The saved tensors are those of triton_bn/autograd.py: x and the per-channel vectors,
// the residual only when an activation follows it. python.cpp binds the two forward calls (run_training,
// run_apply: ops.h) for Python directly as well: cpp_launch.py calls those where they were built.
#include "ops.h"
#include "plan.h"
#include "../node/batch_norm_backward.h"

#include <torch/library.h>

#include <mutex>
#include <unordered_map>

namespace triton_bn_cuda {
namespace {

using torch::autograd::variable_list;
using Slots = std::array<at::Tensor, kSlots>;
using PlanPtr = std::shared_ptr<const Plan>;

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? *t : at::Tensor();
}

bool needs_gradient(const Slots& slots) {
  return triton_bn_node::needs_gradient(slots[kX], slots[kWeight], slots[kBias], slots[kResidual]);
}

// The backward of both ops is the node both devices share (csrc/node/batch_norm_backward.h); here its
// kernels are the backward plan's launches: the slots filled back in from the saved tensors and dy, the
// plan run, the gradients read off its output slots.
struct CudaBatchNormBackward : public triton_bn_node::BatchNormBackward {
  PlanPtr plan;
  std::vector<double> scalars;

  std::string name() const override { return "BatchNormBackward (triton_bn C++ launch path)"; }

  // the backward plan was made for a dy in x's strides and dtype, 16-byte aligned
  bool takes_grad_as_is(const at::Tensor& grad_y, const at::Tensor& x) const override {
    return BatchNormBackward::takes_grad_as_is(grad_y, x) && (reinterpret_cast<uintptr_t>(grad_y.data_ptr()) & 15) == 0;
  }

  std::array<at::Tensor, 4> run_kernels(const at::Tensor& grad_y, const triton_bn_node::SavedTensors& saved,
                                        const triton_bn_node::WantedGradients&) override {
    Slots slots;  // the plan computes the gradients it was made for: those asked for when it was written
    slots[kX] = saved.x;
    slots[kMean] = saved.mean;
    slots[kStat] = saved.stat;
    slots[kWeight] = saved.weight;
    slots[kBias] = saved.bias;
    slots[kResidual] = saved.residual;
    slots[kGradY] = grad_y;
    TORCH_CHECK(plan->matches(slots), "triton_bn: the backward plan does not fit the saved tensors");
    plan->run(slots, scalars);
    return {slots[kGradX], slots[kGradWeight], slots[kGradBias], slots[kGradResidual]};
  }
};

// -- finding a call's plans --------------------------------------------------------------------------------
// Plans are found by a key C++ computes from the call (every given tensor's dtype, sizes, strides, alignment
// and, under grad mode, requires_grad; the call's flags; the stream): a call costs no Python beyond its one
// op call. A key names candidates, and a candidate serves only if its plan matches the call exactly (the
// device included: the same call on two devices has one key and two plans). A miss
// returns no result; Python then writes the plans and remembers them here (remember_*).
enum Kind : int64_t { kTraining = 0, kApply = 1 };

struct Entry {
  PlanPtr forward, backward;  // backward null: none (a call that needs no gradient)
};
std::mutex table_mutex;
std::unordered_map<uint64_t, std::vector<Entry>> table;

void mix(uint64_t& h, uint64_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); }

uint64_t call_key(const Slots& slots, Kind kind, int64_t flags) {
  uint64_t h = static_cast<uint64_t>(kind) * 1000003ULL + static_cast<uint64_t>(flags);
  const bool grad_mode = at::GradMode::is_enabled();
  mix(h, grad_mode);
  for (int64_t slot = 0; slot < kY; ++slot) {
    const at::Tensor& t = slots[slot];
    if (!t.defined()) {
      mix(h, 0x5bd1e995ULL + slot);
      continue;
    }
    mix(h, static_cast<uint64_t>(t.scalar_type()) * 64 + slot);
    for (int64_t size : t.sizes()) mix(h, static_cast<uint64_t>(size));
    for (int64_t stride : t.strides()) mix(h, static_cast<uint64_t>(stride));
    mix(h, (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0);
    mix(h, grad_mode && t.requires_grad());
  }
  mix(h, current_stream(slots[kX].device()));
  return h;
}

// The entry whose plans serve this call (forward null: none).
Entry find(const Slots& slots, Kind kind, int64_t flags) {
  if (capturing(slots[kX].device())) return {};
  const uint64_t key = call_key(slots, kind, flags);
  const bool gradient = needs_gradient(slots);
  std::lock_guard<std::mutex> lock(table_mutex);
  auto it = table.find(key);
  if (it == table.end()) return {};
  for (const Entry& e : it->second) {
    if ((!gradient || e.backward) && e.forward->matches(slots)) return e;
  }
  return {};
}

void remember(const Slots& slots, Kind kind, int64_t flags, int64_t forward, int64_t backward) {
  Entry entry{plan_of(forward), plan_of(backward)};
  TORCH_CHECK(entry.forward->matches(slots), "triton_bn: a plan remembered for a call it does not match");
  const uint64_t key = call_key(slots, kind, flags);
  std::lock_guard<std::mutex> lock(table_mutex);
  table[key].push_back(std::move(entry));
}

// Every call kind forgotten, and every plan handle: Python writes plans again for the calls that follow
// (cpp_launch.forget_plans: the tuner's answers changed, or the tables reached their bound). A node
// recorded before keeps its backward plan alive through its own pointer.
void forget_plans() {
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    table.clear();
  }
  forget_registered_plans();
}

// The call's scalars, in the order plan_numbering.py numbers them (a plan's fp32 parameter names its index).
static_assert(kEps == 0 && kMomentum == 1 && kNegativeSlope == 2, "scalars are {eps, momentum, negative_slope}");

// Run the forward plan; where a gradient is needed (find made sure there is a backward plan) record the node.
at::Tensor run_with_node(Slots& slots, const Entry& plans, const std::vector<double>& scalars, int64_t activation) {
  if (!needs_gradient(slots)) {
    plans.forward->run(slots, scalars);
    return slots[kY];
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;  // the kernels' outputs carry no history of their own
    plans.forward->run(slots, scalars);
  }
  auto node = triton_bn_node::make_node<CudaBatchNormBackward>();
  auto* cuda_node = static_cast<CudaBatchNormBackward*>(node.get());
  cuda_node->plan = plans.backward;
  cuda_node->scalars = scalars;
  // the residual only where an activation follows the add (act'(z) reads it); else d residual = dz
  triton_bn_node::BatchNormBackward::record(node, slots[kY], slots[kX], slots[kWeight], slots[kBias],
                                            slots[kResidual], slots[kMean], slots[kStat], activation != 0);
  return slots[kY];
}

Slots training_slots(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                     const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                     const c10::optional<at::Tensor>& num_batches_tracked) {
  Slots slots;
  slots[kX] = x;
  slots[kWeight] = defined_or_empty(weight);
  slots[kBias] = defined_or_empty(bias);
  slots[kResidual] = defined_or_empty(residual);
  slots[kRunningMean] = defined_or_empty(running_mean);
  slots[kRunningVar] = defined_or_empty(running_var);
  slots[kNumBatches] = defined_or_empty(num_batches_tracked);
  return slots;
}

Slots apply_slots(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual) {
  Slots slots;
  slots[kX] = x;
  slots[kMean] = mean;
  slots[kStat] = stat;
  slots[kWeight] = defined_or_empty(weight);
  slots[kBias] = defined_or_empty(bias);
  slots[kResidual] = defined_or_empty(residual);
  return slots;
}

int64_t training_flags(int64_t activation, bool cumulative) { return activation * 2 + cumulative; }

// The dispatcher's form of run_training / run_apply (below): [y], or [] where no plan takes the call.
std::vector<at::Tensor> listed(at::Tensor y) {
  if (!y.defined()) return {};
  return {std::move(y)};
}

std::vector<at::Tensor> training(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var,
                                 const c10::optional<at::Tensor>& num_batches_tracked, double eps, double momentum,
                                 double negative_slope, int64_t activation, bool cumulative) {
  return listed(run_training(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, eps,
                             momentum, negative_slope, activation, cumulative));
}

void remember_training(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                       const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                       const c10::optional<at::Tensor>& num_batches_tracked, int64_t activation, bool cumulative,
                       int64_t forward, int64_t backward) {
  remember(training_slots(x, weight, bias, residual, running_mean, running_var, num_batches_tracked), kTraining,
           training_flags(activation, cumulative), forward, backward);
}

std::vector<at::Tensor> apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                              const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& residual, double eps, double negative_slope,
                              int64_t activation) {
  return listed(run_apply(x, mean, stat, weight, bias, residual, eps, negative_slope, activation));
}

void remember_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, int64_t activation, int64_t forward,
                    int64_t backward) {
  remember(apply_slots(x, mean, stat, weight, bias, residual), kApply, activation, forward, backward);
}

int64_t make_plan(std::vector<int64_t> expectations, std::vector<int64_t> outputs, std::vector<int64_t> launches,
                  std::vector<double> reals, std::vector<std::string> names, std::vector<at::Tensor> persistent,
                  at::Device device) {
  return register_plan(std::make_shared<const Plan>(std::move(expectations), std::move(outputs), std::move(launches),
                                                    std::move(reals), std::move(names), std::move(persistent),
                                                    device));
}

int64_t plan_launches(int64_t handle) { return plan_of(handle)->launch_count(); }

void set_driver_op(const std::string& mode) { set_driver(mode); }
std::string driver_op() { return driver(); }
std::string recorded_op() { return recorded_json(); }
void clear_recorded_op() { clear_recorded(); }

}  // namespace

at::Tensor run_training(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        const c10::optional<at::Tensor>& num_batches_tracked, double eps, double momentum,
                        double negative_slope, int64_t activation, bool cumulative) {
  Slots slots = training_slots(x, weight, bias, residual, running_mean, running_var, num_batches_tracked);
  triton_bn_node::refuse_forward_ad(slots[kX], slots[kWeight], slots[kBias], slots[kResidual]);
  const Entry plans = find(slots, kTraining, training_flags(activation, cumulative));
  if (!plans.forward) return {};
  return run_with_node(slots, plans, {eps, momentum, negative_slope}, activation);
}

at::Tensor run_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& residual, double eps, double negative_slope,
                     int64_t activation) {
  Slots slots = apply_slots(x, mean, stat, weight, bias, residual);
  triton_bn_node::refuse_forward_ad(slots[kX], slots[kWeight], slots[kBias], slots[kResidual]);
  const Entry plans = find(slots, kApply, activation);
  if (!plans.forward) return {};
  return run_with_node(slots, plans, {eps, 0.0, negative_slope}, activation);
}

}  // namespace triton_bn_cuda

using namespace triton_bn_cuda;

TORCH_LIBRARY(triton_bn_cuda, m) {
  m.def("make_plan(int[] expectations, int[] outputs, int[] launches, float[] reals, str[] names, "
        "Tensor[] persistent, Device device) -> int", &make_plan);
  m.def("plan_launches(int plan) -> int", &plan_launches);
  m.def("training(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float eps, float momentum, float negative_slope, "
        "int activation, bool cumulative) -> Tensor[]");
  m.def("remember_training(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
        "Tensor? running_var, Tensor? num_batches_tracked, int activation, bool cumulative, int forward, "
        "int backward) -> ()");
  m.def("apply(Tensor x, Tensor mean, Tensor stat, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
        "float negative_slope, int activation) -> Tensor[]");
  m.def("remember_apply(Tensor x, Tensor mean, Tensor stat, Tensor? weight, Tensor? bias, Tensor? residual, "
        "int activation, int forward, int backward) -> ()");
  m.def("forget_plans() -> ()", &forget_plans);
  m.def("set_driver(str mode) -> ()", &set_driver_op);
  m.def("driver() -> str", &driver_op);
  m.def("recorded() -> str", &recorded_op);
  m.def("clear_recorded() -> ()", &clear_recorded_op);
}

// One kernel for every device and for autograd: the node is made here when a gradient is needed (the CPU
// key serves the stand-in drivers' tests, which run this path on CPU tensors).
TORCH_LIBRARY_IMPL(triton_bn_cuda, CompositeImplicitAutograd, m) {
  m.impl("training", &training);
  m.impl("remember_training", &remember_training);
  m.impl("apply", &apply);
  m.impl("remember_apply", &remember_apply);
}
