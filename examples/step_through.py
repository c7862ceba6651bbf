"""Step through the statistics kernel: what each program of the split reduction computes.

Runs on a CPU through the Triton interpreter (set here, before triton is imported) or compiled on a
GPU. Prints each program's partial (count, mean, M2) and the merged result next to torch's. The tile is
small on purpose (``--tile``), so that even a tiny tensor is cut into several splits and the last program
of each channel block has a real merge to do (docs/kernels.md draws it).

    python examples/step_through.py            # tiny NCHW tensor, several splits
    python examples/step_through.py --layout channels_last
    python examples/step_through.py --tile 0,0 # the tile the library would choose (one split here)
"""
import dataclasses
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before triton is imported

import triton_bn  # noqa: E402
from triton_bn.backends import triton_grids, triton_launch  # noqa: E402
from triton_bn.kernels import KERNELS  # noqa: E402
from triton_bn.autotune import heuristic_config, merge_block  # noqa: E402
from triton_bn.backends.layout import ChannelsLastGeometry, dense_geometry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--shape", default="6,3,5,5", help="N,C,H,W")
    parser.add_argument("--tile", default=None,
                        help="BLOCK_A,BLOCK_B: rows x channels (channels_last) or images x plane elements (NCHW); "
                             "default 8,4 or 2,16; 0,0: the library's own choice")
    parser.add_argument("--programs-per-sm", type=int, default=8,
                        help="programs per multiprocessor the split count aims at (the interpreter counts 2)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + 3).to(device)
    if args.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x, geometry = dense_geometry(x)
    family = "channels_last" if isinstance(geometry, ChannelsLastGeometry) else "channels_first"
    cfg = heuristic_config(family, "stats", geometry, x.element_size())
    tile = args.tile or ("8,4" if family == "channels_last" else "2,16")
    block_a, block_b = (int(v) for v in tile.split(","))
    if block_a and block_b:
        cfg = dataclasses.replace(cfg, block_a=block_a, block_b=block_b, flat=False,
                                  programs_per_sm=args.programs_per_sm)
    splits, grid, size_args, blocks = triton_grids.reduction_grid(geometry, cfg, x.device, cfg.programs_per_sm)
    print(f"triton_bn {triton_bn.__version__}: x {tuple(x.shape)} {args.layout} -> family {family},"
          f" geometry {geometry}")
    print(f"tile {cfg.block_a}x{cfg.block_b}, {splits} splits, grid {grid}")

    channels = x.shape[1]
    partials = torch.empty((3, splits, channels), dtype=torch.float32, device=x.device)
    moments = torch.zeros((3, channels), dtype=torch.float32, device=x.device)
    mean, invstd = torch.empty(channels, device=x.device), torch.empty(channels, device=x.device)
    dummy = torch.empty(1, device=x.device)
    count = x.numel() // channels
    KERNELS[family]["stats"][grid](
        x, partials, triton_launch.arrival_counters(x.device, blocks), mean, invstd,
        moments[0], moments[2], dummy, dummy, dummy, *size_args, 1.0 / count, count / (count - 1), 0, 0, 1e-5, 0.0,
        UPDATE_RUNNING=False, CUMULATIVE=False, WRITE_MOMENTS=True, BLOCK_SPLITS=merge_block(family, cfg),
        **cfg.launch_kwargs(family, reduction=True))
    pivot = x.reshape(x.shape[0], channels, -1)[0, :, 0].float() if family == "channels_first" else \
        x.movedim(1, -1).reshape(-1, channels)[0].float()
    print("\nper split (count, mean, M2) for each channel; means are stored relative to the pivot "
          "(the channel's first value) and shown here with it added back:")
    for split in range(splits):
        row = ", ".join(f"c{c}: ({partials[0, split, c]:.0f}, {partials[1, split, c] + pivot[c]:.4f}, "
                        f"{partials[2, split, c]:.4f})" for c in range(channels))
        print(f"  split {split}: {row}")
    moments[1] = mean  # the same launch's last program merged the splits (Chan) into these

    dims = [d for d in range(x.dim()) if d != 1]
    print("\nmerged (Chan) vs torch:")
    for c in range(channels):
        torch_mean = x[:, c].double().mean().item()
        torch_m2 = (x[:, c].double().var(unbiased=False) * moments[0, c].double()).item()
        print(f"  c{c}: count {moments[0, c]:.0f}  mean {moments[1, c]:.6f} (torch {torch_mean:.6f})  "
              f"M2 {moments[2, c]:.5f} (torch {torch_m2:.5f})")
    assert torch.allclose(moments[1].double(), x.double().mean(dims), atol=1e-5)
    torch_m2 = x.double().var(dims, unbiased=False) * moments[0].double()
    assert torch.allclose(moments[2].double(), torch_m2, rtol=1e-5), "the merge of the splits is wrong"
    assert (moments[0] == count).all()
    print(f"\n{splits} splits merged by the last program of each channel block: count, mean and M2 as torch's")


if __name__ == "__main__":
    main()
