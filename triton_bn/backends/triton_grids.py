"""How many programs a launch runs: the grids of the two kinds of kernel, per layout family, and the split
count of a reduction (as many programs as fit on the GPU's multiprocessors at once, ``occupancy.py``).
"""
import warnings

import torch

from ..autotune import TileConfig, cdiv, split_count
from .layout import ChannelsLastGeometry
from .occupancy import resident_per_sm
from .triton_launch import capturing, refuse_first_launch_in_capture

_RESIDENT = {}  # (kernel, config, dtype, device, launch kwargs) -> programs of that variant fitting per SM


def reduction_layout(kernel, geometry, cfg: TileConfig, x: torch.Tensor, make_args, kwargs):
    """The ``reduction_grid`` layout of a reduction with as many splits as fit: ``cfg.programs_per_sm``
    programs per multiprocessor, or fewer when fewer of the compiled variant can be resident at once
    (more would only add waves). ``make_args(layout)`` builds the kernel's arguments for a layout."""
    device = x.device
    layout = reduction_grid(geometry, cfg, device, cfg.programs_per_sm)
    if device.type == "cuda":
        key = (kernel, cfg, x.dtype, device, tuple(kwargs.items()))
        fits = _RESIDENT.get(key)
        if fits is None:
            args = make_args(layout)
            if capturing(device):
                refuse_first_launch_in_capture(kernel, layout[1], args, kwargs)
            fits = _RESIDENT[key] = _resident(kernel, layout[1], args, kwargs, device, cfg)
        if fits < cfg.programs_per_sm:
            layout = reduction_grid(geometry, cfg, device, fits)
    return layout


def _resident(kernel, grid, args, kwargs, device, cfg: TileConfig) -> int:
    try:
        return resident_per_sm(kernel.warmup(*args, grid=grid, **kwargs), device)
    except Exception as exc:  # noqa: BLE001 - only the split count depends on it: fall back, and say so once
        warnings.warn(f"triton_bn: could not read the compiled kernel's resources ({type(exc).__name__}: {exc}); "
                      f"reductions use {cfg.programs_per_sm} programs per multiprocessor")
        return cfg.programs_per_sm


# -- grids ------------------------------------------------------------------------------------------------
GRID_AXIS_LIMIT = 65535  # grid axes 1 and 2; axis 0 takes 2^31 - 1


def reduction_grid(geometry, cfg: TileConfig, device, programs_per_sm: int):
    """(num_splits, grid, size arguments, counters needed) of a reduction kernel aiming at
    ``programs_per_sm`` programs per multiprocessor. Channel-contiguous: channel blocks on axis 0 (any
    C), splits on axis 1 (a few per multiprocessor, far under its limit)."""
    if isinstance(geometry, ChannelsLastGeometry):
        row_blocks = cdiv(geometry.rows, cfg.block_a)
        channel_blocks = cdiv(geometry.channels, cfg.block_b)
        splits = min(split_count(row_blocks, channel_blocks, device, programs_per_sm), GRID_AXIS_LIMIT)
        rows_per_split = cdiv(row_blocks, splits) * cfg.block_a
        splits = cdiv(geometry.rows, rows_per_split)
        return (splits, (channel_blocks, splits),
                (geometry.rows, geometry.channels, geometry.row_stride, rows_per_split, splits),
                channel_blocks)
    num_s_blocks, num_tiles = channels_first_tiles(geometry, cfg)
    splits = split_count(num_tiles, geometry.channels, device, programs_per_sm)
    tiles_per_split = cdiv(num_tiles, splits)
    splits = cdiv(num_tiles, tiles_per_split)
    size_args = (geometry.batch, geometry.channels, geometry.spatial, geometry.batch_stride, geometry.channel_stride,
                 num_s_blocks, num_tiles, splits, tiles_per_split)
    return splits, (geometry.channels * splits,), size_args, geometry.channels


def channels_first_tiles(geometry, cfg: TileConfig):
    """(tiles per row of a plane, tiles per channel) of a channels-first tiling (2-D or flat)."""
    if cfg.flat:
        return 1, cdiv(geometry.batch * geometry.spatial, cfg.block_a * cfg.block_b)
    num_s_blocks = cdiv(geometry.spatial, cfg.block_b)
    return num_s_blocks, cdiv(geometry.batch, cfg.block_a) * num_s_blocks


def elementwise_grid(geometry, cfg: TileConfig):
    if isinstance(geometry, ChannelsLastGeometry):  # 1-D: (row blocks x channel blocks), see _elementwise_tile
        grid = (cdiv(geometry.rows, cfg.block_a) * cdiv(geometry.channels, cfg.block_b),)
        return grid, (geometry.rows, geometry.channels, geometry.row_stride)
    num_s_blocks, num_tiles = channels_first_tiles(geometry, cfg)
    grid = (geometry.channels * num_tiles,)
    return grid, (geometry.batch, geometry.channels, geometry.spatial, geometry.batch_stride, geometry.channel_stride,
                  num_s_blocks, num_tiles)


