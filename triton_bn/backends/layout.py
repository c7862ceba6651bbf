"""Which layout family a tensor belongs to, and its 2-D / 3-D view.

- channels-contiguous (channels_last, channels_last_3d, 2-D ``(N, C)``): viewed as ``[R, C]``,
  R = N x spatial, channel stride 1. ``ChannelsLastGeometry``.
- spatial-contiguous (NCHW, NCDHW, ``(N, C, L)``): viewed as ``[N, C, S]``, element stride 1 inside a
  plane. ``ChannelsFirstGeometry``.
Anything else (a slice with gaps, an arbitrary permutation) is copied once into the layout it is
closest to, so the kernels only ever see these two shapes.

Every tensor that a kernel reads or writes next to x (y, the residual, grad_y, dx) is given exactly
x's strides (``like_input``), so a kernel takes one set of strides for all of them.
"""
import math
from typing import NamedTuple, Tuple, Union

import torch


# Named tuples rather than dataclasses: geometries key the launchers' caches on every call, and a tuple hashes
# in C where a dataclass's __hash__ runs Python.
class ChannelsLastGeometry(NamedTuple):
    rows: int  # R = N x spatial
    channels: int
    row_stride: int


class ChannelsFirstGeometry(NamedTuple):
    batch: int  # N
    channels: int
    spatial: int  # S = prod(spatial dims), 1 for (N, C)
    batch_stride: int
    channel_stride: int


Geometry = Union[ChannelsLastGeometry, ChannelsFirstGeometry]

# The channels-innermost memory format of each rank that has one.
CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _geometry_without_copy(x: torch.Tensor):
    n, c, spatial = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if x.is_contiguous() and spatial > 1:
        view = x.reshape(n, c, spatial)
        return ChannelsFirstGeometry(n, c, spatial, view.stride(0), view.stride(1))
    channels_innermost = x.movedim(1, -1)
    if channels_innermost.is_contiguous():
        view = channels_innermost.reshape(-1, c)
        return ChannelsLastGeometry(view.shape[0], c, view.stride(0))
    return None


_GEOMETRIES = {}  # (shape, strides) -> geometry or None: the geometry depends on nothing else, and this is the hot path
_MISSING = object()


def _cached_geometry(x: torch.Tensor):
    """x's geometry without a copy, or None when x is in neither family (remembered per shape and strides)."""
    key = (x.shape, x.stride())  # torch.Size hashes and compares as the tuple it is
    geometry = _GEOMETRIES.get(key, _MISSING)
    if geometry is _MISSING:  # read once into a local: another thread may clear the dict at any time
        geometry = _geometry_without_copy(x)
        if len(_GEOMETRIES) > 4096:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = geometry
    return geometry


def channels_innermost(x: torch.Tensor) -> bool:
    """Whether x is, as it is, a dense [rows, channels] matrix (the channels-contiguous family)."""
    return isinstance(_cached_geometry(x), ChannelsLastGeometry)


def dense_geometry(x: torch.Tensor) -> Tuple[torch.Tensor, Geometry]:
    """``(x_dense, geometry)``: x itself when it is in one of the two families, else one copy of it."""
    geometry = _cached_geometry(x)
    if geometry is None:
        x = x.contiguous(memory_format=_closest_memory_format(x))
        geometry = _geometry_without_copy(x)
    return x, geometry


def _closest_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() in (4, 5) and x.shape[1] > 1:
        # the channel stride is the smallest of the non-trivial dims: the tensor is "mostly" channels-last
        other_strides = [s for d, s in enumerate(x.stride()) if d != 1 and x.shape[d] > 1]
        if other_strides and x.stride(1) < min(other_strides):
            return CHANNELS_LAST_FORMATS[x.dim()]
    return torch.contiguous_format


def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as x) with exactly x's strides: t itself when they match, else a copy."""
    if t.stride() == x.stride() or t.numel() <= 1:
        return t
    out = torch.empty_strided(x.shape, x.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def empty_like_input(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with exactly x's strides (x dense, as ``dense_geometry`` returns it: ``empty_like``
    copies the strides of a dense, non-overlapping tensor)."""
    return torch.empty_like(x)
