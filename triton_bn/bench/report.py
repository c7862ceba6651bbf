"""Report writers: the long-format CSV, the markdown summary, the plots and the autotune report.

One row per (case, shape, dtype, layout, provider); ``KEY`` identifies a row, so runs can be
concatenated and de-duplicated."""
import math
import statistics
from pathlib import Path
from typing import Dict, List

KEY = ["case", "shape", "dtype", "layout", "provider"]
COLUMNS = KEY + ["ms", "ms_p20", "ms_p80", "bytes", "gbps", "efficiency", "rel_err", "device", "mode", "noise"]

# A row is noise, not a result, when its figure is impossible (moving its bytes faster than a copy of the same
# size measured beside it: efficiency > 1) or its times spread widely (p80 - p20 more than half the median: on
# a quiet machine 90-99% of CPU rows and nearly every GPU row are well inside that; a busy one goes past it).
MAX_SPREAD = 0.5


def quantiles(times) -> tuple:
    """(median, p20, p80) of a list of times."""
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def spread_noise(ms: float, p20: float, p80: float) -> str:
    """Why a median of ``ms`` is noise by its spread ("" when it is not): p80 - p20 over ``MAX_SPREAD`` of it."""
    if ms > 0 and p80 - p20 > MAX_SPREAD * ms:
        return f"p20-p80 {p20:.3g}-{p80:.3g} ms around a median of {ms:.3g}"
    return ""


def noise_of(row: dict) -> str:
    """Why a row's figure is noise ("" when it is a result)."""
    reasons = []
    if row["efficiency"] > 1.0:
        reasons.append(f"efficiency {row['efficiency']:.2f} > 1 (faster than a copy)")
    spread = spread_noise(row["ms"], row["ms_p20"], row["ms_p80"])
    if spread:
        reasons.append(spread)
    return "; ".join(reasons)


def is_noisy(noise) -> bool:
    """A ``noise`` cell as read back from the CSV (an empty reason reads as NaN)."""
    return isinstance(noise, str) and noise != ""


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


ANCHORS = ("eager_cudnn", "eager_native", "torch_compile")


def speedup_over_anchors(problem, anchors):
    """(triton_bn's speedup over the fastest anchor of one problem, whether that is noise: either row is), or
    None where one of them was not measured."""
    ours = problem[problem["provider"] == "triton_bn"]
    rivals = problem[problem["provider"].isin(anchors)]
    if not len(ours) or not len(rivals):
        return None
    fastest = rivals.loc[rivals["ms"].idxmin()]
    noisy = is_noisy(ours["noise"].iloc[0]) or is_noisy(fastest["noise"]) if "noise" in problem else False
    return fastest["ms"] / ours["ms"].iloc[0], noisy


def geomeans_per_anchor(group, anchors) -> str:
    """Where a run measured more than one anchor (eager and torch.compile): triton_bn's geomean speedup over each
    one alone, over the rows where neither it nor that anchor is noise (so a table against eager and one against
    torch.compile come out of the same run). Empty with a single anchor, where the best-anchor geomean says it."""
    if len(anchors) < 2:
        return ""
    parts = []
    for anchor in anchors:
        speedups = []
        for _, problem in group.groupby("shape"):
            found = speedup_over_anchors(problem, [anchor])
            if found is not None and not found[1] and math.isfinite(found[0]):
                speedups.append(found[0])
        if speedups:
            parts.append(f"{anchor} {geomean(speedups):.2f}x")
    return "; against each: " + ", ".join(parts) if parts else ""


def headline(frame) -> List[str]:
    """Per case, layout and dtype: triton_bn's geomean speedup over the fastest anchor of each row and its worst
    row, over the rows that are results (noise left out, and counted): what the console prints at the end."""
    anchors = [p for p in ANCHORS if p in set(frame["provider"])]
    lines = []
    for (case, layout, dtype), group in frame.groupby(["case", "layout", "dtype"], sort=True):
        speedups, noisy = [], 0
        for shape, problem in group.groupby("shape"):
            found = speedup_over_anchors(problem, anchors)
            if found is None:
                continue
            if found[1]:
                noisy += 1
            else:
                speedups.append(found[0])
        left_out = f"; {noisy} noisy left out" if noisy else ""
        if speedups:
            lines.append(f"{case:24} {layout:14} {dtype:5} geomean {geomean(speedups):.2f}x, worst row "
                         f"{min(speedups):.2f}x over {len(speedups)} shapes{left_out}"
                         f"{geomeans_per_anchor(group, anchors)}")
        elif noisy:
            lines.append(f"{case:24} {layout:14} {dtype:5} no result: all {noisy} shapes noisy")
    return lines


def noise_lines(frame, limit: int = 8) -> List[str]:
    """The console's account of the noisy rows: how many, and the first few with their reasons."""
    noisy = frame[frame["noise"].map(is_noisy)] if "noise" in frame else frame.iloc[:0]
    if not len(noisy):
        return []
    lines = [f"{len(noisy)} of {len(frame)} rows are noise, not results (a busy machine?), and are left out of the "
             "geomeans above; rerun on a quiet machine:"]
    for _, row in noisy.head(limit).iterrows():
        lines.append(f"  {row['case']} {row['shape']} {row['dtype']} {row['layout']} {row['provider']}: {row['noise']}")
    if len(noisy) > limit:
        lines.append(f"  ... and {len(noisy) - limit} more (column 'noise' of results.csv)")
    return lines


def summary_markdown(frame, header: str) -> str:
    """Per case and layout: triton_bn's efficiency per shape, its speedup over the fastest anchor,
    the geomean of that speedup and the worst row."""
    lines = [header, ""]
    anchors = [p for p in ANCHORS if p in set(frame["provider"])]
    noisy_rows = int(frame["noise"].map(is_noisy).sum()) if "noise" in frame else 0
    if noisy_rows:
        lines += [f"**{noisy_rows} of {len(frame)} rows are noise, not results** (efficiency above 1, or a p20-p80 "
                  f"spread wider than {MAX_SPREAD:.0%} of the median: a busy machine): marked *noisy* below, their "
                  "speedups in brackets and left out of the geomeans; rerun on a quiet machine.", ""]
    # GPU time alone (CUDA graph replay, no host launch work): shown beside the eager figures when measured
    graphed = [p for p in ("triton_bn+cudagraph", "eager_cudnn+cudagraph") if p in set(frame["provider"])]
    ours = frame[frame["provider"] == "triton_bn"]
    for (case, layout, dtype), group in ours.groupby(["case", "layout", "dtype"], sort=True):
        every_provider = frame[(frame["case"] == case) & (frame["layout"] == layout) & (frame["dtype"] == dtype)]
        lines.append(f"### {case}, {layout}, {dtype}")
        lines.append("")
        cols = (["shape", "triton_bn ms", "efficiency"] + [f"{a} eff" for a in anchors]
                + ["speedup vs best anchor", "rel err"] + [f"{g} eff" for g in graphed] + ["noise"])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        speedups, left_out = [], 0
        for _, row in group.iterrows():
            problem = every_provider[every_provider["shape"] == row["shape"]]
            anchor_eff = []
            for a in anchors:
                hit = problem[problem["provider"] == a]
                anchor_eff.append(f"{hit['efficiency'].iloc[0]:.2f}" if len(hit) else "-")
            found = speedup_over_anchors(problem, anchors)
            speedup_text, noise = "-", ""
            if found is not None:
                speedup, noisy = found
                speedup_text = f"({speedup:.2f}x)" if noisy else f"{speedup:.2f}x"
                if noisy:
                    left_out += 1
                    reasons = [f"{r['provider']}: {r['noise']}" for _, r in problem.iterrows() if is_noisy(r["noise"])]
                    noise = "*noisy*: " + "; ".join(reasons)
                elif math.isfinite(speedup):
                    speedups.append(speedup)
            graph_eff = []
            for g in graphed:
                hit = problem[problem["provider"] == g]
                graph_eff.append(f"{hit['efficiency'].iloc[0]:.2f}" if len(hit) else "-")
            lines.append(f"| {row['shape']} | {row['ms']:.4f} | {row['efficiency']:.2f} | " + " | ".join(anchor_eff)
                         + f" | {speedup_text} | {row['rel_err']:.1e} |" + "".join(f" {e} |" for e in graph_eff)
                         + f" {noise} |")
        if speedups:
            lines.append("")
            lines.append(f"geomean speedup vs best anchor: {geomean(speedups):.2f}x; worst row: {min(speedups):.2f}x"
                         + (f" ({left_out} noisy rows left out)" if left_out else "")
                         + geomeans_per_anchor(every_provider, anchors))
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
