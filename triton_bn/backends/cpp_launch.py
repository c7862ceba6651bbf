"""The eager GPU path in C++ (opt-in: ``TRITON_BN_CPP_LAUNCH=1``): one C++ call per forward, kernels launched
from C++, a C++ autograd node whose backward launches the backward kernels.

Python stays the one place that decides. The first call of a kind (shapes, strides, dtypes, alignment,
which inputs are given and need gradients, flags, stream) runs the Python launchers as always, and this
module watches it (``triton_launch.watch``): every launch's kernel, grid and arguments. From those and each
compiled kernel's own parameter list it writes a *plan*: per launch the CUfunction, grid, block, shared
memory and, per kernel parameter, where its value comes from (a tensor slot, a scalar argument of the call,
a constant). The backward's plan is written the same way, from one watched backward on the same tensors.
Later calls of that kind make one call into ``csrc/cuda/`` (``torch.ops.triton_bn_cuda``), which checks
that the call is one its plan was made for and executes it; a call it was not made for returns nothing,
and Python writes a plan for it.

A plan matches Triton's compiled variant exactly or is not used: Triton specialises ints equal to 1 and
16-divisible ints and pointers, so sizes enter the plan's key (they are constants of the plan) and every
pointer's 16-byte alignment is checked per call; the parameter list is the compiled kernel's own (its
signature after specialisation, plus the trailing scratch pointers its PTX declares), checked against the
PTX ``.entry`` declaration (count, order, widths) before the plan is accepted.

Stand-in drivers (``TRITON_BN_CUDA_DRIVER``): ``record`` makes CPU tensors take this path and records each
launch instead of making it (``cuda_driver.recorded()``); ``null`` launches nothing (host-cost
measurements). Under a stand-in the kernels are compiled for sm_90 on the CPU with Triton's compiler, so
the plans and their ABI checks are the real ones; results are not computed.

Not (yet) on this path: CUDA graph capture (the Python path serves it, with its warm-up rule), empty
batches, inputs that need a copy into one of the two layouts, a d residual without dx and without an
activation (Python's shortcut copies dy).
"""
import contextlib
import math
import os
import re
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import build, settings
from ..autotune import tuner
from . import PLAIN_NUMBERS, known_call_activation, layout, triton_internals, triton_kernels, triton_launch
# The numbering this module and csrc/cuda/ share (plan_numbering.py; csrc/cuda/plan_ids.h is written from it)
from .plan_numbering import (BIAS, CALL_SCALARS, F32, FIRST_PERSISTENT, FIRST_SCRATCH, GRAD_BIAS, GRAD_RESIDUAL,
                             GRAD_WEIGHT, GRAD_X, GRAD_Y, I8, I32, I64, LIKE_BIAS, LIKE_WEIGHT, LIKE_X, MEAN,
                             NULL_POINTER, NUM_BATCHES, PER_CHANNEL, POINTER, RESIDUAL, RUNNING_MEAN, RUNNING_VAR,
                             SCALAR_TYPES, SCRATCH, STAT, WEIGHT, X, Y)

ENABLED = settings.flag("TRITON_BN_CPP_LAUNCH")
STAND_IN = triton_launch.CUDA_DRIVER if triton_launch.STAND_IN else ""  # "record", "null" or "" (the real driver)

CSRC = os.path.join(build.CSRC, "cuda")

_library = {}
_lock = threading.Lock()
_training_op = _apply_op = None  # set by _load: (the call's arguments) -> y, or None where no plan takes it


class PlanUnsupported(Exception):
    """This call's kind is not served by the C++ path (it stays on the Python path)."""


def ops():
    """``torch.ops.triton_bn_cuda``, built on first use (csrc/cuda/, build.py); None where it can not be
    built here (said once, in a warning)."""
    if "ops" not in _library:
        with _lock:
            if "ops" not in _library:
                _library["ops"] = _load()
    return _library["ops"]


def _load():
    import warnings
    include = _triton_cuda_include()
    python_entry = python_entry_flags()
    try:
        sources = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cpp"))
        headers = build.headers_of("cuda", "node")  # its own and the autograd node both devices share
        library = build.load_library(
            "triton_bn_cuda", sources, headers + [os.path.join(include, "cuda.h")],
            extra_cflags=["-O2"] + python_entry[0], extra_ldflags=["-ldl"] + python_entry[1],
            include_dirs=[include] + python_entry[2], what="the C++ launch path",
            duration="about a minute on two cores")
    except Exception as exc:  # noqa: BLE001 - the Python path serves
        warnings.warn(f"triton_bn: the C++ launch path could not be built ({type(exc).__name__}: {str(exc)[:300]}); "
                      "the Python launchers serve")
        return None
    cuda_ops = torch.ops.triton_bn_cuda
    cuda_ops.set_driver(STAND_IN or "real")
    global _training_op, _apply_op
    entry = _import_entry(library) if python_entry[0] else None
    if entry is not None:  # the forward calls bound directly (csrc/cuda/python.cpp), from the same library
        _training_op, _apply_op = entry.training, entry.apply
    else:  # the ops' C++ callables (an op's Python wrapper costs microseconds more per call)
        _training_op, _apply_op = _y_or_none(cuda_ops.training.default._op), _y_or_none(cuda_ops.apply.default._op)
    return cuda_ops


def _y_or_none(op):
    """A torch.ops entry, which returns [y] or [], as a call that returns y or None (as python.cpp's do)."""
    def call(*args):
        out = op(*args)
        return out[0] if out else None
    return call


ENTRY_MODULE = "triton_bn_cuda_entry"  # PYBIND11_MODULE's name in csrc/cuda/python.cpp


def python_entry_flags():
    """(cflags, ldflags, include folders) that build csrc/cuda/python.cpp's direct Python entry of the forward
    calls into the library: Python's headers and torch's Python bindings. All empty where Python's headers are
    missing (a Python without its development files): the library is then built without that entry, and
    the forward calls go through torch.ops."""
    import sysconfig
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return [], [], []
    return ["-DTRITON_BN_PYTHON_ENTRY"], ["-ltorch_python"], [include]


def _import_entry(library: str):
    """The Python module in ``library`` (already loaded as the ops' library: the same copy, one plan table), or
    None, said in a warning, where it does not import (the torch.ops entry then serves)."""
    import importlib.machinery
    import importlib.util
    import warnings
    try:
        loader = importlib.machinery.ExtensionFileLoader(ENTRY_MODULE, library)
        spec = importlib.util.spec_from_file_location(ENTRY_MODULE, library, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as exc:
        warnings.warn(f"triton_bn: the C++ launch path's Python entry did not import ({exc}); its calls go through "
                      "torch.ops, a few microseconds slower each")
        return None
    return module


def _triton_cuda_include() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")


ACTIVE = ENABLED or bool(STAND_IN)
_ANY_DEVICE = bool(STAND_IN)  # a stand-in driver takes CPU tensors on the C++ path too


@contextlib.contextmanager
def switched(active: bool):
    """The C++ path switched on (or off) inside the block, and back as it was after, also on an error: how a
    bench times it beside the default path in one process."""
    global ACTIVE
    before, ACTIVE = ACTIVE, active
    try:
        yield
    finally:
        ACTIVE = before


def serves(x: torch.Tensor) -> bool:
    """Whether the C++ path may take this call: switched on, a kernel dtype on a GPU (or any device under a
    stand-in driver), not empty. (Inside a CUDA graph capture C++ finds no plan, and none is written: the
    Python path serves, with its warm-up rule.)"""
    return ACTIVE and x.dtype in triton_kernels.KERNEL_DTYPES and x.numel() > 0 and (x.is_cuda or _ANY_DEVICE)


# -- the calls ------------------------------------------------------------------------------------------------
# the calls whose plans Python wrote (the C++ side finds them by a key of its own): key -> (forward, backward)
# plan handles, or None where the C++ path does not serve such a call
_PLANS: Dict[tuple, Optional[Tuple[int, int]]] = {}
# Both sides' tables are bounded and current: every plan is forgotten (C++'s call table and plan registry,
# these keys, the compiled variants' descriptions) when PLAN_LIMIT call kinds have been written, and when the
# tuner's generation moves on (tuning switched, a configuration forced, the tuner reset: it tells us), since
# a plan launches the tile configurations chosen when it was written. Plans are then written again as calls
# come.
PLAN_LIMIT = 1024


def forget_plans() -> None:
    """Forget every plan on both sides: the next call of each kind writes its plans again."""
    with _lock:
        if _library.get("ops") is not None:
            torch.ops.triton_bn_cuda.forget_plans()
        _PLANS.clear()
        _COMPILED.clear()


tuner.on_change(forget_plans)


def _new_plans(kind: str, args, flags: tuple, write):
    """``write()``'s plans for a call kind C++ found none for, written once per kind; None where the path
    does not serve it (inside a capture; a kind written before that C++ still refuses)."""
    if args[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # plans are written outside captures, from calls that ran
    if len(_PLANS) >= PLAN_LIMIT:
        forget_plans()
    key = _key(kind, args, flags)
    if _PLANS.get(key, _UNBUILT) is not _UNBUILT:
        return None
    plans = _PLANS[key] = write()
    return plans


def _aligned(t) -> bool:
    return t is not None and not t.data_ptr() & 15


def _describe(t) -> tuple:
    if t is None:
        return (None,)
    return (t.dtype, tuple(t.shape), t.stride(), _aligned(t), t.requires_grad)


def _key(kind: str, tensors, flags) -> tuple:
    grad = torch.is_grad_enabled()
    stream = triton_launch.current_stream(tensors[0].device.index) if tensors[0].is_cuda else 0
    return (kind, tensors[0].device, stream, grad, flags) + tuple(_describe(t) for t in tensors)


def known_call(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
               residual, num_batches_tracked):
    """``functional.batch_norm``'s result for a call like one the C++ side already has plans for, else None.

    Only such a call is taken before ``functional``'s checks, and none is the worse for it: a plan is written
    only for a call that passed them, and C++ takes a call only if every tensor matches that call's (which are
    given, and each one's dtype, shape, strides, device and alignment). What no plan holds, the scalars, is
    checked here first; anything unusual (a bool for a number, an unknown activation) goes the long way."""
    # serves(x) without its dtype and size checks: a call of another dtype or an empty one has no plan, and C++
    # returns nothing for it
    if not (isinstance(x, torch.Tensor) and (x.is_cuda or _ANY_DEVICE)) or torch.compiler.is_compiling() \
            or torch._C._get_tracing_state() is not None or (_training_op is None and ops() is None):
        return None
    act = known_call_activation(activation, eps, negative_slope)
    if act is None:
        return None
    if running_mean is not None and running_mean is running_var:  # one buffer passed twice: no plan's key tells
        return None
    if training is True:
        if momentum is None:
            cumulative, factor = True, 0.0
        elif type(momentum) in PLAIN_NUMBERS and math.isfinite(momentum):
            cumulative, factor = False, float(momentum)
        else:
            return None
        if eps <= 0:
            return None
        return _training_op(x, weight, bias, residual, running_mean, running_var,
                            num_batches_tracked if running_mean is not None else None, float(eps), factor,
                            float(negative_slope), act, cumulative)
    if training is False and running_mean is not None and eps >= 0:
        return _apply_op(x, running_mean, running_var, weight, bias, residual, float(eps), float(negative_slope), act)
    return None


def training(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum: float,
             cumulative: bool, eps: float, activation: int, negative_slope: float):
    """y of a training forward through the C++ path, or None where it does not take this call (its arguments
    checked by ``functional``): plans written for calls like it on a miss."""
    if ops() is None:
        return None
    args = (x, weight, bias, residual, running_mean, running_var, num_batches_tracked)
    y = _training_op(*args, eps, momentum, negative_slope, activation, cumulative)
    if y is not None:
        return y
    # no plan for a call like this one yet: write them
    plans = _new_plans("training", args, (cumulative, activation),
                       lambda: _training_plans(*args, momentum, cumulative, eps, activation, negative_slope))
    if plans is None:
        return None
    torch.ops.triton_bn_cuda.remember_training(*args, activation, cumulative, *plans)
    return _training_op(*args, eps, momentum, negative_slope, activation, cumulative)


def apply(x, mean, running_var, weight, bias, residual, eps: float, activation: int, negative_slope: float):
    """y from the running statistics or a frozen table through the C++ path (the variance is the plans'
    STAT slot), or None where it does not take this call."""
    if ops() is None:
        return None
    args = (x, mean, running_var, weight, bias, residual)
    y = _apply_op(*args, eps, negative_slope, activation)
    if y is not None:
        return y
    plans = _new_plans("apply", args, (activation,), lambda: _apply_plans(*args, eps, activation, negative_slope))
    if plans is None:
        return None
    torch.ops.triton_bn_cuda.remember_apply(*args, activation, *plans)
    return _apply_op(*args, eps, negative_slope, activation)


_UNBUILT = object()


# -- writing plans ----------------------------------------------------------------------------------------------
def _training_plans(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                    eps, activation, negative_slope):
    inputs = {X: x, WEIGHT: weight, BIAS: bias, RESIDUAL: residual, RUNNING_MEAN: running_mean,
              RUNNING_VAR: running_var, NUM_BATCHES: num_batches_tracked}
    try:
        _require_dense(x, residual, (weight, bias))
        # a scratch copy of the running state for the watched call: the real call is the C++ one
        state = {slot: (t.clone() if t is not None else None) for slot, t in inputs.items()
                 if slot in (RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES)}
        with triton_launch.watch(dry=bool(STAND_IN)) as watched:
            y, mean, invstd = triton_kernels.batch_norm_training(x, state[RUNNING_MEAN], state[RUNNING_VAR],
                                                         state[NUM_BATCHES], weight, bias, residual, momentum,
                                                         cumulative, eps, activation, negative_slope)
        if any(_aligned(state[slot]) != _aligned(inputs[slot]) for slot in state if state[slot] is not None):
            raise PlanUnsupported("running statistics at an unaligned address")
        known = {**inputs, **state, Y: y, MEAN: mean, STAT: invstd}
        forward = _write(watched, known, {Y: LIKE_X, MEAN: PER_CHANNEL, STAT: PER_CHANNEL},
                         expectations=inputs, device=x.device)
        backward = _backward_plan(x, mean, invstd, weight, bias, residual, eps, True, activation, negative_slope)
    except PlanUnsupported:
        return None
    return forward, backward


def _apply_plans(x, mean, stat, weight, bias, residual, eps, activation, negative_slope):
    inputs = {X: x, MEAN: mean, STAT: stat, WEIGHT: weight, BIAS: bias, RESIDUAL: residual}
    try:
        _require_dense(x, residual, (mean, stat, weight, bias))
        with triton_launch.watch(dry=bool(STAND_IN)) as watched:
            y = triton_kernels.batch_norm_apply(x, mean, None, stat, weight, bias, residual, eps, activation,
                                                negative_slope)
        forward = _write(watched, {**inputs, Y: y}, {Y: LIKE_X}, expectations=inputs, device=x.device)
        backward = _backward_plan(x, mean, stat, weight, bias, residual, eps, False, activation, negative_slope)
    except PlanUnsupported:
        return None
    return forward, backward


def _backward_plan(x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope) -> int:
    """The backward's plan for the gradients this call's inputs need (-1 when nothing needs one); ``stat`` is
    the STAT slot's tensor, invstd (``batch_stats``) or the running variance, as the node saves it."""
    if not torch.is_grad_enabled():
        return -1
    mask = [x.requires_grad, weight is not None and weight.requires_grad, bias is not None and bias.requires_grad,
            residual is not None and residual.requires_grad]
    if not any(mask):
        return -1
    if mask[3] and not mask[0] and activation == 0:
        raise PlanUnsupported("d residual = dy, copied by Python")
    grad_y = torch.empty_like(x)
    if not STAND_IN:
        grad_y.zero_()
    kept = residual if activation != 0 else None  # what the node saves
    with triton_launch.watch(dry=bool(STAND_IN)) as watched:
        invstd, running_var = (stat, None) if batch_stats else (None, stat)
        grads = triton_kernels.batch_norm_backward(grad_y, x.detach(), mean, invstd, running_var, weight, bias, kept,
                                                   eps, activation, negative_slope, mask)
    outputs = {GRAD_X: LIKE_X, GRAD_WEIGHT: LIKE_WEIGHT, GRAD_BIAS: LIKE_BIAS, GRAD_RESIDUAL: LIKE_X}
    known = {X: x, MEAN: mean, STAT: stat, WEIGHT: weight, BIAS: bias, RESIDUAL: kept, GRAD_Y: grad_y}
    known.update({slot: g for slot, g in zip((GRAD_X, GRAD_WEIGHT, GRAD_BIAS, GRAD_RESIDUAL), grads)})
    wanted = {slot: allocation for (slot, allocation), g in zip(outputs.items(), grads) if g is not None}
    return _write(watched, known, wanted, expectations={X: x, MEAN: mean, STAT: stat, WEIGHT: weight, BIAS: bias,
                                                        RESIDUAL: kept, GRAD_Y: grad_y}, device=x.device,
                  requires_grad=False)


def _require_dense(x, residual, per_channel) -> None:
    """The C++ path takes tensors the launchers use as they are: x in one of the two layout families, a
    residual with x's strides, per-channel vectors with stride 1 (anything else is copied by Python)."""
    if layout.dense_geometry(x)[0] is not x:
        raise PlanUnsupported("x needs a copy into a layout family")
    if residual is not None and residual.stride() != x.stride() and residual.numel() > 1:
        raise PlanUnsupported("the residual needs x's strides")
    if any(t is not None and not t.is_contiguous() for t in per_channel):
        raise PlanUnsupported("a per-channel vector with a stride")


class Compiled(NamedTuple):
    """What a plan needs of a compiled kernel variant."""
    name: str
    function: int
    signature: Dict[str, str]  # parameter name -> Triton type after specialisation ("constexpr": not passed)
    num_warps: int
    shared: int
    scratch_pointers: int  # trailing pointer parameters Triton appends (global and profile scratch)
    entry_params: List[str]  # the PTX .entry parameter types, in order


def _write(watched, known: dict, outputs: dict, expectations: dict, device, requires_grad: bool = True):
    """A ``triton_bn_cuda.Plan`` from the watched launches: tensors named by slot (``known``: slot -> the
    tensor of that call; the per-stream counters and the dummy become persistent slots; any other tensor an
    fp32 scratch buffer), each launch's parameters read off its compiled variant."""
    persistent: List[torch.Tensor] = []
    scratch: Dict[int, Tuple[int, int]] = {}  # data_ptr -> (slot, numel)
    by_pointer = {t.data_ptr(): slot for slot, t in known.items() if t is not None}
    standing = {t.data_ptr(): t for t in triton_launch.standing_buffers()}

    def slot_of(t: torch.Tensor) -> int:
        pointer = t.data_ptr()
        if pointer in by_pointer:
            return by_pointer[pointer]
        if pointer in standing:
            persistent.append(standing[pointer])
            by_pointer[pointer] = slot = FIRST_PERSISTENT + len(persistent) - 1
            return slot
        if t.dtype != torch.float32 or t.dim() != 1:
            raise PlanUnsupported(f"an unknown {t.dtype} tensor of shape {tuple(t.shape)}")
        slot = FIRST_SCRATCH + len(scratch)
        scratch[pointer] = (slot, t.numel())
        by_pointer[pointer] = slot
        return slot

    launches, reals, names = [], [], []
    for prepared, args in watched:
        compiled = compiled_variant(prepared.kernel, prepared.grid, args, prepared.kwargs, device)
        params = []
        for name, arg in zip(prepared.kernel.arg_names, args):
            kind = compiled.signature[name]
            if kind == "constexpr":  # specialised away (an int equal to 1, None)
                continue
            if kind.startswith("*"):
                params += [POINTER, slot_of(arg), 0]
            elif kind in ("fp32", "f32"):
                params += [F32, CALL_SCALARS.get(name, -1), 0]
                reals.append(float(arg))
            elif kind in ("i32", "u32"):
                params += [I32, -1, int(arg)]
            elif kind in ("i64", "u64"):
                params += [I64, -1, int(arg)]
            elif kind in ("i1", "i8", "u8"):
                params += [_bool_kind(), -1, int(arg)]
            else:
                raise PlanUnsupported(f"{compiled.name}: parameter {name} of type {kind}")
        params += [NULL_POINTER, -1, 0] * compiled.scratch_pointers
        check_abi(compiled, params[0::3])
        grid = tuple(prepared.grid) + (1,) * (3 - len(prepared.grid))
        launches += [compiled.function, *grid, compiled.num_warps * 32, compiled.shared, len(params) // 3, *params]
        names.append(compiled.name)
    expect = []
    for slot, t in expectations.items():
        if t is None:
            expect += [slot, 0, 0, 0, 0]
        else:
            expect += [slot, 1, _scalar_type(t.dtype), int(_aligned(t)), t.dim(), *t.shape, *t.stride()]
    allocations = [v for slot, allocation in outputs.items()
                   for v in (slot, allocation, known[slot].numel() if allocation == PER_CHANNEL else 0)]
    allocations += [v for slot, numel in scratch.values() for v in (slot, SCRATCH, numel)]
    return torch.ops.triton_bn_cuda.make_plan(expect, allocations, launches, reals, names, persistent, device)


def _bool_kind() -> int:
    """How Triton passes an i1 parameter on this version."""
    return I8 if triton_internals.BOOL_AS_INT8 else I32


_SCALAR_TYPES = {getattr(torch, name): number for name, (_, number) in SCALAR_TYPES.items()}


def _scalar_type(dtype: torch.dtype) -> int:
    """c10::ScalarType's number of a dtype (what the C++ side compares)."""
    return _SCALAR_TYPES[dtype]


# -- compiled variants -----------------------------------------------------------------------------------------
_COMPILED: Dict[tuple, Compiled] = {}


def compiled_variant(kernel, grid, args, kwargs, device) -> Compiled:
    """The variant Triton runs for these arguments: on a GPU the one its launch compiled and loaded (found
    again with ``warmup``); under a stand-in driver compiled for sm_90 on the CPU, specialised by Triton's
    own binder for these arguments."""
    key = (kernel, triton_launch.argument_signature(args), tuple(sorted(kwargs.items())))
    found = _COMPILED.get(key)
    if found is None:
        if getattr(device, "type", "cpu") == "cuda":
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            function = triton_internals.function_handle(compiled)
        else:
            compiled, function = compile_for_sm90(kernel, args, kwargs), 0
        found = _COMPILED[key] = _describe_compiled(compiled, function)
    return found


def compile_for_sm90(kernel, args, kwargs):
    """``kernel`` compiled for a Hopper GPU on this machine, specialised as a launch would for ``args``."""
    from triton.backends.compiler import GPUTarget
    return triton_internals.compile_as_launched(kernel, args, kwargs, GPUTarget("cuda", 90, 32))


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)


def _describe_compiled(compiled, function: int) -> Compiled:
    metadata = compiled.metadata
    for unsupported in ("launch_cooperative_grid", "launch_pdl"):
        if getattr(metadata, unsupported, False):
            raise PlanUnsupported(f"{metadata.name}: {unsupported}")
    if getattr(metadata, "num_ctas", 1) != 1 or getattr(metadata, "global_scratch_size", 0) or \
            getattr(metadata, "profile_scratch_size", 0):
        raise PlanUnsupported(f"{metadata.name}: clusters or scratch memory")
    signature = triton_internals.specialised_signature(compiled)
    entry_params = ptx_entry_params(compiled.asm["ptx"], metadata.name)
    passed = sum(1 for kind in signature.values() if kind != "constexpr")
    return Compiled(metadata.name, function, signature, metadata.num_warps, metadata.shared,
                    len(entry_params) - passed, entry_params)


def ptx_entry_params(ptx: str, name: str) -> List[str]:
    """The types of ``name``'s kernel parameters as its PTX declares them (``.u64``, ``.u32``, ``.f32``...)."""
    for match in _ENTRY.finditer(ptx):
        if match.group(1) == name:
            return [re.search(r"\.param\s+(\.\w+)", p).group(1) for p in match.group(2).split(",") if p.strip()]
    raise PlanUnsupported(f"{name}: no .entry in its PTX")


_PTX_WIDTHS = {POINTER: ".u64", NULL_POINTER: ".u64", I64: ".u64", I32: ".u32", F32: ".f32", I8: ".u8"}


def check_abi(compiled: Compiled, kinds: List[int]) -> None:
    """The parameters a plan packs are the PTX's, in count, order and width: else no plan (a wrong list
    on a GPU is an illegal memory access, not an error)."""
    declared = [".u64" if t in (".b64", ".s64") else ".u32" if t in (".b32", ".s32") else
                ".u8" if t in (".b8", ".s8") else t for t in compiled.entry_params]
    packed = [_PTX_WIDTHS[k] for k in kinds]
    if declared != packed:
        raise PlanUnsupported(f"{compiled.name}: the PTX declares {declared}, the plan packs {packed}")
