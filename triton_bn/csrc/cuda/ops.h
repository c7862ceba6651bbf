// The two forward calls of the C++ launch path, as both of their entries call them: the dispatcher's ops
// (torch.ops.triton_bn_cuda.training / apply, ops.cpp) and the Python module python.cpp binds directly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <c10/util/Optional.h>

namespace triton_bn_cuda {

// y of a training forward (statistics, running update, normalization, the batch counted), with the C++
// autograd node recorded where a gradient is needed; undefined where no plan takes this call yet (the caller
// writes the plans and remembers them, then calls again).
at::Tensor run_training(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        const c10::optional<at::Tensor>& num_batches_tracked, double eps, double momentum,
                        double negative_slope, int64_t activation, bool cumulative);

// y from given statistics (eval's running ones, a frozen table); undefined where no plan takes this call yet.
at::Tensor run_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& stat,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& residual, double eps, double negative_slope,
                     int64_t activation);

}  // namespace triton_bn_cuda
