"""Spatial-contiguous family: NCHW, NCDHW and ``(N, C, L)`` inputs, viewed as ``x[N, C, S]`` with
strides ``(stride_n, stride_c, 1)``: every channel is N planes of S contiguous elements.

The formulas are those of ``channels_last.py``; only the tiling differs. A program works on one
channel and on ``[BLOCK_N, BLOCK_S]`` tiles of its (N, S) plane, so when S is small (7x7, 14x14) a
tile still spans several images and the loads stay long; when S is large the tile is one long run of
a plane. The tiles of a channel are numbered t = n_block * num_s_blocks + s_block, or, in the FLAT
mode, t = j // (BLOCK_N * BLOCK_S) over the flattened index j = n * S + s (see ``_tile_offsets``).

    _bn_fwd_stats_channels_first   grid (C * splits): shifted sums over a range of tiles; the last
                                   program of each channel merges its splits (merge.py)
    _bn_fwd_apply_channels_first   grid (C * tiles); in training its program 0 also counts the batch
                                   (num_batches_tracked += 1, common.count_batch)
    _bn_bwd_reduce_channels_first  grid (C * splits), merged likewise
    _bn_bwd_dx_channels_first      grid (C * tiles)
Grids are 1-D (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535, which C could pass).
The partials are laid out [splits, C] exactly as in the channels-last family, so both share the
merge of ``merge.py``.
"""
import triton
import triton.language as tl

from .common import (count_batch, finite_or_zero, load_channel_coefficients, load_grad_pre_activation, normalize_tile,
                     shifted_moments)
from .merge import finish_backward_sums, finish_statistics, last_to_arrive


@triton.jit
def _tile_offsets(tile, channel, N, S, stride_n, stride_c, num_s_blocks,
                  BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FLAT: tl.constexpr):
    """int64 offsets and mask of tile number ``tile`` of one channel's (N, S) plane.

    Two ways to tile a plane. 2-D (FLAT=False): rows are images, columns spatial positions; when S is
    not a power of two (7x7 = 49 in a 64-wide tile) a quarter of the lanes are masked off. FLAT: the
    N x S elements of the channel are numbered j = n * S + s and a tile is BLOCK_N * BLOCK_S
    consecutive j, so no lane is wasted, at the price of an integer division per element (j // S).
    The autotuner measures both; FLAT is only offered when N * S < 2^31 (j is int32)."""
    if FLAT:
        j = tile * (BLOCK_N * BLOCK_S) + (tl.arange(0, BLOCK_N)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :])
        n_idx = j // S
        s_idx = j - n_idx * S
        mask = n_idx < N
        offs = n_idx.to(tl.int64) * stride_n + channel.to(tl.int64) * stride_c + s_idx
    else:
        n_idx = (tile // num_s_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        s_idx = (tile % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (n_idx < N)[:, None] & (s_idx < S)[None, :]
        offs = n_idx.to(tl.int64)[:, None] * stride_n + channel.to(tl.int64) * stride_c + s_idx[None, :]
    return offs, mask


@triton.jit
def _bn_fwd_stats_channels_first(
    x_ptr,  # [N, C, S] input, strides (stride_n, stride_c, 1)
    partials_ptr,  # [3, num_splits, C] fp32 scratch: (count, mean - pivot, M2) per split and channel
    counter_ptr,  # [>= C] int32, zero at launch and left zero (merge.last_to_arrive)
    save_mean_ptr, save_invstd_ptr, save_count_ptr, save_m2_ptr,  # outputs, see merge.finish_statistics
    running_mean_ptr, running_var_ptr, num_batches_ptr,
    N, C, S, stride_n, stride_c,
    num_s_blocks, num_tiles, num_splits, tiles_per_split,
    inv_count, unbiased_factor, running_mean_stride, running_var_stride, eps, momentum,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_MOMENTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Shifted sums over one split's tiles of one channel (see common.shifted_moments); the last
    program of the channel merges its splits and finalizes."""
    pid = tl.program_id(0)
    channel = pid // num_splits
    split = pid % num_splits
    pivot = finite_or_zero(tl.load(x_ptr + channel.to(tl.int64) * stride_c).to(tl.float32))
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    # First tile: its mean is the shift, and it is the accumulators' first term. Every split has at
    # least one tile and every tile at least one valid element.
    offs, mask = _tile_offsets(tile_begin, channel, N, S, stride_n, stride_c, num_s_blocks, BLOCK_N, BLOCK_S, FLAT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lanes = mask.to(tl.float32)
    shift = finite_or_zero(tl.sum(tl.reshape(x, [BLOCK_N * BLOCK_S]), axis=0) /
                           tl.sum(tl.reshape(lanes, [BLOCK_N * BLOCK_S]), axis=0))
    sum_d = tl.where(mask, x - shift, 0.0)
    sum_d2 = sum_d * sum_d
    for tile in tl.range(tile_begin + 1, tile_end, num_stages=NUM_STAGES):
        offs, mask = _tile_offsets(tile, channel, N, S, stride_n, stride_c, num_s_blocks, BLOCK_N, BLOCK_S, FLAT)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        sum_d += d
        sum_d2 += d * d
        lanes += mask.to(tl.float32)
    count = tl.sum(tl.reshape(lanes, [BLOCK_N * BLOCK_S]), axis=0)
    mean, m2 = shifted_moments(tl.sum(tl.reshape(sum_d, [BLOCK_N * BLOCK_S]), axis=0),
                               tl.sum(tl.reshape(sum_d2, [BLOCK_N * BLOCK_S]), axis=0), count)
    out = split * C + channel
    plane = num_splits * C  # one [num_splits, C] plane of the partials per quantity
    tl.store(partials_ptr + out, count)
    tl.store(partials_ptr + plane + out, (shift - pivot) + mean)
    tl.store(partials_ptr + 2 * plane + out, m2)
    if last_to_arrive(counter_ptr + channel, num_splits):
        cols = channel + tl.arange(0, 1)  # the merge works on channel vectors: here a vector of one
        finish_statistics(partials_ptr, partials_ptr + plane, partials_ptr + 2 * plane,
                          tl.zeros([1], tl.float32) + pivot, cols, cols < C, C, num_splits,
                          save_mean_ptr, save_invstd_ptr, save_count_ptr, save_m2_ptr,
                          running_mean_ptr, running_var_ptr, num_batches_ptr, inv_count, unbiased_factor,
                          running_mean_stride, running_var_stride, eps, momentum,
                          UPDATE_RUNNING, CUMULATIVE, WRITE_MOMENTS, BLOCK_SPLITS, 1)
        tl.store(counter_ptr + channel, 0)


@triton.jit
def _bn_fwd_apply_channels_first(
    x_ptr, residual_ptr, y_ptr,  # [N, C, S], same strides (residual may be a dummy)
    mean_ptr, stat_ptr, weight_ptr, bias_ptr,  # [C]; stat is invstd, or running var (STATS_ARE_RUNNING)
    num_batches_ptr,  # [1] int64 num_batches_tracked, incremented once (COUNT_BATCH), or a dummy
    N, C, S, stride_n, stride_c, num_s_blocks, num_tiles,
    eps, negative_slope,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, COUNT_BATCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FLAT: tl.constexpr,
):
    count_batch(num_batches_ptr, COUNT_BATCH)
    pid = tl.program_id(0)
    channel = pid // num_tiles
    mean, _, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, channel, channel < C, eps,
        STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    offs, mask = _tile_offsets(pid % num_tiles, channel, N, S, stride_n, stride_c, num_s_blocks, BLOCK_N, BLOCK_S, FLAT)
    normalize_tile(x_ptr, residual_ptr, y_ptr, offs, mask, mean, scale, shift, negative_slope, ACTIVATION, HAS_RESIDUAL)


@triton.jit
def _bn_bwd_reduce_channels_first(
    grad_y_ptr, x_ptr, residual_ptr,  # [N, C, S], same strides
    mean_ptr, stat_ptr, weight_ptr, bias_ptr,  # [C]
    sums_ptr,  # [2, C] fp32 output (sum dz, sum dz * xhat), then [2, num_splits, C] fp32 scratch partials
    counter_ptr,  # [>= C] int32, zero at launch and left zero
    grad_weight_ptr, grad_bias_ptr,  # [C] outputs in the parameters' dtype, or dummies
    N, C, S, stride_n, stride_c,
    num_s_blocks, num_tiles, num_splits, tiles_per_split,
    eps, negative_slope,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    channel = pid // num_splits
    split = pid % num_splits
    mean, invstd, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, channel, channel < C, eps,
        STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    acc_dz = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for tile in tl.range(tile_begin, tile_end, num_stages=NUM_STAGES):
        offs, mask = _tile_offsets(tile, channel, N, S, stride_n, stride_c, num_s_blocks, BLOCK_N, BLOCK_S, FLAT)
        x, dz = load_grad_pre_activation(grad_y_ptr, x_ptr, residual_ptr, offs, mask, mean, scale, shift,
                                         negative_slope, ACTIVATION, HAS_RESIDUAL)
        acc_dz += dz
        acc_dz_xhat += dz * ((x - mean) * invstd)
    out = split * C + channel
    plane = num_splits * C
    partials_ptr = sums_ptr + 2 * C  # one allocation holds the sums and, after them, the split partials
    tl.store(partials_ptr + out, tl.sum(tl.reshape(acc_dz, [BLOCK_N * BLOCK_S]), axis=0))
    tl.store(partials_ptr + plane + out, tl.sum(tl.reshape(acc_dz_xhat, [BLOCK_N * BLOCK_S]), axis=0))
    if last_to_arrive(counter_ptr + channel, num_splits):
        cols = channel + tl.arange(0, 1)
        finish_backward_sums(partials_ptr, partials_ptr + plane, cols, cols < C, C, num_splits, sums_ptr,
                             sums_ptr + C, grad_weight_ptr, grad_bias_ptr, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS,
                             BLOCK_SPLITS, 1)
        tl.store(counter_ptr + channel, 0)


@triton.jit
def _bn_bwd_dx_channels_first(
    grad_y_ptr, x_ptr, residual_ptr,  # [N, C, S] inputs, same strides
    grad_x_ptr, grad_residual_ptr,  # [N, C, S] outputs (either may be a dummy)
    mean_ptr, stat_ptr, weight_ptr, bias_ptr,  # [C]
    sums_ptr,  # [2, C] fp32 (sum dz, sum dz * xhat) (read only when BATCH_STATS)
    N, C, S, stride_n, stride_c, num_s_blocks, num_tiles, inv_count,  # 1 / (N x spatial), computed on the host in float64
    eps, negative_slope,
    BATCH_STATS: tl.constexpr,
    STATS_ARE_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    channel = pid // num_tiles
    mean, invstd, scale, shift = load_channel_coefficients(
        mean_ptr, stat_ptr, weight_ptr, bias_ptr, channel, channel < C, eps,
        STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS)
    offs, mask = _tile_offsets(pid % num_tiles, channel, N, S, stride_n, stride_c, num_s_blocks, BLOCK_N, BLOCK_S, FLAT)
    x, dz = load_grad_pre_activation(grad_y_ptr, x_ptr, residual_ptr, offs, mask, mean, scale, shift,
                                     negative_slope, ACTIVATION, HAS_RESIDUAL)
    if WRITE_GRAD_RESIDUAL:
        tl.store(grad_residual_ptr + offs, dz.to(grad_residual_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_X:
        if BATCH_STATS:
            mean_dz = tl.load(sums_ptr + channel) * inv_count
            mean_dz_xhat = tl.load(sums_ptr + C + channel) * inv_count
            dz = dz - mean_dz - (x - mean) * invstd * mean_dz_xhat
        tl.store(grad_x_ptr + offs, (dz * scale).to(grad_x_ptr.dtype.element_ty), mask=mask)
