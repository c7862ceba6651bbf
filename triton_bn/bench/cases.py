"""What is measured: shape sets, cases, providers, and the byte counts that define efficiency."""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..activations import torch_activation
from ..backends.layout import CHANNELS_LAST_FORMATS

SHAPE_SETS: Dict[str, List[Tuple[int, ...]]] = {
    "resnet50": [(128, 64, 112, 112), (128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14),
                 (128, 2048, 7, 7)],
    "small": [(32, 64, 56, 56)],
    "bn1d": [(8192, 1024)],
    "latency": [(1, 64, 56, 56), (1, 256, 14, 14)],
    # the CPU path on a small machine (about a minute on two cores): small (and a 3-D input), ResNet-50's layers
    # at batch 2, BN1d
    "cpu_small": [(16, 64, 28, 28), (32, 64, 56, 56), (4, 32, 8, 16, 16)],
    "cpu_resnet50": [(2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28), (2, 1024, 14, 14), (2, 2048, 7, 7)],
    "cpu_bn1d": [(2048, 1024)],
    # --quick on a CPU: the three largest of ResNet-50's layers at batch 2, where a BN's time is its bytes'
    "cpu_quick": [(2, 64, 112, 112), (2, 256, 56, 56), (2, 512, 28, 28)],
    # the interpreter's smoke run
    "tiny": [(4, 8, 6, 6), (64, 16)],
}
QUICK_SETS = ("resnet50", "small", "bn1d", "latency")
CPU_SETS = ("cpu_small", "cpu_resnet50", "cpu_bn1d")

# case -> (training, backward, activation, residual, minimal bytes in units of the tensor's size)
CASES: Dict[str, Tuple[bool, bool, Optional[str], bool, int]] = {
    "train_fwd": (True, False, None, False, 2),  # read x, write y
    "train_fwd_relu": (True, False, "relu", False, 2),
    "train_fwdbwd": (True, True, None, False, 5),  # + read x, dy; write dx
    "train_fwdbwd_relu": (True, True, "relu", False, 5),
    "eval_fwd": (False, False, None, False, 2),
    "eval_fwd_relu": (False, False, "relu", False, 2),
    "train_add_relu_fwdbwd": (True, True, "relu", True, 7),  # + read residual, write d residual
    # the transcendental activations (SiLU: EfficientNet, MobileNetV3's later blocks; GELU), asked for by name
    "train_fwd_silu": (True, False, "silu", False, 2),
    "train_fwdbwd_silu": (True, True, "silu", False, 5),
    "eval_fwd_silu": (False, False, "silu", False, 2),
    "train_fwd_gelu": (True, False, "gelu", False, 2),
    "train_fwdbwd_gelu": (True, True, "gelu", False, 5),
    "eval_fwd_gelu": (False, False, "gelu", False, 2),
}
# what a run measures without --cases: plain BN, BN + ReLU and BN + add + ReLU
DEFAULT_CASES = ("train_fwd", "train_fwd_relu", "train_fwdbwd", "train_fwdbwd_relu", "eval_fwd", "eval_fwd_relu",
                 "train_add_relu_fwdbwd")
# the order a run measures cases in: those the [speed] targets name (BN+ReLU training, eval) first
CASE_PRIORITY = ("train_fwd_relu", "train_fwdbwd_relu", "eval_fwd_relu", "train_add_relu_fwdbwd", "train_fwd",
                 "train_fwdbwd", "eval_fwd", "train_fwd_silu", "train_fwdbwd_silu", "eval_fwd_silu", "train_fwd_gelu",
                 "train_fwdbwd_gelu", "eval_fwd_gelu")
assert sorted(CASE_PRIORITY) == sorted(CASES) and set(DEFAULT_CASES) <= set(CASES)
LATENCY_CASES = ("eval_fwd", "eval_fwd_relu")
PROVIDERS = ("triton_bn", "eager_cudnn", "eager_native", "torch_compile")
# not a provider (never timed): the same inputs in float64 through PyTorch, what every provider's results
# (y, gradients, running statistics) are compared with
REFERENCE = "float64"
GPU_ONLY_PROVIDERS = ("eager_cudnn",)  # cuDNN is a CUDA library
# the latency set on a GPU also times these, each captured in a CUDA graph and replayed
GRAPH_PROVIDERS = ("triton_bn", "eager_cudnn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# what a full GPU run measures: the kernels' dtypes (float64 takes the pure-PyTorch path on every device)
GPU_DTYPES = ("fp32", "bf16", "fp16")
LAYOUTS = ("nchw", "channels_last")


def minimal_bytes(case: str, shape, dtype: torch.dtype) -> int:
    """The fewest bytes the case must move: each tensor read or written once (the efficiency floor)."""
    return CASES[case][4] * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def efficiency(case: str, shape, dtype: torch.dtype, ms: float, copy_gbps: float) -> float:
    """Fraction of the measured copy bandwidth: minimal bytes / copy bandwidth / time."""
    return minimal_bytes(case, shape, dtype) / (copy_gbps * 1e9) / (ms * 1e-3)


@dataclass
class Workload:
    """One (case, shape, dtype, layout) measured for one provider: ``run()`` is what is timed."""
    run: Callable[[], object]
    # every result of one fresh call, for the error check: y; dx, dweight, dbias (and d residual) of a backward
    # case; the updated running statistics of a training case
    output: Callable[[], Tuple[torch.Tensor, ...]]


def _torch_batch_norm(x, running_mean, running_var, weight, bias, residual, training: bool,
                      activation: Optional[str]):
    """PyTorch's BN (+ add) (+ its activation module's function), the anchors' function. Module state
    arrives as tensors, so one compiled version of it serves every module and (with dynamic shapes) every
    size of a case."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    if residual is not None:
        z = z + residual
    return torch_activation(activation)(z)


def _triton_batch_norm(x, running_mean, running_var, weight, bias, residual, training: bool,
                       activation: Optional[str]):
    import triton_bn
    return triton_bn.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                                activation=activation, residual=residual)


_COMPILED: Dict[tuple, Callable] = {}


def compiled_torch_batch_norm(dynamic: Optional[bool]) -> Callable:
    """One torch.compile'd anchor per dynamic setting (recompiles per case are bounded by dynamo's limit,
    raised in ``cli.py``)."""
    if dynamic not in _COMPILED:
        _COMPILED[dynamic] = torch.compile(_torch_batch_norm, dynamic=dynamic)
    return _COMPILED[dynamic]


def build(case: str, provider: str, shape, dtype: torch.dtype, layout: str, device: str, seed: int = 0,
          compile_dynamic: Optional[bool] = None, cuda_graph: bool = False) -> Workload:
    training, backward, activation, with_residual, _ = CASES[case]
    # drawn on the device: a 100M-element tensor drawn on the host costs seconds per provider
    gen = torch.Generator(device=device).manual_seed(seed)
    # "channels_last": channels innermost, channels_last_3d for a 5-D shape (a 2-D (N, C) shape has one layout)
    fmt = CHANNELS_LAST_FORMATS.get(len(shape), torch.contiguous_format) if layout == "channels_last" \
        else torch.contiguous_format
    x = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=fmt)
    residual = (torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=fmt)
                if with_residual else None)
    # from the seeded generator too: every provider gets the same dy, so their gradients can be compared
    grad = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=fmt) if backward else None
    channels = shape[1]
    # the same parameters and statistics for every provider, so outputs can be compared: fp32, as a
    # mixed-precision model has them, or float64 for a float64 model (PyTorch's CPU kernels take no other)
    per_channel = dict(generator=gen, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weight = torch.rand(channels, **per_channel) + 0.5
    bias = torch.rand(channels, **per_channel) - 0.5
    running_mean = torch.randn(channels, **per_channel) * 0.1
    running_var = torch.rand(channels, **per_channel) + 0.5
    if provider == REFERENCE:  # the very same values, in float64
        x, residual, grad, weight, bias, running_mean, running_var = (
            None if t is None else t.double().contiguous(memory_format=fmt) if t.dim() > 1 else t.double()
            for t in (x, residual, grad, weight, bias, running_mean, running_var))
    if backward:
        weight.requires_grad_()
        bias.requires_grad_()
    if provider == "triton_bn":
        fn = _triton_batch_norm
    elif provider == "torch_compile":
        fn = compiled_torch_batch_norm(compile_dynamic)
    else:
        fn = _torch_batch_norm
    cudnn = provider not in ("eager_native", REFERENCE)
    # cuDNN on or off is what tells eager_cudnn from eager_native on a GPU. On a CPU the switch means nothing,
    # and entering torch.backends.cudnn.flags costs ~10 us a call (AMD EPYC VM), added alike to every provider:
    # a 100-us row's ratio pulled a tenth of the way towards 1
    cudnn_setting = (lambda: torch.backends.cudnn.flags(enabled=cudnn)) if x.is_cuda else contextlib.nullcontext

    def call():
        with cudnn_setting():
            if not backward:
                with torch.no_grad():
                    return fn(x, running_mean, running_var, weight, bias, residual, training, activation)
            inp = x.detach().requires_grad_()
            res = residual.detach().requires_grad_() if residual is not None else None
            y = fn(inp, running_mean, running_var, weight, bias, res, training, activation)
            y.backward(grad)
            return y

    def output():
        saved = (running_mean.clone(), running_var.clone())
        with cudnn_setting():
            if backward:
                weight.grad = bias.grad = None
                inp = x.detach().requires_grad_()
                res = residual.detach().requires_grad_() if residual is not None else None
                y = fn(inp, running_mean, running_var, weight, bias, res, training, activation)
                y.backward(grad)
                parts = [y.detach(), inp.grad, weight.grad, bias.grad] + ([res.grad] if res is not None else [])
                weight.grad = bias.grad = None
            else:
                with torch.no_grad():
                    parts = [fn(x, running_mean, running_var, weight, bias, residual, training, activation)]
        if training:
            parts += [running_mean.clone(), running_var.clone()]
        running_mean.copy_(saved[0])
        running_var.copy_(saved[1])
        return tuple(parts)

    if cuda_graph:
        call = _graph_replay(call)
    return Workload(call, output)


def worst_relative_error(parts, reference) -> float:
    """The largest relative error (norm of the difference over the norm of the reference) over the
    results of ``Workload.output``, compared in the reference's dtype."""
    return max(((part.to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-30)).item()
               for part, ref in zip(parts, reference))


def _graph_replay(call: Callable[[], object]) -> Callable[[], object]:
    """Capture ``call`` in a CUDA graph after a warm-up on a side stream; return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay
