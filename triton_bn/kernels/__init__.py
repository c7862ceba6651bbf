"""Triton kernels. Nothing here knows about modules, autograd or grids: see ``triton_bn/backends/triton_kernels.py``.

``KERNELS[family][role]`` is the one place the launchers find a kernel: four roles (``stats``: the split
statistics; ``apply``: normalise, affine, epilogue; ``bwd_reduce``: the backward's two sums; ``bwd_dx``: the
input gradient) in each of the two layout families (``channels_last``: an ``[R, C]`` matrix;
``channels_first``: ``[N, C, S]``). The kernels' own names keep their leading underscore: it is what profilers
and the committed profiles under ``perf/results/`` show."""
from . import channels_first as _cf
from . import channels_last as _cl

KERNELS = {
    "channels_last": dict(stats=_cl._bn_fwd_stats_channels_last, apply=_cl._bn_fwd_apply_channels_last,
                          bwd_reduce=_cl._bn_bwd_reduce_channels_last, bwd_dx=_cl._bn_bwd_dx_channels_last),
    "channels_first": dict(stats=_cf._bn_fwd_stats_channels_first, apply=_cf._bn_fwd_apply_channels_first,
                           bwd_reduce=_cf._bn_bwd_reduce_channels_first, bwd_dx=_cf._bn_bwd_dx_channels_first),
}
