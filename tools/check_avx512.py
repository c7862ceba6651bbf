"""Compile every native CPU source for an AVX-512 CPU, with the flags the build would pass on one: ATen's vector
code for 16 fp32 / 8 double lanes (``-DCPU_CAPABILITY_AVX512``) and ``-march=<target>``; with ``--run``, also
build the library for AVX-512 on this AVX2 host, emulated, and run the native kernels' tests against it.

    python tools/check_avx512.py [--target skylake-avx512] [--files kernels_float_forward.cpp,...]
    python tools/check_avx512.py --run [-- PYTEST ARGS]      # needs SIMDe's headers (apt-get install libsimde-dev)

Why: on a host without AVX-512 the build takes AVX2 (PyTorch's own choice: native_cpu.vector_isa), so the
AVX-512 instantiations (the vector width in every template that asks ``Vectorized<T>::size()``, the ISA check in
kernels.h, its AVX-512 branches) are compiled and run nowhere. No instruction-level emulator installs on this
project's machines (Intel's SDE is on no package registry; qemu 7.2's TCG stops at AVX2: perf/NOTES.md), so
``--run`` emulates at the source level: triton_bn builds its library as usual, through
tools/avx512_emulation_cxx.py as the compiler, which asks for AVX-512's capability macros and force-includes
tools/avx512_emulation.h (every _mm512_* intrinsic as portable code, from SIMDe or the header's own loops; the
AVX-512 Sleef functions on the AVX2 ones, half by half). The script then checks the loaded library (16 / 8
lanes; no AVX-512 instruction and no call of an AVX-512 Sleef function, so it cannot fault here) and runs
tests/test_native_cpu.py and tests/test_dispatch.py against it, less three tests about the real build's own
ISA and tools (NOT_UNDER_EMULATION). What it cannot show: speed, and the last bit of an estimate instruction
(rcp14: the header cuts it to 14 bits).
Exit status 1 when a file fails (or, with ``--run``, a check or test), 2 when ``--run`` lacks SIMDe.
"""
import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch.utils import cpp_extension  # noqa: E402

from triton_bn import build  # noqa: E402
from triton_bn.backends import native_cpu  # noqa: E402

CSRC = os.path.join(ROOT, "triton_bn", "csrc", "cpu")
EMULATING_CXX = os.path.join(ROOT, "tools", "avx512_emulation_cxx.py")
# tests of the real build's own ISA choice and of this script's compile check, which the emulation changes on
# purpose, and the Arm emulation's (another ISA, minutes under qemu)
NOT_UNDER_EMULATION = ("test_vector_math_built_for_pytorchs_isa", "test_the_kernels_compile_for_avx512",
                       "test_the_kernels_run_on_an_emulated_arm_cpu")
# what the emulated library must not hold, as either would fault on this CPU: an AVX-512 instruction (a zmm or
# mask register in its code), a call of libtorch_cpu's AVX-512 Sleef functions (16 fp32 / 8 double lanes)
AVX512_REGISTERS = re.compile(r"%zmm\d|%k[0-7]\b")
AVX512_SLEEF = re.compile(r"\bSleef_\w+?(?:f16|d8)_\w+")
PROBE = ("from triton_bn.backends import native_cpu; lanes = native_cpu.vector_lanes(); "
         "print(lanes[0], lanes[1], native_cpu.loaded_from())")


def compile_one(path: str, flags) -> subprocess.CompletedProcess:
    return subprocess.run([build.compiler()] + flags + [path, "-o", os.devnull], capture_output=True,
                          text=True)


def missing_simde(cxx: str) -> Optional[str]:
    """None where ``cxx`` finds SIMDe's AVX-512 header, else what to install."""
    probe = subprocess.run([cxx, "-x", "c++", "-E", "-", "-o", os.devnull], input="#include <simde/x86/avx512.h>\n",
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else "SIMDe's headers (Debian/Ubuntu: apt-get install libsimde-dev)"


def run_emulated(pytest_args: List[str]) -> int:
    """Build the library for AVX-512, emulated, check it and run the native tests against it: 0 when all pass."""
    if native_cpu.vector_isa() == "AVX512":
        print("--run: this CPU runs AVX-512 itself, and triton_bn's own build here is the AVX-512 one: "
              "the test suite runs it, nothing to emulate")
        return 0
    real = build.compiler()
    missing = missing_simde(real)
    if missing:
        print(f"--run needs {missing}")
        return 2
    env = dict(os.environ, CXX=EMULATING_CXX, TRITON_BN_REAL_CXX=real,
               TRITON_BN_BUILD_DIR=os.path.join(os.path.dirname(build.build_dir()), "build-avx512-emulated"))
    print("building the native CPU kernels for AVX-512, emulated (tools/avx512_emulation.h; about 90 s) ...",
          flush=True)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        print("AVX-512 (emulated): the build FAILED\n" + probe.stdout[-3000:] + probe.stderr[-3000:])
        return 1
    fp32_lanes, double_lanes, library = probe.stdout.split()[-3:]
    listing = subprocess.run(["objdump", "-d", library], capture_output=True, text=True).stdout
    faulting = sum(1 for line in listing.splitlines() if AVX512_REGISTERS.search(line))
    undefined = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True).stdout
    wide_sleef = sorted(set(AVX512_SLEEF.findall(undefined)))
    print(f"AVX-512 (emulated): activation vectors of {fp32_lanes} fp32 / {double_lanes} double lanes; "
          f"{faulting} AVX-512 instructions in {library}; AVX-512 Sleef functions it calls: "
          f"{', '.join(wide_sleef) or 'none'}", flush=True)
    if (fp32_lanes, double_lanes) != ("16", "8") or faulting or wide_sleef:
        print("AVX-512 (emulated): not the library asked for (16 / 8 lanes, no AVX-512 instruction, no call of "
              "libtorch_cpu's AVX-512 Sleef: tools/avx512_emulation.h renames the ones it knows)")
        return 1
    deselect = [f"--deselect=tests/test_native_cpu.py::{name}" for name in NOT_UNDER_EMULATION]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_native_cpu.py",
               "tests/test_dispatch.py", *deselect, *pytest_args]
    print("running: " + " ".join(command[1:]), flush=True)
    return 0 if subprocess.run(command, env=env, cwd=ROOT).returncode == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="skylake-avx512", help="the -march CPU (default: skylake-avx512, the "
                                                                   "AVX-512 F/BW/VL/DQ that ATen's AVX-512 code needs)")
    parser.add_argument("--files", help="comma-separated names in triton_bn/csrc/cpu (default: every .cpp there)")
    parser.add_argument("--run", action="store_true", help="then build the library for AVX-512 on this host, "
                        "emulated, and run the native tests against it (arguments after -- go to pytest)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # what follows "--" goes to pytest
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1:]
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
    if failed:
        return 1
    return run_emulated(pytest_args) if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
