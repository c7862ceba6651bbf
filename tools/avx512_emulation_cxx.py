#!/usr/bin/env python3
"""The C++ compiler that tools/check_avx512.py --run puts in ``CXX``: the real one (``TRITON_BN_REAL_CXX``),
with the native CPU build's AVX2 capability macros turned into AVX-512's and tools/avx512_emulation.h
force-included before each of its sources (other builds, such as the C++ launch path's, pass unchanged), so
the library that triton_bn builds and loads as usual has AVX-512's vector widths and branches, emulated.
``--version`` names the emulation and its header's digest, which puts both in the build's key (build.py): this
build and a real one never share a cache entry, and an edit of the header rebuilds.
"""
import hashlib
import os
import sys

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "avx512_emulation.h")
AS_AVX512 = {"-DCPU_CAPABILITY=AVX2": "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX2": "-DCPU_CAPABILITY_AVX512"}


def command(real: str, args):
    """The real compiler's command: a compile of the native CPU kernels (the only sources built with a
    CPU_CAPABILITY macro) emulates AVX-512; anything else (the C++ launch path, a link) passes unchanged."""
    if "-c" not in args or not any(arg in AS_AVX512 for arg in args):
        return [real, *args]
    return [real, "-include", HEADER, *(AS_AVX512.get(arg, arg) for arg in args)]


def main() -> None:
    real = os.environ["TRITON_BN_REAL_CXX"]
    args = sys.argv[1:]
    if "--version" in args:
        with open(HEADER, "rb") as header:
            digest = hashlib.sha1(header.read()).hexdigest()[:16]
        print(f"AVX-512 emulated through {HEADER} (sha1 {digest}), over:", flush=True)
    os.execvp(real, command(real, args))


if __name__ == "__main__":
    main()
