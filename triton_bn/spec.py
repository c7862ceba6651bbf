"""The specification: every step of batch norm (+ residual, + activation) written with torch ops, the same
steps the Triton kernels take (``backends/triton_kernels.py``) with the same formulas: fp32 accumulation,
one rounding at the end for 16-bit inputs, float64 in float64. The tests compare every backend against it
(and against float64 PyTorch); ``dispatch.py`` also runs it where no backend serves a whole call: an empty
batch on the pure path, and the steps of a split call (the custom ops under torch.compile, SyncBatchNorm)
off the Triton kernels. Nothing here is tuned for speed: the fast paths are the backends'.

    batch_stats(...)              -> (mean, invstd)    the running statistics updated once
    batch_norm_apply(...)         -> y                 from batch statistics (invstd) or running ones (variance)
    batch_moments(x)              -> [3, C] (count, mean, M2), what SyncBatchNorm gathers
    backward_sums(...)            -> [2, C] (sum dz, sum dz * xhat)
    backward_elementwise(...)     -> (dx, d residual)
    batch_norm_training(...)      -> (y, mean, invstd) batch_stats, then batch_norm_apply, the batch counted
    batch_norm_backward(...)      -> (dx, dweight, dbias, d residual): the two backward steps
Every function takes the arguments of the backends' function of the same name (``backends/__init__.py``).
"""
from typing import List

import torch

from .activations import TABLE, torch_activation, torch_activation_grad
from .backends import compute_dtype, reduce_dims


def _per_channel(t: torch.Tensor, x: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).reshape([1, -1] + [1] * (x.dim() - 2))


def _var_mean(x):
    """(biased variance, mean) per channel, the mean as PyTorch's batch norm gives it where the data holds inf:
    ``torch.var_mean``'s Welford steps turn a channel holding +inf into a NaN mean (inf - inf), where batch
    norm's sum / n is +inf; such a channel's mean is taken again as a plain mean (its variance is NaN either
    way). The check costs a sync on a GPU, where only float64 comes this way."""
    var, mean = torch.var_mean(x, dim=reduce_dims(x), unbiased=False)
    if mean.isnan().any():
        mean = torch.where(mean.isnan(), x.mean(dim=reduce_dims(x)), mean)
    return var, mean


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum: float, cumulative: bool, eps: float):
    dtype = compute_dtype(x)
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(channels, dtype=dtype, device=x.device), torch.full(
            (channels,), float("nan"), dtype=dtype, device=x.device)
    xf = x.to(dtype)
    var, mean = _var_mean(xf)
    if running_mean is not None:
        count = x.numel() // channels
        factor = (1.0 / (num_batches_tracked.to(dtype) + 1)) if cumulative else momentum  # the count with this batch
        new_mean = running_mean.to(dtype) * (1 - factor) + mean * factor
        new_var = running_var.to(dtype) * (1 - factor) + var * (count / (count - 1)) * factor
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return mean, torch.rsqrt(var + eps)


def _coefficients(x, mean, invstd, running_var, weight, bias, eps, dtype):
    invstd = invstd.to(dtype) if invstd is not None else torch.rsqrt(running_var.to(dtype) + eps)
    scale = invstd * weight.to(dtype) if weight is not None else invstd
    shift = bias.to(dtype) if bias is not None else torch.zeros_like(scale)
    return _per_channel(invstd, x, dtype), _per_channel(scale, x, dtype), _per_channel(shift, x, dtype)


def batch_norm_apply(x, mean, invstd, running_var, weight, bias, residual, eps: float, activation: int,
                     negative_slope: float):
    dtype = compute_dtype(x)
    _, scale, shift = _coefficients(x, mean, invstd, running_var, weight, bias, eps, dtype)
    z = (x.to(dtype) - _per_channel(mean, x, dtype)) * scale + shift
    if residual is not None:
        z = z + residual.to(dtype)
    return torch_activation(TABLE[activation].name, negative_slope)(z).to(x.dtype)


def batch_moments(x):
    dtype = compute_dtype(x)
    channels = x.shape[1]
    if x.numel() == 0:
        return torch.zeros((3, channels), dtype=dtype, device=x.device)
    var, mean = _var_mean(x.to(dtype))
    count = x.numel() // channels
    return torch.stack([torch.full_like(mean, count), mean, var * count])


def _grad_pre_activation(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation,
                         negative_slope):
    dtype = compute_dtype(x)
    invstd, scale, shift = _coefficients(x, mean, invstd, running_var, weight, bias, eps, dtype)
    xf = x.to(dtype)
    grad_z = grad_y.to(dtype)
    if activation != 0:
        z = (xf - _per_channel(mean, x, dtype)) * scale + shift
        if residual is not None:
            z = z + residual.to(dtype)
        grad_z = grad_z * torch_activation_grad(TABLE[activation].name, negative_slope)(z)
    xhat = (xf - _per_channel(mean, x, dtype)) * invstd
    return grad_z, xhat, scale, dtype


def backward_sums(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope,
                  grad_weight=None, grad_bias=None):
    grad_z, xhat, _, _ = _grad_pre_activation(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps,
                                              activation, negative_slope)
    dims = reduce_dims(x)
    sums = torch.stack([grad_z.sum(dims), (grad_z * xhat).sum(dims)])
    if grad_weight is not None:
        grad_weight.copy_(sums[1])
    if grad_bias is not None:
        grad_bias.copy_(sums[0])
    return sums


def backward_elementwise(grad_y, x, mean, invstd, running_var, weight, bias, residual, sums, inv_count, eps,
                         activation, negative_slope, want_dx, want_dresidual):
    grad_z, xhat, scale, dtype = _grad_pre_activation(grad_y, x, mean, invstd, running_var, weight, bias, residual,
                                                      eps, activation, negative_slope)
    grad_x = grad_residual = None
    if want_dx:
        g = grad_z
        if invstd is not None:  # batch statistics: their own gradient terms
            g = g - _per_channel(sums[0], x, dtype) * inv_count - xhat * _per_channel(sums[1], x, dtype) * inv_count
        grad_x = (g * scale).to(x.dtype)
    if want_dresidual:
        grad_residual = grad_z.to(x.dtype, copy=True)  # never an alias of grad_y (custom-op outputs must not alias)
    return grad_x, grad_residual


def batch_norm_training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum: float,
                        cumulative: bool, eps: float, activation: int, negative_slope: float):
    """A whole training forward by the steps: (y, mean, invstd), the running statistics updated once (the
    statistics read the count before this batch), then the batch counted in ``num_batches_tracked``."""
    mean, invstd = batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)
    y = batch_norm_apply(x, mean, invstd, None, weight, bias, residual, eps, activation, negative_slope)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y, mean, invstd


def batch_norm_backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps: float, activation: int,
                        negative_slope: float, output_mask: List[bool]):
    """(dx, dweight, dbias, d residual) by the two steps, each None unless ``output_mask`` asks for it: the
    sums where dx (with batch statistics), dweight or dbias need them, then the elementwise step where dx
    or d residual is wanted."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    grad_weight = torch.empty_like(weight) if (want_dweight and weight is not None) else None
    grad_bias = torch.empty_like(bias) if (want_dbias and bias is not None) else None
    sums = None
    if (want_dx and invstd is not None) or grad_weight is not None or grad_bias is not None:
        sums = backward_sums(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation,
                             negative_slope, grad_weight, grad_bias)
    grad_x = grad_residual = None
    if want_dx or want_dresidual:
        count = max(x.numel() // max(x.shape[1], 1), 1)
        grad_x, grad_residual = backward_elementwise(grad_y, x, mean, invstd, running_var, weight, bias, residual,
                                                     sums, 1.0 / count, eps, activation, negative_slope,
                                                     want_dx, want_dresidual)
    return grad_x, grad_weight, grad_bias, grad_residual
