"""Chan's parallel merge of ``(count, mean, M2)`` triples, and the per-channel finalize kernels.

Why Chan and not ``E[x^2] - E[x]^2``: with a mean of 1e4 and a std of 1, ``E[x^2]`` is 1e8 and fp32 keeps
about 7 digits, so the difference of two numbers near 1e8 has no correct digits left. Chan keeps the
centred sum of squares ``M2 = sum (x - mean)^2`` of each part and merges two parts A and B exactly:

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Every quantity stays of the size of the data's spread, so nothing cancels. A part with ``n_b = 0``
(a split with no rows, or masked lanes) has weight zero and leaves the other part unchanged.
"""
import triton
import triton.language as tl


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    count = count_a + count_b
    # weight of part b; 0 when both parts are empty (avoids 0 / 0)
    weight_b = tl.where(count > 0.0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@triton.jit
def _bn_fwd_stats_finalize(
    count_ptr, mean_ptr, m2_ptr,  # [num_splits, C] fp32 partials from a *_stats_partial kernel
    pivot_ptr,  # [C] fp32: the partial means are relative to this per-channel pivot
    save_mean_ptr, save_invstd_ptr,  # [C] fp32 outputs: batch mean and 1 / sqrt(biased var + eps)
    save_count_ptr, save_m2_ptr,  # [C] fp32 outputs (WRITE_MOMENTS): the merged count and M2, for SyncBatchNorm
    running_mean_ptr, running_var_ptr,  # [C] (strided) running buffers, updated in place, or dummies
    num_batches_ptr,  # [1] int64 num_batches_tracked (read only when CUMULATIVE), or a dummy
    C, num_splits,
    inv_count, unbiased_factor,  # 1 / n and n / (n - 1), from the host in float64 (n is exact there)
    running_mean_stride, running_var_stride,
    eps, momentum,
    UPDATE_RUNNING: tl.constexpr,  # write running_mean / running_var
    CUMULATIVE: tl.constexpr,  # momentum=None: the weight of this batch is 1 / num_batches_tracked
    WRITE_MOMENTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the split partials of BLOCK_C channels in split order (deterministic), then update the
    running statistics exactly once. One program per BLOCK_C channels; never autotuned, so it can not
    run twice on the same buffers."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for split in range(0, num_splits):
        offs = split * C + cols
        count, mean, m2 = chan_merge(
            count, mean, m2,
            tl.load(count_ptr + offs, mask=cmask, other=0.0),
            tl.load(mean_ptr + offs, mask=cmask, other=0.0),
            tl.load(m2_ptr + offs, mask=cmask, other=0.0),
        )
    mean += tl.load(pivot_ptr + cols, mask=cmask, other=0.0)
    var_biased = m2 * inv_count
    tl.store(save_mean_ptr + cols, mean, mask=cmask)
    tl.store(save_invstd_ptr + cols, tl.math.rsqrt(var_biased + eps), mask=cmask)
    if WRITE_MOMENTS:
        tl.store(save_count_ptr + cols, count, mask=cmask)
        tl.store(save_m2_ptr + cols, m2, mask=cmask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_ptr).to(tl.float32)
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
def _bn_bwd_reduce_finalize(
    sum_dz_part_ptr, sum_dz_xhat_part_ptr,  # [num_splits, C] fp32 partials
    sum_dz_ptr, sum_dz_xhat_ptr,  # [C] fp32 outputs, read by the dx kernel
    grad_weight_ptr, grad_bias_ptr,  # [C] in the parameters' dtype, or dummies
    C, num_splits,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sum the backward partials in split order: a fixed order, so the gradients are bitwise
    reproducible (no atomics). dbias = sum dz, dweight = sum dz * xhat."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_dz = tl.zeros([BLOCK_C], tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C], tl.float32)
    for split in range(0, num_splits):
        offs = split * C + cols
        sum_dz += tl.load(sum_dz_part_ptr + offs, mask=cmask, other=0.0)
        sum_dz_xhat += tl.load(sum_dz_xhat_part_ptr + offs, mask=cmask, other=0.0)
    tl.store(sum_dz_ptr + cols, sum_dz, mask=cmask)
    tl.store(sum_dz_xhat_ptr + cols, sum_dz_xhat, mask=cmask)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + cols, sum_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=cmask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=cmask)
