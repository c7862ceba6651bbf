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

With ``--run`` it also runs them, emulated: ``tools/arm_harness.cpp`` (every kernel entry point through
PyTorch's dispatcher against float64 references ATen computes in the same process: every dtype, NCHW,
channels_last and [N, C], every activation, a residual, the backward) is linked with the kernels' objects and
the wheel's libraries and run under ``qemu-aarch64`` (Debian's ``qemu-user``). The wheel is PyPI's, a CUDA
build: the two CUDA libraries its libtorch_cpu names (libcudart, libcupti) are replaced by stubs that say
"no device", and qemu's path prefix gives the program an Arm ``/proc/cpuinfo`` and ``MIDR_EL1`` (oneDNN and
cpuinfo read them while the library loads; they find the x86 host's otherwise and crash).

    python tools/check_aarch64.py            # needs aarch64-linux-gnu-g++ and the package index
    python tools/check_aarch64.py --run      # and qemu-aarch64: runs tools/arm_harness.cpp, emulated
Exit status 0 when everything asked for succeeded, 1 on a failure, 2 when no cross compiler (or, with
``--run``, no qemu-aarch64) is installed.
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
QEMU = os.environ.get("AARCH64_QEMU", "qemu-aarch64")
SYSROOT = os.environ.get("AARCH64_SYSROOT", "/usr/aarch64-linux-gnu")  # Debian's cross libc (libc6-arm64-cross)
HARNESS = os.path.join(ROOT, "tools", "arm_harness.cpp")
# an Arm Neoverse N1 as Linux describes it: what the emulated program reads for /proc/cpuinfo and MIDR_EL1
CPUINFO = ("processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
           "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n")
MIDR = "0x00000000413fd0c1\n"


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


def stub_missing_libraries(lib: str, workdir: str) -> str:
    """A folder of stand-ins for the libraries libtorch_cpu.so names that neither the wheel nor the cross libc
    has (the CUDA runtime and CUPTI of a CUDA build): each defines, under the version its symbols ask for, the
    functions libtorch_cpu calls, answering "no device" (cudaErrorNoDevice, 100; zero devices)."""
    stubs = os.path.join(workdir, "stubs")
    os.makedirs(stubs, exist_ok=True)
    readelf, nm = CROSS.replace("g++", "readelf"), CROSS.replace("g++", "nm")
    dynamic = subprocess.run([readelf, "-d", os.path.join(lib, "libtorch_cpu.so")], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", dynamic)
    missing = [name for name in needed if not os.path.exists(os.path.join(lib, name))
               and not os.path.exists(os.path.join(SYSROOT, "lib", name))]
    undefined = subprocess.run([nm, "-D", "--undefined-only", os.path.join(lib, "libtorch_cpu.so")],
                               capture_output=True, text=True).stdout.split()
    for name in missing:
        symbols = sorted({entry.split("@")[0] for entry in undefined if entry.endswith("@" + name)})
        source = os.path.join(stubs, name + ".c")
        with open(source, "w") as out:
            for symbol in symbols:
                out.write(f"int {symbol}(int* count) {{ *count = 0; return 100; }}\n" if symbol == "cudaGetDeviceCount"
                          else f"int {symbol}(void) {{ return 100; }}\n")
        with open(source + ".map", "w") as out:
            out.write(f"{name} {{\n global:\n" + "".join(f"  {symbol};\n" for symbol in symbols) + " local: *;\n};\n")
        subprocess.run([CROSS.replace("g++", "gcc"), "-shared", "-fPIC", source, "-o", os.path.join(stubs, name),
                        f"-Wl,-soname,{name}", f"-Wl,--version-script={source}.map"], check=True)
    print(f"aarch64: stand-ins for {', '.join(missing) or 'nothing'} (libraries of torch's CUDA build)", flush=True)
    return stubs


def emulated_root(workdir: str) -> str:
    """qemu's path prefix: the cross libc's libraries, an Arm /proc/cpuinfo and each CPU's MIDR_EL1."""
    root = os.path.join(workdir, "root")
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    os.symlink(os.path.join(SYSROOT, "lib"), os.path.join(root, "lib"))
    cpus = 2
    with open(os.path.join(root, "proc", "cpuinfo"), "w") as out:
        out.write("".join(CPUINFO.format(n=n) for n in range(cpus)))
    for n in range(cpus):
        folder = os.path.join(root, "sys", "devices", "system", "cpu", f"cpu{n}", "regs", "identification")
        os.makedirs(folder)
        with open(os.path.join(folder, "midr_el1"), "w") as out:
            out.write(MIDR)
    return root


def run_emulated(flags, objects, lib: str, workdir: str) -> int:
    """tools/arm_harness.cpp linked with the kernels' objects, run under qemu-aarch64: its exit status."""
    stubs = stub_missing_libraries(lib, workdir)
    program = os.path.join(workdir, "arm_harness")
    proc = subprocess.run([CROSS, *flags, HARNESS, *objects, "-fopenmp", f"-L{lib}", f"-L{stubs}", "-lc10",
                           "-ltorch_cpu", f"-Wl,-rpath-link,{lib}", f"-Wl,-rpath-link,{stubs}", "-o", program],
                          capture_output=True, text=True)
    if proc.returncode:
        print("aarch64: building tools/arm_harness.cpp FAILED\n" + proc.stderr[-3000:])
        return 1
    environment = dict(os.environ, QEMU_LD_PREFIX=emulated_root(workdir), LD_LIBRARY_PATH=f"{lib}:{stubs}",
                       QEMU_CPU="max")
    print(f"aarch64: running tools/arm_harness.cpp under {QEMU} (a few minutes) ...", flush=True)
    return subprocess.run([QEMU, program], env=environment).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "triton_bn", "torch-aarch64"))
    parser.add_argument("--run", action="store_true", help="also run the kernels under qemu-aarch64 "
                        "(tools/arm_harness.cpp)")
    args = parser.parse_args()
    if shutil.which(CROSS) is None:
        print(f"no {CROSS} here (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu; or set AARCH64_CXX)")
        return 2
    if args.run and shutil.which(QEMU) is None:
        print(f"no {QEMU} here (Debian/Ubuntu: apt-get install qemu-user; or set AARCH64_QEMU)")
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
        if args.run:
            return 0 if run_emulated(flags, objects, lib, workdir) == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
