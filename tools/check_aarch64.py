"""Cross-compile the native CPU kernels for aarch64 (Arm: Graviton, Ampere, Apple silicon under Linux) here.

An Arm host builds ``triton_bn/csrc/cpu/`` on first use as an x86 host does (native_cpu.py), with ATen's NEON
``Vectorized`` for the transcendental activations (no CPU_CAPABILITY macro: ATen's headers pick NEON by
themselves on aarch64) and Sleef behind it. No Arm machine is lent to this project, so this downloads torch's
aarch64 wheel of the installed version for this Python (no install; its headers and libraries are kept, in
~/.cache/triton_bn/torch-aarch64: its sleef.h declares the NEON functions that the x86 wheel's does not),
compiles every CPU source with a cross compiler (Debian's ``g++-aarch64-linux-gnu``) against its headers
with the flags native_cpu.py gives an aarch64 build (``-march=armv8-a`` for ``-mcpu=native``), says how many NEON
vector instructions the kernels hold, and links the objects against the wheel's libraries with every symbol
resolved (``-Wl,--no-undefined``): the Sleef functions ATen's NEON code calls must be exported there.

    python tools/check_aarch64.py            # needs aarch64-linux-gnu-g++ and the package index
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
from triton_bn import build  # noqa: E402
from triton_bn.backends import native_cpu  # noqa: E402

CROSS = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
TARGET = "armv8-a"  # what every 64-bit Arm CPU runs (NEON is part of it)


def aarch64_wheel(cache: str) -> str:
    """The torch folder (include/, lib/) of torch's aarch64 wheel of this version for this Python, downloaded
    and unpacked once."""
    version = torch.__version__.split("+")[0]
    target = os.path.join(cache, f"{version}-aarch64")
    folder = os.path.join(target, "torch")
    if os.path.isdir(os.path.join(folder, "lib")) and os.path.isdir(os.path.join(folder, "include")):
        return folder
    os.makedirs(target, exist_ok=True)
    print(f"downloading torch {version}'s aarch64 wheel (its headers and libraries are kept) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-q", "-d", target,
                    "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64"], check=True)
    (wheel,) = glob.glob(os.path.join(target, "torch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target, [name for name in archive.namelist()
                                    if name.startswith(("torch/lib/", "torch/include/"))])
    os.remove(wheel)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "triton_bn", "torch-aarch64"))
    args = parser.parse_args()
    if shutil.which(CROSS) is None:
        print(f"no {CROSS} here (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu; or set AARCH64_CXX)")
        return 2
    wheel = aarch64_wheel(args.cache)
    installed = os.path.join(os.path.dirname(torch.__file__), "include")
    flags = [flag.replace(installed, os.path.join(wheel, "include")) for flag in build._torch_flags()]
    flags += native_cpu.compile_flags("aarch64", "DEFAULT", TARGET)
    print(f"{CROSS}: {' '.join(native_cpu.compile_flags('aarch64', 'DEFAULT', TARGET))}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as workdir:
        def compile_one(source):
            obj = os.path.join(workdir, os.path.basename(source) + ".o")
            proc = subprocess.run([CROSS, *flags, "-c", source, "-o", obj], capture_output=True, text=True)
            return source, obj, proc
        objects = []
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for source, obj, proc in pool.map(compile_one, native_cpu.SOURCES):
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
        lib = os.path.join(wheel, "lib")
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
