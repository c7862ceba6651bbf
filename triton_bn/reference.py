"""The pure-PyTorch path (no Triton; native C++ kernels serve part of it where they can be built,
``native.py``): what CPU tensors run when the Triton interpreter is off (so the library works
everywhere), and float64 on any device. Its calls go through the same autograd Functions as the kernels
(only x and per-channel vectors are saved; gradients are not differentiable twice).

- the fast path of whole calls (``batch_norm_training``, the eval case of ``batch_norm_apply``,
  ``batch_norm_backward``): for dense inputs (channels innermost or contiguous) the native kernels of
  ``native.py`` (statistics, normalization, epilogue and backward in C++: one read fewer than PyTorch's,
  no separate epilogue pass; fp32, bf16, fp16 and float64); otherwise (other strides, float64 off the
  CPU, or no compiler) PyTorch's fused batch-norm kernels (statistics, normalization and the
  running-statistics update in vectorised, multi-threaded calls), with the residual and the activation
  applied in place after them, where they compute what the step functions do (``fast_path``: a
  non-empty batch, the per-channel tensors converted to the compute dtype first, ``_in_compute_dtype``; 16-bit
  inputs in PyTorch's mixed-precision kernels where the epilogue commutes with rounding, else in fp32:
  ``_kernel_dtype``; an accurate mean where PyTorch's kernel adds rows without compensation:
  ``_summed_by_planes``; large fp32 planes' statistics in blocks, where PyTorch's kernel is slow:
  ``_statistics_in_blocks``);
- the step functions (``batch_stats``, ``batch_norm_apply`` with batch statistics, ``backward_sums``,
  ``backward_elementwise``, ``batch_moments``), the same functions as ``launch.py`` written with torch
  ops: the executable specification of what the kernels compute (same formulas, fp32 accumulation, one
  rounding at the end for 16-bit inputs, float64 in float64). They serve where a call is split into
  steps (the custom ops under torch.compile, SyncBatchNorm) and everywhere the fast path does not.
"""
import torch.nn.functional as F
from typing import List, Optional

import torch

from . import native
from .activations import ACTIVATION_IDS, torch_activation, torch_activation_grad
from .layout import CHANNELS_LAST_FORMATS

_ACTIVATION_NAMES = {v: k for k, v in ACTIVATION_IDS.items()}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor, x: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).reshape([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor):
    return [d for d in range(x.dim()) if d != 1]


def _var_mean(x):
    """(biased variance, mean) per channel, the mean as PyTorch's batch norm gives it where the data holds inf:
    ``torch.var_mean``'s Welford steps turn a channel holding +inf into a NaN mean (inf - inf), where batch
    norm's sum / n is +inf; such a channel's mean is taken again as a plain mean (its variance is NaN either
    way). The check costs a sync on a GPU, where only float64 comes this way."""
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), unbiased=False)
    if mean.isnan().any():
        mean = torch.where(mean.isnan(), x.mean(dim=_reduce_dims(x)), mean)
    return var, mean


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum: float, cumulative: bool, eps: float):
    dtype = _compute_dtype(x)
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


def _coefficients(x, mean, stat, weight, bias, eps, batch_stats, dtype):
    invstd = stat.to(dtype) if batch_stats else torch.rsqrt(stat.to(dtype) + eps)
    scale = invstd * weight.to(dtype) if weight is not None else invstd
    shift = bias.to(dtype) if bias is not None else torch.zeros_like(scale)
    return _per_channel(invstd, x, dtype), _per_channel(scale, x, dtype), _per_channel(shift, x, dtype)


def batch_norm_apply(x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool, activation: int,
                     negative_slope: float):
    if not batch_stats and fast_path(x):
        return _eval_fast(x, mean, stat, weight, bias, residual, eps, activation, negative_slope)
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
    var, mean = _var_mean(x.to(dtype))
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
def fast_path(x) -> bool:
    """Whether a whole call may run through PyTorch's fused kernels (or the native ones): a non-empty batch.
    Its per-channel tensors are first converted to the compute dtype (``_in_compute_dtype``), as the step
    functions read them."""
    return x.numel() != 0


def _in_compute_dtype(x, *per_channel):
    """The per-channel tensors (weight, bias, mean and variance, any may be None) in x's compute dtype
    (fp32, float64 for float64), contiguous: what the step functions compute with. A model cast with
    ``.to(torch.bfloat16)`` keeps bf16 weights and running statistics; PyTorch's kernels would compute with
    those in 16 bits. A tensor already right is passed through (no copy)."""
    dtype = _compute_dtype(x)
    return tuple(t if (t is None or (t.dtype == dtype and t.is_contiguous()))
                 else t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True) for t in per_channel)


_HALF = (torch.float16, torch.bfloat16)


def _kernel_dtype(x, activation: int, residual, weight, bias, running_mean) -> torch.dtype:
    """The dtype PyTorch's forward kernels run this call in. A 16-bit input runs in its own dtype (PyTorch's
    mixed-precision CPU kernels: fp32 statistics and arithmetic, the output rounded once) when the epilogue
    commutes with that rounding, so that the result is the one rounding of the fp32 value the kernels make:
    no activation, or ReLU (rounding is monotone and keeps the sign: relu(round(z)) == round(relu(z))), no
    residual (round(round(z) + r) is a second rounding), and some fp32 parameter or running statistic (what
    makes PyTorch's kernel mixed-precision; without one it computes in 16 bits). Everything else is computed
    in fp32 and rounded at the end."""
    if x.dtype in _HALF and (activation > 1 or residual is not None
                             or (weight is None and bias is None and running_mean is None)):
        return torch.float32
    return x.dtype


def _backward_dtype(x, grad_y, activation: int, weight, bias, mean) -> torch.dtype:
    """The dtype PyTorch's backward kernel runs this call in. The residual does not enter it (z, where an
    activation needs it, is recomputed apart: ``_pre_activation``), so a 16-bit call with no activation
    or ReLU runs in its own dtype (PyTorch's mixed-precision backward: dL/dz masked by ReLU is exact in 16
    bits) when x and dy are dense in one memory format: PyTorch's 16-bit backward keeps fp32 sums only on
    its contiguous and channels-last paths (on the generic one, e.g. a channels-last x with a contiguous
    dy, its dweight and dbias lose digits the kernels keep). Else fp32."""
    if x.dtype in _HALF and (_kernel_dtype(x, activation, None, weight, bias, mean) != x.dtype
                             or not _same_dense_layout(x, grad_y)):
        return torch.float32
    return x.dtype


def _same_dense_layout(a, b) -> bool:
    if a.is_contiguous():
        return b.is_contiguous()
    fmt = CHANNELS_LAST_FORMATS.get(a.dim())
    return fmt is not None and a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)


def _as(t, dtype):
    return t if (t is None or t.dtype == dtype) else t.to(dtype)


def _finish(z, residual, activation: int, negative_slope: float, dtype: torch.dtype):
    """act(z + residual) in ``dtype``, rounded once: z (PyTorch's normalized output) and the sum in the
    compute dtype, then one cast. (The residual is cast to z's dtype first: PyTorch's elementwise kernels
    on mixed dtypes take a scalar, casting loop, 5-15x slower than a cast and a vectorised add.)"""
    if residual is not None:
        z = z.add_(_as(residual, z.dtype))
    return _as(_IN_PLACE[activation](z, negative_slope) if activation else z, dtype)


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


def _running_variance(invstd: torch.Tensor, eps: float) -> torch.Tensor:
    """The variance an invstd was made from (var = 1 / invstd^2 - eps, to rounding): what PyTorch's eval-mode
    kernel takes to normalize with batch statistics. It gives var + eps back to an ulp, so the kernel's
    1 / sqrt(var + eps) is invstd to an ulp, even where var is far below eps."""
    return invstd.pow(-2).sub_(eps)


def _normalize_eval(x, weight, bias, mean, var, eps: float):
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def _eval_fast(x, mean, var, weight, bias, residual, eps: float, activation: int, negative_slope: float):
    """Eval: the native kernel where it serves x (one pass, epilogue fused; it reads per-channel tensors of
    any dtype in its compute type itself: fp32, double for float64); else PyTorch's kernel with the running
    statistics, then the epilogue in place."""
    native_ops = native.serves(x)
    if native_ops is not None:
        return native_ops.apply(x, mean, var, weight, bias, native.like(residual, x), eps, False, activation,
                                negative_slope)
    mean, var, weight, bias = _in_compute_dtype(x, mean, var, weight, bias)
    dtype = _kernel_dtype(x, activation, residual, weight, bias, mean)
    y = _normalize_eval(_as(x, dtype), weight, bias, mean, var, eps)
    return _finish(y, residual, activation, negative_slope, x.dtype)


def _summed_by_planes(x) -> bool:
    """Whether PyTorch's CPU statistics kernel sums this input plane by plane (contiguous, more than one
    element per plane): vectorised sums of each plane, accurate to about an ulp of the mean. Its other
    kernel (channels-last, 2-D and [N, C, 1...] inputs, and any other strides) adds the rows of a channel
    in fp32 without compensation: with a mean of 1e4 and a std of 1 its mean is off by 4e-3 to 1.4e-2
    standard deviations, and by ~1e-5 already at a mean of one standard deviation (32x64x56x56)."""
    return x.is_contiguous() and x.numel() != x.shape[0] * x.shape[1]


# Elements per block of the blocked reductions below: a block's fp32 temporary (4 MB) stays in cache.
BLOCK_ELEMENTS = 1 << 20


def _sample_blocks(x: torch.Tensor):
    """x split along dim 0 into blocks of whole samples, about ``BLOCK_ELEMENTS`` elements each (one block
    when x is no larger)."""
    per_sample = x.numel() // max(x.shape[0], 1)
    return x.split(max(1, BLOCK_ELEMENTS // max(per_sample, 1)))


def _sum_in_blocks(blocks, dtype: torch.dtype, write, reduce) -> torch.Tensor:
    """sum over ``blocks`` (``_sample_blocks``) of ``reduce(write(block, buffer))`` -> [C] float64, where
    ``write`` fills one buffer of ``dtype``, reused for every block (a fresh one per block costs ~1.5x) and
    small enough to stay in cache, and ``reduce`` sums it per channel; the blocks' sums are added in float64
    (no accuracy lost against one cascade sum: each block is one)."""
    buffer = torch.empty_like(blocks[0], dtype=dtype)
    total = torch.zeros(blocks[0].shape[1], dtype=torch.float64, device=blocks[0].device)
    for block in blocks:
        total.add_(reduce(write(block, buffer[:block.shape[0]])))
    return total


def _accurate_mean(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x's per-channel mean in ``dtype`` by ``torch.mean``'s cascade sum. PyTorch's CPU reductions convert a
    16-bit input to the fp32 result type before they sum: a full-size fp32 copy, which on a large input costs
    more than the sum itself. So a large 16-bit x is converted block by block (``_sum_in_blocks``)."""
    dims = _reduce_dims(x)
    blocks = _sample_blocks(x)
    if x.dtype == dtype or len(blocks) == 1:
        return x.mean(dims, dtype=dtype)
    total = _sum_in_blocks(blocks, dtype, lambda block, out: out.copy_(block), lambda t: t.sum(dims))
    return total.div_(x.numel() // x.shape[1]).to(dtype)


def _plane_sums(planes: torch.Tensor) -> torch.Tensor:
    """[n, C, S] -> [C] float64: each plane summed by PyTorch's vectorised inner reduction (a cascade sum),
    the n planes of a channel then added in float64. Faster here than one reduction over dims (0, 2), and
    no less accurate."""
    return planes.sum(2).sum(0, dtype=torch.float64)


def _plane_statistics(x: torch.Tensor):
    """(mean, biased variance) per channel of a contiguous fp32 x, both in x's dtype: the mean from
    ``_plane_sums``, then the squared deviations from it, summed block by block (``_sum_in_blocks``).
    Two reads of x."""
    samples, channels = x.shape[0], x.shape[1]
    count = x.numel() // channels
    planes = x.view(samples, channels, -1)
    mean = _plane_sums(planes).div_(count).to(x.dtype)
    center = mean.view(1, channels, 1)

    def squared_deviation(block, out):
        deviation = torch.sub(block, center, out=out)
        return deviation.mul_(deviation)

    total = _sum_in_blocks(_sample_blocks(planes), x.dtype, squared_deviation, _plane_sums)
    return mean, total.div_(count).to(x.dtype)


# From this many elements on, a contiguous fp32 input's statistics come from ``_plane_statistics`` rather
# than PyTorch's kernel (``_statistics_in_blocks``).
BLOCKED_STATISTICS_MIN_ELEMENTS = 1 << 19


def _statistics_in_blocks(x) -> bool:
    """Whether a plane-summed input's statistics are cheaper from ``_plane_statistics`` than from PyTorch's
    kernel, which sums fp32 planes in its CPU accumulate type, float64: 8.0 ms for the two statistics of a
    32x64x56x56 batch on this project's CPU, where ``torch.mean`` takes 1.5 ms (16-bit planes accumulate in
    fp32, float64 in float64: nothing to gain there). Below ~2^18 elements the extra op calls cost more than
    that saves (fp32 training forward against the fused kernel, this CPU: 0.47-0.82x at 0.5-2e5 elements,
    1.07x at 2.6e5, 1.1-1.6x from 4e5 on, 7x7 planes included); 2^19 keeps a margin for run-to-run noise."""
    return x.dtype == torch.float32 and x.numel() >= BLOCKED_STATISTICS_MIN_ELEMENTS


def host_factor(running_mean, num_batches_tracked, momentum: float, cumulative: bool) -> float:
    """The weight of this batch in the running average, as a number: PyTorch's kernels and the native ones
    take it so, and a cumulative one (1 / (count before this batch + 1)) is read on the host."""
    return (1.0 / (float(num_batches_tracked) + 1)) if (cumulative and running_mean is not None) else momentum


def _update_running(running_mean, running_var, mean, var, count: int, factor: float) -> None:
    """PyTorch's moving average of the running statistics (in place), with the unbiased batch variance."""
    if running_mean is not None:
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var * (count / (count - 1) if count > 1 else float("nan")), factor)


def batch_norm_training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum: float,
                        cumulative: bool, eps: float, activation: int, negative_slope: float):
    """(y, mean, invstd) of a training forward, the running statistics updated once (unbiased), then the
    residual and the activation in place (the step functions where ``fast_path`` says no). Three ways:
    - planes summed one by one (``_summed_by_planes``): one call of PyTorch's fused kernel, except for large
      fp32 inputs (``_statistics_in_blocks``): mean and variance by ``_plane_statistics``, the running
      statistics by ``_update_running``, y by PyTorch's eval-mode kernel;
    - rows added without compensation by PyTorch: its statistics kernel (variance and running statistics),
      the mean from ``torch.mean``'s cascade sum (``_accurate_mean``; the running mean corrected by the
      difference), y from its eval-mode kernel: the fused kernel's passes over x plus one reduction, never a
      second normalization. (Its variance is taken around its own mean: off by the square of the mean's
      error, ~1e-10 of the variance, far below fp32 rounding.)
    ``num_batches_tracked``, when given, counts this batch (+1) once all is computed (the statistics read
    the count before it), as the kernels' training forward does."""
    if fast_path(x):
        factor = host_factor(running_mean, num_batches_tracked, momentum, cumulative)
        y, mean, invstd = _fused_training(x, running_mean, running_var, weight, bias, residual, factor, eps,
                                          activation, negative_slope)
    else:  # the step functions read the count on the device
        mean, invstd = batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)
        y = batch_norm_apply(x, mean, invstd, weight, bias, residual, eps, True, activation, negative_slope)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y, mean, invstd


def _fused_training(x, running_mean, running_var, weight, bias, residual, factor: float, eps: float,
                    activation: int, negative_slope: float):
    """``batch_norm_training`` where ``fast_path`` says yes, the running statistics weighted by ``factor``:
    the native kernels where they serve x (``native.py``: statistics in one read, y with
    the epilogue in one more; they read and update per-channel tensors of any dtype in their compute type themselves),
    else PyTorch's kernels, with the per-channel tensors converted (``_in_compute_dtype``) and the
    running statistics, where they had to be, written back (rounded once, as the step functions' update)."""
    native_ops = native.serves(x)
    if native_ops is not None:
        return native_ops.training_forward(x, weight, bias, native.like(residual, x), running_mean, running_var,
                                           factor, eps, activation, negative_slope)
    computed_mean, computed_var, weight, bias = _in_compute_dtype(x, running_mean, running_var, weight, bias)
    result = _pytorch_training(x, computed_mean, computed_var, weight, bias, residual, factor, eps, activation,
                               negative_slope)
    if computed_mean is not running_mean:
        running_mean.copy_(computed_mean)
    if computed_var is not running_var:
        running_var.copy_(computed_var)
    return result


def _pytorch_training(x, running_mean, running_var, weight, bias, residual, factor: float, eps: float,
                      activation: int, negative_slope: float):
    """``_fused_training`` through PyTorch's kernels, every per-channel tensor in the compute dtype."""
    xc = _as(x, _kernel_dtype(x, activation, residual, weight, bias, running_mean))
    by_planes = _summed_by_planes(xc)
    # float64 rows are summed in float64: nothing to compensate, one fused call in every layout
    if (by_planes or xc.dtype == torch.float64) and not _statistics_in_blocks(xc):
        y, mean, invstd = torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True, factor, eps)
        return _finish(y, residual, activation, negative_slope, x.dtype), mean, invstd
    if by_planes:
        mean, var = _plane_statistics(xc)
        _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], factor)
    else:
        rough_mean, var = torch.batch_norm_update_stats(xc, running_mean, running_var, factor)
        mean = _accurate_mean(xc, rough_mean.dtype)
        if running_mean is not None:
            # where the channel holds inf both means are inf and the running mean already is (NaN: inf - inf)
            running_mean.add_((mean - rough_mean).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), alpha=factor)
    y = _normalize_eval(xc, weight, bias, mean, var, eps)
    return _finish(y, residual, activation, negative_slope, x.dtype), mean, var.add(eps).rsqrt_()


_ATEN = torch.ops.aten


def _direct(overload):
    """An aten overload as its C++ callable (``OpOverload._op``): the same operator without the Python
    wrapper around it, a few microseconds per call on small tensors."""
    return getattr(overload, "_op", overload)


_THRESHOLD_BACKWARD = _direct(_ATEN.threshold_backward.grad_input)
_LEAKY_RELU_BACKWARD = _direct(_ATEN.leaky_relu_backward.grad_input)
_HARDTANH_BACKWARD = _direct(_ATEN.hardtanh_backward.grad_input)
_SILU_BACKWARD = _direct(_ATEN.silu_backward.grad_input)
_GELU_BACKWARD = _direct(_ATEN.gelu_backward.grad_input)
_HARDSWISH_BACKWARD = _direct(_ATEN.hardswish_backward.out)
_SIGMOID_BACKWARD = _direct(_ATEN.sigmoid_backward.grad_input)
_NATIVE_BATCH_NORM_BACKWARD = _direct(_ATEN.native_batch_norm_backward.default)
# dL/dz from dL/dy and z, written over z: PyTorch's own activation backward kernels (one pass each, and by
# definition PyTorch's choices at the kinks)
_ACTIVATION_BACKWARD = {
    1: lambda g, z, slope: _THRESHOLD_BACKWARD(g, z, 0.0, grad_input=z),
    2: lambda g, z, slope: _LEAKY_RELU_BACKWARD(g, z, slope, False, grad_input=z),
    3: lambda g, z, slope: _HARDTANH_BACKWARD(g, z, 0.0, 6.0, grad_input=z),
    4: lambda g, z, slope: _SILU_BACKWARD(g, z, grad_input=z),
    5: lambda g, z, slope: _GELU_BACKWARD(g, z, approximate="none", grad_input=z),
    6: lambda g, z, slope: _GELU_BACKWARD(g, z, approximate="tanh", grad_input=z),
    7: lambda g, z, slope: _HARDSWISH_BACKWARD(g, z, out=z),
    8: lambda g, z, slope: _SIGMOID_BACKWARD(g, z.sigmoid_(), grad_input=z),
}


def _pre_activation(x, mean, stat, weight, bias, residual, eps, batch_stats):
    """z = bn(x) [+ residual], recomputed with PyTorch's eval-mode kernel (accurate at large means in every
    layout) from the running statistics, or from the batch's."""
    z = _normalize_eval(x, weight, bias, mean, _running_variance(stat, eps) if batch_stats else stat, eps)
    return z.add_(residual) if residual is not None else z


def batch_norm_backward(grad_y, x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool,
                        activation: int, negative_slope: float, output_mask):
    """(dx, dweight, dbias, dresidual) through the native kernels (``native.serves``) or PyTorch's fused
    backward kernel, None where not asked for;
    None altogether where ``fast_path`` says no (the caller then runs the step functions). Only x and the
    per-channel vectors were saved: with an activation, z is recomputed (one pass of PyTorch's eval-mode
    kernel) and its buffer then holds dL/dz; at an exact kink (z == 0 to the last bit) its rounding can pick
    the other subgradient."""
    if not fast_path(x):
        return None
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    native_ops = native.serves(x)
    if native_ops is not None:  # both passes in native code, z recomputed inside (per-channel: compute type)
        wanted = (want_dx, want_dweight and weight is not None, want_dbias and bias is not None, want_dresidual)
        grads = native_ops.backward(native.like(grad_y, x), x, mean, stat, weight, bias,
                                    native.like(residual, x) if activation != 0 else None, eps, batch_stats,
                                    activation, negative_slope, *wanted)
        grads = tuple(g if want else None for g, want in zip(grads, wanted))
    else:
        grads = _pytorch_backward(grad_y, x, *_in_compute_dtype(x, mean, stat, weight, bias), residual, eps,
                                  batch_stats, activation, negative_slope, output_mask)
    # dweight and dbias in the parameters' own dtype, as the step functions give them
    return grads[0], _as(grads[1], weight.dtype if weight is not None else None), \
        _as(grads[2], bias.dtype if bias is not None else None), grads[3]


def _pytorch_backward(grad_y, x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool, activation: int,
                      negative_slope: float, output_mask):
    """``batch_norm_backward`` through PyTorch's kernels, its per-channel tensors in the compute dtype (dweight and
    dbias in it too)."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    dtype = _compute_dtype(x)
    kernel_dtype = _backward_dtype(x, grad_y, activation, weight, bias, mean)
    xc, grad_z = _as(x, kernel_dtype), _as(grad_y, kernel_dtype)
    if activation != 0:
        # z + r is formed in the compute dtype (one rounding, as the forward's); without a residual z is
        # formed where the kernel runs. A 16-bit kernel then reads ReLU's mask from z in 16 bits (rounding
        # keeps the sign).
        z_dtype = xc.dtype if residual is None else dtype
        z = _pre_activation(xc if xc.dtype == z_dtype else x.to(z_dtype), mean, stat, weight, bias,
                            _as(residual, z_dtype), eps, batch_stats)
        grad_z = _ACTIVATION_BACKWARD[activation](grad_z, _as(z, kernel_dtype), negative_slope)
    grad_residual = None
    if want_dresidual:  # never an alias of grad_y (custom-op outputs must not alias)
        grad_residual = grad_z.to(x.dtype, copy=True) if grad_z is grad_y else _as(grad_z, x.dtype)
    grad_x = grad_weight = grad_bias = None
    if want_dx or want_dweight or want_dbias:
        grad_x, grad_weight, grad_bias = _NATIVE_BATCH_NORM_BACKWARD(
            grad_z, xc, weight, None if batch_stats else mean, None if batch_stats else stat,
            mean if batch_stats else None, stat if batch_stats else None, batch_stats, eps,
            [want_dx, want_dweight and weight is not None, want_dbias and bias is not None])
        grad_x = _as(grad_x, x.dtype)
    return grad_x, grad_weight, grad_bias, grad_residual
