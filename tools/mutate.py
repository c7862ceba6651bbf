"""Plant plausible bugs one at a time and check that the test suite catches each.

Each mutation replaces one exact piece of text in one file (which must appear there exactly once, so the list
fails loudly when the code moves on) in a fresh copy of the repository's tracked files, then runs the test
files that cover that code, in the copy, stopping at the first failure. A mutation is *caught* when the
tests fail, *missed* when they pass. The C++ mutations rebuild the native CPU kernels (their build key
changes with the source: about 70 s each on two cores).

    python tools/mutate.py                 # every mutation; prints a table, writes it to --report
    python tools/mutate.py eps-channels-last unbiased-factor   # only these
    python tools/mutate.py --list

The whole list (67 mutations; 63 of them took about 50 minutes on this project's 2-core VM: perf/NOTES.md has
the last report).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL_TESTS = ("tests/test_core.py", "tests/test_epilogue.py", "tests/test_kernels.py")
NATIVE_TESTS = ("tests/test_native_cpu.py",)


class Mutation(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]
    why: str


MUTATIONS: List[Mutation] = [
    # the Triton kernels (run through the interpreter by the CPU tests)
    Mutation("eps-channels-last", "triton_bn/kernels/channels_last.py",
             "                          running_mean_stride, running_var_stride, eps, momentum,",
             "                          running_mean_stride, running_var_stride, 0.0, momentum,", KERNEL_TESTS,
             "channels_last training invstd without eps"),
    Mutation("eps-channels-first", "triton_bn/kernels/channels_first.py",
             "                          running_mean_stride, running_var_stride, eps, momentum,",
             "                          running_mean_stride, running_var_stride, 0.0, momentum,", KERNEL_TESTS,
             "NCHW training invstd without eps"),
    Mutation("eps-eval", "triton_bn/kernels/common.py", "invstd = tl.math.rsqrt(stat + eps)",
             "invstd = tl.math.rsqrt(stat)", KERNEL_TESTS, "eval invstd from the running variance without eps"),
    Mutation("unbiased-factor", "triton_bn/kernels/merge.py", "var_unbiased = var_biased * unbiased_factor",
             "var_unbiased = var_biased", KERNEL_TESTS, "running_var takes the biased variance"),
    Mutation("momentum-swapped", "triton_bn/kernels/merge.py", "rm = (1.0 - factor) * rm + factor * mean",
             "rm = factor * rm + (1.0 - factor) * mean", KERNEL_TESTS, "running mean weighs the old value by momentum"),
    Mutation("cumulative-off-by-one", "triton_bn/kernels/merge.py",
             "factor = 1.0 / (tl.load(num_batches_ptr) + 1).to(tl.float32)",
             "factor = 1.0 / (tl.load(num_batches_ptr) + 2).to(tl.float32)", KERNEL_TESTS,
             "momentum=None: the cumulative average counts one batch too many"),
    Mutation("chan-merge-m2", "triton_bn/kernels/merge.py",
             "m2 = m2_a + m2_b + delta * delta * count_a * weight_b", "m2 = m2_a + m2_b", KERNEL_TESTS,
             "the merge of two parts drops the between-part term"),
    Mutation("k-way-merge-m2", "triton_bn/kernels/merge.py",
             "merged_m2 = tl.sum(m2, 0) + tl.sum(count * deviation * deviation, 0)", "merged_m2 = tl.sum(m2, 0)",
             KERNEL_TESTS, "the k-way merge of splits drops the between-split term"),
    Mutation("silu-derivative", "triton_bn/kernels/activations.py", "out = s * (1.0 + z * (1.0 - s))",
             "out = s * (1.0 + z * s)", KERNEL_TESTS, "SiLU's derivative with a wrong term"),
    Mutation("gelu-derivative", "triton_bn/kernels/activations.py",
             "out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)",
             "out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))", KERNEL_TESTS,
             "GELU's derivative without its density term"),
    Mutation("leaky-relu-derivative", "triton_bn/kernels/activations.py",
             "out = tl.where(z > 0.0, 1.0, negative_slope)", "out = tl.where(z > 0.0, 1.0, 0.0)", KERNEL_TESTS,
             "leaky ReLU's derivative ignores the slope"),
    Mutation("hardswish-derivative", "triton_bn/kernels/activations.py", "z / 3.0 + 0.5", "z / 3.0",
             KERNEL_TESTS, "hardswish's derivative off by 0.5 between the kinks"),
    Mutation("sigmoid-derivative", "triton_bn/kernels/activations.py", "        out = s * (1.0 - s)\n",
             "        out = s\n", KERNEL_TESTS, "sigmoid's derivative is the sigmoid"),
    Mutation("residual-in-backward-z", "triton_bn/kernels/common.py",
             "        residual = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)\n    dz =",
             "        residual = tl.zeros_like(x)\n    dz =", KERNEL_TESTS,
             "the backward recomputes z without the residual"),
    Mutation("channel-mask", "triton_bn/kernels/channels_last.py",
             "    rows, cols = _elementwise_tile(C, BLOCK_R, BLOCK_C)\n    cmask = cols < C\n    mean, _, scale",
             "    rows, cols = _elementwise_tile(C, BLOCK_R, BLOCK_C)\n    cmask = cols < C + 1\n    mean, _, scale",
             KERNEL_TESTS, "the channels_last apply reads and writes one channel past the end"),
    # the launchers
    Mutation("dresidual-shortcut", "triton_bn/backends/triton_kernels.py",
             "if want_dresidual and not want_dx and activation == 0:",
             "if want_dresidual and not want_dx:", KERNEL_TESTS,
             "d residual = dy taken with an activation too, when dx is not wanted"),
    # the native CPU kernels (C++: each rebuilds)
    Mutation("native-eps", "triton_bn/csrc/cpu/ops.cpp", "v = A(1) / std::sqrt(v + static_cast<A>(eps));",
             "v = A(1) / std::sqrt(v);", NATIVE_TESTS, "native invstd without eps"),
    Mutation("native-unbiased", "triton_bn/csrc/cpu/ops.cpp",
             "const A unbias = R > 1 ? static_cast<A>(static_cast<double>(R) / (R - 1)) : A(NAN);",
             "const A unbias = A(1);", NATIVE_TESTS, "native running_var biased"),
    Mutation("native-dx-mean-term", "triton_bn/csrc/cpu/kernels.h",
             "k.k3[c] = static_cast<A>(sum_dz[c] / R * k.invstd[c] * w[c]);", "k.k3[c] = A(0);", NATIVE_TESTS,
             "native dx without the mean of dz"),
    Mutation("native-gelu-cdf-sign", "triton_bn/csrc/cpu/kernels.h",
             "return {Vec<A>::blendv(one - tail, tail, z < Vec<A>(0)), gauss};",
             "return {Vec<A>::blendv(tail, one - tail, z < Vec<A>(0)), gauss};", NATIVE_TESTS,
             "native fp32 GELU takes Phi(-z) for Phi(z): the two halves of erf's sign swapped"),
    Mutation("native-logistic-nan", "triton_bn/csrc/cpu/kernels.h",
             "return Vec<A>::blendv(s, z, z != z);", "return s;", NATIVE_TESTS,
             "the vector logistic loses NaN: fp32 exp_u20 of NaN is inf, so sigmoid(NaN) comes out 0"),
    Mutation("native-fp32-exp-rough", "triton_bn/csrc/cpu/kernels.h", "    return x.exp_u20();\n",
             "    return x.fexp_u20();\n", NATIVE_TESTS,
             "fp32's vector exp swapped for ATen's faster, rougher fexp_u20 (a degree-3 polynomial)"),
    Mutation("native-fp32-exp-sign", "triton_bn/csrc/cpu/kernels.h",
             "if constexpr (ACT == kSilu) return z / (one + exp_vec(z.neg()));",
             "if constexpr (ACT == kSilu) return z / (one + exp_vec(z));", NATIVE_TESTS,
             "SiLU's vector forward takes e^z for e^-z"),
    Mutation("native-short-planes-channel", "triton_bn/csrc/cpu/kernels.h", "      int64_t c = p0 % g.C;\n",
             "      int64_t c = 0;\n", NATIVE_TESTS,
             "short NCHW planes with SiLU/GELU: a chunk of planes that starts mid-way through the channels restarts at channel 0"),
    Mutation("native-short-rows-repeat", "triton_bn/csrc/cpu/kernels.h", "std::copy(scale, scale + C, sc + r * C);",
             "std::copy(scale, scale + C, sc);", NATIVE_TESTS,
             "rows after a chunk's first take a stale scale: the per-channel values not repeated per row"),
    Mutation("native-block-sums-square", "triton_bn/csrc/cpu/kernels.h",
             "sum_b[k] = _mm256_fmadd_ps(d, d, sum_b[k]);", "sum_b[k] = _mm256_fmadd_ps(d, sh[k], sum_b[k]);",
             NATIVE_TESTS, "fp16 channels-last rows of 32 channels or more: the sum of squares takes the shift for d"),
    Mutation("native-backward-block-sums-group", "triton_bn/csrc/cpu/kernels.h",
             "_mm256_loadu_ps(mu + channel)", "_mm256_loadu_ps(mu + c)", NATIVE_TESTS,
             "fp16 channels-last rows of 16 to 255 channels: the backward's later groups centre on the first's mean"),
    Mutation("native-avx512-gelu-reciprocal-unrefined", "triton_bn/csrc/cpu/kernels.h",
             "const Vec<A> t = estimate * at::vec::fnmadd(d, estimate, splat<A>(2));", "const Vec<A> t = estimate;",
             ("tests/test_emulated_avx512.py",), "AVX-512 builds only: GELU's 1 / d is rcp14's 14-bit estimate "
             "without its Newton step (caught by the emulated AVX-512 run, tools/check_avx512.py --run; missed where SIMDe is not installed)"),
    Mutation("native-statistics-block-shift", "triton_bn/csrc/cpu/kernels.h",
             "sh[k] = _mm256_loadu_ps(shift + c + 8 * k);", "sh[k] = _mm256_loadu_ps(shift + c);", NATIVE_TESTS,
             "channels-last statistics a block at a time: later groups of 8 channels sum against the first's shift"),
    Mutation("native-activate-in-place-shift", "triton_bn/csrc/cpu/ops.cpp",
             "const std::vector<A> scale(g.C, A(1)), shift(g.C, A(0));",
             "const std::vector<A> scale(g.C, A(1)), shift(g.C, A(1));", ("tests/test_dispatch.py",),
             "a folded layer's SiLU written over its output adds 1 before the activation"),
    Mutation("fold-activation-pass-ignores-grad", "triton_bn/dispatch.py",
             "x.dim() < 2 or needs_gradient(x, None, None, residual) \\\n",
             "x.dim() < 2 \\\n", ("tests/test_dispatch.py",),
             "a folded activation's native pass taken while autograd records: the gradient lost"),
    Mutation("native-momentum", "triton_bn/csrc/cpu/ops.cpp", "rm[c] = lerp(rm[c], m[c], f);",
             "rm[c] = lerp(m[c], rm[c], f);", NATIVE_TESTS, "native running mean weighs the old value by momentum"),
    Mutation("known-eval-takes-a-parameter-needing-grad", "triton_bn/csrc/cpu/ops.cpp",
             "if (!plain_cpu(*p) || p->dim() != 1 || p->size(0) != C || (grad_mode && p->requires_grad()) ||",
             "if (!plain_cpu(*p) || p->dim() != 1 || p->size(0) != C ||", ("tests/test_dispatch.py",),
             "the known eval call takes a weight that needs a gradient: y without a grad_fn, the gradient lost"),
    Mutation("known-eval-ignores-the-interpreter", "triton_bn/dispatch.py",
             "_NATIVE_TAKES_KERNEL_DTYPES = not (triton_kernels.INTERPRET or triton_kernels.STAND_IN)",
             "_NATIVE_TAKES_KERNEL_DTYPES = True", ("tests/test_dispatch.py",),
             "fp32 eval calls leave the Triton kernels for the native ones under the interpreter"),
    # the autograd node both devices record (csrc/node/), here behind the CPU kernels
    Mutation("node-twice-differentiable", "triton_bn/csrc/node/batch_norm_backward.h",
             "  if (!at::GradMode::is_enabled() || std::none_of(", "  if (true || std::none_of(", NATIVE_TESTS,
             "the node's gradients no longer refuse a second derivative under create_graph"),
    Mutation("node-edges-swapped", "triton_bn/csrc/node/batch_norm_backward.h",
             "collect_next_edges(x, weight, bias, residual)", "collect_next_edges(x, bias, weight, residual)",
             NATIVE_TESTS, "the node hands dweight to the bias and dbias to the weight"),
    Mutation("node-residual-not-saved", "triton_bn/csrc/cpu/ops.cpp", "mean, invstd, r.defined() && activation != kIdentity);",
             "mean, invstd, false);", NATIVE_TESTS, "the CPU node forgets the residual an activation's derivative needs"),
    # the layers around the kernels
    Mutation("sync-merge", "triton_bn/sync.py", "m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)",
             "m2 = m2s.sum(0)", ("tests/test_sync.py",), "SyncBatchNorm's merge of ranks drops the between-rank term"),
    Mutation("fold-shift-sign", "triton_bn/fold.py", "shift = -bn.running_mean.double() * scale",
             "shift = bn.running_mean.double() * scale", ("tests/test_inference.py", "tests/test_models.py"),
             "folding adds the mean instead of subtracting it"),
    Mutation("guards-off", "triton_bn/tracing.py",
             "        for where, name, default, holds, check in self._argument_tests:",
             "        return None\n        for where, name, default, holds, check in self._argument_tests:",
             ("tests/test_models.py",), "convert_model's fused forwards run for calls their trace does not stand for"),
    Mutation("fold-epilogue-writes-input", "triton_bn/fold.py", "            z, fresh = z + residual, True\n",
             "            z, fresh = z.add_(residual), True\n", ("tests/test_inference.py",),
             "a folded BN's residual add writes into its input, which another module may hold"),
    Mutation("fold-activation-dropped", "triton_bn/fold.py",
             "        if bn.activation is not None:\n            _move_activation_into(module, producer.target, node.target)\n",
             "", ("tests/test_inference.py", "tests/test_models.py"),
             "folding a BN with an activation into its layer loses the activation"),
    Mutation("fold-fallback-activation-twice", "triton_bn/fold.py",
             "    if fused is not None and bn_name in fused.activation_owners:",
             "    if False:", ("tests/test_models.py",),
             "a folded activation runs twice when the parent's fused forward falls back to its own"),
    # the C++ launch path's Python entry (under the recording stand-in driver)
    Mutation("entry-error-backtrace", "triton_bn/csrc/cuda/python.cpp",
             "throw std::runtime_error(error.what_without_backtrace());", "throw std::runtime_error(error.what());",
             ("tests/test_launch.py",), "the direct entry's errors carry the C++ backtrace torch.ops strips"),
    # [seams]: errors before any write, one device per plan, broken artefacts, infinities, noise
    Mutation("seams-residual-checked-late", "triton_bn/modules.py",
             "            check_added_residual(residual, input)  # before batch_norm writes the running statistics\n",
             "", ("tests/test_seams.py",), "a module's added residual is checked only by the add, after the write"),
    Mutation("seams-stride-zero-statistics", "triton_bn/functional.py", "        if t.stride(0) == 0 and t.shape[0] > 1:",
             "        if False:", ("tests/test_seams.py",), "running statistics of stride 0 are written, then refused"),
    Mutation("seams-cpp-error-type", "triton_bn/functional.py", "            _checked_activation(*arguments)\n",
             "", ("tests/test_launch.py",), "a call the C++ path refuses gets pybind's error, not the documented one"),
    Mutation("seams-plan-any-device", "triton_bn/csrc/cuda/plan.cpp", "  if (device != device_) return false;\n",
             "", ("tests/test_launch.py",), "a plan made for one device serves a call on another"),
    Mutation("seams-library-unverified", "triton_bn/build.py", "    if _intact(library):\n        loader(library)",
             "    if os.path.exists(library):\n        loader(library)", ("tests/test_build.py",),
             "a native library cut short is loaded (SIGBUS in every process)"),
    Mutation("seams-tuning-cache-trusted", "triton_bn/autotune.py", "            cfg = tile_config_from_json(entry)",
             "            cfg = TileConfig(**entry) if isinstance(entry, dict) else None", ("tests/test_seams.py",),
             "a tuning cache entry of another shape crashes the first call"),
    Mutation("seams-infinite-shift", "triton_bn/kernels/channels_last.py",
             "    pivot = finite_or_zero(tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32))",
             "    pivot = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)", ("tests/test_robust.py",),
             "an infinite pivot turns a channel's +inf mean into NaN"),
    Mutation("bench-heap-gives-back", "triton_bn/bench/heap.py", "mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO_BYTES) != 1",
             "mallopt(M_TRIM_THRESHOLD, 128 << 10) != 1", ("tests/test_bench.py",),
             "the CPU bench says it keeps freed memory while large blocks still fault in fresh pages"),
    Mutation("bench-cpu-cudnn-switch", "triton_bn/bench/cases.py", "if x.is_cuda else contextlib.nullcontext",
             "if True else contextlib.nullcontext", ("tests/test_bench.py",),
             "every CPU call of every provider pays for entering the cuDNN switch, small rows' ratios pulled to 1"),
    Mutation("seams-noise-reported", "triton_bn/bench/report.py", "    if row[\"efficiency\"] > 1.0:",
             "    if False:", ("tests/test_bench.py",), "a row faster than a copy is reported as a result"),
    Mutation("coverage-reason-module-between", "triton_bn/coverage.py",
             "    handed = flow.handed_to.get((name, \"bn\"), []) + flow.handed_to.get((name, \"add\"), [])",
             "    handed = []", ("tests/test_fusion.py",),
             "a BN left unfused behind stochastic depth is reported missed with no reason"),
    # -- forwards a one-level trace could not reach ([fusion], 2026-12-06)
    Mutation("reach-helper-module-unseen", "triton_bn/convert.py",
             "                if isinstance(value, nn.Module) and not all(",
             "                if False and not all(", ("tests/test_hf_models.py",),
             "a BN handed to a helper kept as a call is fused all the same (the helper's call of it gets the activation)"),
    Mutation("reach-inlined-hooks-unchecked", "triton_bn/tracing.py",
             "                and not any(getattr(current, hooks) for hooks in HOOK_REGISTRIES) \\\n",
             "                and True \\\n", ("tests/test_hf_models.py",),
             "a hook on an inlined child is skipped by the fused forward"),
    Mutation("reach-flag-unchecked", "triton_bn/tracing.py",
             "            arguments += [ArgumentCheck(name, (), \"equals\"",
             "            arguments += [] and [ArgumentCheck(name, (), \"equals\"", ("tests/test_hf_models.py",),
             "a call with a flag the trace did not take runs the graph of the default"),
    Mutation("reach-fallback-shallow", "triton_bn/tracing.py",
             "        children[head] = _twin(child, {**(own.undone() if own is not None else {}), **inner})",
             "        pass", ("tests/test_hf_models.py",),
             "a fallback leaves an inlined BN's activation fused (the activation runs twice)"),
    Mutation("reach-settings-trusted", "triton_bn/tracing.py", "    instructions = list(dis.get_instructions(code))\n",
             "    return True\n", ("tests/test_hf_models.py",),
             "a helper that calls the module handed to it counts as reading its settings (its BN fused, folded)"),
    Mutation("reach-rebuilt-dict-unordered", "triton_bn/tracing.py",
             "    store = next(base for base in cls.__mro__ if base in (collections.OrderedDict, dict))",
             "    store = dict", ("tests/test_hf_models.py",),
             "a rebuilt ModelOutput's items bypass OrderedDict's order: it looks empty to keys() and to_tuple()"),
    Mutation("reach-inlined-counted-twice", "triton_bn/tracing.py",
             "        return [check.name for check in self.guard.attributes if check.kind == \"unhooked\" and check.name in",
             "        return [] and [check.name for check in self.guard.attributes if check.kind == \"unhooked\" and check.name in",
             ("tests/test_deploy.py",), "fold counts an inlined child's calls twice (its BNs frozen, not folded)"),
    Mutation("reach-raise-condition-unchecked", "triton_bn/tracing.py",
             "                    return bool(run(value)) is taken",
             "                    return True or bool(run(value)) is taken", ("tests/test_models.py",),
             "a shape check that raises is traced past and never asked again: a wrong input runs the fused graph"),
    Mutation("reach-caught-refusal-traced", "triton_bn/tracing.py",
             "    if recorder.refused is not None:\n        raise recorder.refused",
             "    if False:\n        raise recorder.refused", ("tests/test_models.py",),
             "a forward that catches fx's TraceError (a ValueError) is traced through its handler"),
    Mutation("reach-variant-unreplayed", "triton_bn/convert.py",
             "        checks = _fusions_replayed(traced.graph, followers, taken)",
             "        checks = []", ("tests/test_models.py",),
             "a second graph (an optional argument None) is used without the fusions replayed in it"),
    Mutation("reach-not-tensor-unchecked", "triton_bn/tracing.py",
             "            test = lambda value: not isinstance(value, torch.Tensor)  # noqa: E731",
             "            test = lambda value: True  # noqa: E731", ("tests/test_models.py",),
             "the second graph traced for a value that is no tensor takes a tensor the first graph refused"),
    Mutation("reach-condition-reads-data", "triton_bn/tracing.py",
             "            kinds[current] = \"metadata\" if all(kind == \"metadata\" for kind in inputs) else None",
             "            kinds[current] = \"metadata\"", ("tests/test_models.py",),
             "a check that raises on the argument's values (not its shape) is traced past and asked per call"),
]


def _copy_tree(destination: str) -> None:
    """The working tree's files git tracks or would track (new ones not yet committed included)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if not os.path.exists(os.path.join(ROOT, name)):  # deleted in the working tree
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)


def _apply(copy: str, mutation: Mutation) -> None:
    path = os.path.join(copy, mutation.path)
    with open(path) as f:
        text = f.read()
    found = text.count(mutation.old)
    if found != 1:
        raise SystemExit(f"{mutation.name}: the text to replace occurs {found} times in {mutation.path} (want once)")
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run(mutation: Mutation, timeout: float) -> Tuple[str, float, str]:
    """(caught / missed / error, seconds, the first failing test or the error)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as copy:
        _copy_tree(copy)
        _apply(copy, mutation)
        env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
        where = subprocess.run([sys.executable, "-c", "import triton_bn; print(triton_bn.__file__)"], cwd=copy,
                               env=env, capture_output=True, text=True)
        if not where.stdout.strip().startswith(copy):
            return "error", 0.0, f"the copy's package is not the one imported: {where.stdout}{where.stderr[-500:]}"
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "2", "--dist", "loadfile",
                                   "-p", "no:cacheprovider", *mutation.tests], cwd=copy, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error", time.monotonic() - started, f"timed out after {timeout:.0f} s"
        seconds = time.monotonic() - started
        if done.returncode == 0:
            return "missed", seconds, ""
        # 1: tests failed; 2: xdist's -x interrupted the run after a failure (an ERROR is a failure too)
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        if done.returncode in (1, 2) and failed:
            return "caught", seconds, failed[0].split(" ", 1)[1][:120]
        return "error", seconds, done.stdout[-2000:] + done.stderr[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutation's tests")
    parser.add_argument("--report", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.path:40} {m.why}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    lines = ["| mutation | file | what it breaks | result | seconds | first failing test |", "|---|---|---|---|---|---|"]
    results = []
    for mutation in chosen:
        outcome, seconds, detail = run(mutation, args.timeout)
        results.append(outcome)
        first_line = detail.splitlines()[0] if detail else ""
        lines.append(f"| {mutation.name} | {mutation.path} | {mutation.why} | {outcome} | {seconds:.0f} | "
                     f"{first_line} |")
        print(lines[-1], flush=True)
        if outcome == "error":
            print(detail, file=sys.stderr)
    summary = (f"\n{results.count('caught')} of {len(results)} caught, {results.count('missed')} missed, "
               f"{results.count('error')} errors")
    print(summary)
    if args.report:
        with open(args.report, "w") as f:
            f.write("\n".join(lines) + "\n" + summary + "\n")
    return 0 if results.count("caught") == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
