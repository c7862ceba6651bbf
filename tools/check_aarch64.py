"""Cross-compile the native CPU kernels for aarch64 (Arm: Graviton, Ampere, Apple silicon under Linux) here.

An Arm host builds ``triton_bn/csrc/cpu/`` on first use as an x86 host does (native.py), with ATen's NEON
``Vectorized`` for the transcendental activations (no CPU_CAPABILITY macro: ATen's headers pick NEON by
themselves on aarch64) and Sleef behind it. No Arm machine is lent to this project, so this compiles every
CPU source with a cross compiler (Debian's ``g++-aarch64-linux-gnu``) against the installed torch's headers,
with the flags native.py gives an aarch64 build (``-march=armv8-a`` for ``-mcpu=native``), and says how many
NEON vector instructions the kernels hold. ``--link`` also downloads torch's aarch64 wheel for this Python
(no install; cached) and links the objects against its libraries with every symbol resolved
(``-Wl,--no-undefined``): the Sleef functions ATen's NEON code calls must be exported there.

    python tools/check_aarch64.py            # compile (needs aarch64-linux-gnu-g++)
    python tools/check_aarch64.py --link     # and link against torch's aarch64 wheel
Exit status 0 when everything asked for succeeded, 1 on a failure, 2 when no cross compiler is installed.
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from triton_bn import build, native  # noqa: E402

CROSS = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
TARGET = "armv8-a"  # what every 64-bit Arm CPU runs (NEON is part of it)


def wheel_libraries(cache: str) -> str:
    """torch/lib of torch's aarch64 wheel of this version for this Python, downloaded and unpacked once."""
    version = torch.__version__.split("+")[0]
    target = os.path.join(cache, f"{version}-aarch64")
    lib = os.path.join(target, "torch", "lib")
    if os.path.isdir(lib):
        return lib
    os.makedirs(target, exist_ok=True)
    print(f"downloading torch {version}'s aarch64 wheel (its libraries are kept) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-q", "-d", target,
                    "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64"], check=True)
    (wheel,) = glob.glob(os.path.join(target, "torch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target, [name for name in archive.namelist() if name.startswith("torch/lib/")])
    os.remove(wheel)
    return lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link", action="store_true", help="also link against torch's aarch64 wheel")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "triton_bn", "torch-aarch64"))
    args = parser.parse_args()
    if shutil.which(CROSS) is None:
        print(f"no {CROSS} here (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu; or set AARCH64_CXX)")
        return 2
    flags = build._torch_flags() + native.compile_flags("aarch64", "DEFAULT", TARGET)
    print(f"{CROSS}: {' '.join(native.compile_flags('aarch64', 'DEFAULT', TARGET))}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as workdir:
        def compile_one(source):
            obj = os.path.join(workdir, os.path.basename(source) + ".o")
            proc = subprocess.run([CROSS, *flags, "-c", source, "-o", obj], capture_output=True, text=True)
            return source, obj, proc
        objects = []
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for source, obj, proc in pool.map(compile_one, native.SOURCES):
                name = os.path.relpath(source, ROOT)
                print(f"{'ok    ' if proc.returncode == 0 else 'FAILED'} {name}", flush=True)
                if proc.returncode:
                    failed.append(name)
                    print("\n".join(line for line in proc.stderr.splitlines() if "error" in line)[:3000])
                else:
                    objects.append(obj)
        if failed:
            print(f"aarch64: {len(failed)} source(s) failed to compile")
            return 1
        objdump = CROSS.replace("g++", "objdump")
        if shutil.which(objdump):
            listing = "".join(subprocess.run([objdump, "-d", obj], capture_output=True, text=True).stdout
                              for obj in objects)
            vector = len(re.findall(r"\t(?:fmla|fmul|fadd|fdiv|fsub)\tv\d+\.(?:4s|2d)", listing))
            print(f"aarch64: every source compiles; {vector} NEON vector arithmetic instructions (4 fp32 / 2 double "
                  "lanes) in the kernels")
        else:
            print("aarch64: every source compiles")
        if not args.link:
            return 0
        lib = wheel_libraries(args.cache)
        library = os.path.join(workdir, "triton_bn_cpu.so")
        command = [CROSS, *objects, "-shared", "-fopenmp", f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch",
                   "-Wl,--no-undefined", f"-Wl,-rpath-link,{lib}", "-o", library]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            print("aarch64: linking against torch's aarch64 libraries FAILED\n" + proc.stderr[-3000:])
            return 1
        undefined = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True).stdout
        sleef = sorted({line.split()[-1] for line in undefined.splitlines() if "Sleef_" in line})
        print(f"aarch64: linked against {lib} with no undefined symbol; Sleef functions it calls: "
              f"{', '.join(sleef) if sleef else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
