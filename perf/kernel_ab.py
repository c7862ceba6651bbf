"""A native CPU kernel change against a base commit, in one process: both versions of the kernels
(triton_bn/csrc/cpu/) built into one program, each under a namespace of its own, and called alternately, one
call of each per step (which goes first alternating too), on the same inputs; per row the median time of each,
the median of the step-by-step ratios (base / new: above 1 means the change is faster) and whether the two wrote
bitwise the same outputs.

    python perf/kernel_ab.py BASE [--dtypes fp16,bf16] [--layouts nchw,channels_last] [--passes ...]
                             [--activations 0,1] [--shapes 2x2048x7x7,...] [--steps 1000] [--out FOLDER]
                             [--new FOLDER]

e.g. ``python perf/kernel_ab.py HEAD --dtypes fp16 --passes normalize --shapes 2x2048x7x7`` with an edit of
kernels.h in the working tree. Why: on this project's VMs the speed of the same code moves up to 2x between
processes (perf/NOTES.md), so bench runs resolve a whole case to about 10% at best (perf/ab_pairs.py, its A/A
check); calls of both versions interleaved in one process see the same machine state, and a pass-level change
of a few percent shows (the 16-bit short planes of perf/results/cpu-amd-epyc-2026-12-07-16bit-short-planes-
not-kept/ were measured this way). What it does not measure: the op's own cost around the kernels (allocation,
per-channel set-up, the Python call), which the bench does. Passes: ``statistics`` (mean and variance, one read
of x), ``normalize`` (y = act(x * scale + shift)), ``backward`` (the sums, then dx: training, with dweight and
dbias). Activation ids are those of triton_bn/activations.py (0 identity, 1 ReLU, ...).
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from triton_bn.build import compiler as compiler_command  # noqa: E402
from triton_bn.backends import native_cpu  # noqa: E402  (the build's own flags: ISA macros, -march, OpenMP)

CSRC = os.path.join("triton_bn", "csrc", "cpu")
TYPES = {"fp32": "float", "fp64": "double", "fp16": "c10::Half", "bf16": "c10::BFloat16"}
PASSES = ("statistics", "normalize", "backward")

# One version of the kernels, its namespace renamed by VARIANT_NS, and plain entries the driver declares.
VARIANT = r'''
#define triton_bn_cpu VARIANT_NS
#include "kernels.h"
namespace triton_bn_cpu {
template <typename T> void ab_pass(int pass, const T* x, const T* dy, T* out, double* channel_out, const int64_t* shape,
                                   const double* per_channel, int64_t activation) {
  using A = acc_t<T>;
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  const Geometry g{shape[3] != 0, N, C, S, N * S};
  std::vector<A> v[4];
  for (int k = 0; k < 4; ++k) v[k].assign(per_channel + k * C, per_channel + (k + 1) * C);
  if (pass == 0) {
    std::vector<A> mean(C), var(C);
    statistics<T>(x, g, mean.data(), var.data());
    for (int64_t c = 0; c < C; ++c) channel_out[c] = mean[c], channel_out[C + c] = var[c];
  } else if (pass == 1) {
    normalize<T>(x, nullptr, out, g, v[0], v[1], activation, A(0.01));
  } else {
    BackwardCoefficients<A> k;
    k.scale = v[0], k.shift = v[1], k.mean = v[2], k.invstd = v[3];
    std::vector<A> gw(C), gb(C), w(v[0]);
    backward<T>(dy, x, nullptr, out, nullptr, gw.data(), gb.data(), g, k, w, true, true, activation, A(0.01));
    for (int64_t c = 0; c < C; ++c) channel_out[c] = gw[c], channel_out[C + c] = gb[c];
  }
}
template void ab_pass<AB_TYPE>(int, const AB_TYPE*, const AB_TYPE*, AB_TYPE*, double*, const int64_t*, const double*,
                               int64_t);
TRITON_BN_FORWARD_KERNELS(, AB_TYPE)
TRITON_BN_BACKWARD_KERNELS(, AB_TYPE)
}
'''

DRIVER = r'''
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define DECLARE(NS) namespace NS { template <typename T> void ab_pass(int, const T*, const T*, T*, double*, \
    const int64_t*, const double*, int64_t); }
DECLARE(base_ns)
DECLARE(new_ns)
using clk = std::chrono::steady_clock;
double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
int main(int argc, char** argv) {  // pass layout(0 rows, 1 planes) N C S activation steps label
  const int pass = atoi(argv[1]);
  const int64_t shape[4] = {atol(argv[3]), atol(argv[4]), atol(argv[5]), atol(argv[2])};
  const int64_t activation = atol(argv[6]), steps = atol(argv[7]), C = shape[1], n = shape[0] * C * shape[2];
  using T = AB_TYPE;
  std::vector<T> x(n), dy(n), out0(n), out1(n);
  for (int64_t i = 0; i < n; ++i) {  // fixed values in [-2, 2): reproducible, no NaN, both signs
    x[i] = T(static_cast<float>((i * 7919) % 4001) / 1000.f - 2.f);
    dy[i] = T(static_cast<float>((i * 104729) % 3989) / 997.f - 2.f);
  }
  std::vector<double> per_channel(4 * C), ch0(2 * C), ch1(2 * C);
  for (int64_t c = 0; c < C; ++c) {
    per_channel[c] = 0.5 + 0.001 * c, per_channel[C + c] = 0.1 - 0.0003 * c;   // scale, shift
    per_channel[2 * C + c] = 0.01 * (c % 7), per_channel[3 * C + c] = 1.5;    // mean, invstd
  }
  std::vector<double> t0, t1, ratio;
  const auto call = [&](bool base) {
    const auto start = clk::now();
    if (base) {
      base_ns::ab_pass<T>(pass, x.data(), dy.data(), out0.data(), ch0.data(), shape, per_channel.data(), activation);
    } else {
      new_ns::ab_pass<T>(pass, x.data(), dy.data(), out1.data(), ch1.data(), shape, per_channel.data(), activation);
    }
    return std::chrono::duration<double, std::micro>(clk::now() - start).count();
  };
  for (int64_t step = 0; step < steps + 20; ++step) {
    // which goes first alternates: the second call of a step finds the inputs where the first left them
    const bool base_first = step % 2 == 0;
    const double first = call(base_first), second = call(!base_first);
    if (step < 20) continue;  // warm-up
    t0.push_back(base_first ? first : second);
    t1.push_back(base_first ? second : first);
    ratio.push_back(t0.back() / t1.back());
  }
  const bool same = (pass == 0 || std::memcmp(out0.data(), out1.data(), n * sizeof(T)) == 0) &&
                    (pass == 1 || std::memcmp(ch0.data(), ch1.data(), 2 * C * sizeof(double)) == 0);
  printf("%s base %.1f us new %.1f us ratio %.3f bitwise %s\n", argv[8], median(t0), median(t1), median(ratio),
         same ? "equal" : "DIFFERENT");
  return 0;
}
'''


def _shape(text):
    """"N x C x spatial..." -> (N, C, S)."""
    dims = [int(d) for d in text.split("x")]
    spatial = 1
    for d in dims[2:]:
        spatial *= d
    return dims[0], dims[1], spatial


def build(base_csrc: str, new_csrc: str, dtype: str, work: str) -> str:
    """The program for one dtype: the base and new kernels compiled side by side, then linked with the driver."""
    flags = ["-std=c++17"] + native_cpu.compile_flags(platform.machine(), native_cpu.vector_isa())
    flags += [f"-DAB_TYPE={TYPES[dtype]}"]
    flags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    compiler = compiler_command()
    with open(os.path.join(work, "variant.cpp"), "w") as f:
        f.write(VARIANT)
    with open(os.path.join(work, "driver.cpp"), "w") as f:
        f.write(DRIVER)
    jobs = [subprocess.Popen([compiler] + flags + [f"-DVARIANT_NS={ns}_ns", f"-I{csrc}", "-c", "variant.cpp", "-o",
                                                  f"{ns}.o"], cwd=work)
            for ns, csrc in (("base", base_csrc), ("new", new_csrc))]
    if any(job.wait() != 0 for job in jobs):
        raise SystemExit("kernel_ab: a version of the kernels did not compile (the compiler's output is above)")
    program = os.path.join(work, f"ab_{dtype}")
    libs = cpp_extension.library_paths()
    subprocess.run([compiler] + flags + ["driver.cpp", "base.o", "new.o", "-o", program] + [f"-L{p}" for p in libs]
                   + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"], cwd=work, check=True)
    return program


def base_sources(base: str, work: str) -> str:
    """The base commit's csrc/cpu/ files, written to ``work``."""
    folder = os.path.join(work, "base_csrc")
    os.makedirs(folder)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{base}:{CSRC}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "show", f"{base}:{CSRC}/{name}"], cwd=ROOT, check=True, capture_output=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob.stdout)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("base", help="the commit to compare the working tree's kernels with (HEAD: an A/A check)")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16,fp64")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--activations", default="0,1", help="activation ids (triton_bn/activations.py)")
    parser.add_argument("--shapes", default="2x2048x7x7,16x64x28x28,2x256x56x56")
    parser.add_argument("--steps", type=int, default=1000, help="alternating calls of each version per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", help="a folder of kernel sources to use as the new version (default: the working "
                                      "tree's triton_bn/csrc/cpu)")
    parser.add_argument("--out", help="also write the rows to OUT/kernel_ab.txt")
    args = parser.parse_args(argv)
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731
    for name in split(args.dtypes):
        if name not in TYPES:
            parser.error(f"--dtypes: {name!r} is not one of {', '.join(TYPES)}")
    for name in split(args.passes):
        if name not in PASSES:
            parser.error(f"--passes: {name!r} is not one of {', '.join(PASSES)}")
    work = tempfile.mkdtemp(prefix="kernel_ab_")
    lines = [f"kernel_ab: {args.base} (base) against the working tree (new), {torch.backends.cpu.get_cpu_capability()}"
             f" build, {args.threads} threads, {args.steps} alternating steps a row"]
    print(lines[0], flush=True)
    try:
        base_csrc = base_sources(args.base, work)
        for dtype in split(args.dtypes):
            print(f"building both versions for {dtype} (a minute or two) ...", flush=True)
            program = build(base_csrc, os.path.abspath(args.new or os.path.join(ROOT, CSRC)), dtype, work)
            for pass_name in split(args.passes):
                for activation in split(args.activations) if pass_name != "statistics" else ["0"]:
                    for layout in split(args.layouts):
                        for text in split(args.shapes):
                            N, C, S = _shape(text)
                            label = f"{pass_name:10} act {activation} {dtype} {layout:13} {text:14}"
                            done = subprocess.run([program, str(PASSES.index(pass_name)), "1" if layout == "nchw"
                                                   else "0", str(N), str(C), str(S), activation, str(args.steps),
                                                   label], capture_output=True, text=True,
                                                  env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                            line = done.stdout.strip() or f"{label} failed: {done.stderr.strip()[-300:]}"
                            print(line, flush=True)
                            lines.append(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_ab.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
