"""The activation table: one entry per activation, from which everything else is derived or checked.

Each entry holds the user-facing name, the id the kernels branch on (a Triton constexpr, a C++ template
argument), the name of that id as a constant, the PyTorch function it must match (and its in-place form), its
derivative written with torch ops, and what ``convert_model`` recognises as it by type (PyTorch's module
classes, functions and tensor methods; any other module is recognised by behaviour,
``convert.activation_by_behaviour``). Derived from it: ``ACTIVATION_IDS``, ``SUPPORTED_ACTIVATIONS``, the
Triton kernels' constants (``kernels/activations.py``), the C++ kernels' ids (``csrc/cpu/activation_ids.h``,
written by ``python tools/activation_header.py`` and checked against this table by
tests/test_activation_table.py) and the converter's maps. Adding one: docs/adding-an-activation.md."""
import functools
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _unchanged(z: torch.Tensor) -> torch.Tensor:
    return z


_SQRT_2_OVER_PI, _TANH_KAPPA = math.sqrt(2.0 / math.pi), 0.044715


def _gelu_tanh_grad(z, slope):
    t = torch.tanh(_SQRT_2_OVER_PI * (z + _TANH_KAPPA * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_KAPPA * z * z)


def _silu_grad(z, slope):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z, slope):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _hardswish_grad(z, slope):
    return torch.where(z <= -3, torch.zeros_like(z), torch.where(z >= 3, torch.ones_like(z), z / 3 + 0.5))


class Activation(NamedTuple):
    name: Optional[str]
    id: int  # what the kernels branch on (0: none); the table's order
    constant: str  # the id's name: IDENTITY, RELU, ... in Triton (kernels/activations.py); kIdentity, kRelu in C++
    function: Callable  # the PyTorch function it must match (leaky_relu's takes negative_slope)
    in_place: Callable  # its form that writes its argument (the function itself where PyTorch has none: GELU)
    derivative: Callable  # (z, slope) -> d act / dz with torch ops, with PyTorch's choices at the kinks
    modules: Tuple[type, ...] = ()  # PyTorch's classes convert_model takes for it by type
    functions: Tuple[Callable, ...] = ()  # functions convert_model takes for it in a traced forward
    methods: Tuple[str, ...] = ()  # tensor methods likewise
    # whether the C++ kernels compute it in vector registers (kernels.h's activate_vec: the activations an exp, erf
    # or tanh per value make costly, on at::vec::Vectorized); written into activation_ids.h as computed_in_vectors,
    # and what dispatch.activation_pass runs on the native kernels
    vector_math: bool = False


TABLE: Tuple[Activation, ...] = (
    Activation(None, 0, "IDENTITY", _unchanged, _unchanged, lambda z, slope: torch.ones_like(z)),
    Activation("relu", 1, "RELU", F.relu, torch.relu_, lambda z, slope: (z > 0).to(z.dtype), (nn.ReLU,),
               (F.relu, torch.relu, F.relu_, torch.relu_), ("relu", "relu_")),
    Activation("leaky_relu", 2, "LEAKY_RELU", F.leaky_relu, F.leaky_relu_,
               lambda z, slope: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)), (nn.LeakyReLU,),
               (F.leaky_relu, F.leaky_relu_)),
    Activation("relu6", 3, "RELU6", F.relu6, functools.partial(F.relu6, inplace=True),
               lambda z, slope: ((z > 0) & (z < 6)).to(z.dtype), (nn.ReLU6,), (F.relu6,)),
    Activation("silu", 4, "SILU", F.silu, functools.partial(F.silu, inplace=True), _silu_grad, (nn.SiLU,), (F.silu,),
               vector_math=True),
    Activation("gelu", 5, "GELU", F.gelu, F.gelu, _gelu_grad, (nn.GELU,), (F.gelu,), vector_math=True),
    Activation("gelu_tanh", 6, "GELU_TANH", functools.partial(F.gelu, approximate="tanh"),
               functools.partial(F.gelu, approximate="tanh"), _gelu_tanh_grad,  # nn.GELU("tanh"): by its attribute
               vector_math=True),
    Activation("hardswish", 7, "HARDSWISH", F.hardswish, functools.partial(F.hardswish, inplace=True), _hardswish_grad,
               (nn.Hardswish,), (F.hardswish,)),
    Activation("sigmoid", 8, "SIGMOID", torch.sigmoid, torch.sigmoid_,
               lambda z, slope: torch.sigmoid(z) * (1 - torch.sigmoid(z)), (nn.Sigmoid,), (torch.sigmoid, F.sigmoid),
               ("sigmoid", "sigmoid_"), vector_math=True),
)
assert [a.id for a in TABLE] == list(range(len(TABLE))), "the ids are the table's order: 0, 1, 2, ..."
BY_NAME: Dict[Optional[str], Activation] = {a.name: a for a in TABLE}
ACTIVATION_IDS: Dict[Optional[str], int] = {a.name: a.id for a in TABLE}
SUPPORTED_ACTIVATIONS = tuple(a.name for a in TABLE if a.name is not None)


def activation_id(name: Optional[str]) -> int:
    """The kernel id of ``name``; a ValueError that lists the supported names otherwise."""
    try:
        return ACTIVATION_IDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported activation {name!r}; expected None or one of {', '.join(map(repr, SUPPORTED_ACTIVATIONS))}"
        ) from None


def torch_activation(name: Optional[str], negative_slope: float = 0.01,
                     inplace: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function that ``name`` stands for (what the fused kernels are tested against). ``inplace``:
    its form that writes into its argument where PyTorch has one, only for a tensor the caller owns outright
    (a layer's fresh output, a new sum)."""
    activation_id(name)
    entry = BY_NAME[name]
    function = entry.in_place if inplace else entry.function
    if name == "leaky_relu":
        return functools.partial(function, negative_slope=negative_slope)
    return function


def torch_activation_grad(name: Optional[str], negative_slope: float = 0.01) -> Callable[[torch.Tensor], torch.Tensor]:
    """d act(z) / dz written with torch ops (the pure-PyTorch path runs inside a custom op, where autograd
    is off), with PyTorch's own choices at the kinks, as in the kernels."""
    activation_id(name)
    return functools.partial(BY_NAME[name].derivative, slope=negative_slope)
