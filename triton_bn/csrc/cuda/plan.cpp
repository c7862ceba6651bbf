// A plan: reading the flat encoding cpp_launch.py writes, checking a call against it, executing it.
#include "plan.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <mutex>

namespace triton_bn_cuda {
namespace {

// A reader of the flat integer lists, with a bound check on every read: a malformed plan is an error
// here, never a launch with garbage parameters.
class Reader {
 public:
  explicit Reader(const std::vector<int64_t>& values) : values_(values) {}
  int64_t next() {
    TORCH_CHECK(position_ < values_.size(), "triton_bn: a malformed plan (truncated)");
    return values_[position_++];
  }
  bool done() const { return position_ == values_.size(); }

 private:
  const std::vector<int64_t>& values_;
  size_t position_ = 0;
};

int64_t checked_slot(int64_t slot) {
  TORCH_CHECK(slot >= 0 && slot < kSlots, "triton_bn: a plan names slot ", slot);
  return slot;
}

bool aligned(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

}  // namespace

Plan::Plan(std::vector<int64_t> expectations, std::vector<int64_t> outputs, std::vector<int64_t> launches,
           std::vector<double> reals, std::vector<std::string> names, std::vector<at::Tensor> persistent,
           at::Device device)
    : persistent_(std::move(persistent)), device_(device) {
  for (const at::Tensor& t : persistent_) {
    TORCH_CHECK(t.device() == device_, "triton_bn: a plan for ", device_, " holds a buffer on ", t.device());
  }
  TORCH_CHECK(static_cast<int64_t>(persistent_.size()) <= kSlots - kFirstPersistent,
              "triton_bn: a plan with too many persistent buffers");
  Reader expect(expectations);
  while (!expect.done()) {
    Expectation e;
    e.slot = checked_slot(expect.next());
    e.defined = expect.next() != 0;
    e.dtype = expect.next();
    e.aligned = expect.next() != 0;
    const int64_t ndim = expect.next();
    for (int64_t d = 0; d < ndim; ++d) e.sizes.push_back(expect.next());
    for (int64_t d = 0; d < ndim; ++d) e.strides.push_back(expect.next());
    expectations_.push_back(std::move(e));
  }
  Reader out(outputs);
  while (!out.done()) {
    Output o;
    o.slot = checked_slot(out.next());
    const int64_t allocation = out.next();
    TORCH_CHECK(allocation >= kLikeX && allocation <= kScratch, "triton_bn: a plan names allocation ", allocation);
    o.allocation = static_cast<Allocation>(allocation);
    o.numel = out.next();
    o.workspace_offset = -1;
    if (o.allocation == kPerChannel || o.allocation == kScratch) {
      // each piece starts on a 16-byte boundary: as aligned as an allocation of its own, which is what the
      // compiled variants were specialized for
      o.workspace_offset = workspace_numel_;
      workspace_numel_ += (o.numel + 3) / 4 * 4;
    }
    outputs_.push_back(o);
  }
  Reader launch(launches);
  size_t real = 0;
  while (!launch.done()) {
    Launch l;
    TORCH_CHECK(launches_.size() < names.size(), "triton_bn: a plan has fewer kernel names than launches");
    l.name = names[launches_.size()];
    l.function = launch.next();
    for (auto& g : l.grid) g = launch.next();
    l.block = launch.next();
    l.shared = launch.next();
    const int64_t count = launch.next();
    for (int64_t i = 0; i < count; ++i) {
      Param p{};
      const int64_t kind = launch.next();
      TORCH_CHECK(kind >= kPointer && kind <= kNullPointer, "triton_bn: a plan names parameter kind ", kind);
      p.kind = static_cast<ParamKind>(kind);
      p.slot = launch.next();
      p.integer = launch.next();
      if (p.kind == kPointer) checked_slot(p.slot);
      if (p.kind == kF32) {
        TORCH_CHECK(real < reals.size(), "triton_bn: a plan has fewer fp32 values than fp32 parameters");
        p.real = reals[real++];
      }
      l.params.push_back(p);
    }
    launches_.push_back(std::move(l));
  }
}

bool Plan::matches(const std::array<at::Tensor, kSlots>& tensors) const {
  const at::Device device = tensors[kX].device();
  if (device != device_) return false;
  for (const Expectation& e : expectations_) {
    const at::Tensor& t = tensors[e.slot];
    if (t.defined() != e.defined) return false;
    if (!e.defined) continue;
    if (static_cast<int64_t>(t.scalar_type()) != e.dtype || t.device() != device || t.sizes() != at::IntArrayRef(e.sizes) ||
        t.strides() != at::IntArrayRef(e.strides) || aligned(t) != e.aligned) {
      return false;
    }
  }
  return true;
}

namespace {
// values [offset, offset + numel) of a 1-D workspace as a tensor of their own, sharing its storage: built
// directly, as at::empty builds a tensor, because a view through the dispatcher (narrow, as_strided) costs
// more host time than the allocation it saves
at::Tensor slice_of(const at::Tensor& workspace, int64_t offset, int64_t numel) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(workspace.storage()), workspace.key_set(),
                                                   workspace.dtype());
  impl->set_sizes_contiguous({numel});
  impl->set_storage_offset(workspace.storage_offset() + offset);
  return at::Tensor(std::move(impl));
}
}  // namespace

void Plan::run(std::array<at::Tensor, kSlots>& tensors, const std::vector<double>& scalars) const {
  const at::Tensor& x = tensors[kX];
  for (size_t i = 0; i < persistent_.size(); ++i) tensors[kFirstPersistent + i] = persistent_[i];
  // One allocation for the per-channel outputs (mean, invstd) and the scratch, each a slice of it: on a GPU
  // every allocation is a trip through the caching allocator, and a layer's training forward needs three.
  const at::Tensor workspace =
      workspace_numel_ > 0 ? at::empty({workspace_numel_}, x.options().dtype(at::kFloat)) : at::Tensor();
  for (const Output& o : outputs_) {
    switch (o.allocation) {
      case kLikeX: tensors[o.slot] = at::empty_like(x); break;  // x is dense: empty_like keeps its strides
      case kPerChannel:
      case kScratch: tensors[o.slot] = slice_of(workspace, o.workspace_offset, o.numel); break;
      case kLikeWeight: tensors[o.slot] = at::empty_like(tensors[kWeight]); break;
      case kLikeBias: tensors[o.slot] = at::empty_like(tensors[kBias]); break;
    }
  }
  std::vector<uint64_t> words;
  std::vector<void*> pointers;
  for (const Launch& l : launches_) {
    words.assign(l.params.size(), 0);
    pointers.resize(l.params.size());
    for (size_t i = 0; i < l.params.size(); ++i) {
      const Param& p = l.params[i];
      switch (p.kind) {
        case kPointer: {
          const at::Tensor& t = tensors[p.slot];
          TORCH_CHECK(t.defined(), "triton_bn: ", l.name, " needs slot ", p.slot, ", which this call left empty");
          words[i] = reinterpret_cast<uint64_t>(t.data_ptr());
          break;
        }
        case kNullPointer: words[i] = 0; break;
        case kI32: {
          const int32_t v = static_cast<int32_t>(p.integer);
          std::memcpy(&words[i], &v, sizeof(v));
          break;
        }
        case kI64: words[i] = static_cast<uint64_t>(p.integer); break;
        case kI8: {
          const int8_t v = static_cast<int8_t>(p.integer);
          std::memcpy(&words[i], &v, sizeof(v));
          break;
        }
        case kF32: {
          TORCH_CHECK(p.slot < static_cast<int64_t>(scalars.size()), "triton_bn: ", l.name, " needs scalar ", p.slot);
          const float v = static_cast<float>(p.slot >= 0 ? scalars[p.slot] : p.real);
          std::memcpy(&words[i], &v, sizeof(v));
          break;
        }
      }
      pointers[i] = &words[i];  // the driver reads each parameter's bytes from its own slot
    }
    launch(l, pointers.data(), words, x.device());
  }
}

namespace {
std::mutex registry_mutex;
std::vector<std::shared_ptr<const Plan>> registry;
}  // namespace

int64_t register_plan(std::shared_ptr<const Plan> plan) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(std::move(plan));
  return static_cast<int64_t>(registry.size()) - 1;
}

void forget_registered_plans() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.clear();
}

std::shared_ptr<const Plan> plan_of(int64_t handle) {
  if (handle < 0) return nullptr;
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle < static_cast<int64_t>(registry.size()), "triton_bn: no plan ", handle);
  return registry[handle];
}

}  // namespace triton_bn_cuda
