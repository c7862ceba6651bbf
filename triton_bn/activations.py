"""The activation registry: user-facing names, the constexpr ids the kernels branch on, and the
PyTorch function each one must match (used by the pure-PyTorch path and by ``convert_model``)."""
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


def torch_activation(name: Optional[str], negative_slope: float = 0.01) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function that ``name`` stands for (what the fused kernels are tested against)."""
    activation_id(name)
    table = {
        None: lambda z: z,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope),
        "relu6": F.relu6,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid,
    }
    return table[name]
