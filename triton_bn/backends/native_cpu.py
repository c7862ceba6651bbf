"""The native CPU backend: C++ kernels for dense CPU inputs, channels innermost (channels_last,
channels_last_3d, (N, C), C-innermost (N, C, L)) or contiguous (NCHW, NCDHW, (N, C, L)): ``csrc/cpu/``,
compiled on first use by ``build.py`` (once per machine, torch, compiler and source version, one process per
file on every core; ``TRITON_BN_BUILD_DIR`` says where) and registered as ``torch.ops.triton_bn_cpu``.

Why: PyTorch's CPU batch norm reads x three times in a training forward (channels_last; it sums those
rows without compensation), and an activation module reads and writes the result once more. These kernels
take one read for the statistics (shifted sums, accurate), one read and one write for y with the residual
and the activation fused, and two passes for the whole backward, z recomputed inside. ``dispatch.py`` sends
them the whole calls of inputs they serve (``serves``), a training call that needs a gradient through their
C++ autograd node (``training_with_node``); where they do not apply (other strides) or cannot be built here
(no compiler), PyTorch's kernels serve (``pytorch_kernels.py``). They compute in fp32 for fp32, bf16 and
fp16 inputs and in double for float64 (whose statistics, dweight and dbias are then float64, as on the rest
of the pure path). ``TRITON_BN_NATIVE_CPU=0`` (read at import) switches them off.
"""
import glob
import os
import platform
import threading
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .. import build, settings
from .layout import channels_innermost, like_input
from . import host_factor, in_parameter_dtypes

ENABLED = settings.flag("TRITON_BN_NATIVE_CPU")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CSRC = os.path.join(build.CSRC, "cpu")
# the longest compiles first, so that the cores finish together (on this project's 2-core VM: the bf16 and
# fp16 backward 23-24 s, ops.cpp 21 s, the fp32 backward 21 s, float64's 13 s, each forward 4-7 s)
_LONGEST_FIRST = ("kernels_bfloat16_backward", "kernels_half_backward", "ops", "kernels_float_backward",
                  "kernels_double_backward")
SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cpp")), key=lambda path: (
    _LONGEST_FIRST.index(os.path.basename(path)[:-4]) if os.path.basename(path)[:-4] in _LONGEST_FIRST
    else len(_LONGEST_FIRST), path))
HEADERS = build.headers_of("cpu", "node")  # the CPU kernels' and the autograd node both devices share
BUILD_TIME = "about a minute on two quiet cores, a few on a busy machine"  # 55-115 s and 183-239 s measured (README)


class NativeOps(NamedTuple):
    """The ops of ``csrc/cpu/`` as C++ callables (the Python wrapper of an op costs
    microseconds per call)."""
    training_forward: Callable
    apply: Callable
    backward: Callable
    training: Callable  # training_forward + the batch counted, its backward recorded as a C++ autograd node
    evaluate_call: Callable  # a plain eval call with its checks made in C++, or None (dispatch.known_eval_call)
    activate_: Callable  # SiLU, GELU, GELU-tanh or sigmoid written over x (dispatch.activation_pass)


_loaded = {}  # "ops": NativeOps, or None where the build failed
_lock = threading.Lock()
_UNSET = object()


# ATen's x86 vector ISAs (torch.backends.cpu.get_cpu_capability()'s names) that at::vec::Vectorized is built for
# by a CPU_CAPABILITY macro (csrc/cpu/kernels.h refuses one the compiler does not target: AVX-512 needs
# AVX512F, BW, VL and DQ, as ATen's own AVX-512 kernels are compiled with).
VECTOR_ISAS = ("AVX512", "AVX2")


def vector_isa() -> str:
    """The vector ISA the native kernels' transcendental activations are built for: PyTorch's own choice on
    this CPU (its ``get_cpu_capability``: "AVX512" or "AVX2" on x86, lowered by ``ATEN_CPU_CAPABILITY`` as
    PyTorch's kernels are), or "DEFAULT" (ATen's portable code: NEON on aarch64, which ATen's headers pick by
    themselves, scalar loops elsewhere) where PyTorch names no x86 ISA. Part of the build's key (through the
    flags) and of the bench's header."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in VECTOR_ISAS else "DEFAULT"


def capability_flags(isa: str):
    """The macros that build at::vec::Vectorized for ``isa`` (one of VECTOR_ISAS, or DEFAULT): what inductor's
    C++ code passes too (torch/_inductor/cpu_vec_isa.py). Without them Vectorized is ATen's portable code, on x86
    a loop of scalar calls: the known trap of including vec.h in an extension."""
    return [] if isa == "DEFAULT" else [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]


def compile_flags(machine: str, isa: str, target: str = "native"):
    """The kernels' flags for a ``machine`` (``platform.machine()``'s names), a vector ``isa`` (``vector_isa``)
    and a CPU ``target`` (``native``: this machine's CPU; tools/check_aarch64.py names a generic one).
    ``-fopenmp``: ATen's ``parallel_for`` is an inline template that runs serially unless the code that
    instantiates it is compiled with OpenMP (it then shares PyTorch's own OpenMP runtime and threads).
    On aarch64, ``AT_BUILD_ARM_VEC256_WITH_SLEEF``: ATen's NEON ``Vectorized`` calls Sleef (which the Arm
    wheels of torch export, as PyTorch's own Arm build does) instead of its scalar map of std::exp."""
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if machine in ("x86_64", "AMD64"):
        flags.append(f"-march={target}")
    elif machine in ("aarch64", "arm64"):
        flags += [f"-mcpu={target}" if target == "native" else f"-march={target}", "-DAT_BUILD_ARM_VEC256_WITH_SLEEF"]
    return flags + capability_flags(isa)


def _compile_flags():
    """Optimised for this machine's CPU (its vector width decides the loops' speed); the CPU is part of the
    build's key, so a home directory shared by different machines never hands one another's binary. The
    vector ISA's macros (``vector_isa``): csrc/cpu/kernels.h checks that -march=native gives what they ask for."""
    return compile_flags(platform.machine(), vector_isa())


def _build():
    _loaded["path"] = build.load_library("triton_bn_cpu", SOURCES, HEADERS, extra_cflags=_compile_flags(), extra_ldflags=["-fopenmp"],
                       what="the native CPU kernels", duration=BUILD_TIME)
    ops = torch.ops.triton_bn_cpu
    return NativeOps(*(getattr(getattr(ops, op_name).default, "_op", getattr(ops, op_name).default)
                       for op_name in NativeOps._fields))


def ops() -> Optional[NativeOps]:
    """The native kernels' ops, or None when switched off or when they
    cannot be built on this machine (said once, in a warning)."""
    loaded = _loaded.get("ops", _UNSET)
    if loaded is not _UNSET:
        return loaded
    with _lock:
        if "ops" not in _loaded:
            loaded = None
            if ENABLED:
                try:
                    loaded = _build()
                except Exception as exc:  # noqa: BLE001 - no compiler, a failed or abandoned build: PyTorch's kernels
                    log = getattr(exc, "log", None)
                    tail = build.log_tail(log)
                    warnings.warn(f"triton_bn: the native CPU kernels could not be built ({type(exc).__name__}: "
                                  f"{str(exc)[:400]}){'; compiler output in ' + log if log else ''}"
                                  f"{': ...' + chr(10) + tail if tail else ''}\ndense CPU tensors take PyTorch's "
                                  "kernels instead (slower). TRITON_BN_NATIVE_CPU=0 skips the attempt.")
            _loaded["ops"] = loaded
    return _loaded["ops"]


def loaded() -> Optional[NativeOps]:
    """The native ops where a build is already loaded, else None (never starts a build: for a route that only
    a call after the first can take)."""
    return _loaded.get("ops")


def vector_lanes() -> Optional[Tuple[int, int]]:
    """(fp32 lanes, double lanes) of the vector type the loaded build's transcendental activations run on
    (16 and 8 where it was built for AVX-512, 8 and 4 for AVX2, 1 and 1 where ATen's code is scalar); None
    where no build is loaded."""
    if ops() is None:
        return None
    return tuple(torch.ops.triton_bn_cpu.vector_lanes())


def loaded_from() -> Optional[str]:
    """The path of the loaded build (None before ``ops()`` or where none was loaded)."""
    return _loaded.get("path")


def serves(x: torch.Tensor) -> Optional[NativeOps]:
    """The native ops when they compute this input (a non-empty CPU tensor of a supported dtype, its
    channels innermost or contiguous), else None."""
    if not x.is_cpu or x.dtype not in DTYPES or x.numel() == 0 or not (x.is_contiguous() or channels_innermost(x)):
        return None
    return ops()


def like(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """t (a residual, a gradient) with x's strides and dtype, as the native ops take it (``like_input``,
    the kernels' rule, plus the dtype)."""
    if t is None:
        return None
    return like_input(t if t.dtype == x.dtype else t.to(x.dtype), x)


# -- the backend: whole calls on inputs ``serves`` takes (dispatch.py asks it first) ------------------------
# They read and update per-channel tensors of any dtype in their compute type themselves (fp32; double for
# float64); a residual or gradient is handed over with x's strides and dtype (``like``).
def training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum: float,
             cumulative: bool, eps: float, activation: int, negative_slope: float):
    """(y, mean, invstd): the statistics in one read, y with the epilogue in one more, the running statistics
    updated once; then the batch counted in ``num_batches_tracked`` (when given)."""
    factor = host_factor(running_mean, num_batches_tracked, momentum, cumulative)
    result = ops().training_forward(x, weight, bias, like(residual, x), running_mean, running_var, factor, eps,
                                    activation, negative_slope)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return result


def training_with_node(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum: float,
                       cumulative: bool, eps: float, activation: int, negative_slope: float):
    """y of a training forward that records its backward as a C++ autograd node (``csrc/node/``: the same
    saved tensors and gradients as ``autograd.TrainingBatchNormFunction``, without a Python Function's host
    time, which on a small layer exceeds the kernels' own); the op counts the batch itself."""
    factor = host_factor(running_mean, num_batches_tracked, momentum, cumulative)
    return ops().training(x, weight, bias, like(residual, x), running_mean, running_var, num_batches_tracked,
                          factor, eps, activation, negative_slope)


def evaluate(x, running_mean, running_var, weight, bias, residual, eps: float, activation: int,
             negative_slope: float):
    """y from the running statistics in one pass, the epilogue fused."""
    return ops().apply(x, running_mean, None, running_var, weight, bias, like(residual, x), eps, activation,
                       negative_slope)


def backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps: float, activation: int,
             negative_slope: float, output_mask):
    """(dx, dweight, dbias, d residual) in two passes, z recomputed inside; None where not asked for, dweight
    and dbias in the parameters' dtype."""
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    wanted = (want_dx, want_dweight and weight is not None, want_dbias and bias is not None, want_dresidual)
    grads = ops().backward(like(grad_y, x), x, mean, invstd, running_var, weight, bias,
                           like(residual, x) if activation != 0 else None, eps, activation, negative_slope, *wanted)
    return in_parameter_dtypes(tuple(g if want else None for g, want in zip(grads, wanted)), weight, bias)
