"""What is measured: shape sets, cases, providers, and the byte counts that define efficiency."""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

SHAPE_SETS: Dict[str, List[Tuple[int, ...]]] = {
    "resnet50": [(128, 64, 112, 112), (128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14),
                 (128, 2048, 7, 7)],
    "small": [(32, 64, 56, 56)],
    "bn1d": [(8192, 1024)],
    "latency": [(1, 64, 56, 56), (1, 256, 14, 14)],
    # what a machine without a GPU runs, through the Triton interpreter
    "tiny": [(4, 8, 6, 6), (64, 16)],
}
QUICK_SETS = ("resnet50", "small", "bn1d", "latency")

# case -> (training, backward, activation, residual, minimal bytes in units of the tensor's size)
CASES: Dict[str, Tuple[bool, bool, Optional[str], bool, int]] = {
    "train_fwd": (True, False, None, False, 2),  # read x, write y
    "train_fwd_relu": (True, False, "relu", False, 2),
    "train_fwdbwd": (True, True, None, False, 5),  # + read x, dy; write dx
    "train_fwdbwd_relu": (True, True, "relu", False, 5),
    "eval_fwd": (False, False, None, False, 2),
    "eval_fwd_relu": (False, False, "relu", False, 2),
    "train_add_relu_fwdbwd": (True, True, "relu", True, 7),  # + read residual, write d residual
}
LATENCY_CASES = ("eval_fwd", "eval_fwd_relu")
PROVIDERS = ("triton_bn", "eager_cudnn", "eager_native", "torch_compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    output: Callable[[], torch.Tensor]  # the forward output of one fresh call, for the error check


def _module(shape, device, activation, provider):
    import triton_bn
    channels = shape[1]
    if provider == "triton_bn":
        cls = triton_bn.BatchNorm1d if len(shape) in (2, 3) else triton_bn.BatchNorm2d
        return cls(channels, activation=activation).to(device)
    cls = torch.nn.BatchNorm1d if len(shape) in (2, 3) else torch.nn.BatchNorm2d
    return cls(channels).to(device)


def build(case: str, provider: str, shape, dtype: torch.dtype, layout: str, device: str,
          seed: int = 0) -> Workload:
    training, backward, activation, with_residual, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last" and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(shape, generator=gen).to(device=device, dtype=dtype) if with_residual else None
    if residual is not None and layout == "channels_last" and len(shape) == 4:
        residual = residual.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x) if backward else None
    module = _module(shape, device, activation, provider).train(training)  # parameters stay fp32
    with torch.no_grad():  # the same parameters for every provider, so outputs can be compared
        module.weight.copy_(torch.rand(shape[1], generator=gen) + 0.5)
        module.bias.copy_(torch.rand(shape[1], generator=gen) - 0.5)

    if provider == "triton_bn":
        def forward(inp, res):
            return module(inp, residual=res)
    else:
        act = F.relu if activation == "relu" else (lambda t: t)

        def forward(inp, res):
            z = module(inp)
            return act(z + res if res is not None else z)
        if provider == "torch_compile":
            # every workload closes over other modules: start dynamo afresh so each gets its own
            # compile instead of running into the recompile limit
            torch._dynamo.reset()
            forward = torch.compile(forward)

    cudnn = provider != "eager_native"

    def call():
        with torch.backends.cudnn.flags(enabled=cudnn):
            if not backward:
                with torch.no_grad():
                    return forward(x, residual)
            inp = x.detach().requires_grad_()
            res = residual.detach().requires_grad_() if residual is not None else None
            y = forward(inp, res)
            y.backward(grad)
            return y

    def output():
        with torch.backends.cudnn.flags(enabled=cudnn), torch.no_grad():
            state = {k: v.clone() for k, v in module.state_dict().items()}
            y = forward(x, residual)
            module.load_state_dict(state)
            return y

    return Workload(call, output)
