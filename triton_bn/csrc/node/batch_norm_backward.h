// The one C++ autograd node of triton_bn's batch norm, for both devices: the native CPU op
// (csrc/cpu/ops.cpp) and the C++ launch path for CUDA tensors (csrc/cuda/ops.cpp) record this node, and
// only the kernels behind it differ (a subclass's run_kernels: the CPU kernels, or the backward plan's
// launches). Header-only, because each device's library is built on its own (build.py); both include it.
//
// Written as PyTorch's own generated nodes are, not as a torch::autograd::Function: a Function's context,
// saved-data map and output bookkeeping cost microseconds per call on a small layer. What it keeps is the
// saved-tensor policy of triton_bn/autograd.py:
//   - saved: x itself (never a copy, never y), the per-channel mean and stat (invstd in training, the running
//     variance in eval), weight and bias; the residual only when an activation follows the add (act'(z)
//     reads it; without one, d residual = dz). They are SavedVariables: version counters checked (an input
//     modified in place before the backward is an error, not a wrong gradient), saved-tensor hooks applied,
//     freed with the graph (release_variables).
//   - next edges: x, weight, bias, residual, in that order (an absent one an empty edge); only the
//     gradients autograd asks for (should_compute_output) are computed.
//   - once differentiable: under create_graph the gradients come back behind a node that raises if
//     anything differentiates through them (the formula is not differentiable again; a silent zero would
//     drop terms), as Python's torch.autograd.function.once_differentiable does.
//   - forward-mode AD (dual tensors) is refused with an error, never silently dropped.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

namespace triton_bn_node {

using torch::autograd::variable_list;

// How autograd holds its nodes: std::shared_ptr up to torch 2.12 (the GPU image's 2.11 among them),
// c10::intrusive_ptr from the release after pytorch/pytorch#181782 (torch 2.13, CI's). Read off the edge
// type, so that one source builds against either.
using NodePtr = std::decay_t<decltype(std::declval<torch::autograd::Edge>().function)>;

template <class T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // PyTorch's deleter, as its own code uses (it frees a long chain of nodes without deep recursion),
    // named through argument-dependent lookup: torch versions without it still compile this template
    return std::shared_ptr<T>(new T(), [](auto* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// The tensors a backward reads, unpacked from the node's SavedVariables (undefined where absent).
struct SavedTensors {
  at::Tensor x, mean, stat, weight, bias, residual;
};

// Which of (dx, dweight, dbias, d residual) autograd asks for.
struct WantedGradients {
  bool x, weight, bias, residual;
};

// The gradients are not differentiable again: see the header comment.
inline variable_list once_differentiable(variable_list grads, const variable_list& grad_outputs) {
  if (!at::GradMode::is_enabled() || std::none_of(grad_outputs.begin(), grad_outputs.end(), [](const at::Tensor& g) {
        return g.defined() && g.requires_grad();
      })) {
    return grads;
  }
  variable_list detached;
  for (auto& g : grads) detached.push_back(g.defined() ? g.detach().requires_grad_(true) : at::Tensor());
  torch::autograd::DelayedError error("triton_bn: the batch-norm gradient is not differentiable again "
                                      "(trying to differentiate twice)", static_cast<int64_t>(detached.size()));
  return error.apply(std::move(detached));
}

// Whether a call must record the node: grad mode on and any differentiable input requiring a gradient.
inline bool needs_gradient(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& residual) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : {&x, &weight, &bias, &residual}) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// Forward-mode AD has no formula here: a dual input is an error before anything runs or is written.
inline void refuse_forward_ad(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& residual) {
  for (const at::Tensor* t : {&x, &weight, &bias, &residual}) {
    TORCH_CHECK(!torch::autograd::isFwGradDefined(*t),
                "triton_bn: forward-mode AD (dual tensors, torch.func.jvp) is not supported by triton_bn's batch "
                "norm; use torch.nn.BatchNorm for it");
  }
}

class BatchNormBackward : public torch::autograd::Node {
 public:
  // The device's kernels: dy (already in x's dtype and strides) and the saved tensors in; (dx, dweight,
  // dbias, d residual) out, each defined where wanted.
  virtual std::array<at::Tensor, 4> run_kernels(const at::Tensor& grad_y, const SavedTensors& saved,
                                                const WantedGradients& wanted) = 0;

  // Whether dy can go to the kernels as it arrives; else it is copied into x's dtype and strides first (a
  // gradient arrives in any layout: sum().backward() sends an expanded one). A device may ask for more.
  virtual bool takes_grad_as_is(const at::Tensor& grad_y, const at::Tensor& x) const {
    return grad_y.scalar_type() == x.scalar_type() && grad_y.strides() == x.strides();
  }

  // Save what the backward reads and attach the node (``self``, the owning pointer make_node gave) to y.
  // Call after the forward's kernels ran below the autograd key (at::AutoDispatchBelowADInplaceOrView),
  // once needs_gradient said so.
  static void record(const NodePtr& self, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& mean,
                     const at::Tensor& stat, bool keep_residual) {
    auto* node = static_cast<BatchNormBackward*>(self.get());
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, residual));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->mean_ = torch::autograd::SavedVariable(mean, false);
    node->stat_ = torch::autograd::SavedVariable(stat, false);
    node->weight_ = torch::autograd::SavedVariable(weight, false);
    node->bias_ = torch::autograd::SavedVariable(bias, false);
    node->residual_ = torch::autograd::SavedVariable(keep_residual ? residual : at::Tensor(), false);
    torch::autograd::set_history(y, self);
  }

  void release_variables() override {
    for (auto* saved : {&x_, &mean_, &stat_, &weight_, &bias_, &residual_}) saved->reset_data();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    variable_list out(4);
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) return out;  // y was not used: no gradient flows
    // none of the saved tensors is an output of this node: unpacked without it
    const SavedTensors saved{x_.unpack(), mean_.unpack(), stat_.unpack(), weight_.unpack(), bias_.unpack(),
                             residual_.unpack()};
    if (!takes_grad_as_is(grad, saved.x)) grad = at::empty_like(saved.x).copy_(grad);
    const WantedGradients wanted{should_compute_output(0), should_compute_output(1), should_compute_output(2),
                                 should_compute_output(3)};
    std::array<at::Tensor, 4> grads = run_kernels(grad, saved, wanted);
    const bool asked[4] = {wanted.x, wanted.weight, wanted.bias, wanted.residual};
    for (size_t i = 0; i < 4; ++i) {
      if (!asked[i]) continue;
      TORCH_CHECK(grads[i].defined(), "triton_bn: a gradient was asked for that the backward does not compute");
      out[i] = std::move(grads[i]);
    }
    return once_differentiable(std::move(out), grad_outputs);
  }

 private:
  torch::autograd::SavedVariable x_, mean_, stat_, weight_, bias_, residual_;
};

}  // namespace triton_bn_node
