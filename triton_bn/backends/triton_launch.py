"""How the Triton backend makes a launch, apart from what it launches (``triton_kernels.py``):

- the device guard: Triton launches on the current GPU, so each launcher runs with its input's GPU current;
- the buffers the launchers keep across calls: a private dummy per device (for pointer arguments a kernel's
  flags switch off) and the arrival counters per stream (for the reductions' last-program merge);
- ``watch``: every launch recorded (the C++ launch path writes its plans from what it sees);
- the CUDA graph capture guard: a kernel variant's first launch can not happen inside a capture;
- ``PreparedLaunch``: one kind of call's launch with everything but the tensors fixed, which calls its
  compiled variants directly instead of going through Triton's launcher each time.
GPU-only paths here run on a GPU alone; under the interpreter every launch takes Triton's path.
"""
import contextlib
import functools
import inspect
import threading
from typing import List

import torch

from .. import settings

_dummies = {}


def dummy_buffer(device: torch.device) -> torch.Tensor:
    """A private 1-element buffer for pointer arguments a kernel's flags switch off. Never the input:
    a kernel that wrote through such a pointer by mistake would corrupt only this scratch."""
    dummy = _dummies.get(device)
    if dummy is None:
        dummy = _dummies.setdefault(device, torch.empty(1, dtype=torch.float32, device=device))
    return dummy


def _off_device(x: torch.Tensor) -> bool:
    """Whether x lives on a GPU other than the current one: Triton launches on the current device, so a
    model on cuda:1 while cuda:0 is current would otherwise launch on the wrong GPU."""
    return x.is_cuda and x.device.index != torch.cuda.current_device()


def input_device(x: torch.Tensor):
    """A context that makes x's GPU the current device."""
    return torch.cuda.device(x.device) if _off_device(x) else contextlib.nullcontext()


def on_input_device(launcher):
    """Run ``launcher`` with its first tensor argument's GPU as the current device."""
    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        if _off_device(first):
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return wrapper


# Under a stand-in CUDA driver (TRITON_BN_CUDA_DRIVER=record or null: tests and host-cost measurements of
# the C++ launch path, cpp_launch.py) CPU tensors take the kernel path as CUDA tensors would, and nothing is
# launched from Python: the launches are only watched.
CUDA_DRIVER = settings.get("TRITON_BN_CUDA_DRIVER")  # "real", "record" or "null" (cpp_launch.py reads it here)
STAND_IN = CUDA_DRIVER in ("record", "null")


_watching = threading.local()


@contextlib.contextmanager
def watch(dry: bool = False):
    """Collect the (PreparedLaunch, arguments) of every launch the launchers make on this thread meanwhile (the
    tuner's candidate runs are not among them); ``dry``: collect them without launching (cpp_launch.py writes its
    plans from them)."""
    previous = getattr(_watching, "state", None)
    launches = []
    _watching.state = (launches, dry)
    try:
        yield launches
    finally:
        _watching.state = previous


def current_stream(device_index: int) -> int:
    """The raw handle of the device's current CUDA stream, as Triton's CUDA driver reads it (no
    ``torch.cuda.Stream`` object built, which costs microseconds per call)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def standing_buffers() -> List[torch.Tensor]:
    """The buffers the launchers keep across calls (the per-device dummies and the per-stream arrival counters):
    what a C++ plan holds as persistent slots instead of per-call tensors (cpp_launch.py)."""
    return list(_dummies.values()) + list(_COUNTERS.values())


# -- arrival counters -------------------------------------------------------------------------------------
_COUNTERS = {}  # (device, stream) -> int32 zeros: every reduction leaves its counters at zero
_COUNTERS_LOCK = threading.Lock()


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Zeroed int32 counters, one per channel block of a reduction (merge.last_to_arrive). Kernels on
    one stream run one after another and each resets what it used, so one buffer per stream serves every
    call; two streams never share one. Inside a CUDA graph capture the buffer is allocated (and its
    zeroing captured) for that call alone: a buffer from the graph's private memory must not be kept."""
    stream = current_stream(device.index) if device.type == "cuda" else 0
    if stream and torch.cuda.is_current_stream_capturing():
        return torch.zeros(needed, dtype=torch.int32, device=device)
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is not None and counters.numel() >= needed:
        return counters
    with _COUNTERS_LOCK:  # growing: one thread at a time, so that no two buffers serve one stream
        counters = _COUNTERS.get(key)
        if counters is None or counters.numel() < needed:
            counters = _COUNTERS[key] = torch.zeros(max(needed, 1024), dtype=torch.int32, device=device)
    return counters


# -- launching --------------------------------------------------------------------------------------------
def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_first_launch_in_capture(kernel, grid, args, kwargs) -> None:
    """Inside a CUDA graph capture, a kernel variant that never ran in this process can not run: its
    first launch loads its module, which a capturing stream refuses (after compiling it, which is
    allowed). ``warmup`` compiles or finds the variant without launching it; an unloaded module means
    this would be its first launch: say so before the capture breaks."""
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    if getattr(compiled, "module", None) is None:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "a kernel")
        raise RuntimeError(
            f"triton_bn: {name} would run for the first time in this form (these shapes, dtypes, layouts and "
            "flags) inside a CUDA graph capture, where its module can not be loaded. Warm up first: run the same "
            "step (forward and backward) once before capturing.")


def launch_through_triton(kernel, grid, args, kwargs, device: torch.device):
    """Triton's own launch path: specialize every argument, find (or compile) the variant, launch it.
    Returns what Triton returns: the compiled variant."""
    if capturing(device):
        refuse_first_launch_in_capture(kernel, grid, args, kwargs)
    return kernel[grid](*args, **kwargs)


# Whether a prepared launch may call its compiled variants directly (``PreparedLaunch``); TRITON_BN_DIRECT_LAUNCH=0
# (read at import) sends every launch through Triton's JITFunction, for comparison or if a Triton release
# ever breaks the direct call.
DIRECT_LAUNCH = settings.flag("TRITON_BN_DIRECT_LAUNCH")


def argument_signature(args) -> tuple:
    """A hashable key that tells apart every argument list Triton would specialize differently: a tensor by
    its dtype and whether its address is 16-byte aligned, an int by its value (Triton specializes ints on
    being 1, on divisibility by 16 and on needing 64 bits), anything else by its type alone (Triton passes
    every Python float as fp32 and never specializes on its value: a changing scalar or a NaN never misses)."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else
                  (a if a.__class__ is int else a.__class__) for a in args])


class PreparedLaunch:
    """One kind of call's launch, prepared: kernel, grid and keywords (constexprs, warps, stages) fixed; only the
    tensors and scalars change from call to call.

    Triton's ``kernel[grid](...)`` redoes on every call what a prepared launch already knows: it specializes each
    argument, builds a cache key from the specialization and the options, checks the kernel's globals,
    and only then launches. On an H100 host a 3-argument kernel launches in ~17 us that way against ~10 us
    through its compiled variant's own launcher, and these kernels, with 20-30 arguments, save 20-28 us per
    launch (perf/NOTES.md, GPU run 8); a converted model's training step launches four times per layer.
    So the first launch of each ``argument_signature`` takes Triton's path (which compiles or finds the
    variant), and later launches with that signature call the compiled variant directly
    (``CompiledKernel[grid]``: Triton's own launcher for an already compiled kernel, with its launch
    hooks). CPU tensors (the interpreter) always take Triton's path, and so does a signature's first launch
    inside a CUDA graph capture, where ``launch_through_triton`` refuses a variant that never ran."""
    __slots__ = ("kernel", "grid", "kwargs", "constexpr_values", "variants")

    def __init__(self, kernel, grid, kwargs):
        self.kernel, self.grid, self.kwargs = kernel, tuple(grid), kwargs
        self.constexpr_values = None  # the values after the positional arguments, in parameter order
        self.variants = {}  # argument_signature -> the compiled variant's launcher for this grid

    def __call__(self, args, device: torch.device) -> None:
        watching = getattr(_watching, "state", None)
        if watching is not None:
            watching[0].append((self, args))
            if watching[1]:
                return
        if STAND_IN and device.type != "cuda":
            return  # a stand-in driver's CPU tensors: nothing runs on them (cpp_launch.py)
        if not (DIRECT_LAUNCH and device.type == "cuda"):
            launch_through_triton(self.kernel, self.grid, args, self.kwargs, device)
            return
        key = argument_signature(args)
        runner = self.variants.get(key, _UNSEEN)
        if runner is None or runner is _UNSEEN:  # Triton's path (which guards a first launch inside a capture)
            compiled = launch_through_triton(self.kernel, self.grid, args, self.kwargs, device)
            if runner is _UNSEEN:  # once per signature (a racing thread at worst does this twice)
                self.variants[key] = self._direct_runner(compiled, len(args))
            return
        # a variant launched before, so its module is loaded: safe inside a CUDA graph capture too
        runner(*args, *self.constexpr_values, stream=current_stream(device.index))

    def _direct_runner(self, compiled, positional: int):
        """``compiled``'s launcher for this grid; None (Triton's path every time) where Triton returned no
        compiled kernel or the kernel is not a plain JITFunction (a test's wrapper, pre-run hooks)."""
        fn = getattr(self.kernel, "fn", None)
        if compiled is None or fn is None or getattr(self.kernel, "pre_run_hooks", None) \
                or not hasattr(compiled, "__getitem__"):
            return None
        if self.constexpr_values is None:
            params = list(inspect.signature(fn).parameters.values())[positional:]
            self.constexpr_values = tuple(self.kwargs[p.name] if p.name in self.kwargs else p.default
                                          for p in params)
        return compiled[self.grid + (1,) * (3 - len(self.grid))]


_UNSEEN = object()


