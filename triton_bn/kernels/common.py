"""Helpers shared by both layout families: the shifted moments of a split, the per-channel
coefficients, and the recomputed gradient of the activation."""
import triton
import triton.language as tl

from .activations import activation_grad, apply_activation


@triton.jit
def shifted_moments(sum_d, sum_d2, count):
    """(mean - shift, M2) of ``count`` values from the sums of d = x - shift and of d^2.

    M2 = sum d^2 - (sum d)^2 / n is exact algebra for any shift; in floating point the subtraction
    loses about log10(1 + (mean - shift)^2 / var) digits. The kernels take the shift to be the mean of
    the split's first tile (dozens to thousands of the channel's values), so mean - shift is a small
    fraction of the spread and nothing cancels, even with a mean of 1e4 and a std of 1, where the
    unshifted E[x^2] - E[x]^2 would keep no correct digit. Three operations per element (subtract,
    add, fused multiply-add), against five to ten for a Welford step: the loop stays far under the
    arithmetic that full memory bandwidth leaves per element."""
    mean = sum_d / tl.maximum(count, 1.0)
    # NaN propagates (an inf in the channel gives inf - inf here): a GPU's max would otherwise return the 0
    # and report a variance of zero for a channel whose variance PyTorch reports as NaN
    m2 = tl.maximum(sum_d2 - sum_d * mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return mean, m2


@triton.jit
def finite_or_zero(value):
    """``value`` where it is finite, else 0: what a shift or pivot taken from the data must be. An infinite
    shift would turn every finite value of the channel into inf - inf = NaN, where PyTorch's mean of a channel
    holding +inf (and no -inf or NaN) is +inf."""
    return tl.where(tl.abs(value) <= 3.4028234663852886e38, value, 0.0)


@triton.jit
def load_channel_coefficients(
    mean_ptr, stat_ptr, weight_ptr, bias_ptr, channels, channel_mask, eps,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Per-channel fp32 (mean, invstd, scale, shift) with z = (x - mean) * scale + shift.

    Why not the single FMA x * scale + (bias - mean * scale): with a mean of 1e4 and a std of 1 the two
    terms are ~1e4 and cancel, leaving ~1e-3 absolute error in fp32; x - mean is exact there
    (Sterbenz), so this form keeps the result as accurate as PyTorch's.

    ``stat_ptr`` holds the saved invstd (training) or the running variance (eval, STATS_ARE_RUNNING):
    in eval the "precomputed table" scale = weight * rsqrt(running_var + eps) is computed here, at
    the head of each program, from the live buffers: it costs a few flops per channel, needs no extra
    launch, and can never be stale."""
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    stat = tl.load(stat_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)
    if STATS_ARE_RUNNING:
        invstd = tl.math.rsqrt(stat + eps)
    else:
        invstd = stat
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    return mean, invstd, scale, shift


@triton.jit
def count_batch(num_batches_ptr, COUNT_BATCH: tl.constexpr):
    """num_batches_tracked += 1 (COUNT_BATCH), by program 0 of a training forward's normalization launch.
    The statistics launch before it on the stream has already read the count (a cumulative average weighs
    the batch 1 / (count + 1): merge.finish_statistics) and nothing else reads it, so one plain store is
    safe, and a training forward needs no separate increment kernel of its own."""
    if COUNT_BATCH:
        if tl.program_id(0) == 0:
            tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)


@triton.jit
def grad_pre_activation(grad_y, x, residual, mean, scale, shift, negative_slope,
                        ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """dL/dz where z = (x - mean) * scale + shift (+ residual) is the pre-activation: recomputed with exactly
    the forward's arithmetic, so act'(z) is taken at the same z the forward saw (this matters at the
    kinks of relu-like activations)."""
    if ACTIVATION == 0:
        grad_z = grad_y
    else:
        z = (x - mean) * scale + shift
        if HAS_RESIDUAL:
            z = z + residual
        grad_z = grad_y * activation_grad(z, ACTIVATION, negative_slope)
    return grad_z


@triton.jit
def load_grad_pre_activation(grad_y_ptr, x_ptr, residual_ptr, offs, mask, mean, scale, shift, negative_slope,
                             ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Load one tile of x and dy (and the residual when the activation needs it) and return
    ``(x, dz)`` in fp32, dz = 0 on masked lanes. ``mean``, ``scale`` and ``shift`` broadcast against the
    tile (a [1, BLOCK_C] row in channels-last, scalars in channels-first)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    residual = x
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = grad_pre_activation(dy, x, residual, mean, scale, shift, negative_slope, ACTIVATION, HAS_RESIDUAL)
    return x, tl.where(mask, dz, 0.0)


@triton.jit
def normalize_tile(x_ptr, residual_ptr, y_ptr, offs, mask, mean, scale, shift, negative_slope,
                   ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The forward epilogue of one tile: y = act((x - mean) * scale + shift [+ residual]), computed in
    fp32 and cast once at the store. Per-channel values broadcast against the tile."""
    z = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * scale + shift
    if HAS_RESIDUAL:
        z += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = apply_activation(z, ACTIVATION, negative_slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
