"""Compile (without running) every native CPU source for an AVX-512 CPU, with the flags the build would pass on
one: ATen's vector code for 16 fp32 / 8 double lanes (``-DCPU_CAPABILITY_AVX512``) and ``-march=<target>``.

    python tools/check_avx512.py [--target skylake-avx512] [--files kernels_float_forward.cpp,...]

Why: on a host without AVX-512 the build takes AVX2 (PyTorch's own choice: native_cpu.vector_isa), so the
AVX-512 instantiations (the vector width in every template that asks ``Vectorized<T>::size()``, the ISA check in
kernels.h) are compiled nowhere. This catches what does not compile for AVX-512; running it needs an AVX-512
CPU (no emulator for it installs on this project's machines: perf/NOTES.md). Exit status 1 when a file fails.
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch.utils import cpp_extension  # noqa: E402

from triton_bn.backends import native_cpu  # noqa: E402

CSRC = os.path.join(ROOT, "triton_bn", "csrc", "cpu")


def compile_one(path: str, flags) -> subprocess.CompletedProcess:
    return subprocess.run([os.environ.get("CXX", "c++")] + flags + [path, "-o", os.devnull], capture_output=True,
                          text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="skylake-avx512", help="the -march CPU (default: skylake-avx512, the "
                                                                   "AVX-512 F/BW/VL/DQ that ATen's AVX-512 code needs)")
    parser.add_argument("--files", help="comma-separated names in triton_bn/csrc/cpu (default: every .cpp there)")
    args = parser.parse_args(argv)
    names = args.files.split(",") if args.files else sorted(f for f in os.listdir(CSRC) if f.endswith(".cpp"))
    flags = ["-std=c++17", "-fPIC", "-c"] + native_cpu.compile_flags("x86_64", "AVX512", target=args.target)
    flags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    isa_flags = " ".join(native_cpu.compile_flags("x86_64", "AVX512", target=args.target))
    print(f"compiling {len(names)} file(s) for AVX-512 ({isa_flags})", flush=True)
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for name, done in zip(names, pool.map(lambda n: compile_one(os.path.join(CSRC, n), flags), names)):
            print(f"{'ok' if done.returncode == 0 else 'FAILED':6} triton_bn/csrc/cpu/{name}", flush=True)
            if done.returncode != 0:
                failed += 1
                print(done.stderr[:3000])  # the first errors: the cause, before what follows from it
    print("AVX-512: every source compiles" if not failed else f"AVX-512: {failed} file(s) do not compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
