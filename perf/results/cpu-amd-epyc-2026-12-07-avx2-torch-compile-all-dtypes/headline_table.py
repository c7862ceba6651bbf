"""The per-cell lines of a bench console ("against each: eager_native X, torch_compile Y") as a markdown table, and
the lowest cells. Usage: python headline_table.py console.txt"""
import re, sys
cells = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+)\s+(\S+)\s+(\S+)\s+geomean .*against each: eager_native ([\d.]+|n/a)x?, torch_compile ([\d.]+|n/a)x?", line)
    if m:
        cells[m.group(1, 2, 3)] = (m.group(4), m.group(5))
cols = [(d, l) for d in ("fp32", "bf16", "fp16", "fp64") for l in ("nchw", "channels_last")]
print("| AVX2, against eager / torch.compile | " + " | ".join(f"{d} {'NCHW' if l == 'nchw' else l}" for d, l in cols) + " |")
print("|---" * 9 + "|")
rows = [("BN+ReLU eval", "eval_fwd_relu"), ("BN+ReLU training forward", "train_fwd_relu"),
        ("BN+ReLU training forward + backward", "train_fwdbwd_relu"), ("BN + add + ReLU, forward + backward", "train_add_relu_fwdbwd"),
        ("plain eval", "eval_fwd"), ("plain training forward", "train_fwd"), ("plain training forward + backward", "train_fwdbwd"),
        ("SiLU eval", "eval_fwd_silu"), ("SiLU training forward", "train_fwd_silu"), ("SiLU training forward + backward", "train_fwdbwd_silu"),
        ("GELU eval", "eval_fwd_gelu"), ("GELU training forward", "train_fwd_gelu"), ("GELU training forward + backward", "train_fwdbwd_gelu")]
def fmt(v): return v if v == "n/a" else v + "x"
for name, case in rows:
    print(f"| {name} | " + " | ".join("%s / %s" % tuple(map(fmt, cells.get((case, l, d), ("n/a", "n/a")))) for d, l in cols) + " |")
vals = [(k, float(v[1])) for k, v in cells.items() if v[1] != "n/a"]
eag = [(k, float(v[0])) for k, v in cells.items() if v[0] != "n/a"]
print("\ncells", len(cells), "min vs compile", min(vals, key=lambda t: t[1]), "min vs eager", min(eag, key=lambda t: t[1]))
print("below 1 vs compile:", [k for k, v in vals if v < 1.0]); print("below 1 vs eager:", sorted((v, k) for k, v in eag if v < 1.0))
