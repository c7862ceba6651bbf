"""Check that every C++ source of triton_bn/csrc/ compiles against another torch's headers (syntax only).

The GPU image runs torch 2.11 while CI installs 2.13, and the C++ API differs between them (autograd nodes are
std::shared_ptr in 2.11, c10::intrusive_ptr from 2.13): a source that builds here can fail there, and on a GPU a
failed build only warns and falls back to the Python path. This downloads the other version's wheel (no install,
no dependencies; cached), unpacks its headers, and runs ``$CXX -fsyntax-only`` on each source with the flags
build.py uses and those headers instead of the installed ones.

    python tools/check_torch_headers.py                 # torch 2.11.0 (the GPU image's)
    python tools/check_torch_headers.py --torch 2.12.0
"""
import argparse
import glob
import os
import subprocess
import sys
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from triton_bn import build  # noqa: E402
from triton_bn.backends import native_cpu, cpp_launch  # noqa: E402


def headers_of(version: str, cache: str) -> str:
    """The include folder of torch ``version``'s wheel for this Python, downloaded and unpacked once."""
    target = os.path.join(cache, version)
    include = os.path.join(target, "torch", "include")
    if os.path.isdir(include):
        return include
    os.makedirs(target, exist_ok=True)
    print(f"downloading torch {version}'s wheel (headers only are kept) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-q", "-d", target],
                   check=True)
    (wheel,) = glob.glob(os.path.join(target, "torch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target, [name for name in archive.namelist() if name.startswith("torch/include/")])
    os.remove(wheel)
    return include


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default="2.11.0", help="the torch version whose headers to compile against")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "triton_bn", "torch-headers"))
    args = parser.parse_args()
    include = headers_of(args.torch, args.cache)
    installed = os.path.join(os.path.dirname(torch.__file__), "include")
    flags = [flag.replace(installed, include) for flag in build._torch_flags()]
    # the CPU kernels' own flags too: the CPU_CAPABILITY macros select ATen's vector code for this host's ISA
    flags += ["-isystem", cpp_launch._triton_cuda_include(), *native_cpu._compile_flags(), "-fsyntax-only"]
    entry_cflags, _, entry_includes = cpp_launch.python_entry_flags()  # csrc/cuda/python.cpp's binding, as built here
    flags += entry_cflags + [flag for path in entry_includes for flag in ("-isystem", path)]
    if not entry_cflags:
        print("no Python headers here: csrc/cuda/python.cpp is checked empty, as it would be built")
    cxx = build.compiler()
    failed = []
    for source in sorted(glob.glob(os.path.join(ROOT, "triton_bn", "csrc", "*", "*.cpp"))):
        proc = subprocess.run([cxx, *flags, source], capture_output=True, text=True)
        name = os.path.relpath(source, ROOT)
        print(f"{'ok    ' if proc.returncode == 0 else 'FAILED'} {name}", flush=True)
        if proc.returncode:
            failed.append(name)
            print("\n".join(line for line in proc.stderr.splitlines() if "error" in line)[:3000])
    print(f"torch {args.torch}'s headers: {len(failed)} source(s) failed" if failed
          else f"torch {args.torch}'s headers: every source compiles")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
