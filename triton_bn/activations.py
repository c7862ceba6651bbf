"""The activation registry: user-facing names, the constexpr ids the kernels branch on, and the
PyTorch function each one must match (used by the pure-PyTorch path and by ``convert_model``)."""
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# name -> kernel id; the ids are mirrored in triton_bn/kernels/activations.py
ACTIVATION_IDS = {
    None: 0,
    "relu": 1,
    "leaky_relu": 2,
    "relu6": 3,
    "silu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
    "hardswish": 7,
    "sigmoid": 8,
}
SUPPORTED_ACTIVATIONS = tuple(name for name in ACTIVATION_IDS if name is not None)


def activation_id(name: Optional[str]) -> int:
    """The kernel id of ``name``; a ValueError that lists the supported names otherwise."""
    try:
        return ACTIVATION_IDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported activation {name!r}; expected None or one of {', '.join(map(repr, SUPPORTED_ACTIVATIONS))}"
        ) from None


def _unchanged(z: torch.Tensor) -> torch.Tensor:
    return z


# name -> (the PyTorch function, its in-place form: the function itself where PyTorch has none, as for GELU);
# leaky_relu, which takes its slope, is made per call
_TORCH_FUNCTIONS = {
    None: (_unchanged, _unchanged),
    "relu": (F.relu, torch.relu_),
    "relu6": (F.relu6, functools.partial(F.relu6, inplace=True)),
    "silu": (F.silu, functools.partial(F.silu, inplace=True)),
    "gelu": (F.gelu, F.gelu),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"),) * 2,
    "hardswish": (F.hardswish, functools.partial(F.hardswish, inplace=True)),
    "sigmoid": (torch.sigmoid, torch.sigmoid_),
}


def torch_activation(name: Optional[str], negative_slope: float = 0.01,
                     inplace: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function that ``name`` stands for (what the fused kernels are tested against). ``inplace``:
    its form that writes into its argument where PyTorch has one, only for a tensor the caller owns outright
    (a layer's fresh output, a new sum)."""
    activation_id(name)
    if name == "leaky_relu":
        return functools.partial(F.leaky_relu_ if inplace else F.leaky_relu, negative_slope=negative_slope)
    return _TORCH_FUNCTIONS[name][inplace]


def torch_activation_grad(name: Optional[str], negative_slope: float = 0.01) -> Callable[[torch.Tensor], torch.Tensor]:
    """d act(z) / dz written with torch ops (the pure-PyTorch path runs inside a custom op, where autograd
    is off), with PyTorch's own choices at the kinks, as in the kernels."""
    activation_id(name)
    sqrt_2_over_pi, coef = math.sqrt(2.0 / math.pi), 0.044715

    def gelu_tanh_grad(z):
        t = torch.tanh(sqrt_2_over_pi * (z + coef * z ** 3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * sqrt_2_over_pi * (1 + 3 * coef * z * z)

    def silu_grad(z):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))

    table = {
        None: torch.ones_like,
        "relu": lambda z: (z > 0).to(z.dtype),
        "leaky_relu": lambda z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope)),
        "relu6": lambda z: ((z > 0) & (z < 6)).to(z.dtype),
        "silu": silu_grad,
        "gelu": lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
        "gelu_tanh": gelu_tanh_grad,
        "hardswish": lambda z: torch.where(z <= -3, torch.zeros_like(z), torch.where(z >= 3, torch.ones_like(z), z / 3 + 0.5)),
        "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    }
    return table[name]
