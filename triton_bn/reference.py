"""The pure-PyTorch path: the same three functions as ``launch.py``, written with torch ops.

It serves CPU tensors when the Triton interpreter is off, so the library works everywhere, and it is
the executable specification of what the kernels compute (same formulas, fp32 accumulation;
float64 inputs are computed in float64)."""
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
