"""The two reductions (``stats``, ``bwd_reduce``) timed alone, per shape and configuration. (GPU only.)

GPU run 4 (perf/NOTES.md) found the statistics of small planes (7x7, 14x14 NCHW) up to 2.3x slower than in
run 3, with the same tiles, after the reduction loops became software-pipelined
(``tl.range(..., num_stages=NUM_STAGES)``). This script times, per case: the heuristic's tile at 1, 2 and 3
stages, with 4 and 8 programs per multiprocessor, the previous heuristic's choice, and a flat
(channels-first) or a 128 x 32 (channels-last) tile at 1 and 3 stages. Each timing is a CUDA-graph replay
of one launch (no host time), L2 flushed before each (``triton.testing.do_bench``), median.

    PYTHONPATH=. OUT=/some/folder python3 perf/short_loops.py

Writes short_loops.csv and short_loops.md to $OUT and prints the table. ``heuristic`` marks what
``autotune.heuristic_config`` picks, ``previous`` what it picked before GPU runs 5-6 (``previous_heuristic``).
"""
import csv
import os
import sys
import time
from pathlib import Path

import torch
import triton

from triton_bn.backends import triton_grids, triton_kernels
from triton_bn.autotune import TileConfig, forced_config, heuristic_config, next_power_of_2
from triton_bn.backends.layout import ChannelsLastGeometry, dense_geometry

CASES = [  # (shape, dtype, channels_last)
    ((128, 2048, 7, 7), torch.float32, False),
    ((128, 1024, 14, 14), torch.float32, False),
    ((128, 512, 28, 28), torch.float32, False),
    ((32, 64, 56, 56), torch.float32, False),
    ((128, 256, 56, 56), torch.float32, False),  # a long loop: pipelining should pay here
    ((8192, 1024), torch.float32, False),  # 2-D input: the channels-last family
    ((128, 2048, 7, 7), torch.bfloat16, True),
    ((128, 1024, 14, 14), torch.bfloat16, True),
    ((32, 64, 56, 56), torch.bfloat16, True),
    ((128, 256, 56, 56), torch.bfloat16, True),  # a long loop
]


def previous_heuristic(family: str, kind: str, geometry, element_size: int) -> TileConfig:
    """``heuristic_config`` before GPU runs 5-6: 3 stages everywhere, channels-last statistics as wide as the
    other kernels."""
    rows, channels = ((geometry.rows, geometry.channels) if family == "channels_last"
                      else (geometry.batch, geometry.spatial))
    widest = (64 if element_size >= 4 else 128) if family == "channels_last" else 2048
    block_b = max(16, min(next_power_of_2(channels), widest))
    block_a = max(1, min(4096 // block_b, next_power_of_2(rows)))
    return TileConfig(block_a, block_b, 8 if block_a * block_b >= 4096 else 4)


def configs(family: str, geometry, heuristic: TileConfig, previous: TileConfig):
    tile = dict(block_a=heuristic.block_a, block_b=heuristic.block_b, num_warps=heuristic.num_warps)
    out = [TileConfig(**tile, num_stages=stages) for stages in (1, 2, 3)]
    out.append(TileConfig(**tile, num_stages=heuristic.num_stages, programs_per_sm=8))
    out.append(previous)
    if family == "channels_first":
        flat = min(4096, 1 << (geometry.batch * geometry.spatial - 1).bit_length())
        other = [TileConfig(1, flat, 8 if flat >= 4096 else 4, num_stages=s, flat=True) for s in (1, 3)]
    else:
        other = [TileConfig(128, 32, 8, num_stages=s) for s in (1, 3)]
    return list(dict.fromkeys(out + other))  # in order, each once


def reductions(x: torch.Tensor):
    """(role, callable that launches it once, bytes it must read) for the two reductions of x."""
    channels = x.shape[1]
    running_mean = torch.zeros(channels, device=x.device)
    running_var = torch.ones(channels, device=x.device)
    mean = x.float().mean(dim=[d for d in range(x.dim()) if d != 1])
    invstd = torch.rand(channels, device=x.device) + 0.5
    weight, bias = torch.rand(channels, device=x.device), torch.rand(channels, device=x.device)
    grad_y = torch.randn_like(x)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)

    def stats():
        triton_kernels.batch_stats(x, running_mean, running_var, None, 0.1, False, 1e-5)

    def sums():
        triton_kernels.backward_sums(grad_y, x, mean, invstd, None, weight, bias, None, 1e-5, 1, 0.0, grad_weight,
                                     grad_bias)

    read = x.numel() * x.element_size()
    return [("stats", stats, read), ("bwd_reduce", sums, 2 * read)]


def tiles_per_program(family: str, geometry, cfg: TileConfig, device) -> int:
    """What each program of the reduction walks, from the launcher's own grid."""
    _, _, size_args, _ = triton_grids.reduction_grid(geometry, cfg, device, cfg.programs_per_sm)
    return size_args[-1] if family == "channels_first" else size_args[3] // cfg.block_a


def graph_time_us(fn) -> float:
    fn()  # compile and load before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3


def main() -> int:
    if not torch.cuda.is_available():
        print("perf/short_loops.py needs a CUDA GPU")
        return 1
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    rows = []
    started = time.time()
    with open(out / "short_loops.csv", "w", newline="") as handle:
        writer = None
        for shape, dtype, channels_last in CASES:
            torch.manual_seed(0)
            x = (torch.randn(shape, device=device) * 2 + 3).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _, geometry = dense_geometry(x)
            family = "channels_last" if isinstance(geometry, ChannelsLastGeometry) else "channels_first"
            layout = "channels_last" if channels_last else "nchw"
            for role, fn, nbytes in reductions(x):
                heuristic = heuristic_config(family, role, geometry, x.element_size())
                previous = previous_heuristic(family, role, geometry, x.element_size())
                for cfg in configs(family, geometry, heuristic, previous):
                    with forced_config(f"{family}.{role}", cfg):
                        us = graph_time_us(fn)
                    tile = f"{'flat ' if cfg.flat else ''}{cfg.block_a}x{cfg.block_b}"
                    row = dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                               layout=layout, role=role, tile=tile, stages=cfg.num_stages,
                               per_sm=cfg.programs_per_sm, iterations=tiles_per_program(family, geometry, cfg, device),
                               us=round(us, 2), tb_s=round(nbytes / us / 1e6, 2),
                               heuristic=cfg == heuristic, previous=cfg == previous)
                    rows.append(row)
                    if writer is None:
                        writer = csv.DictWriter(handle, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                    handle.flush()
            print(f"{shape} {dtype} {layout}: done at {time.time() - started:.0f} s", flush=True)
    lines = [f"# Short reduction loops: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
             f"triton {triton.__version__}", "",
             "Each reduction launched alone (CUDA-graph replay, L2 flushed, median). TB/s counts the bytes the "
             "reduction must read (x; grad_y and x for bwd_reduce).", "",
             "| shape | dtype | layout | role | tile | stages | programs/SM | tiles per program | us | TB/s | |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " / ".join(name for name in ("heuristic", "previous") if r[name])
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['role']} | {r['tile']} | {r['stages']} | "
                     f"{r['per_sm']} | {r['iterations']} | {r['us']:.1f} | {r['tb_s']:.2f} | {mark} |")
    text = "\n".join(lines) + "\n"
    (out / "short_loops.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
