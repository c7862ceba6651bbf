"""Channels-contiguous family: channels_last, channels_last_3d and 2-D ``(N, C)`` inputs, viewed as a
matrix ``x[R, C]`` with R = N x spatial rows (row stride ``stride_r``) and channels innermost
(stride 1). Every kernel works on ``[BLOCK_R, BLOCK_C]`` tiles, so the loads along a row are
contiguous and vectorise (this is the column-reduction pattern of the Triton layer-norm tutorial).

Forward, training (per channel c, n = R):
    mean_c = sum_r x / n            var_c = sum_r (x - mean_c)^2 / n           (biased)
    invstd_c = 1 / sqrt(var_c + eps)
    y = act((x - mean_c) * scale_c + b_c [+ residual]),  scale_c = w_c * invstd_c

Backward (z is the pre-activation, recomputed; xhat = (x - mean) * invstd):
    dz      = dy * act'(z)                      d residual = dz
    dbias_c = sum_r dz                          dweight_c  = sum_r dz * xhat
    training: dx = w * invstd * (dz - dbias_c / n - xhat * dweight_c / n)
    eval:     dx = w * invstd * dz               (statistics are constants)

Kernels, in launch order (two per training pass):
    _bn_fwd_stats_channels_last   grid (C blocks, splits): shifted sums per lane over a row range,
                                  reduced to one (count, mean, M2) per channel and split; the last
                                  program of each channel block merges the splits (merge.py)
    _bn_fwd_apply_channels_last   1-D grid over (R blocks x C blocks): normalise + affine + epilogue;
                                  in training program 0 also counts the batch (common.count_batch)
    _bn_bwd_reduce_channels_last  grid (C blocks, splits): sums of dz and dz * xhat, merged likewise
    _bn_bwd_dx_channels_last      1-D grid over (R blocks x C blocks)
Bytes: the training forward reads x twice and writes y once (3 tensor passes); the backward reads
x and dy twice and writes dx once (5 passes). Offsets are int64: R * stride_r can pass 2^31.
"""
import triton
import triton.language as tl

from .common import (count_batch, finite_or_zero, load_channel_coefficients, load_grad_pre_activation, normalize_tile,
                     shifted_moments)
from .merge import finish_backward_sums, finish_statistics, last_to_arrive


@triton.jit
def _elementwise_tile(C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows, cols) of this program's tile. The grid is 1-D, channel blocks fastest: axis 0 takes
    2^31 - 1 programs, where a second grid axis would cap the channel blocks at 65535."""
    channel_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    rows = (pid // channel_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols


@triton.jit
def _bn_fwd_stats_channels_last(
    x_ptr,  # [R, C] input, row stride stride_r, channel stride 1
    partials_ptr,  # [3, num_splits, C] fp32 scratch: (count, mean - pivot, M2) per split and channel
    counter_ptr,  # [>= channel blocks] int32, zero at launch and left zero (merge.last_to_arrive)
    save_mean_ptr, save_invstd_ptr, save_count_ptr, save_m2_ptr,  # outputs, see merge.finish_statistics
    running_mean_ptr, running_var_ptr, num_batches_ptr,
    R, C, stride_r,
    rows_per_split,  # a multiple of BLOCK_R
    num_splits, inv_count, unbiased_factor, running_mean_stride, running_var_stride, eps, momentum,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_MOMENTS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Shifted sums over one split's rows (see common.shifted_moments): the split's first tile gives
    each channel's shift, then every element costs a subtract, an add and a fused multiply-add. The last
    program of each channel block merges the splits and finalizes (merge.finish_statistics)."""
    channel_block = tl.program_id(0)
    split = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # The partial means are written relative to x[0, c], the pivot the merge adds back once: with a
    # mean of 1e4 the merged quantities then stay of the size of the spread.
    pivot = finite_or_zero(tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32))
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, R)
    # First tile: its per-channel mean is the shift, and it is the accumulators' first term.
    rows = row_begin + tl.arange(0, BLOCK_R)
    mask = (rows < row_end)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = finite_or_zero(tl.sum(x, axis=0) / tl.minimum(row_end - row_begin, BLOCK_R).to(tl.float32))
    sum_d = tl.where(mask, x - shift[None, :], 0.0)
    sum_d2 = sum_d * sum_d
    # Full tiles need no row mask: nothing in the loop but the three operations per element. The loop's
    # loads are software-pipelined NUM_STAGES deep (tl.range: Triton pipelines a loop without a dot
    # only when asked this way).
    rest_begin = row_begin + BLOCK_R
    full_tiles = tl.maximum(row_end - rest_begin, 0) // BLOCK_R
    for i in tl.range(0, full_tiles, num_stages=NUM_STAGES):
        rows = rest_begin + i * BLOCK_R + tl.arange(0, BLOCK_R)
        x_tile = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=cmask[None, :], other=0.0)
        d = x_tile.to(tl.float32) - shift[None, :]
        sum_d += d
        sum_d2 += d * d
    tail = rest_begin + full_tiles * BLOCK_R
    if tail < row_end:
        rows = tail + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        x_tail = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x_tail - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    count = (row_end - row_begin).to(tl.float32)
    mean, m2 = shifted_moments(tl.sum(sum_d, axis=0), tl.sum(sum_d2, axis=0), count)
    offs = split * C + cols
    plane = num_splits * C  # one [num_splits, C] plane of the partials per quantity
    tl.store(partials_ptr + offs, tl.zeros_like(mean) + count, mask=cmask)
    tl.store(partials_ptr + plane + offs, (shift - pivot) + mean, mask=cmask)
    tl.store(partials_ptr + 2 * plane + offs, m2, mask=cmask)
    if last_to_arrive(counter_ptr + channel_block, num_splits):
        finish_statistics(partials_ptr, partials_ptr + plane, partials_ptr + 2 * plane, pivot, cols, cmask, C,
                          num_splits,
                          save_mean_ptr, save_invstd_ptr, save_count_ptr, save_m2_ptr,
                          running_mean_ptr, running_var_ptr, num_batches_ptr, inv_count, unbiased_factor,
                          running_mean_stride, running_var_stride, eps, momentum,
                          UPDATE_RUNNING, CUMULATIVE, WRITE_MOMENTS, BLOCK_SPLITS, BLOCK_C)
        tl.store(counter_ptr + channel_block, 0)


@triton.jit
def _bn_fwd_apply_channels_last(
    x_ptr, residual_ptr, y_ptr,  # [R, C], all with row stride stride_r (residual may be a dummy)
    mean_ptr, stat_ptr,  # [C] fp32 mean and invstd, or the running mean / var (STATS_ARE_RUNNING)
    weight_ptr, bias_ptr,  # [C] or dummies
    num_batches_ptr,  # [1] int64 num_batches_tracked, incremented once (COUNT_BATCH), or a dummy
    R, C, stride_r,
    eps, negative_slope,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, COUNT_BATCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    count_batch(num_batches_ptr, COUNT_BATCH)
    rows, cols = _elementwise_tile(C, BLOCK_R, BLOCK_C)
    cmask = cols < C
    mean, _, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, cols, cmask, eps, STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = rows[:, None] * stride_r + cols[None, :]
    normalize_tile(x_ptr, residual_ptr, y_ptr, offs, mask, mean[None, :], scale[None, :], shift[None, :],
                   negative_slope, ACTIVATION, HAS_RESIDUAL)


@triton.jit
def _bn_bwd_reduce_channels_last(
    grad_y_ptr, x_ptr, residual_ptr,  # [R, C], row stride stride_r (residual: only with an activation)
    mean_ptr, stat_ptr, weight_ptr, bias_ptr,  # [C], as in the apply kernel
    sums_ptr,  # [2, C] fp32 output (sum dz, sum dz * xhat), then [2, num_splits, C] fp32 scratch partials
    counter_ptr,  # [>= channel blocks] int32, zero at launch and left zero
    grad_weight_ptr, grad_bias_ptr,  # [C] outputs in the parameters' dtype, or dummies
    R, C, stride_r, rows_per_split, num_splits,
    eps, negative_slope,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    channel_block = tl.program_id(0)
    split = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, invstd, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, cols, cmask, eps, STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, R)
    acc_dz = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in tl.range(row_begin, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = rows[:, None] * stride_r + cols[None, :]
        x, dz = load_grad_pre_activation(grad_y_ptr, x_ptr, residual_ptr, offs, mask, mean[None, :], scale[None, :],
                                         shift[None, :], negative_slope, ACTIVATION, HAS_RESIDUAL)
        acc_dz += dz
        acc_dz_xhat += dz * ((x - mean[None, :]) * invstd[None, :])
    offs = split * C + cols
    plane = num_splits * C
    partials_ptr = sums_ptr + 2 * C  # one allocation holds the sums and, after them, the split partials
    tl.store(partials_ptr + offs, tl.sum(acc_dz, axis=0), mask=cmask)
    tl.store(partials_ptr + plane + offs, tl.sum(acc_dz_xhat, axis=0), mask=cmask)
    if last_to_arrive(counter_ptr + channel_block, num_splits):
        finish_backward_sums(partials_ptr, partials_ptr + plane, cols, cmask, C, num_splits, sums_ptr,
                             sums_ptr + C, grad_weight_ptr, grad_bias_ptr, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS,
                             BLOCK_SPLITS, BLOCK_C)
        tl.store(counter_ptr + channel_block, 0)


@triton.jit
def _bn_bwd_dx_channels_last(
    grad_y_ptr, x_ptr, residual_ptr,  # [R, C] inputs, row stride stride_r
    grad_x_ptr, grad_residual_ptr,  # [R, C] outputs (either may be a dummy)
    mean_ptr, stat_ptr, weight_ptr, bias_ptr,  # [C]
    sums_ptr,  # [2, C] fp32 (sum dz, sum dz * xhat) from the reduction (read only when BATCH_STATS)
    R, C, stride_r, inv_count,  # 1 / (N x spatial), computed on the host in float64
    eps, negative_slope,
    BATCH_STATS: tl.constexpr,  # training: the statistics are functions of x
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols = _elementwise_tile(C, BLOCK_R, BLOCK_C)
    cmask = cols < C
    mean, invstd, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, cols, cmask, eps, STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = rows[:, None] * stride_r + cols[None, :]
    x, dz = load_grad_pre_activation(grad_y_ptr, x_ptr, residual_ptr, offs, mask, mean[None, :], scale[None, :],
                                     shift[None, :], negative_slope, ACTIVATION, HAS_RESIDUAL)
    if WRITE_GRAD_RESIDUAL:
        tl.store(grad_residual_ptr + offs, dz.to(grad_residual_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_X:
        if BATCH_STATS:
            mean_dz = tl.load(sums_ptr + cols, mask=cmask, other=0.0) * inv_count
            mean_dz_xhat = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0) * inv_count
            xhat = (x - mean[None, :]) * invstd[None, :]
            dz = dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]
        tl.store(grad_x_ptr + offs, (dz * scale[None, :]).to(grad_x_ptr.dtype.element_ty), mask=mask)
