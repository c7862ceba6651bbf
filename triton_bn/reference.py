"""The pure-PyTorch path: what CPU tensors run when the Triton interpreter is off (so the library works
everywhere), and float64 on any device. Its calls go through the same autograd Functions as the kernels
(only x and per-channel vectors are saved; gradients are not differentiable twice).

- the fast path of whole calls (``batch_norm_training``, the eval case of ``batch_norm_apply``,
  ``batch_norm_backward``): PyTorch's fused batch-norm kernels (statistics, normalization and the
  running-statistics update in one vectorised, multi-threaded call), with the residual and the
  activation applied in place after them, where they compute what the step functions do (``fast_path``;
  16-bit inputs computed in fp32; a channels-last mean checked against an accurate one: ``MEAN_CHECK``);
- the step functions (``batch_stats``, ``batch_norm_apply`` with batch statistics, ``backward_sums``,
  ``backward_elementwise``, ``batch_moments``), the same functions as ``launch.py`` written with torch
  ops: the executable specification of what the kernels compute (same formulas, fp32 accumulation, one
  rounding at the end for 16-bit inputs, float64 in float64). They serve where a call is split into
  steps (the custom ops under torch.compile, SyncBatchNorm) and everywhere the fast path does not.
"""
import torch.nn.functional as F
from typing import List, Optional

import torch

from .activations import ACTIVATION_IDS, torch_activation, torch_activation_grad

_ACTIVATION_NAMES = {v: k for k, v in ACTIVATION_IDS.items()}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor, x: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).reshape([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor):
    return [d for d in range(x.dim()) if d != 1]


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum: float, cumulative: bool, eps: float):
    dtype = _compute_dtype(x)
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(channels, dtype=dtype, device=x.device), torch.full(
            (channels,), float("nan"), dtype=dtype, device=x.device)
    xf = x.to(dtype)
    var, mean = torch.var_mean(xf, dim=_reduce_dims(x), unbiased=False)
    if running_mean is not None:
        count = x.numel() // channels
        factor = (1.0 / num_batches_tracked.to(dtype)) if cumulative else momentum
        new_mean = running_mean.to(dtype) * (1 - factor) + mean * factor
        new_var = running_var.to(dtype) * (1 - factor) + var * (count / (count - 1)) * factor
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return mean, torch.rsqrt(var + eps)


def _coefficients(x, mean, stat, weight, bias, eps, batch_stats, dtype):
    invstd = stat.to(dtype) if batch_stats else torch.rsqrt(stat.to(dtype) + eps)
    scale = invstd * weight.to(dtype) if weight is not None else invstd
    shift = bias.to(dtype) if bias is not None else torch.zeros_like(scale)
    return _per_channel(invstd, x, dtype), _per_channel(scale, x, dtype), _per_channel(shift, x, dtype)


def batch_norm_apply(x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool, activation: int,
                     negative_slope: float):
    if not batch_stats and fast_path(x, mean, stat, weight, bias):
        # eval: PyTorch's own kernel with the running statistics, then the epilogue in place
        dtype = _compute_dtype(x)
        y = torch.batch_norm(x.to(dtype), weight, bias, mean, stat, False, 0.0, eps, False)
        return _epilogue_in_place(y, _compute(residual, dtype), activation, negative_slope).to(x.dtype)
    dtype = _compute_dtype(x)
    _, scale, shift = _coefficients(x, mean, stat, weight, bias, eps, batch_stats, dtype)
    z = (x.to(dtype) - _per_channel(mean, x, dtype)) * scale + shift
    if residual is not None:
        z = z + residual.to(dtype)
    return torch_activation(_ACTIVATION_NAMES[activation], negative_slope)(z).to(x.dtype)


def batch_moments(x):
    dtype = _compute_dtype(x)
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros((3, channels), dtype=dtype, device=x.device)
    var, mean = torch.var_mean(x.to(dtype), dim=_reduce_dims(x), unbiased=False)
    count = x.numel() // channels
    return torch.stack([torch.full_like(mean, count), mean, var * count])


def _grad_pre_activation(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation,
                         negative_slope):
    dtype = _compute_dtype(x)
    invstd, scale, shift = _coefficients(x, mean, stat, weight, bias, eps, batch_stats, dtype)
    xf = x.to(dtype)
    grad_z = grad_y.to(dtype)
    if activation != 0:
        z = (xf - _per_channel(mean, x, dtype)) * scale + shift
        if residual is not None:
            z = z + residual.to(dtype)
        grad_z = grad_z * torch_activation_grad(_ACTIVATION_NAMES[activation], negative_slope)(z)
    xhat = (xf - _per_channel(mean, x, dtype)) * invstd
    return grad_z, xhat, scale, dtype


def backward_sums(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope,
                  grad_weight=None, grad_bias=None):
    grad_z, xhat, _, _ = _grad_pre_activation(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats,
                                              activation, negative_slope)
    dims = _reduce_dims(x)
    sums = torch.stack([grad_z.sum(dims), (grad_z * xhat).sum(dims)])
    if grad_weight is not None:
        grad_weight.copy_(sums[1])
    if grad_bias is not None:
        grad_bias.copy_(sums[0])
    return sums


def backward_elementwise(grad_y, x, mean, stat, weight, bias, residual, sums, inv_count, eps, batch_stats,
                         activation, negative_slope, want_dx, want_dresidual):
    grad_z, xhat, scale, dtype = _grad_pre_activation(grad_y, x, mean, stat, weight, bias, residual, eps,
                                                      batch_stats, activation, negative_slope)
    grad_x = grad_residual = None
    if want_dx:
        g = grad_z
        if batch_stats:
            g = g - _per_channel(sums[0], x, dtype) * inv_count - xhat * _per_channel(sums[1], x, dtype) * inv_count
        grad_x = (g * scale).to(x.dtype)
    if want_dresidual:
        grad_residual = grad_z.to(x.dtype, copy=True)  # never an alias of grad_y (custom-op outputs must not alias)
    return grad_x, grad_residual


# -- the fast path of whole calls: PyTorch's fused kernels, the epilogue in place ----------------------------
def fast_path(x, running_mean, running_var, weight, bias) -> bool:
    """Whether PyTorch's fused batch-norm kernels can compute this call as the step functions would:
    parameters and running statistics in the compute dtype (fp32, or float64 for a float64 input) and the
    running statistics contiguous (updated in place), a non-empty batch. A 16-bit input is computed in fp32
    (``_compute``): PyTorch's 16-bit CPU kernels round the normalized value before the epilogue, where the
    kernels round once, at the end."""
    dtype = _compute_dtype(x)
    return (x.numel() > 0 and all(t is None or t.dtype == dtype for t in (running_mean, running_var, weight, bias))
            and (running_mean is None or (running_mean.is_contiguous() and running_var.is_contiguous())))


def _compute(t, dtype):
    return None if t is None else t.to(dtype)


_IN_PLACE = {
    1: lambda y, slope: y.relu_(),
    2: lambda y, slope: F.leaky_relu(y, slope, inplace=True),
    3: lambda y, slope: F.relu6(y, inplace=True),
    4: lambda y, slope: F.silu(y, inplace=True),
    5: lambda y, slope: F.gelu(y),
    6: lambda y, slope: F.gelu(y, approximate="tanh"),
    7: lambda y, slope: F.hardswish(y, inplace=True),
    8: lambda y, slope: y.sigmoid_(),
}


def _epilogue_in_place(y, residual, activation: int, negative_slope: float):
    if residual is not None:
        y = y.add_(residual)
    return _IN_PLACE[activation](y, negative_slope) if activation else y


# PyTorch's channels-last (and 2-D) CPU kernel sums a channel in fp32 without compensation: with a mean of 1e4
# and a std of 1 its mean is off by ~4e-3 standard deviations. An accurate mean (torch.mean's cascade sum, a
# cheap reduction) is compared with it, and y and the running mean are corrected where they differ by more
# than this many standard deviations.
MEAN_CHECK = 1e-6


def batch_norm_training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum: float,
                        cumulative: bool, eps: float, activation: int, negative_slope: float):
    """(y, mean, invstd) of a training forward, the running statistics updated once (unbiased): one call of
    PyTorch's fused kernel, then the residual and the activation in place (the step functions where
    ``fast_path`` says no)."""
    if not fast_path(x, running_mean, running_var, weight, bias):
        mean, invstd = batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)
        return (batch_norm_apply(x, mean, invstd, weight, bias, residual, eps, True, activation, negative_slope),
                mean, invstd)
    factor = (1.0 / float(num_batches_tracked)) if (cumulative and running_mean is not None) else momentum
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    y, mean, invstd = torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True, factor, eps)
    if not xc.is_contiguous():  # the channels-last kernel: check its mean (MEAN_CHECK)
        accurate = xc.mean(_reduce_dims(x))
        error = accurate - mean
        if bool(((error * invstd).abs() > MEAN_CHECK).any()):
            scale = invstd * weight if weight is not None else invstd
            y.sub_(_per_channel(error * scale, x, dtype))  # y = (x - mean) * scale + b, with the right mean
            if running_mean is not None:
                running_mean.add_(error * factor)
        mean = accurate
    y = _epilogue_in_place(y, _compute(residual, dtype), activation, negative_slope)
    return y.to(x.dtype), mean, invstd


_ATEN = torch.ops.aten
# dL/dz from dL/dy and z: PyTorch's own activation backward kernels (one pass each, and by definition
# PyTorch's choices at the kinks)
_ACTIVATION_BACKWARD = {
    1: lambda g, z, slope: _ATEN.threshold_backward(g, z, 0.0),
    2: lambda g, z, slope: _ATEN.leaky_relu_backward(g, z, slope, False),
    3: lambda g, z, slope: _ATEN.hardtanh_backward(g, z, 0.0, 6.0),
    4: lambda g, z, slope: _ATEN.silu_backward(g, z),
    5: lambda g, z, slope: _ATEN.gelu_backward(g, z, approximate="none"),
    6: lambda g, z, slope: _ATEN.gelu_backward(g, z, approximate="tanh"),
    7: lambda g, z, slope: _ATEN.hardswish_backward(g, z),
    8: lambda g, z, slope: _ATEN.sigmoid_backward(g, torch.sigmoid(z)),
}


def _pre_activation(x, mean, stat, weight, bias, residual, eps, batch_stats):
    """z = bn(x) [+ residual], recomputed with PyTorch's eval-mode kernel (accurate at large means in every
    layout) from the running statistics, or from the batch's (var = 1 / invstd^2 - eps, to rounding)."""
    if batch_stats:
        stat = stat.double().pow(-2).sub(eps).to(stat.dtype)
    z = torch.batch_norm(x, weight, bias, mean, stat, False, 0.0, eps, False)
    return z.add_(residual) if residual is not None else z


def batch_norm_backward(grad_y, x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool,
                        activation: int, negative_slope: float, output_mask):
    """(dx, dweight, dbias, dresidual) through PyTorch's fused backward kernel, None where not asked for;
    None altogether where ``fast_path`` says no (the caller then runs the step functions). Only x and the
    per-channel vectors were saved: with an activation, z is recomputed (one pass of PyTorch's eval-mode
    kernel), and at an exact kink (z == 0 to the last bit) its rounding can pick the other subgradient."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    dtype = _compute_dtype(x)
    if not (fast_path(x, None if batch_stats else mean, None if batch_stats else stat, weight, bias)
            and mean.dtype == dtype and stat.dtype == dtype):
        return None
    xc, grad_z = x.to(dtype), grad_y.to(dtype)
    if activation != 0:
        z = _pre_activation(xc, mean, stat, weight, bias, _compute(residual, dtype), eps, batch_stats)
        grad_z = _ACTIVATION_BACKWARD[activation](grad_z, z, negative_slope)
    grad_residual = None
    if want_dresidual:  # never an alias of grad_y (custom-op outputs must not alias)
        grad_residual = grad_z.to(x.dtype, copy=True) if grad_z is grad_y else grad_z.to(x.dtype)
    grad_x = grad_weight = grad_bias = None
    if want_dx or want_dweight or want_dbias:
        grad_x, grad_weight, grad_bias = _ATEN.native_batch_norm_backward(
            grad_z, xc, weight, None if batch_stats else mean, None if batch_stats else stat,
            mean if batch_stats else None, stat if batch_stats else None, batch_stats, eps,
            [want_dx, want_dweight and weight is not None, want_dbias and bias is not None])
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
    return grad_x, grad_weight, grad_bias, grad_residual
