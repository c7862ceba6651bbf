"""A bench run's geomean cells against earlier runs of the same cells: which fall below the lowest earlier reading
of their cell, and which below the best one.

    python perf/compare_runs.py NEW_SUMMARY 'EARLIER_GLOB' [...]

NEW_SUMMARY is a ``summary.md`` that ``triton-bn bench`` wrote; each EARLIER_GLOB names summaries of earlier runs
(quoted, expanded here, ``**`` included), e.g. ``'perf/results/cpu-amd-epyc-2026-11-27-*/**/summary*.md'``. A
cell is a (case, layout, dtype) with its geomean against the fastest anchor. Runs of another day are not side
by side: this says whether a cell left the spread that earlier runs of it had, not by how much the code moved.
"""
import glob
import re
import sys


def geomeans(path: str):
    """{(case, layout, dtype): geomean} of one summary.md (rows flagged as noise are already left out)."""
    cells, cell = {}, None
    with open(path) as f:
        for line in f:
            heading = re.match(r"### (\S+), (\S+), (\S+)", line)
            if heading:
                cell = heading.group(1, 2, 3)
            geomean = re.match(r"geomean speedup vs best anchor: ([\d.]+)x", line)
            if geomean and cell is not None:
                cells[cell] = float(geomean.group(1))
    return cells


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    new = geomeans(argv[0])
    earlier = {}
    paths = sorted({path for pattern in argv[1:] for path in glob.glob(pattern, recursive=True)})
    for path in paths:
        for cell, value in geomeans(path).items():
            earlier.setdefault(cell, []).append(value)
    if not new or not paths:
        print(f"nothing to compare: {len(new)} cells in {argv[0]}, {len(paths)} earlier summaries", file=sys.stderr)
        return 1
    both = [cell for cell in sorted(new) if cell in earlier]
    below_lowest = [cell for cell in both if new[cell] < min(earlier[cell])]
    below_best = [cell for cell in both if new[cell] < max(earlier[cell])]
    print(f"{len(both)} of {len(new)} cells have earlier readings ({len(paths)} summaries)")
    for title, cells, reference in (("below the lowest earlier reading", below_lowest, min),
                                    ("below the best earlier reading", below_best, max)):
        print(f"{title}: {len(cells)}")
        for cell in sorted(cells, key=lambda c: new[c] - reference(earlier[c])):
            print(f"  {' '.join(cell)}: {new[cell]:.2f}x against {reference(earlier[cell]):.2f}x "
                  f"(earlier {min(earlier[cell]):.2f}-{max(earlier[cell]):.2f}x over {len(earlier[cell])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
