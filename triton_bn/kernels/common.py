"""Helpers shared by both layout families: per-lane Welford, the per-channel coefficients, and the
recomputed gradient of the activation."""
import triton
import triton.language as tl

from .activations import activation_grad, apply_activation


@triton.jit
def welford_update(count, mean, m2, x, mask):
    """One Welford step per lane. Masked lanes get weight zero (count unchanged, delta 0), so a
    tile that does not fill the block leaves no trace in the statistics."""
    count = count + mask.to(tl.float32)
    delta = tl.where(mask, x - mean, 0.0)
    mean = mean + delta / tl.maximum(count, 1.0)
    m2 = m2 + tl.where(mask, delta * (x - mean), 0.0)
    return count, mean, m2


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
def merge_lanes(count, mean, m2, axis: tl.constexpr):
    """Merge per-lane Welford triples along ``axis`` in one step (Chan's merge of k parts):

        n = sum n_i      mean = sum n_i mean_i / n      M2 = sum M2_i + sum n_i (mean_i - mean)^2

    Exact like the pairwise merge, and stable for the same reason (only deviations from the mean are
    squared); unlike a ``tl.reduce`` with a Python combine function it is plain vectorised sums, fast on
    the GPU and in the interpreter alike. Empty lanes (n_i = 0) contribute nothing."""
    total = tl.sum(count, axis)
    merged_mean = tl.sum(count * mean, axis) / tl.maximum(total, 1.0)
    deviation = mean - tl.expand_dims(merged_mean, axis)
    merged_m2 = tl.sum(m2, axis) + tl.sum(count * deviation * deviation, axis)
    return total, merged_mean, merged_m2


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
