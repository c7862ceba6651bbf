"""Every kernel compiles for a Hopper GPU (sm_90), on this CPU: the Triton interpreter accepts code the
compiler rejects (a plain float global, a scalar/tensor type mismatch), so the interpreter tests alone
would let a kernel that can not build on a GPU pass. Triton ships ptxas, so no GPU is needed to build
a cubin. The compiler needs the kernels as jit functions, not the interpreter's, so each group runs in
a child process without TRITON_INTERPRET (``python tests/test_compile_sm90.py GROUP``)."""
import os
import re
import subprocess
import sys

import pytest
import triton

from triton_bn.kernels import channels_first as cf
from triton_bn.kernels import channels_last as cl

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover - an older triton
    GPUTarget = None

FLOAT_ARGS = {"eps", "negative_slope", "inv_count", "unbiased_factor", "momentum"}
DTYPE_OF = {"x_ptr": "bf16", "y_ptr": "bf16", "residual_ptr": "bf16", "grad_y_ptr": "bf16", "grad_x_ptr": "bf16",
            "grad_residual_ptr": "bf16", "running_mean_ptr": "fp32", "running_var_ptr": "fp16",
            "num_batches_ptr": "i64", "grad_weight_ptr": "fp32", "grad_bias_ptr": "fp32", "counter_ptr": "i32"}


def _compile(kernel, constexprs, index_type="i32", hints=False, unaligned=(), dtypes=None):
    """Compile for sm_90; ``hints``: with the divisibility-by-16 attributes the JIT adds at run time for
    ResNet-50 sizes on every pointer and integer argument (what lets loads vectorise and pipeline),
    except the arguments named in ``unaligned`` (a 7x7 plane's size and channel stride, say).
    ``dtypes`` overrides ``DTYPE_OF`` for some pointers."""
    pointer_dtypes = dict(DTYPE_OF, **(dtypes or {}))
    signature = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = index_type
    missing = [n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr and n not in constexprs]
    assert not missing, f"test must set {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if hints and signature[name] not in ("constexpr", "fp32") and name not in unaligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    assert compiled.asm["cubin"], "no machine code"
    return compiled


EPILOGUE = dict(STATS_ARE_RUNNING=False, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True)
CL_TILE = dict(BLOCK_R=32, BLOCK_C=64)
CF_TILE = dict(BLOCK_N=4, BLOCK_S=256, FLAT=False)


def group_channels_last_elementwise():
    for activation in range(9):
        _compile_channels_last_elementwise(activation)


def _compile_channels_last_elementwise(activation):
    _compile(cl._bn_fwd_apply_channels_last, dict(EPILOGUE, ACTIVATION=activation, COUNT_BATCH=True, **CL_TILE))
    _compile(cl._bn_bwd_dx_channels_last, dict(EPILOGUE, ACTIVATION=activation, BATCH_STATS=True, WRITE_GRAD_X=True,
                                               WRITE_GRAD_RESIDUAL=True, **CL_TILE))


def group_channels_first():
    for activation in (0, 5, 6):
        for flat in (False, True):
            _compile_channels_first(activation, flat)


def _compile_channels_first(activation, flat):
    tile = dict(CF_TILE, FLAT=flat)
    _compile(cf._bn_fwd_apply_channels_first, dict(EPILOGUE, ACTIVATION=activation, COUNT_BATCH=True, **tile))
    _compile(cf._bn_bwd_dx_channels_first, dict(EPILOGUE, ACTIVATION=activation, BATCH_STATS=True, WRITE_GRAD_X=True,
                                                WRITE_GRAD_RESIDUAL=True, **tile))
    _compile(cf._bn_bwd_reduce_channels_first, dict(EPILOGUE, **SUMS_FLAGS, ACTIVATION=activation, BLOCK_SPLITS=256,
                                                    **tile))
    _compile(cf._bn_fwd_stats_channels_first, dict(STATS_FLAGS, BLOCK_SPLITS=256, **tile))


def group_reductions_and_finalize():
    """i64: sizes and strides past 2^31 arrive as 64-bit integers."""
    for index_type in ("i32", "i64"):
        _compile_reductions(index_type)


STATS_FLAGS = dict(UPDATE_RUNNING=True, CUMULATIVE=True, WRITE_MOMENTS=True, NUM_STAGES=3)
SUMS_FLAGS = dict(WRITE_GRAD_WEIGHT=True, WRITE_GRAD_BIAS=True, NUM_STAGES=3)


def _compile_reductions(index_type):
    _compile(cl._bn_fwd_stats_channels_last, dict(STATS_FLAGS, BLOCK_SPLITS=32, **CL_TILE), index_type)
    _compile(cl._bn_bwd_reduce_channels_last, dict(EPILOGUE, **SUMS_FLAGS, ACTIVATION=1, BLOCK_SPLITS=32, **CL_TILE),
             index_type)
    _compile(cf._bn_fwd_stats_channels_first, dict(STATS_FLAGS, BLOCK_SPLITS=256, **CF_TILE), index_type)
    _compile(cf._bn_bwd_reduce_channels_first, dict(EPILOGUE, **SUMS_FLAGS, ACTIVATION=0, BLOCK_SPLITS=256, **CF_TILE),
             index_type)


def group_pipelining_and_ordering():
    """Every reduction: NUM_STAGES > 1 really pipelines its loop (cp.async, different code), NUM_STAGES=1
    does not; the last-program merge is published by a barrier and an acq_rel device-scope atomic."""
    reductions = [
        (cl._bn_fwd_stats_channels_last, dict(STATS_FLAGS, BLOCK_SPLITS=32, BLOCK_R=64, BLOCK_C=64)),
        (cl._bn_bwd_reduce_channels_last, dict(EPILOGUE, **SUMS_FLAGS, ACTIVATION=1, BLOCK_SPLITS=32, BLOCK_R=64,
                                                BLOCK_C=64)),
        (cf._bn_fwd_stats_channels_first, dict(STATS_FLAGS, BLOCK_SPLITS=256, BLOCK_N=2, BLOCK_S=1024, FLAT=False)),
        (cf._bn_bwd_reduce_channels_first, dict(EPILOGUE, **SUMS_FLAGS, ACTIVATION=1, BLOCK_SPLITS=256, BLOCK_N=2,
                                                BLOCK_S=1024, FLAT=False)),
    ]
    for kernel, constexprs in reductions:
        ptx = {stages: _compile(kernel, dict(constexprs, NUM_STAGES=stages), hints=True).asm["ptx"]
               for stages in (1, 3)}
        name = kernel.__name__
        assert "cp.async" not in ptx[1], f"{name}: NUM_STAGES=1 should not pipeline"
        assert "cp.async" in ptx[3] and ptx[1] != ptx[3], f"{name}: NUM_STAGES=3 did not pipeline the loop"
        assert re.search(r"atom\.[\w.]*acq_rel[\w.]*\.add", ptx[3]), f"{name}: no acq_rel atomic"
        assert re.search(r"atom\.[\w.]*\.gpu\.", ptx[3]), f"{name}: the atomic is not device-scope"
        assert "bar.sync" in ptx[3], f"{name}: no barrier before the atomic"


def group_unaligned_pipelining():
    """Why the heuristic pipelines only vector-aligned reductions (autotune.vector_aligned): on an fp32
    input whose plane size and channel stride are not divisible by 16 (7x7, 14x14), a pipelined loop
    copies one 4-byte element per cp.async through shared memory (1.8-6x slower on an H100,
    perf/NOTES.md); aligned, 16 bytes per cp.async. The 1-stage loop the heuristic runs there has none.
    (A 2-byte input's unaligned loop is not pipelined at all: a cp.async moves at least 4 bytes.)"""
    tile = dict(STATS_FLAGS, BLOCK_SPLITS=256, BLOCK_N=64, BLOCK_S=64, FLAT=False)
    fp32 = dict(hints=True, dtypes={"x_ptr": "fp32"})

    def copy_sizes(constexprs, unaligned=()):
        ptx = _compile(cf._bn_fwd_stats_channels_first, constexprs, unaligned=unaligned, **fp32).asm["ptx"]
        return set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, (0x[0-9a-f]+)", ptx))

    assert copy_sizes(tile, unaligned=("S", "stride_c")) == {"0x4"}
    assert copy_sizes(dict(tile, NUM_STAGES=1), unaligned=("S", "stride_c")) == set()
    assert copy_sizes(tile) == {"0x10"}


def group_eval_flags():
    _compile(cl._bn_fwd_apply_channels_last, dict(STATS_ARE_RUNNING=True, HAS_WEIGHT=False, HAS_BIAS=False,
                                                  HAS_RESIDUAL=False, ACTIVATION=2, COUNT_BATCH=False, **CL_TILE))
    _compile(cf._bn_bwd_dx_channels_first, dict(STATS_ARE_RUNNING=True, HAS_WEIGHT=False, HAS_BIAS=False,
                                                HAS_RESIDUAL=False, ACTIVATION=3, BATCH_STATS=False,
                                                WRITE_GRAD_X=True, WRITE_GRAD_RESIDUAL=False, **CF_TILE))


GROUPS = ["channels_last_elementwise", "channels_first", "reductions_and_finalize", "eval_flags",
          "pipelining_and_ordering", "unaligned_pipelining"]


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_compile_for_sm90(group):
    if GPUTarget is None:
        pytest.skip("this triton has no triton.backends.compiler.GPUTarget")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"compiled {group}" in proc.stdout, proc.stderr[-4000:]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need the real jit functions"
    globals()[f"group_{sys.argv[1]}"]()
    print(f"compiled {sys.argv[1]}")


def test_resource_report_tool_runs():
    """perf/resource_report.py (registers and spills per kernel and tile) still works."""
    if GPUTarget is None:
        pytest.skip("this triton has no triton.backends.compiler.GPUTarget")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(root, "perf", "resource_report.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "/" in line]
    assert len(rows) >= 19 and " -1 / " not in proc.stdout


def test_statistics_loop_fits_the_bf16_bandwidth_budget():
    """At full bandwidth a 2-byte dtype leaves ~18 instructions per element (perf/NOTES.md); the
    channels-last statistics loop must stay well under that (v1 took ~34, dividing per element; the
    shifted sums take ~5.6 with the run-time divisibility hints)."""
    if GPUTarget is None:
        pytest.skip("this triton has no triton.backends.compiler.GPUTarget")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(root, "perf", "sass_loop.py"), "64", "32", "4"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_element = [float(line.split(": ")[-1].split()[0]) for line in proc.stdout.splitlines()
                   if line.startswith("data loop") and "per element" in line]
    assert per_element and max(per_element) < 9, proc.stdout
