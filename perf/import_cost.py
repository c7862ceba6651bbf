"""What ``import triton_bn`` costs after ``import torch``: each measured in a fresh process, several times.

    python perf/import_cost.py        # prints the medians (perf/NOTES.md has the figures of this machine)
"""
import statistics
import subprocess
import sys

CHILD = """
import time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import triton_bn; t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def measure(runs: int = 7):
    torch_s, ours_s = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
        torch_s.append(float(out[0]))
        ours_s.append(float(out[1]))
    return statistics.median(torch_s), statistics.median(ours_s)


if __name__ == "__main__":
    torch_s, ours_s = measure()
    print(f"import torch: {torch_s:.2f} s; import triton_bn after it: {ours_s:.2f} s (median of 7 fresh processes)")
