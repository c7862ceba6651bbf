// The forward calls of the C++ launch path bound for Python directly (pybind11): run_training and run_apply
// (ops.h), the same calls as torch.ops.triton_bn_cuda.training / apply, without the dispatcher's boxed
// calling convention in between. Through torch.ops a call's twelve arguments are converted to IValues
// against the op's schema, pushed on a stack and unboxed again, and the result comes back as a list: about
// as much host time as the whole call does (perf/NOTES.md), on a path whose only purpose is host time.
//
// Built only where Python's headers are (build flag TRITON_BN_PYTHON_ENTRY, cpp_launch.py): elsewhere this file
// is empty and cpp_launch.py calls the torch.ops entries. The GIL is released during a call, as PyTorch's own
// operator bindings do (a launch may wait for room in the CUDA launch queue; other Python threads run
// meanwhile). An error arrives as the RuntimeError the torch.ops entry would raise, with the same message.
#ifdef TRITON_BN_PYTHON_ENTRY
#include "ops.h"

#include <torch/csrc/utils/pybind.h>  // at::Tensor (an undefined one is None) and optional casters

#include <stdexcept>
#include <utility>

namespace {

// c10::Error's message without the C++ backtrace, as torch's own bindings translate it.
template <class Call>
at::Tensor translated(Call&& call) {
  try {
    return std::forward<Call>(call)();
  } catch (const c10::Error& error) {
    throw std::runtime_error(error.what_without_backtrace());
  }
}

at::Tensor training(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                    const c10::optional<at::Tensor>& num_batches_tracked, double eps, double momentum,
                    double negative_slope, int64_t activation, bool cumulative) {
  return translated([&] {
    return triton_bn_cuda::run_training(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                        eps, momentum, negative_slope, activation, cumulative);
  });
}

at::Tensor apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& residual, double eps, double negative_slope, int64_t activation) {
  return translated([&] {
    return triton_bn_cuda::run_apply(x, mean, stat, weight, bias, residual, eps, negative_slope, activation);
  });
}

}  // namespace

PYBIND11_MODULE(triton_bn_cuda_entry, m) {
  m.doc() = "triton_bn's C++ launch path: the forward calls, bound directly (csrc/cuda/python.cpp)";
  m.def("training", &training, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "y of a training forward through its plans, or None where no plan takes the call yet");
  m.def("apply", &apply, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "y from given statistics through its plans, or None where no plan takes the call yet");
}
#endif  // TRITON_BN_PYTHON_ENTRY
