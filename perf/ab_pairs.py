"""A kernel change against the commit before it, side by side on this machine: ``triton-bn bench`` of a base
commit (checked out in a git worktree, with its own native build) and of the working tree, in alternating pairs
(before-1, after-1, before-2, after-2, ...), then per cell (case, dtype, layout) each pair's after / before of the
geomean against PyTorch, and our own time after / before.

    python perf/ab_pairs.py BASE OUT [--pairs N] -- BENCH_ARGUMENTS...
    python perf/ab_pairs.py --report OUT

e.g. ``python perf/ab_pairs.py HEAD~1 /tmp/ab -- --device cpu --cases train_fwd --dtypes fp16 --layouts
channels_last``. Why pairs, and why ratios: a CPU VM's speed drifts between runs of the same code (copy bandwidth
22.8-32.3 GB/s on this project's AMD EPYC VMs, both providers' times moving up to 2x), so only runs next to each
other compare, each cell against PyTorch measured beside it; a change is established when every pair agrees in
sign (perf/NOTES.md has where they did not). Run it once with BASE = HEAD first (the same code on both sides):
what that reads is what this host can not resolve today (on 2026-12-07's VM, 1.03-1.11 with every pair agreeing
in sign). ``--report`` prints the table of an earlier OUT again.
"""
import argparse
import collections
import csv
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = "import sys; from triton_bn.bench.cli import main; sys.exit(main())"


def _geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def runs_of(out: str) -> List[Tuple[str, str]]:
    """[(before-k, after-k)] for the pairs whose results.csv are both in ``out``, in order."""
    pairs, k = [], 1
    while all(os.path.exists(os.path.join(out, f"{side}-{k}", "results.csv")) for side in ("before", "after")):
        pairs.append((f"before-{k}", f"after-{k}"))
        k += 1
    return pairs


def _times(out: str, run: str) -> Dict[tuple, Dict[str, float]]:
    """{(case, dtype, layout, shape): {provider: ms}} of one run, rows flagged as noise left out."""
    times = collections.defaultdict(dict)
    with open(os.path.join(out, run, "results.csv")) as f:
        for row in csv.DictReader(f):
            if not row.get("noise"):
                times[(row["case"], row["dtype"], row["layout"], row["shape"])][row["provider"]] = float(row["ms"])
    return times


def cell_ratios(out: str, reference: str = "eager_native") -> List[dict]:
    """Per cell: each pair's geomean of ``reference`` / triton_bn before and after, their ratio, and our own time
    after / before (geomean over the shapes, the best of the pairs on each side). Shapes are those every run
    measured without a noise flag."""
    pairs = runs_of(out)
    if not pairs:
        raise FileNotFoundError(f"no before-1 / after-1 results.csv in {out}")
    runs = [run for pair in pairs for run in pair]
    times = {run: _times(out, run) for run in runs}
    keys = set.intersection(*(set(k for k, v in times[run].items() if {"triton_bn", reference} <= set(v))
                              for run in runs))
    cells = collections.defaultdict(list)
    for key in sorted(keys):
        cells[key[:3]].append(key)
    table = []
    for cell, keys_of_cell in sorted(cells.items()):
        speedup = {run: _geomean([times[run][k][reference] / times[run][k]["triton_bn"] for k in keys_of_cell])
                   for run in runs}
        own = _geomean([min(times[after][k]["triton_bn"] for _, after in pairs) /
                        min(times[before][k]["triton_bn"] for before, _ in pairs) for k in keys_of_cell])
        table.append(dict(cell=cell, shapes=len(keys_of_cell), before=[speedup[b] for b, _ in pairs],
                          after=[speedup[a] for _, a in pairs], ratios=[speedup[a] / speedup[b] for b, a in pairs],
                          own_after_over_before=own))
    return table


def report(out: str) -> str:
    """The table of ``cell_ratios`` as text, with the geomean of every pair's ratio over the cells."""
    table = cell_ratios(out)
    lines = []
    for row in table:
        case, dtype, layout = row["cell"]
        lines.append(f"{case:22} {dtype:5} {layout:13} before {' '.join(f'{v:.2f}' for v in row['before'])} "
                     f"after {' '.join(f'{v:.2f}' for v in row['after'])}  ratio "
                     f"{' '.join(f'{v:.3f}' for v in row['ratios'])} | own time after/before "
                     f"{row['own_after_over_before']:.3f} ({row['shapes']} shapes)")
    every = [r for row in table for r in row["ratios"]]
    agree = sum(1 for row in table if all(r > 1 for r in row["ratios"]) or all(r < 1 for r in row["ratios"]))
    lines.append(f"geomean after/before over {len(table)} cells and {len(runs_of(out))} pairs: {_geomean(every):.3f}; "
                 f"{agree} of {len(table)} cells agree in sign in every pair")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--report"] and len(argv) == 2:
        print(report(argv[1]))
        return 0
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="perf/ab_pairs.py")
    parser.add_argument("base")
    parser.add_argument("out")
    parser.add_argument("--pairs", type=int, default=2)
    args, bench_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if any(a == "--out" or a.startswith("--out=") for a in bench_args):
        print("perf/ab_pairs.py: leave --out out of the bench's arguments: each run writes OUT/<before|after>-k",
              file=sys.stderr)
        return 2
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"perf/ab_pairs.py: {args.out} exists and is not empty: an earlier comparison is never overwritten",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    base = tempfile.mkdtemp(prefix="triton-bn-base-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", base, args.base], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        for k in range(1, args.pairs + 1):
            for side, tree in (("before", base), ("after", ROOT)):
                run = os.path.join(os.path.abspath(args.out), f"{side}-{k}")
                print(f"{side}-{k}: triton-bn bench {' '.join(bench_args)} ({tree})", flush=True)
                with open(run + ".log", "w") as log:
                    done = subprocess.run([sys.executable, "-c", BENCH, "bench", *bench_args, "--out", run],
                                          cwd=tree, env=dict(os.environ, PYTHONPATH=tree), stdout=log,
                                          stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    print(f"perf/ab_pairs.py: {side}-{k} failed (exit {done.returncode}); its console: {run}.log",
                          file=sys.stderr)
                    return 1
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], stdout=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    text = report(args.out)
    with open(os.path.join(args.out, "after-over-before.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
