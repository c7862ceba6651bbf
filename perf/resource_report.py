"""Registers, spills, shared memory and resident programs per SM of every kernel x declared tile, for
sm_90, without a GPU.

Compiles each kernel to PTX with triton (no device needed) with the divisibility-by-16 hints the JIT adds
at run time for ResNet-50 sizes (every pointer and integer argument), runs triton's bundled ``ptxas -v``
on it and tabulates registers per thread, spill bytes, shared memory and how many programs of it fit on
one H100/H200 multiprocessor (64K registers, 228 KB shared memory, 64 warps). Reductions are compiled as
configured (their num_stages pipelines the loop through shared memory). A configuration that spills moves
local-memory bytes the byte count does not include; one that fits once per SM has little in flight.

    TRITON_INTERPRET=0 python perf/resource_report.py > perf/ptxas-sm90.md
    PYTHONPATH=<triton 3.6>:. TRITON_INTERPRET=0 python perf/resource_report.py > perf/ptxas-sm90-triton3.6.md
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
assert os.environ.get("TRITON_INTERPRET", "0") != "1", "needs the real jit functions"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from test_compile_sm90 import DTYPE_OF, EPILOGUE, FLOAT_ARGS  # noqa: E402
from triton_bn.autotune import DECLARED_CONFIGS, merge_block  # noqa: E402
from triton_bn.backends.occupancy import H100_LIMITS, resident_programs  # noqa: E402
from triton_bn.kernels import channels_first as cf  # noqa: E402
from triton_bn.kernels import channels_last as cl  # noqa: E402

# triton 3.9 ships two ptxas builds; its PTX version needs the newer one (named for Blackwell, it
# assembles sm_90a too). Older triton versions ship only ``ptxas``.
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS = next(p for p in (_BIN / "ptxas-blackwell", _BIN / "ptxas") if p.exists())


def _compile(kernel, constexprs, element: str, num_warps: int):
    signature = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            dtype = DTYPE_OF.get(name, "fp32")
            signature[name] = "*" + (element if dtype == "bf16" else dtype)
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    hints = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name] not in ("constexpr", "fp32")}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=hints)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _resources(ptx: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True).stderr
    if "fatal" in out:
        raise RuntimeError(out)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return int(regs.group(1)) if regs else -1, (int(spill.group(1)) + int(spill.group(2))) if spill else -1


STATS = dict(UPDATE_RUNNING=True, CUMULATIVE=False, WRITE_MOMENTS=False)
SUMS = dict(WRITE_GRAD_WEIGHT=True, WRITE_GRAD_BIAS=True)
DX = dict(BATCH_STATS=True, WRITE_GRAD_X=True, WRITE_GRAD_RESIDUAL=True)
APPLY = dict(EPILOGUE, ACTIVATION=1, COUNT_BATCH=True)  # a training forward's normalization


def main() -> None:
    kernels = {
        "channels_last": [("stats", cl._bn_fwd_stats_channels_last, STATS, True),
                          ("apply", cl._bn_fwd_apply_channels_last, APPLY, False),
                          ("bwd_reduce", cl._bn_bwd_reduce_channels_last, dict(EPILOGUE, ACTIVATION=1, **SUMS), True),
                          ("bwd_dx", cl._bn_bwd_dx_channels_last, dict(EPILOGUE, ACTIVATION=1, **DX), False)],
        "channels_first": [("stats", cf._bn_fwd_stats_channels_first, STATS, True),
                           ("apply", cf._bn_fwd_apply_channels_first, APPLY, False),
                           ("bwd_reduce", cf._bn_bwd_reduce_channels_first, dict(EPILOGUE, ACTIVATION=1, **SUMS), True),
                           ("bwd_dx", cf._bn_bwd_dx_channels_first, dict(EPILOGUE, ACTIVATION=1, **DX), False)],
    }
    print("# ptxas resource report, sm_90a (no GPU needed)\n")
    print(f"triton {triton.__version__}; ReLU epilogue with residual; x/y/dy in bf16; run-time divisibility hints. "
          "Per cell: registers per thread / spill bytes / shared bytes / programs resident per SM. "
          "Made by `perf/resource_report.py`.\n")
    for family, entries in kernels.items():
        names = ("BLOCK_R", "BLOCK_C") if family == "channels_last" else ("BLOCK_N", "BLOCK_S")
        print(f"## {family}\n")
        print("| tile | warps | stages | " + " | ".join(role for role, _, _, _ in entries) + " |")
        print("|---|---|---|" + "---|" * len(entries))
        for cfg in DECLARED_CONFIGS[family]:
            cells = []
            for _, kernel, flags, reduction in entries:
                constexprs = dict(flags, **{names[0]: cfg.block_a, names[1]: cfg.block_b})
                if family == "channels_first":
                    constexprs["FLAT"] = cfg.flat
                if reduction:
                    constexprs.update(BLOCK_SPLITS=merge_block(family, cfg), NUM_STAGES=cfg.num_stages)
                compiled = _compile(kernel, constexprs, "bf16", cfg.num_warps)
                regs, spill = _resources(compiled.asm["ptx"])
                shared = compiled.metadata.shared
                cells.append(f"{regs} / {spill} / {shared} / {resident_programs(regs, shared, cfg.num_warps, H100_LIMITS)}")
            tile = f"{cfg.block_a}x{cfg.block_b}" + (" flat" if cfg.flat else "")
            print(f"| {tile} | {cfg.num_warps} | {cfg.num_stages} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
