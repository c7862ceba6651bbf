"""Instructions in the main loop of the statistics kernel, from its SASS, without a GPU.

Compiles ``_bn_fwd_stats_channels_last`` for sm_90 (bf16 input), disassembles the cubin with
triton's bundled ``nvdisasm`` and counts the instructions between each loop label and the branch
back to it: the arithmetic per element that the bandwidth budget must cover (perf/NOTES.md).

    TRITON_INTERPRET=0 python perf/sass_loop.py [BLOCK_R BLOCK_C NUM_WARPS]
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "needs the real jit functions"
from triton_bn.kernels import channels_last as cl  # noqa: E402


FLOAT_ARGS = {"inv_count", "unbiased_factor", "eps", "momentum"}
POINTER_TYPES = {"x_ptr": "*bf16", "counter_ptr": "*i32", "num_batches_ptr": "*i64"}


def loop_bodies(block_r: int = 64, block_c: int = 32, num_warps: int = 4):
    kernel = cl._bn_fwd_stats_channels_last
    signature = {name: "constexpr" if p.is_constexpr else POINTER_TYPES.get(name, "*fp32") if name.endswith("_ptr")
                 else "fp32" if name in FLOAT_ARGS else "i32" for name, p in zip(kernel.arg_names, kernel.params)}
    # As the launcher specialises a ResNet layer at run time: every pointer 16-byte aligned and every
    # integer (C, R, the row stride, rows per split) a multiple of 16. Without these hints the compiler
    # can not prove that a row of the tile is contiguous and aligned, and loads one element at a time.
    divisible = {(i,): [["tt.divisibility", 16]] for i, (name, p) in enumerate(zip(kernel.arg_names, kernel.params))
                 if not p.is_constexpr and name not in FLOAT_ARGS}
    # no pipelining (NUM_STAGES=1): the count is of the arithmetic per element, not of the copy machinery
    constexprs = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_SPLITS=32, NUM_STAGES=1, UPDATE_RUNNING=True,
                      CUMULATIVE=False, WRITE_MOMENTS=False)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=divisible)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        lines = subprocess.run([str(nvdisasm), str(cubin)], capture_output=True, text=True, check=True).stdout.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines)
              if line.strip().startswith(".L") and line.strip().endswith(":")}
    for i, line in enumerate(lines):
        if "BRA" not in line:
            continue
        for name, start in labels.items():
            if name in line and start < i:  # a branch back: the body of a loop
                body = [b for b in lines[start:i] if ";" in b]
                if body:
                    yield len(body), sum("MUFU.RCP" in b for b in body)


if __name__ == "__main__":
    block_r, block_c, warps = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (64, 32, 4)
    per_thread = block_r * block_c // (32 * warps)
    # The data loop (shifted sums: no division) and the last program's merge of the splits (Chan's formula
    # divides by counts; its cost is per split tile, once per channel block, not per element of x). They
    # are told apart by the reciprocal, not by their order in the SASS: triton 3.9 places the data loop
    # first, triton 3.6 a merge loop.
    loops = list(loop_bodies(block_r, block_c, warps))
    for instructions, reciprocals in sorted(loops, key=lambda loop: loop[1] > 0):
        if reciprocals == 0:
            print(f"data loop: {instructions} instructions, {reciprocals} MUFU.RCP, {per_thread} elements per thread: "
                  f"{instructions / per_thread:.1f} instructions per element")
        else:
            print(f"merge loop: {instructions} instructions, {reciprocals} MUFU.RCP per tile of split partials")
