"""The Triton backend's launchers: plain functions that pick the layout family, allocate (statistics always in
fp32), ask the tuner (``autotune.py``) and the grids (``triton_grids.py``), remember the answers per kind of
call (prepared launches) and launch the kernels of ``kernels/`` (how a launch is made: ``triton_launch.py``).
No autograd and no nn here; arguments arrive checked (``functional.py``, ``ops.py``) and ``dispatch.py`` sends only what
``uses_kernels`` says these kernels take: fp32, fp16 and bf16 on CUDA, and on the CPU under the Triton
interpreter (``TRITON_INTERPRET=1`` set before import) or a stand-in CUDA driver.

Entry points (each but the first also behind a custom op of ``ops.py``):
    batch_norm_training(...)   -> (y, mean, invstd)      batch_stats then batch_norm_apply (2 launches; the
                                  second also counts the batch in num_batches_tracked)
    batch_stats(...)           -> (mean, invstd)         split reduction, merged by its last program (1 launch)
    batch_moments(x)           -> [3, C] (count, mean, M2), for SyncBatchNorm (1 launch; ``Backend.moments``)
    batch_norm_apply(...)      -> y                      1 launch
    batch_norm_backward(...)   -> (dx, dweight, dbias, dresidual): backward_sums (1 launch) when the sums
                                  are needed, then backward_elementwise (dx, 1 launch) when dx or
                                  d residual is wanted: at most 2 launches
"""
from typing import List, Optional, Tuple

import torch

from .. import spec
from ..autotune import INTERPRET, TileConfig, merge_block, tuner
from ..kernels import KERNELS
from . import kernel_statistic
from .layout import ChannelsLastGeometry, dense_geometry, empty_like_input, like_input
from .triton_grids import elementwise_grid, reduction_layout
from . import triton_launch
from .triton_launch import STAND_IN, PreparedLaunch, arrival_counters, dummy_buffer, input_device, on_input_device

# What the kernels take. float64 has no fast path worth a kernel (it exists for reference computations
# and gradcheck): it takes the pure-PyTorch path on every device.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_kernels(x: torch.Tensor) -> bool:
    return (x.is_cuda or INTERPRET or STAND_IN) and x.dtype in KERNEL_DTYPES


def _family(geometry) -> str:
    return "channels_last" if isinstance(geometry, ChannelsLastGeometry) else "channels_first"


def _per_channel_args(mean, stat, weight, bias, device):
    """(mean, stat, weight, bias) as kernel arguments: read-only vectors with stride 1 (a strided view is
    copied), a private dummy for an absent one."""
    dummy = dummy_buffer(device)  # (written out, not a generator: this runs on every call)
    return (dummy if mean is None else mean.contiguous(), dummy if stat is None else stat.contiguous(),
            dummy if weight is None else weight.contiguous(), dummy if bias is None else bias.contiguous())


def _on_scratch(make_args, copy):
    """The ``tuning_args`` of a kernel that updates state (running statistics, the batch count): the tuner
    runs every candidate, so candidates get ``make_args(layout, copy())`` instead, scratch copies of that
    state made once, at the first (untimed) candidate run, so that no copy kernel is timed."""
    made = []

    def tuning_args(layout):
        if not made:
            made.append(copy())
        return make_args(layout, made[0])
    return tuning_args


# -- prepared launches -----------------------------------------------------------------------------------
# Everything a launch needs except the tensors (kernel, grid, size arguments, constexprs and options), per
# (role, geometry, dtype, device, epilogue flags) and tuner generation: a training loop asks the same
# questions every step, and answering them again (configuration lookup, grid arithmetic, keyword dicts)
# costs more host time than the launch itself; its PreparedLaunch also keeps the compiled variants it may
# call directly. A new tuner generation (forced configuration, reset,
# tuning switched) makes every prepared launch unreachable.
_CALLS = {}


def _remember(key, call):
    if len(_CALLS) > 8192:
        _CALLS.clear()
    _CALLS[key] = call
    return call


def _prepared_launch(role: str, geometry, x: torch.Tensor, flags: tuple, build):
    """The prepared launch of (role, geometry, dtype, device, flags); on a miss,
    ``build(kernel, family, flag_kwargs)`` makes it (choosing the configuration, tuning if need be)."""
    key = (role, geometry, x.dtype, x.device, flags, tuner.generation)
    call = _CALLS.get(key)
    if call is None:
        family = _family(geometry)
        call = _remember(key, build(KERNELS[family][role], family, _flag_kwargs(role, flags)))
    return call


def _elementwise_call(role: str, geometry, x: torch.Tensor, flags: tuple, make_args, tuning_args=None):
    """(PreparedLaunch, size arguments) of an elementwise kernel; ``make_args(size_args)`` builds its
    arguments, for the tuner's candidate runs ``tuning_args(size_args)`` where given (as for reductions)."""
    def build(kernel, family, base):
        def run(cfg: TileConfig):
            grid, size_args = elementwise_grid(geometry, cfg)
            triton_launch.launch_through_triton(kernel, grid, (tuning_args or make_args)(size_args),
                                                dict(base, **cfg.launch_kwargs(family)), x.device)

        cfg = tuner.select(family, role, geometry, x, run)
        grid, size_args = elementwise_grid(geometry, cfg)
        return PreparedLaunch(kernel, grid, dict(base, **cfg.launch_kwargs(family))), size_args

    return _prepared_launch(role, geometry, x, flags, build)


def _reduction_call(role: str, geometry, x: torch.Tensor, flags: tuple, make_args, tuning_args=None):
    """(PreparedLaunch, layout) of a reduction; ``make_args(layout)`` builds its arguments. The tuner's
    candidate runs use ``tuning_args(layout)`` instead where given (scratch copies of what a real run
    updates)."""
    def build(kernel, family, base):
        def kwargs_for(cfg: TileConfig):
            return dict(base, BLOCK_SPLITS=merge_block(family, cfg), **cfg.launch_kwargs(family, reduction=True))

        def run(cfg: TileConfig):
            kwargs = kwargs_for(cfg)
            layout = reduction_layout(kernel, geometry, cfg, x, make_args, kwargs)
            triton_launch.launch_through_triton(kernel, layout[1], (tuning_args or make_args)(layout), kwargs,
                                                x.device)

        cfg = tuner.select(family, role, geometry, x, run)
        kwargs = kwargs_for(cfg)
        layout = reduction_layout(kernel, geometry, cfg, x, make_args, kwargs)
        return PreparedLaunch(kernel, layout[1], kwargs), layout

    return _prepared_launch(role, geometry, x, flags, build)


_FLAG_NAMES = {
    "stats": ("UPDATE_RUNNING", "CUMULATIVE", "WRITE_MOMENTS"),
    "apply": ("STATS_ARE_RUNNING", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "COUNT_BATCH"),
    "bwd_reduce": ("STATS_ARE_RUNNING", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "WRITE_GRAD_WEIGHT",
                   "WRITE_GRAD_BIAS"),
    "bwd_dx": ("STATS_ARE_RUNNING", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION", "BATCH_STATS",
               "WRITE_GRAD_X", "WRITE_GRAD_RESIDUAL"),
}


def _flag_kwargs(role: str, flags: tuple) -> dict:
    """A role's constexpr flags as keywords, from the flag tuple that keys its prepared launch."""
    return dict(zip(_FLAG_NAMES[role], flags))


def _epilogue_flags(per_channel, residual, batch_stats: bool, activation: int) -> tuple:
    """(STATS_ARE_RUNNING, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION) from the per-channel arguments
    (``_per_channel_args``: the dummy stands for an absent weight or bias)."""
    dummy = dummy_buffer(per_channel[0].device)
    return (not batch_stats, per_channel[2] is not dummy, per_channel[3] is not dummy, residual is not None,
            activation)


# -- forward --------------------------------------------------------------------------------------------
@on_input_device
def batch_stats(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], momentum: float, cumulative: bool,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and invstd (fp32, [C]) of x, and the running-statistics update (once). A cumulative
    average reads ``num_batches_tracked`` as the count before this batch (weight 1 / (count + 1)); counting
    the batch is the caller's."""
    x, geometry = dense_geometry(x)
    return _statistics(x, geometry, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)


def _statistics(x, geometry, running_mean, running_var, num_batches_tracked, momentum: float, cumulative: bool,
                eps: float):
    """``batch_stats`` on a dense x: (mean, invstd), fp32. Two allocations: the outputs of a custom op
    (``ops.py``) may not alias one another."""
    mean = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:  # PyTorch leaves the running statistics alone on an empty batch
        return mean.zero_(), invstd.fill_(float("nan"))
    _merged_statistics(x, geometry, mean, invstd, None, running_mean, running_var, num_batches_tracked, momentum,
                       cumulative, eps)
    return mean, invstd


@on_input_device
def batch_norm_training(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        num_batches_tracked: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], momentum: float,
                        cumulative: bool, eps: float, activation: int, negative_slope: float):
    """A whole training forward: (y, mean, invstd), the running statistics updated once and the batch counted
    in ``num_batches_tracked`` (when given): the statistics, then the normalization, which also counts the
    batch (two launches on one geometry, no increment kernel); on the pure-PyTorch path, PyTorch's
    kernels."""
    x, geometry = dense_geometry(x)
    mean, invstd = _statistics(x, geometry, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps)
    if x.numel() == 0 and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # nothing is launched for an empty batch, but it counts (as in PyTorch)
    return (_apply(x, geometry, mean, invstd, weight, bias, residual, eps, True, activation, negative_slope,
                   num_batches_tracked), mean, invstd)


@on_input_device
def batch_moments(x: torch.Tensor) -> torch.Tensor:
    """Local ``(count, mean, M2)`` per channel, packed as one fp32 [3, C] tensor (what SyncBatchNorm
    all-gathers). An empty x gives count 0, which weighs nothing in the merge."""
    channels = x.shape[1]
    moments = torch.zeros((3, channels), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        x, geometry = dense_geometry(x)
        _merged_statistics(x, geometry, moments[1], torch.empty_like(moments[1]), moments, None, None, None, 0.0, False,
                           1e-5)
    return moments


def _merged_statistics(x, geometry, mean, invstd, moments, running_mean, running_var, num_batches_tracked,
                       momentum: float, cumulative: bool, eps: float) -> None:
    """One launch on a dense x: split shifted sums, merged and finalized by the last program of each
    channel block (mean, invstd, optional moments, and the running statistics, updated once)."""
    channels = x.shape[1]
    device = x.device
    count = x.numel() // channels
    update = running_mean is not None
    dummy = dummy_buffer(device)
    moment_args = (moments[0], moments[2]) if moments is not None else (dummy, dummy)
    running = (running_mean if update else dummy, running_var if update else dummy,
               num_batches_tracked if (update and cumulative) else dummy)
    scalars = (1.0 / count, count / (count - 1) if count > 1 else float("nan"),
               running_mean.stride(0) if update else 0, running_var.stride(0) if update else 0, eps, momentum)

    def make_args(layout, running=running):
        splits, _, size_args, blocks = layout
        partials = torch.empty(3 * splits * channels, dtype=torch.float32, device=device)  # [3, splits, C], flat
        return (x, partials, arrival_counters(device, blocks), mean, invstd,
                *moment_args, *running, *size_args, *scalars)

    tuning_args = _on_scratch(make_args, lambda: tuple(t if t is dummy else t.clone() for t in running))
    launch, layout = _reduction_call("stats", geometry, x, (update, cumulative, moments is not None), make_args,
                                     tuning_args)
    launch(make_args(layout), device)


@on_input_device
def batch_norm_apply(x: torch.Tensor, mean: torch.Tensor, invstd: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], eps: float, activation: int,
                     negative_slope: float) -> torch.Tensor:
    """y = act(x * scale + shift [+ residual]), from invstd (batch statistics) or the running variance."""
    x, geometry = dense_geometry(x)
    stat, batch_stats = kernel_statistic(invstd, running_var)
    return _apply(x, geometry, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope)


def _apply(x, geometry, mean, stat, weight, bias, residual, eps: float, batch_stats: bool, activation: int,
           negative_slope: float, num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``batch_norm_apply`` on a dense x, the statistic as the kernels take it (``kernel_statistic``): one
    launch, which also adds 1 to ``num_batches_tracked`` when given (the training forward's count of its
    batch)."""
    y = empty_like_input(x)
    if x.numel() == 0:
        return y
    device = x.device
    residual = like_input(residual, x) if residual is not None else None
    per_channel = _per_channel_args(mean, stat, weight, bias, device)
    tensors = (x, residual if residual is not None else dummy_buffer(device), y, *per_channel)
    counting = num_batches_tracked is not None

    def make_args(size_args, counted=num_batches_tracked if counting else dummy_buffer(device)):
        return (*tensors, counted, *size_args, eps, negative_slope)

    flags = _epilogue_flags(per_channel, residual, batch_stats, activation) + (counting,)
    launch, size_args = _elementwise_call(
        "apply", geometry, x, flags, make_args, _on_scratch(make_args, num_batches_tracked.clone) if counting else None)
    launch(make_args(size_args), device)
    return y


# -- backward -------------------------------------------------------------------------------------------
@on_input_device
def backward_sums(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: Optional[torch.Tensor],
                  running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], eps: float, activation: int, negative_slope: float,
                  grad_weight: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """Pass 1 of the backward: fp32 [2, C] = (sum dz, sum dz * xhat) per channel, also written to
    ``grad_bias`` / ``grad_weight`` when given (in the parameters' dtype)."""
    if x.numel() == 0:  # nothing to launch: the step function gives the zero sums
        return spec.backward_sums(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation,
                                  negative_slope, grad_weight, grad_bias)
    stat, batch_stats = kernel_statistic(invstd, running_var)
    x, geometry = dense_geometry(x)
    residual = like_input(residual, x) if residual is not None else None
    scratch = _sums_launch(like_input(grad_y, x), x, geometry, _per_channel_args(mean, stat, weight, bias, x.device),
                           residual, grad_weight, grad_bias, eps, batch_stats, activation, negative_slope)
    return scratch[:2 * x.shape[1]].view(2, x.shape[1])


def _sums_launch(grad_y, x, geometry, per_channel, residual, grad_weight, grad_bias, eps, batch_stats, activation,
                 negative_slope) -> torch.Tensor:
    """Launch pass 1 on dense tensors; returns its fp32 buffer: the [2, C] sums, then the partials."""
    channels, device = x.shape[1], x.device
    residual_arg = residual if residual is not None else dummy_buffer(device)
    outputs = (grad_weight if grad_weight is not None else dummy_buffer(device),
               grad_bias if grad_bias is not None else dummy_buffer(device))
    scratch = []

    def make_args(layout):  # only scratch and this call's outputs are written: safe to run per candidate
        splits, _, size_args, blocks = layout
        buffer = torch.empty((2 + 2 * splits) * channels, dtype=torch.float32, device=device)
        scratch[:] = [buffer]
        return (grad_y, x, residual_arg, *per_channel, buffer, arrival_counters(device, blocks), *outputs,
                *size_args, eps, negative_slope)

    flags = _epilogue_flags(per_channel, residual, batch_stats, activation) + (grad_weight is not None,
                                                                               grad_bias is not None)
    launch, layout = _reduction_call("bwd_reduce", geometry, x, flags, make_args)
    launch(make_args(layout), device)
    return scratch[0]


@on_input_device
def backward_elementwise(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], sums: Optional[torch.Tensor],
                         inv_count: float, eps: float, activation: int, negative_slope: float,
                         want_dx: bool, want_dresidual: bool):
    """Pass 2 of the backward: (dx, d residual), each None unless wanted. With batch statistics, dx
    uses ``sums * inv_count`` (the mean of dz and of dz * xhat over the batch; SyncBatchNorm passes
    all-reduced sums already divided by the global count, with inv_count = 1); ``sums`` is [2, C] fp32
    (or the buffer ``_sums_launch`` returns, which starts with it)."""
    if x.numel() == 0:  # nothing to launch: the step function gives the empty gradients
        return spec.backward_elementwise(grad_y, x, mean, invstd, running_var, weight, bias, residual, sums,
                                         inv_count, eps, activation, negative_slope, want_dx, want_dresidual)
    stat, batch_stats = kernel_statistic(invstd, running_var)
    x, geometry = dense_geometry(x)
    residual = like_input(residual, x) if residual is not None else None
    return _dx_launch(like_input(grad_y, x), x, geometry, _per_channel_args(mean, stat, weight, bias, x.device),
                      residual, sums.contiguous() if sums is not None else None, inv_count, eps, batch_stats,
                      activation, negative_slope, want_dx, want_dresidual)


def _dx_launch(grad_y, x, geometry, per_channel, residual, sums, inv_count, eps, batch_stats, activation,
               negative_slope, want_dx, want_dresidual):
    """Launch pass 2 on dense tensors."""
    device = x.device
    grad_x = empty_like_input(x) if want_dx else None
    grad_residual = empty_like_input(x) if want_dresidual else None
    if want_dresidual and not want_dx and activation == 0:
        grad_residual.copy_(grad_y)  # act = identity: d residual = dy, no kernel needed
        return grad_x, grad_residual
    dummy = dummy_buffer(device)
    tensors = (grad_y, x, residual if residual is not None else dummy, grad_x if want_dx else dummy,
               grad_residual if want_dresidual else dummy, *per_channel, sums if sums is not None else dummy)

    def make_args(size_args):
        return (*tensors, *size_args, inv_count, eps, negative_slope)

    flags = _epilogue_flags(per_channel, residual, batch_stats, activation) + (batch_stats, want_dx, want_dresidual)
    launch, size_args = _elementwise_call("bwd_dx", geometry, x, flags, make_args)
    launch(make_args(size_args), device)
    return grad_x, grad_residual


def batch_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: Optional[torch.Tensor],
                        running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float, activation: int,
                        negative_slope: float, output_mask: List[bool]):
    """(dx, dweight, dbias, dresidual), each None unless asked for by ``output_mask``. Runs pass 1 only
    when something needs the per-channel sums, pass 2 only when dx or d residual is wanted.

    ``residual`` is only needed (and only saved by the autograd formula) when an activation follows
    the add: it is part of the pre-activation whose derivative is recomputed."""
    if x.numel() == 0:  # nothing to launch: the step functions give the empty and zero gradients
        return spec.batch_norm_backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation,
                                        negative_slope, output_mask)
    stat, batch_stats = kernel_statistic(invstd, running_var)
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    grad_weight = torch.empty_like(weight) if (want_dweight and weight is not None) else None
    grad_bias = torch.empty_like(bias) if (want_dbias and bias is not None) else None
    need_sums = (want_dx and batch_stats) or grad_weight is not None or grad_bias is not None
    count = max(x.numel() // max(x.shape[1], 1), 1)
    with input_device(x):  # both passes share one geometry and one set of argument preparations
        x, geometry = dense_geometry(x)
        grad_y = like_input(grad_y, x)
        residual = like_input(residual, x) if residual is not None else None
        per_channel = _per_channel_args(mean, stat, weight, bias, x.device)
        sums = (_sums_launch(grad_y, x, geometry, per_channel, residual, grad_weight, grad_bias, eps, batch_stats,
                             activation, negative_slope) if need_sums else None)
        grad_x = grad_residual = None
        if want_dx or want_dresidual:
            grad_x, grad_residual = _dx_launch(grad_y, x, geometry, per_channel, residual, sums, 1.0 / count, eps,
                                               batch_stats, activation, negative_slope, want_dx, want_dresidual)
    return grad_x, grad_weight, grad_bias, grad_residual
