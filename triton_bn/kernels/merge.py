"""The end of every reduction: the last program to finish merges all splits' partials and finalizes.

Why Chan and not ``E[x^2] - E[x]^2``: with a mean of 1e4 and a std of 1, ``E[x^2]`` is 1e8 and fp32 keeps
about 7 digits, so the difference of two numbers near 1e8 has no correct digits left. Chan keeps the
centred sum of squares ``M2 = sum (x - mean)^2`` of each part and merges two parts A and B exactly:

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Every quantity stays of the size of the data's spread, so nothing cancels. A part with ``n_b = 0``
(masked lanes) has weight zero and leaves the other part unchanged. k parts merge at once with the same
formula summed (``merge_parts``), which is how a ``[BLOCK_SPLITS, BLOCK_C]`` tile of split partials is
merged in one step.

No separate finalize launch: each program of a reduction writes its split's partial, then takes a
ticket from a per-channel-block counter (``last_to_arrive``); the program that draws the last ticket
merges all the splits of its channels, in split order (tile by tile, a fixed reduction tree inside each
tile: the result does not depend on which program came last), writes the statistics and updates the
running statistics, then resets the counter to zero for the next launch (so CUDA-graph replays find
it zero too).
"""
import triton
import triton.language as tl


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    count = count_a + count_b
    # weight of part b; 0 when both parts are empty (avoids 0 / 0)
    weight_b = tl.where(count > 0.0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    # an infinite mean (a channel holding inf) merges as PyTorch's sum / n would: inf with finite parts is inf,
    # +inf with -inf is NaN. mean_a + delta * weight_b would give inf - inf = NaN for the first, so the
    # weighted sum serves there (only there: for finite means the delta form rounds better)
    mean = tl.where(tl.abs(delta) <= 3.4028234663852886e38, mean_a + delta * weight_b,
                    mean_a * (1.0 - weight_b) + mean_b * weight_b)
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@triton.jit
def merge_parts(count, mean, m2):
    """k-way Chan merge along axis 0: n = sum n_i, mean = sum n_i mean_i / n,
    M2 = sum M2_i + sum n_i (mean_i - mean)^2. Empty parts (n_i = 0) contribute nothing."""
    total = tl.sum(count, 0)
    merged_mean = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
    deviation = mean - merged_mean[None, :]
    merged_m2 = tl.sum(m2, 0) + tl.sum(count * deviation * deviation, 0)
    return total, merged_mean, merged_m2


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """True in exactly one program: the last of ``arrivals`` programs to call this on ``counter_ptr``.

    The barrier first makes every thread's partial stores precede the atomic in the CTA; the atomic's
    release (acq_rel, device scope) then publishes them, cumulatively, to whichever program draws the
    last ticket, and its acquire makes that program's later loads see every other program's stores."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == arrivals - 1


@triton.jit
def merge_split_moments(count_ptr, mean_ptr, m2_ptr, cols, cmask, C, num_splits,
                        BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge ``num_splits`` partial (count, mean, M2) rows of the columns ``cols``: one k-way merge per
    tile of BLOCK_SPLITS splits, the tiles merged in order. Returns (count, mean, M2, tiles merged)."""
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    tiles = 0
    for first in range(0, num_splits, BLOCK_SPLITS):
        splits = first + tl.arange(0, BLOCK_SPLITS)
        mask = (splits < num_splits)[:, None] & cmask[None, :]
        offs = splits[:, None] * C + cols[None, :]
        # .cg: read from L2, where the other programs' stores are, not from a stale L1 line
        tile = merge_parts(tl.load(count_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"),
                           tl.load(mean_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"),
                           tl.load(m2_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"))
        count, mean, m2 = chan_merge(count, mean, m2, tile[0], tile[1], tile[2])
        tiles += 1
    return count, mean, m2, tiles


@triton.jit
def finish_statistics(
    count_ptr, mean_ptr, m2_ptr,  # [num_splits, C] fp32 partials (count, mean - pivot, M2)
    pivot,  # [BLOCK_C] fp32: the partial means are relative to it
    cols, cmask, C, num_splits,
    save_mean_ptr, save_invstd_ptr,  # [C] fp32 outputs: batch mean and 1 / sqrt(biased var + eps)
    save_count_ptr, save_m2_ptr,  # [C] fp32 outputs (WRITE_MOMENTS): the merged count and M2, for SyncBatchNorm
    running_mean_ptr, running_var_ptr,  # [C] (strided) running buffers, updated in place, or dummies
    num_batches_ptr,  # [1] int64 num_batches_tracked before this batch (read only when CUMULATIVE), or a dummy
    inv_count, unbiased_factor,  # 1 / n and n / (n - 1), from the host in float64 (n is exact there)
    running_mean_stride, running_var_stride,
    eps, momentum,
    UPDATE_RUNNING: tl.constexpr,  # write running_mean / running_var
    CUMULATIVE: tl.constexpr,  # momentum=None: the weight of this batch is 1 / (num_batches_tracked + 1)
    WRITE_MOMENTS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Run by the last program of a channel block: merge the splits, write mean and invstd, update the
    running statistics exactly once (the kernel that calls this runs once per forward: it is tuned only
    with scratch running buffers)."""
    count, mean, m2, _ = merge_split_moments(count_ptr, mean_ptr, m2_ptr, cols, cmask, C, num_splits,
                                             BLOCK_SPLITS, BLOCK_C)
    mean += pivot
    var_biased = m2 * inv_count
    tl.store(save_mean_ptr + cols, mean, mask=cmask)
    tl.store(save_invstd_ptr + cols, tl.math.rsqrt(var_biased + eps), mask=cmask)
    if WRITE_MOMENTS:
        tl.store(save_count_ptr + cols, count, mask=cmask)
        tl.store(save_m2_ptr + cols, m2, mask=cmask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / (tl.load(num_batches_ptr) + 1).to(tl.float32)  # the count with this batch
        else:
            factor = momentum
        # PyTorch stores the unbiased variance in running_var; n > 1 is checked on the host.
        var_unbiased = var_biased * unbiased_factor
        rm_ptrs = running_mean_ptr + cols * running_mean_stride
        rv_ptrs = running_var_ptr + cols * running_var_stride
        rm = tl.load(rm_ptrs, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptrs, mask=cmask, other=0.0).to(tl.float32)
        rm = (1.0 - factor) * rm + factor * mean
        rv = (1.0 - factor) * rv + factor * var_unbiased
        tl.store(rm_ptrs, rm.to(running_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rv_ptrs, rv.to(running_var_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def finish_backward_sums(
    sum_dz_part_ptr, sum_dz_xhat_part_ptr,  # [num_splits, C] fp32 partials
    cols, cmask, C, num_splits,
    sum_dz_ptr, sum_dz_xhat_ptr,  # [C] fp32 outputs, read by the dx kernel
    grad_weight_ptr, grad_bias_ptr,  # [C] in the parameters' dtype, or dummies
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Run by the last program of a channel block: sum the splits tile by tile, in split order (a fixed
    order: the gradients are bitwise reproducible). dbias = sum dz, dweight = sum dz * xhat."""
    sum_dz = tl.zeros([BLOCK_C], tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C], tl.float32)
    for first in range(0, num_splits, BLOCK_SPLITS):
        splits = first + tl.arange(0, BLOCK_SPLITS)
        mask = (splits < num_splits)[:, None] & cmask[None, :]
        offs = splits[:, None] * C + cols[None, :]
        sum_dz += tl.sum(tl.load(sum_dz_part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), 0)
        sum_dz_xhat += tl.sum(tl.load(sum_dz_xhat_part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), 0)
    tl.store(sum_dz_ptr + cols, sum_dz, mask=cmask)
    tl.store(sum_dz_xhat_ptr + cols, sum_dz_xhat, mask=cmask)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + cols, sum_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=cmask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=cmask)
