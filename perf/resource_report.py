"""Registers and spills of every kernel x declared tile, for sm_90, without a GPU.

Compiles each kernel to PTX with triton (no device needed), runs triton's bundled ``ptxas -v`` on it
and tabulates registers per thread and spill bytes. A configuration that spills moves local-memory
bytes the byte count does not include: worth knowing before spending GPU time on it.

    TRITON_INTERPRET=0 python perf/resource_report.py > perf/ptxas-sm90.md
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
from triton_bn.autotune import DECLARED_CONFIGS  # noqa: E402
from triton_bn.kernels import channels_first as cf  # noqa: E402
from triton_bn.kernels import channels_last as cl  # noqa: E402

# triton 3.9 ships two ptxas builds; its PTX version needs the newer one (named for Blackwell, it
# assembles sm_90a too). Older triton versions ship only ``ptxas``.
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS = next(p for p in (_BIN / "ptxas-blackwell", _BIN / "ptxas") if p.exists())


def _ptx(kernel, constexprs, element: str, num_warps: int) -> str:
    signature = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            dtype = DTYPE_OF.get(name, "fp32")
            signature[name] = "*" + (element if dtype == "bf16" else dtype)
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


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


def main() -> None:
    kernels = {
        "channels_last": [("stats", cl._bn_fwd_stats_partial_channels_last, {}),
                          ("apply", cl._bn_fwd_apply_channels_last, dict(EPILOGUE, ACTIVATION=1)),
                          ("bwd_reduce", cl._bn_bwd_reduce_partial_channels_last, dict(EPILOGUE, ACTIVATION=1)),
                          ("bwd_dx", cl._bn_bwd_dx_channels_last, dict(EPILOGUE, ACTIVATION=1, BATCH_STATS=True,
                                                                       WRITE_GRAD_X=True, WRITE_GRAD_RESIDUAL=True))],
        "channels_first": [("stats", cf._bn_fwd_stats_partial_channels_first, {}),
                           ("apply", cf._bn_fwd_apply_channels_first, dict(EPILOGUE, ACTIVATION=1)),
                           ("bwd_reduce", cf._bn_bwd_reduce_partial_channels_first, dict(EPILOGUE, ACTIVATION=1)),
                           ("bwd_dx", cf._bn_bwd_dx_channels_first, dict(EPILOGUE, ACTIVATION=1, BATCH_STATS=True,
                                                                         WRITE_GRAD_X=True, WRITE_GRAD_RESIDUAL=True))],
    }
    print("# ptxas resource report, sm_90a (no GPU needed)\n")
    print(f"triton {triton.__version__}; ReLU epilogue with residual; x/y/dy in bf16. Registers per thread / spill "
          "bytes (stores + loads). Made by `perf/resource_report.py`.\n")
    for family, entries in kernels.items():
        names = ("BLOCK_R", "BLOCK_C") if family == "channels_last" else ("BLOCK_N", "BLOCK_S")
        print(f"## {family}\n")
        print("| tile | warps | " + " | ".join(role for role, _, _ in entries) + " |")
        print("|---|---|" + "---|" * len(entries))
        for cfg in DECLARED_CONFIGS[family]:
            cells = []
            for _, kernel, flags in entries:
                constexprs = dict(flags, **{names[0]: cfg.block_a, names[1]: cfg.block_b})
                if family == "channels_first":
                    constexprs["FLAT"] = cfg.flat
                regs, spill = _resources(_ptx(kernel, constexprs, "bf16", cfg.num_warps))
                cells.append(f"{regs} / {spill}")
            tile = f"{cfg.block_a}x{cfg.block_b}" + (" flat" if cfg.flat else "")
            print(f"| {tile} | {cfg.num_warps} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
