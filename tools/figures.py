"""Draw the figures of docs/kernels.md (SVG, in docs/figures/): how the statistics kernel tiles a tensor in each
layout family, how its splits are merged, and the bytes each pass moves.

    python tools/figures.py              # rewrites docs/figures/*.svg
    python tools/figures.py --out DIR    # somewhere else
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "triton_bn"  # fixed element ids: the same drawing, the same file
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
SVG = dict(format="svg", metadata={"Date": None})  # no timestamp: a figure changes only when the drawing does


def _cells(ax, width: int, height: int) -> None:
    """A light grid of width x height element cells, row 0 at the top."""
    for i in range(height):
        for j in range(width):
            ax.add_patch(Rectangle((j, height - 1 - i), 1, 1, fill=False, lw=0.3, color="#999999"))


def _frame(ax, width: int, height: int, xlabel: str, ylabel: str, title: str, xticks) -> None:
    ax.set_xlim(0, width + 0.5)
    ax.set_ylim(0, height + 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(xticks)
    ax.set_yticks([])


def tiles(path: str) -> None:
    """Left: one channel of an NCHW tensor, its N x S plane cut into [BLOCK_N, BLOCK_S] tiles, consecutive tiles
    assigned to a split. Right: a channels_last tensor as an [R, C] matrix, [BLOCK_R, BLOCK_C] tiles, the channel
    blocks on grid axis 0 and the row splits on axis 1."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    n, s, block_n, block_s, tiles_per_split = 6, 25, 2, 16, 1
    num_s_blocks = -(-s // block_s)
    _cells(left, s, n)
    tile = 0
    for bi in range(0, n, block_n):
        for bj in range(0, s, block_s):
            split = tile // tiles_per_split
            w, h = min(block_s, s - bj), min(block_n, n - bi)
            left.add_patch(Rectangle((bj, n - bi - h), w, h, alpha=0.35, color=COLORS[split % len(COLORS)]))
            left.add_patch(Rectangle((bj, n - bi - h), w, h, fill=False, lw=1.5, color=COLORS[split % len(COLORS)]))
            left.text(bj + w / 2, n - bi - h / 2, f"split {split}", ha="center", va="center", fontsize=8)
            tile += 1
    _frame(left, s, n, "S = H x W (contiguous in memory)", "N (images)",
           f"NCHW, one channel: tiles [BLOCK_N={block_n}, BLOCK_S={block_s}],\n"
           f"{num_s_blocks} per row of images; one program per (channel, split)", [0, block_s, s])
    rows, channels, block_r, block_c, rows_per_split = 24, 12, 4, 4, 8
    _cells(right, channels, rows)
    for cb, c0 in enumerate(range(0, channels, block_c)):
        for split, r0 in enumerate(range(0, rows, rows_per_split)):
            color = COLORS[(cb * 3 + split) % len(COLORS)]
            right.add_patch(Rectangle((c0, rows - r0 - rows_per_split), block_c, rows_per_split, alpha=0.3, color=color))
            for t in range(r0, r0 + rows_per_split, block_r):
                right.add_patch(Rectangle((c0, rows - t - block_r), block_c, block_r, fill=False, lw=1.0, color=color))
            right.text(c0 + block_c / 2, rows - r0 - rows_per_split / 2, f"program\n({cb}, {split})", ha="center",
                       va="center", fontsize=7)
    _frame(right, channels, rows, "C (contiguous in memory)", "R = N x H x W (rows)",
           f"channels_last: tiles [BLOCK_R={block_r}, BLOCK_C={block_c}], {rows_per_split} rows per split;\n"
           "program (channel block, split) walks its rows tile by tile", [0, block_c, 2 * block_c, channels])
    fig.tight_layout()
    fig.savefig(path, **SVG)
    plt.close(fig)


def merge(path: str) -> None:
    """The split reduction: each split's program writes (count, mean, M2) of its rows; the last to arrive at the
    channel block's counter merges them, BLOCK_SPLITS at a time, the tiles in split order (Chan), then writes
    mean, invstd and the running statistics."""
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.6)
    ax.axis("off")
    splits, per_tile = 8, 4

    def box(x, y, w, h, text, color, size=8):
        ax.add_patch(Rectangle((x, y), w, h, color=color, alpha=0.3))
        ax.add_patch(Rectangle((x, y), w, h, fill=False, color=color, lw=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(a, b):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="->", mutation_scale=10, lw=0.8, color="#444444"))

    for i in range(splits):
        box(0.2 + i * 1.3, 3.2, 1.1, 0.8, f"split {i}\n(n{i}, mean{i}, M2{i})", COLORS[i % len(COLORS)], 7)
    ax.text(0.2, 4.3, "the programs of one channel block, one per split of the rows:", fontsize=8, ha="left",
            va="center")
    for t in range(splits // per_tile):
        x = 0.6 + t * 5.2
        box(x, 1.75, 4.4, 0.8, f"tile {t}: k-way merge of splits {t * per_tile}..{t * per_tile + per_tile - 1}\n"
                              "n = sum n_i,  mean = sum n_i mean_i / n\nM2 = sum M2_i + sum n_i (mean_i - mean)^2",
            "#555555", 7)
        for i in range(t * per_tile, (t + 1) * per_tile):
            arrow((0.75 + i * 1.3, 3.2), (x + 2.2, 2.5))
    box(3.0, 0.3, 5.0, 0.9, "the last program to arrive (atomic counter):\nChan's merge of tile 0 and tile 1, in order"
                            " -> mean, invstd = 1/sqrt(M2/n + eps),\nrunning statistics updated once",
        "#c44e52", 7)
    arrow((2.8, 1.8), (4.5, 1.2))
    arrow((8.0, 1.8), (6.5, 1.2))
    fig.tight_layout()
    fig.savefig(path, **SVG)
    plt.close(fig)


def traffic(path: str) -> None:
    """Bytes per pass, in units of the tensor's size: triton_bn's passes against the fewest any implementation
    needs (read x, write y; + read dy, write dx; + the residual) and against PyTorch's BN then ReLU."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    cases = ["training forward", "training forward\n+ backward", "eval forward"]
    ours = [[("statistics: read x", 1), ("apply: read x, write y", 2)],
            [("statistics", 1), ("apply", 2), ("backward sums: read x, dy", 2), ("dx: read x, dy, write dx", 3)],
            [("apply: read x, write y", 2)]]
    minimal = [2, 5, 2]
    # PyTorch: BN's statistics (read x) and apply (read x, write y), then ReLU (read, write); backward: ReLU's
    # (read dy and y, write), BN's sums (read x, dy) and dx (read x, dy, write dx).
    torch_bn_relu = [1 + 2 + 2, 1 + 2 + 2 + 3 + 2 + 3, 2 + 2]
    for i, passes in enumerate(ours):
        bottom = 0
        for j, (label, units) in enumerate(passes):
            ax.bar(i - 0.2, units, 0.35, bottom=bottom, color=COLORS[j], alpha=0.7)
            ax.text(i - 0.2, bottom + units / 2, label, ha="center", va="center", fontsize=6)
            bottom += units
        ax.bar(i + 0.2, torch_bn_relu[i], 0.35, color="#8c8c8c", alpha=0.5)
        ax.plot([i - 0.4, i + 0.4], [minimal[i], minimal[i]], color="black", lw=1)
        ax.text(i + 0.42, minimal[i], "fewest", fontsize=7, va="center")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel("bytes moved / tensor size")
    ax.set_title("left: triton_bn's passes (BN + ReLU fused); right, grey: BN then a ReLU module", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, **SVG)
    plt.close(fig)


FIGURES = {"tiles.svg": tiles, "merge.svg": merge, "traffic.svg": traffic}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(os.path.join(args.out, name))
        print("wrote", os.path.join(args.out, name))


if __name__ == "__main__":
    main()
