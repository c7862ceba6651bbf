"""Launchers: plain functions that pick the layout family, allocate (statistics always in fp32),
compute grids and call the kernels. No autograd and no nn here; arguments arrive validated by
``functional.py`` and the ops of ``ops.py``.

CUDA tensors run the compiled kernels; CPU tensors run the same kernels through the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before import, and otherwise the pure-PyTorch path of
``reference.py`` (same semantics, so a CPU-only user still gets a working library). float64 tensors
take the pure-PyTorch path on every device.

Entry points (each also behind a custom op of ``ops.py``):
    batch_stats(...)           -> (mean, invstd)         split reduction, merged by its last program (1 launch)
    batch_moments(x)           -> [3, C] (count, mean, M2), for SyncBatchNorm (1 launch)
    batch_norm_apply(...)      -> y                      1 launch
    batch_norm_backward(...)   -> (dx, dweight, dbias, dresidual): backward_sums (1 launch) when the sums
                                  are needed, then backward_elementwise (dx, 1 launch) when dx or
                                  d residual is wanted: at most 2 launches
"""
import functools
import threading
import warnings
from typing import List, Optional, Tuple

import torch

from . import reference
from .autotune import INTERPRET, TileConfig, cdiv, merge_block, split_count, tuner
from .kernels import channels_first as cf
from .kernels import channels_last as cl
from .layout import ChannelsLastPlan, empty_like_input, like_input, plan_layout
from .occupancy import resident_per_sm

_dummies = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """A private 1-element buffer for pointer arguments a kernel's flags switch off. Never the input:
    a kernel that wrote through such a pointer by mistake would corrupt only this scratch."""
    dummy = _dummies.get(device)
    if dummy is None:
        dummy = _dummies.setdefault(device, torch.empty(1, dtype=torch.float32, device=device))
    return dummy


def _on_input_device(launcher):
    """Run ``launcher`` with its first tensor argument's GPU as the current device: Triton launches on the
    current device, so a model on cuda:1 while cuda:0 is current would otherwise launch on the wrong GPU."""
    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return wrapper


# What the kernels take. float64 has no fast path worth a kernel (it exists for reference computations
# and gradcheck): it takes the pure-PyTorch path on every device.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_kernels(x: torch.Tensor) -> bool:
    return (x.is_cuda or INTERPRET) and x.dtype in KERNEL_DTYPES


def _family(plan) -> str:
    return "channels_last" if isinstance(plan, ChannelsLastPlan) else "channels_first"


# The kernel of each role, per layout family.
_KERNELS = {
    "channels_last": dict(stats=cl._bn_fwd_stats_channels_last, apply=cl._bn_fwd_apply_channels_last,
                          bwd_reduce=cl._bn_bwd_reduce_channels_last, bwd_dx=cl._bn_bwd_dx_channels_last),
    "channels_first": dict(stats=cf._bn_fwd_stats_channels_first, apply=cf._bn_fwd_apply_channels_first,
                           bwd_reduce=cf._bn_bwd_reduce_channels_first, bwd_dx=cf._bn_bwd_dx_channels_first),
}


def _per_channel_args(mean, stat, weight, bias, device):
    """(mean, stat, weight, bias) as kernel arguments: read-only vectors with stride 1 (a strided view is
    copied), a private dummy for an absent one."""
    return tuple(_dummy(device) if t is None else t.contiguous() for t in (mean, stat, weight, bias))


# -- arrival counters -------------------------------------------------------------------------------------
_COUNTERS = {}  # (device, stream) -> int32 zeros: every reduction leaves its counters at zero
_COUNTERS_LOCK = threading.Lock()


def _arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Zeroed int32 counters, one per channel block of a reduction (welford.last_to_arrive). Kernels on
    one stream run one after another and each resets what it used, so one buffer per stream serves every
    call; two streams never share one. Inside a CUDA graph capture the buffer is allocated (and its
    zeroing captured) for that call alone: a buffer from the graph's private memory must not be kept."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    if stream and torch.cuda.is_current_stream_capturing():
        return torch.zeros(needed, dtype=torch.int32, device=device)
    key = (device, stream)
    with _COUNTERS_LOCK:
        counters = _COUNTERS.get(key)
        if counters is None or counters.numel() < needed:
            counters = _COUNTERS[key] = torch.zeros(max(needed, 1024), dtype=torch.int32, device=device)
    return counters


# -- launching --------------------------------------------------------------------------------------------
def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_first_launch_in_capture(kernel, grid, args, kwargs) -> None:
    """Inside a CUDA graph capture, a kernel variant that never ran in this process can not run: its
    first launch loads its module, which a capturing stream refuses (after compiling it, which is
    allowed). ``warmup`` compiles or finds the variant without launching it; an unloaded module means
    this would be its first launch: say so before the capture breaks."""
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    if getattr(compiled, "module", None) is None:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "a kernel")
        raise RuntimeError(
            f"triton_bn: {name} would run for the first time in this form (these shapes, dtypes, layouts and "
            "flags) inside a CUDA graph capture, where its module can not be loaded. Warm up first: run the same "
            "step (forward and backward) once before capturing.")


def _launch(kernel, grid, args, kwargs, device: torch.device) -> None:
    if _capturing(device):
        refuse_first_launch_in_capture(kernel, grid, args, kwargs)
    kernel[grid](*args, **kwargs)


_RESIDENT = {}  # (kernel, config, dtype, device, launch kwargs) -> programs of that variant fitting per SM


def _launch_reduction(kernel, plan, cfg: TileConfig, x: torch.Tensor, make_args, kwargs) -> None:
    """Launch a reduction with as many splits as fit: ``cfg.programs_per_sm`` programs per multiprocessor,
    or fewer when fewer of the compiled variant can be resident at once (more would only add waves).
    ``make_args(layout)`` builds the arguments for a ``_reduction_grid`` layout."""
    device = x.device
    layout = _reduction_grid(plan, cfg, device, cfg.programs_per_sm)
    if device.type == "cuda":
        key = (kernel, cfg, x.dtype, device, tuple(kwargs.items()))
        fits = _RESIDENT.get(key)
        if fits is None:
            args = make_args(layout)
            if _capturing(device):
                refuse_first_launch_in_capture(kernel, layout[1], args, kwargs)
            fits = _RESIDENT[key] = _resident(kernel, layout[1], args, kwargs, device, cfg)
        if fits < cfg.programs_per_sm:
            layout = _reduction_grid(plan, cfg, device, fits)
    _launch(kernel, layout[1], make_args(layout), kwargs, device)


def _resident(kernel, grid, args, kwargs, device, cfg: TileConfig) -> int:
    try:
        return resident_per_sm(kernel.warmup(*args, grid=grid, **kwargs), device)
    except Exception as exc:  # noqa: BLE001 - only the split count depends on it: fall back, and say so once
        warnings.warn(f"triton_bn: could not read the compiled kernel's resources ({type(exc).__name__}: {exc}); "
                      f"reductions use {cfg.programs_per_sm} programs per multiprocessor")
        return cfg.programs_per_sm


# -- grids ------------------------------------------------------------------------------------------------
GRID_AXIS_LIMIT = 65535  # grid axes 1 and 2; axis 0 takes 2^31 - 1


def _reduction_grid(plan, cfg: TileConfig, device, programs_per_sm: int):
    """(num_splits, grid, size arguments, counters needed) of a reduction kernel aiming at
    ``programs_per_sm`` programs per multiprocessor. Channel-contiguous: channel blocks on axis 0 (any
    C), splits on axis 1 (a few per multiprocessor, far under its limit)."""
    if isinstance(plan, ChannelsLastPlan):
        row_blocks = cdiv(plan.rows, cfg.block_a)
        channel_blocks = cdiv(plan.channels, cfg.block_b)
        splits = min(split_count(row_blocks, channel_blocks, device, programs_per_sm), GRID_AXIS_LIMIT)
        rows_per_split = cdiv(row_blocks, splits) * cfg.block_a
        splits = cdiv(plan.rows, rows_per_split)
        return (splits, (channel_blocks, splits), (plan.rows, plan.channels, plan.row_stride, rows_per_split, splits),
                channel_blocks)
    num_s_blocks, num_tiles = _channels_first_tiles(plan, cfg)
    splits = split_count(num_tiles, plan.channels, device, programs_per_sm)
    tiles_per_split = cdiv(num_tiles, splits)
    splits = cdiv(num_tiles, tiles_per_split)
    size_args = (plan.batch, plan.channels, plan.spatial, plan.batch_stride, plan.channel_stride,
                 num_s_blocks, num_tiles, splits, tiles_per_split)
    return splits, (plan.channels * splits,), size_args, plan.channels


def _channels_first_tiles(plan, cfg: TileConfig):
    """(tiles per row of a plane, tiles per channel) of a channels-first tiling (2-D or flat)."""
    if cfg.flat:
        return 1, cdiv(plan.batch * plan.spatial, cfg.block_a * cfg.block_b)
    num_s_blocks = cdiv(plan.spatial, cfg.block_b)
    return num_s_blocks, cdiv(plan.batch, cfg.block_a) * num_s_blocks


def _elementwise_grid(plan, cfg: TileConfig):
    if isinstance(plan, ChannelsLastPlan):  # 1-D: (row blocks x channel blocks), see _elementwise_tile
        grid = (cdiv(plan.rows, cfg.block_a) * cdiv(plan.channels, cfg.block_b),)
        return grid, (plan.rows, plan.channels, plan.row_stride)
    num_s_blocks, num_tiles = _channels_first_tiles(plan, cfg)
    grid = (plan.channels * num_tiles,)
    return grid, (plan.batch, plan.channels, plan.spatial, plan.batch_stride, plan.channel_stride,
                  num_s_blocks, num_tiles)


# -- forward --------------------------------------------------------------------------------------------
@_on_input_device
def batch_stats(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], momentum: float, cumulative: bool,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and invstd (fp32, [C]) of x, and the running-statistics update (once)."""
    if not uses_kernels(x):
        return reference.batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)
    channels = x.shape[1]
    mean = torch.empty(channels, dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:  # PyTorch leaves the running statistics alone on an empty batch
        return mean.zero_(), invstd.fill_(float("nan"))
    _merged_statistics(x, mean, invstd, None, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                       eps)
    return mean, invstd


@_on_input_device
def batch_moments(x: torch.Tensor) -> torch.Tensor:
    """Local ``(count, mean, M2)`` per channel, packed as one fp32 [3, C] tensor (what SyncBatchNorm
    all-gathers). An empty x gives count 0, which weighs nothing in the merge."""
    if not uses_kernels(x):
        return reference.batch_moments(x)
    channels = x.shape[1]
    moments = torch.zeros((3, channels), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        _merged_statistics(x, moments[1], torch.empty_like(moments[1]), moments, None, None, None, 0.0, False, 1e-5)
    return moments


def _merged_statistics(x, mean, invstd, moments, running_mean, running_var, num_batches_tracked, momentum: float,
                       cumulative: bool, eps: float) -> None:
    """One launch: split shifted sums, merged and finalized by the last program of each channel block
    (mean, invstd, optional moments, and the running statistics, updated once)."""
    channels = x.shape[1]
    x, plan = plan_layout(x)
    family = _family(plan)
    kernel = _KERNELS[family]["stats"]
    count = x.numel() // channels
    update = running_mean is not None
    dummy = _dummy(x.device)
    moment_args = (moments[0], moments[2]) if moments is not None else (dummy, dummy)
    flags = dict(UPDATE_RUNNING=update, CUMULATIVE=cumulative, WRITE_MOMENTS=moments is not None)
    scalars = (1.0 / count, count / (count - 1) if count > 1 else float("nan"),
               running_mean.stride(0) if update else 0, running_var.stride(0) if update else 0, eps, momentum)

    def run(cfg: TileConfig, running):
        def make_args(layout):
            splits, _, size_args, blocks = layout
            partials = torch.empty((3, splits, channels), dtype=torch.float32, device=x.device)
            return (x, partials[0], partials[1], partials[2], _arrival_counters(x.device, blocks), mean, invstd,
                    *moment_args, *running, *size_args, *scalars)

        kwargs = dict(flags, BLOCK_SPLITS=merge_block(family, cfg), **cfg.launch_kwargs(family, reduction=True))
        _launch_reduction(kernel, plan, cfg, x, make_args, kwargs)

    running = (running_mean if update else dummy, running_var if update else dummy,
               num_batches_tracked if (update and cumulative) else dummy)

    def run_while_tuning(cfg: TileConfig):  # each candidate updates scratch copies, never the real buffers
        run(cfg, tuple(t.clone() if t is not dummy else t for t in running))

    run(tuner.select(family, "stats", plan, x, run_while_tuning), running)


def _epilogue_flags(weight, bias, residual, batch_stats: bool, activation: int) -> dict:
    return dict(STATS_ARE_RUNNING=not batch_stats, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_RESIDUAL=residual is not None, ACTIVATION=activation)


@_on_input_device
def batch_norm_apply(x: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
                     batch_stats: bool, activation: int, negative_slope: float) -> torch.Tensor:
    """y = act(x * scale + shift [+ residual]). ``stat`` is invstd (batch_stats) or the running variance."""
    if not uses_kernels(x):
        return reference.batch_norm_apply(x, mean, stat, weight, bias, residual, eps, batch_stats,
                                          activation, negative_slope)
    x, plan = plan_layout(x)
    y = empty_like_input(x)
    if x.numel() == 0:
        return y
    device = x.device
    residual = like_input(residual, x) if residual is not None else None
    family = _family(plan)
    kernel = _KERNELS[family]["apply"]
    tensors = (x, residual if residual is not None else _dummy(device), y,
               *_per_channel_args(mean, stat, weight, bias, device))
    flags = _epilogue_flags(weight, bias, residual, batch_stats, activation)

    def run(cfg: TileConfig):
        grid, size_args = _elementwise_grid(plan, cfg)
        _launch(kernel, grid, (*tensors, *size_args, eps, negative_slope), dict(flags, **cfg.launch_kwargs(family)),
                device)

    run(tuner.select(family, "apply", plan, x, run))
    return y


# -- backward -------------------------------------------------------------------------------------------
@_on_input_device
def backward_sums(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                  weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  eps: float, batch_stats: bool, activation: int, negative_slope: float,
                  grad_weight: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """Pass 1 of the backward: fp32 [2, C] = (sum dz, sum dz * xhat) per channel, also written to
    ``grad_bias`` / ``grad_weight`` when given (in the parameters' dtype)."""
    if not uses_kernels(x):
        return reference.backward_sums(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation,
                                       negative_slope, grad_weight, grad_bias)
    channels, device = x.shape[1], x.device
    sums = torch.empty((2, channels), dtype=torch.float32, device=device)
    if x.numel() == 0:
        sums.zero_()
        for out, row in ((grad_weight, 1), (grad_bias, 0)):
            if out is not None:
                out.copy_(sums[row])
        return sums
    x, plan = plan_layout(x)
    grad_y = like_input(grad_y, x)
    residual = like_input(residual, x) if residual is not None else None
    family = _family(plan)
    kernel = _KERNELS[family]["bwd_reduce"]
    per_channel = _per_channel_args(mean, stat, weight, bias, device)
    flags = _epilogue_flags(weight, bias, residual, batch_stats, activation)
    residual_arg = residual if residual is not None else _dummy(device)
    outputs = (sums[0], sums[1], grad_weight if grad_weight is not None else _dummy(device),
               grad_bias if grad_bias is not None else _dummy(device))

    def run(cfg: TileConfig):  # writes only scratch and this call's outputs: safe to run per candidate
        def make_args(layout):
            splits, _, size_args, blocks = layout
            partials = torch.empty((2, splits, channels), dtype=torch.float32, device=device)
            return (grad_y, x, residual_arg, *per_channel, partials[0], partials[1], _arrival_counters(device, blocks),
                    *outputs, *size_args, eps, negative_slope)

        kwargs = dict(flags, WRITE_GRAD_WEIGHT=grad_weight is not None, WRITE_GRAD_BIAS=grad_bias is not None,
                      BLOCK_SPLITS=merge_block(family, cfg), **cfg.launch_kwargs(family, reduction=True))
        _launch_reduction(kernel, plan, cfg, x, make_args, kwargs)

    run(tuner.select(family, "bwd_reduce", plan, x, run))
    return sums


@_on_input_device
def backward_elementwise(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                         weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], sums: Optional[torch.Tensor], inv_count: float,
                         eps: float, batch_stats: bool, activation: int, negative_slope: float,
                         want_dx: bool, want_dresidual: bool):
    """Pass 2 of the backward: (dx, d residual), each None unless wanted. With batch statistics, dx
    uses ``sums * inv_count`` (the mean of dz and of dz * xhat over the batch; SyncBatchNorm passes
    all-reduced sums already divided by the global count, with inv_count = 1)."""
    if not uses_kernels(x):
        return reference.backward_elementwise(grad_y, x, mean, stat, weight, bias, residual, sums, inv_count, eps,
                                              batch_stats, activation, negative_slope, want_dx, want_dresidual)
    device = x.device
    if x.numel() == 0:
        return (torch.zeros_like(x) if want_dx else None, torch.zeros_like(x) if want_dresidual else None)
    x, plan = plan_layout(x)
    grad_y = like_input(grad_y, x)
    grad_x = empty_like_input(x) if want_dx else None
    grad_residual = empty_like_input(x) if want_dresidual else None
    if want_dresidual and not want_dx and activation == 0:
        grad_residual.copy_(grad_y)  # act = identity: d residual = dy, no kernel needed
        return grad_x, grad_residual
    residual = like_input(residual, x) if residual is not None else None
    family = _family(plan)
    kernel = _KERNELS[family]["bwd_dx"]
    per_channel = _per_channel_args(mean, stat, weight, bias, device)
    flags = _epilogue_flags(weight, bias, residual, batch_stats, activation)
    sums = sums if sums is not None else torch.zeros((2, 1), dtype=torch.float32, device=device)

    def run_dx(cfg: TileConfig):
        grid, size_args = _elementwise_grid(plan, cfg)
        args = (grad_y, x, residual if residual is not None else _dummy(device),
                grad_x if want_dx else _dummy(device), grad_residual if want_dresidual else _dummy(device),
                *per_channel, sums[0], sums[1], *size_args, inv_count, eps, negative_slope)
        _launch(kernel, grid, args, dict(flags, BATCH_STATS=batch_stats, WRITE_GRAD_X=want_dx,
                                         WRITE_GRAD_RESIDUAL=want_dresidual, **cfg.launch_kwargs(family)), device)

    run_dx(tuner.select(family, "bwd_dx", plan, x, run_dx))
    return grad_x, grad_residual


def batch_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        residual: Optional[torch.Tensor], eps: float, batch_stats: bool, activation: int,
                        negative_slope: float, output_mask: List[bool]):
    """(dx, dweight, dbias, dresidual), each None unless asked for by ``output_mask``. Runs pass 1 only
    when something needs the per-channel sums, pass 2 only when dx or d residual is wanted.

    ``residual`` is only needed (and only saved by the autograd formula) when an activation follows
    the add: it is part of the pre-activation whose derivative is recomputed."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    grad_weight = torch.empty_like(weight) if (want_dweight and weight is not None) else None
    grad_bias = torch.empty_like(bias) if (want_dbias and bias is not None) else None
    sums = None
    if (want_dx and batch_stats) or grad_weight is not None or grad_bias is not None:
        sums = backward_sums(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation,
                             negative_slope, grad_weight, grad_bias)
    grad_x = grad_residual = None
    if want_dx or want_dresidual:
        count = max(x.numel() // max(x.shape[1], 1), 1)
        grad_x, grad_residual = backward_elementwise(grad_y, x, mean, stat, weight, bias, residual, sums, 1.0 / count,
                                                     eps, batch_stats, activation, negative_slope, want_dx,
                                                     want_dresidual)
    return grad_x, grad_weight, grad_bias, grad_residual
