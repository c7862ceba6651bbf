"""Report writers: the long-format CSV, the markdown summary, the plots and the autotune report.

One row per (case, shape, dtype, layout, provider); ``KEY`` identifies a row, so runs can be
concatenated and de-duplicated."""
import math
from pathlib import Path
from typing import Dict, List

KEY = ["case", "shape", "dtype", "layout", "provider"]
COLUMNS = KEY + ["ms", "ms_p20", "ms_p80", "bytes", "gbps", "efficiency", "rel_err", "device", "mode"]


def add_speedups(rows: List[dict], providers) -> List[dict]:
    """speedup_vs_<p> = time of provider p on the same problem / this row's time (> 1: this row is faster)."""
    by_problem: Dict[tuple, Dict[str, float]] = {}
    for row in rows:
        by_problem.setdefault(tuple(row[k] for k in KEY[:-1]), {})[row["provider"]] = row["ms"]
    for row in rows:
        times = by_problem[tuple(row[k] for k in KEY[:-1])]
        for p in providers:
            row[f"speedup_vs_{p}"] = times[p] / row["ms"] if p in times and row["ms"] > 0 else float("nan")
    return rows


def write_csv(rows: List[dict], path: Path):
    import pandas as pd
    frame = pd.DataFrame(rows)
    frame = frame.drop_duplicates(subset=KEY, keep="last")
    frame.to_csv(path, index=False)
    return frame


def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def headline(frame) -> List[str]:
    """Per case, layout and dtype: triton_bn's geomean speedup over the fastest anchor of each row and its worst
    row (what the console prints at the end of a run)."""
    anchors = [p for p in ("eager_cudnn", "eager_native", "torch_compile") if p in set(frame["provider"])]
    lines = []
    for (case, layout, dtype), group in frame.groupby(["case", "layout", "dtype"], sort=True):
        speedups = []
        for shape, problem in group.groupby("shape"):
            ours = problem[problem["provider"] == "triton_bn"]["ms"]
            best = problem[problem["provider"].isin(anchors)]["ms"]
            if len(ours) and len(best):
                speedups.append(best.min() / ours.iloc[0])
        if speedups:
            lines.append(f"{case:24} {layout:14} {dtype:5} geomean {geomean(speedups):.2f}x, worst row "
                         f"{min(speedups):.2f}x over {len(speedups)} shapes")
    return lines


def summary_markdown(frame, header: str) -> str:
    """Per case and layout: triton_bn's efficiency per shape, its speedup over the fastest anchor,
    the geomean of that speedup and the worst row."""
    lines = [header, ""]
    anchors = [p for p in ("eager_cudnn", "eager_native", "torch_compile") if p in set(frame["provider"])]
    # GPU time alone (CUDA graph replay, no host launch work): shown beside the eager figures when measured
    graphed = [p for p in ("triton_bn+cudagraph", "eager_cudnn+cudagraph") if p in set(frame["provider"])]
    ours = frame[frame["provider"] == "triton_bn"]
    for (case, layout, dtype), group in ours.groupby(["case", "layout", "dtype"], sort=True):
        lines.append(f"### {case}, {layout}, {dtype}")
        lines.append("")
        cols = (["shape", "triton_bn ms", "efficiency"] + [f"{a} eff" for a in anchors]
                + ["speedup vs best anchor", "rel err"] + [f"{g} eff" for g in graphed])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        speedups = []
        for _, row in group.iterrows():
            problem = frame[(frame["case"] == case) & (frame["layout"] == layout) & (frame["dtype"] == dtype)
                            & (frame["shape"] == row["shape"])]
            anchor_eff = []
            best = float("inf")
            for a in anchors:
                hit = problem[problem["provider"] == a]
                if len(hit):
                    anchor_eff.append(f"{hit['efficiency'].iloc[0]:.2f}")
                    best = min(best, hit["ms"].iloc[0])
                else:
                    anchor_eff.append("-")
            speedup = best / row["ms"] if math.isfinite(best) else float("nan")
            speedups.append(speedup)
            graph_eff = []
            for g in graphed:
                hit = problem[problem["provider"] == g]
                graph_eff.append(f"{hit['efficiency'].iloc[0]:.2f}" if len(hit) else "-")
            lines.append(f"| {row['shape']} | {row['ms']:.4f} | {row['efficiency']:.2f} | " + " | ".join(anchor_eff)
                         + f" | {speedup:.2f}x | {row['rel_err']:.1e} |" + "".join(f" {e} |" for e in graph_eff))
        finite = [s for s in speedups if math.isfinite(s)]
        if finite:
            lines.append("")
            lines.append(f"geomean speedup vs best anchor: {geomean(finite):.2f}x; worst row: {min(finite):.2f}x")
        lines.append("")
    return "\n".join(lines)


def write_plots(frame, folder: Path) -> List[Path]:
    """One PNG per (case, layout, dtype): efficiency per shape, one line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for (case, layout, dtype), group in frame.groupby(["case", "layout", "dtype"], sort=True):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        shapes = list(dict.fromkeys(group["shape"]))
        for provider, rows in group.groupby("provider"):
            rows = rows.set_index("shape").reindex(shapes)
            ax.plot(range(len(shapes)), rows["efficiency"], marker="o", label=provider)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, fontsize=7)
        ax.set_ylabel("efficiency (of copy bandwidth)")
        ax.set_title(f"{case} {layout} {dtype}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"efficiency_{case}_{layout}_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_autotune_report(entries: List[dict], folder: Path) -> None:
    """Every configuration benchmarked per kernel key, its time and the one chosen (CSV + markdown)."""
    import pandas as pd
    frame = pd.DataFrame(entries, columns=["key", "block_a", "block_b", "num_warps", "num_stages", "programs_per_sm",
                                           "flat", "ms", "chosen"])
    frame.to_csv(folder / "autotune.csv", index=False)
    lines = ["# Autotune report", ""]
    if frame.empty:
        lines.append("No configuration was benchmarked in this run: tuning was off (CPU interpreter or "
                     "TRITON_BN_AUTOTUNE=0) or every key was already in the on-disk cache; "
                     "the heuristic or cached choice was used.")
    for key, group in frame.groupby("key", sort=True):
        lines += [f"## {key}", "", "| block_a | block_b | flat | warps | stages | programs/SM | ms | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, row in group.sort_values("ms").iterrows():
            lines.append(f"| {row['block_a']} | {row['block_b']} | {bool(row['flat'])} | {row['num_warps']} | {row['num_stages']} | "
                         f"{row['programs_per_sm']} | {row['ms']:.4f} | {'**yes**' if row['chosen'] else ''} |")
        lines.append("")
    (folder / "autotune.md").write_text("\n".join(lines))
