"""PyTorch's own batch-norm kernels with our epilogue: the backend of whole calls on the pure path where the
native CPU kernels do not serve (strides they do not take, float64 off the CPU, a machine without a compiler,
``TRITON_BN_NATIVE_CPU=0``). ``dispatch.py`` sends it non-empty batches only.

PyTorch's kernels normalize (statistics, running-statistics update, vectorised and multi-threaded); the
residual and the activation are then applied in place, where that computes what the step functions of
``spec.py`` do: the per-channel tensors converted to the compute dtype first (``_in_compute_dtype``); 16-bit
inputs in PyTorch's mixed-precision kernels where the epilogue commutes with rounding, else in fp32
(``_kernel_dtype``); an accurate mean where PyTorch's kernel adds rows without compensation
(``_summed_by_planes``); large fp32 planes' statistics in blocks, where PyTorch's kernel is slow
(``_statistics_in_blocks``). Thresholds were measured on this project's CPU (docs/cpu-path.md).
"""
import torch
import torch.nn.functional as F

from .layout import CHANNELS_LAST_FORMATS
from . import compute_dtype, host_factor, in_parameter_dtypes, kernel_statistic, reduce_dims


def _in_compute_dtype(x, *per_channel):
    """The per-channel tensors (weight, bias, mean and variance, any may be None) in x's compute dtype
    (fp32, float64 for float64), contiguous: what the step functions compute with. A model cast with
    ``.to(torch.bfloat16)`` keeps bf16 weights and running statistics; PyTorch's kernels would compute with
    those in 16 bits. A tensor already right is passed through (no copy)."""
    dtype = compute_dtype(x)
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


def evaluate(x, running_mean, running_var, weight, bias, residual, eps: float, activation: int,
             negative_slope: float):
    """y from the running statistics: PyTorch's eval-mode kernel, then the residual and the activation in
    place."""
    mean, var, weight, bias = _in_compute_dtype(x, running_mean, running_var, weight, bias)
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
    dims = reduce_dims(x)
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


def _update_running(running_mean, running_var, mean, var, count: int, factor: float) -> None:
    """PyTorch's moving average of the running statistics (in place), with the unbiased batch variance."""
    if running_mean is not None:
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var * (count / (count - 1) if count > 1 else float("nan")), factor)


def training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum: float,
             cumulative: bool, eps: float, activation: int, negative_slope: float):
    """(y, mean, invstd) of a training forward on a non-empty batch, the running statistics updated once
    (unbiased), the residual and the activation in place after PyTorch's kernels. Three ways:
    - planes summed one by one (``_summed_by_planes``): one call of PyTorch's fused kernel, except for large
      fp32 inputs (``_statistics_in_blocks``): mean and variance by ``_plane_statistics``, the running
      statistics by ``_update_running``, y by PyTorch's eval-mode kernel;
    - rows added without compensation by PyTorch: its statistics kernel (variance and running statistics),
      the mean from ``torch.mean``'s cascade sum (``_accurate_mean``; the running mean corrected by the
      difference), y from its eval-mode kernel: the fused kernel's passes over x plus one reduction, never a
      second normalization. (Its variance is taken around its own mean: off by the square of the mean's
      error, ~1e-10 of the variance, far below fp32 rounding.)
    The per-channel tensors are converted to the compute dtype first (``_in_compute_dtype``) and the running
    statistics, where they had to be, written back (rounded once, as the step functions' update);
    ``num_batches_tracked``, when given, counts this batch (+1) once all is computed."""
    factor = host_factor(running_mean, num_batches_tracked, momentum, cumulative)
    computed_mean, computed_var, weight, bias = _in_compute_dtype(x, running_mean, running_var, weight, bias)
    result = _pytorch_training(x, computed_mean, computed_var, weight, bias, residual, factor, eps, activation,
                               negative_slope)
    if computed_mean is not running_mean:
        running_mean.copy_(computed_mean)
    if computed_var is not running_var:
        running_var.copy_(computed_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return result


def _pytorch_training(x, running_mean, running_var, weight, bias, residual, factor: float, eps: float,
                      activation: int, negative_slope: float):
    """``training`` through PyTorch's kernels, every per-channel tensor already in the compute dtype."""
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


def backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps: float, activation: int,
             negative_slope: float, output_mask):
    """(dx, dweight, dbias, dresidual) through PyTorch's fused backward kernel, None where not asked for;
    dweight and dbias in the parameters' own dtype, as the step functions give them. Only x and the
    per-channel vectors were saved: with an activation, z is recomputed (one pass of PyTorch's eval-mode
    kernel) and its buffer then holds dL/dz; at an exact kink (z == 0 to the last bit) its rounding can pick
    the other subgradient."""
    stat, batch_stats = kernel_statistic(invstd, running_var)
    grads = _pytorch_backward(grad_y, x, *_in_compute_dtype(x, mean, stat, weight, bias), residual, eps,
                              batch_stats, activation, negative_slope, output_mask)
    return in_parameter_dtypes(grads, weight, bias)


def _pytorch_backward(grad_y, x, mean, stat, weight, bias, residual, eps: float, batch_stats: bool, activation: int,
                      negative_slope: float, output_mask):
    """``batch_norm_backward`` through PyTorch's kernels, its per-channel tensors in the compute dtype (dweight and
    dbias in it too)."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    dtype = compute_dtype(x)
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
