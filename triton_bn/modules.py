"""Drop-in modules: ``BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``, so ``isinstance``,
``state_dict`` keys, ``load_state_dict`` both ways, ``reset_parameters``, ``train()``/``eval()`` and
``_check_input_dim`` are PyTorch's own. Only ``forward`` differs: it calls ``triton_bn.batch_norm``
with an optional fused activation and residual."""
import copy
import inspect
from typing import Optional

import torch
from torch import Tensor

from .activations import activation_id, torch_activation
from .functional import SCRIPT_REFUSAL, batch_norm


class FusedBatchNormMixin:
    """The shared part of the three modules (PyTorch's own _BatchNorm.forward logic, but with no host
    read of num_batches_tracked: momentum=None is resolved on the device)."""

    def _init_fused(self, activation: Optional[str], negative_slope: float) -> None:
        activation_id(activation)  # ValueError naming the supported values
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        # parameters and buffers straight from their dicts: nn.Module's __getattr__ costs a microsecond a name
        parameters, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training = self.training
        bn_training = training or (running_mean is None and running_var is None)
        track = not training or self.track_running_stats
        activation, fused = self.activation, residual
        if residual is not None and not fusable(residual, input):
            check_added_residual(residual, input)  # before batch_norm writes the running statistics
            fused, activation = None, None  # added below, after the normalization, as the model's own add would
        y = batch_norm(
            input,
            running_mean if track else None,
            running_var if track else None,
            parameters["weight"], parameters["bias"], bn_training,
            self.momentum, self.eps,
            activation=activation, negative_slope=self.negative_slope, residual=fused,
            num_batches_tracked=buffers["num_batches_tracked"] if (training and self.track_running_stats) else None,
        )
        if fused is not residual:
            return torch_activation(self.activation, self.negative_slope)(y + residual)
        return y

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_REFUSAL)

    def without_activation(self) -> torch.nn.Module:
        """This BN with no fused activation: a twin sharing its parameters, buffers, hooks and mode at this
        moment (a fused forward that falls back to the module's own forward runs the activation itself)."""
        if self.activation is None:
            return self
        twin = copy.copy(self)
        twin.activation = None
        return twin

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text


def fusable(residual, input: Tensor) -> bool:
    """Whether the kernels can add ``residual`` themselves: a tensor of the input's shape, dtype and device.
    Any other (one that broadcasts, a number: what a model's ``out + shortcut`` may meet) is added after the
    normalization, with PyTorch's own add and the activation after it, so that a converted model still
    computes what the original did."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device)


def check_added_residual(residual, input: Tensor) -> None:
    """Raise, before anything is written, what ``bn(input) + residual`` would raise after the normalization for a
    residual the kernels do not add themselves: one that broadcasts against the input (a ``ValueError``
    otherwise), on the input's device or a 0-dimensional CPU tensor (a ``RuntimeError`` otherwise), a real tensor
    or a real number (a ``TypeError`` otherwise). The sum then follows PyTorch's add: its shape is the broadcast
    shape, its dtype the promoted one (a float64 residual on a float32 input gives a float64 output, as the
    original model's ``out + shortcut`` does)."""
    if isinstance(residual, Tensor):
        if residual.is_complex():
            raise TypeError(f"batch_norm: residual must be real, got {residual.dtype}")
        if residual.device != input.device and not (residual.dim() == 0 and residual.device.type == "cpu"):
            raise RuntimeError(f"batch_norm: residual is on {residual.device} but input is on {input.device}")
        try:
            torch.broadcast_shapes(input.shape, residual.shape)
        except RuntimeError:
            raise ValueError(f"batch_norm: residual shape {tuple(residual.shape)} does not broadcast against input "
                             f"shape {tuple(input.shape)}") from None
    elif not isinstance(residual, (int, float)):
        raise TypeError(f"batch_norm: residual must be a Tensor, a real number or None, got {type(residual).__name__}")


def with_fused_signature(init, torch_class):
    """Give ``init`` (which takes ``*args, activation, negative_slope, **kwargs`` and hands the rest to
    ``torch_class.__init__``) the signature of the installed torch's constructor plus the two
    keyword-only fusion arguments. So every argument torch accepts (``bias=`` since torch 2.13,
    ``device=``, ``dtype=``, whatever the next release adds) is accepted and checked by torch itself,
    and ``inspect.signature`` tells the truth."""
    base = inspect.signature(torch_class.__init__)
    extra = [inspect.Parameter("activation", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str]),
             inspect.Parameter("negative_slope", inspect.Parameter.KEYWORD_ONLY, default=0.01, annotation=float)]
    init.__signature__ = base.replace(parameters=list(base.parameters.values()) + extra)
    return init


def _fused_module(torch_class, doc_dims):
    class Fused(FusedBatchNormMixin, torch_class):
        def __init__(self, *args, activation: Optional[str] = None, negative_slope: float = 0.01, **kwargs) -> None:
            torch_class.__init__(self, *args, **kwargs)
            self._init_fused(activation, negative_slope)

    with_fused_signature(Fused.__init__, torch_class)
    Fused.__name__ = Fused.__qualname__ = torch_class.__name__
    Fused.__module__ = __name__
    Fused.__doc__ = (f"``torch.nn.{torch_class.__name__}`` on Triton kernels, for inputs {doc_dims}, with an "
                     "optional fused ``activation`` and ``forward(input, residual=None)`` computing "
                     "``act(bn(input) + residual)`` (fused for a residual of the input's shape, dtype and "
                     "device; any other that PyTorch's add takes is added after the normalization).")
    return Fused


BatchNorm1d = _fused_module(torch.nn.BatchNorm1d, "(N, C) or (N, C, L)")
BatchNorm2d = _fused_module(torch.nn.BatchNorm2d, "(N, C, H, W)")
BatchNorm3d = _fused_module(torch.nn.BatchNorm3d, "(N, C, D, H, W)")


class TailMixin:
    """A BN followed by some of its own child modules, run in the order ``tail`` names them: the pattern
    of timm's ``BatchNormAct2d`` (a BatchNorm2d subclass whose forward ends with ``self.drop`` and
    ``self.act``). ``convert_model`` builds these for such subclasses, keeping the children under their
    original names (so the ``state_dict`` keys stay the original's) and fusing the first of them into
    the kernel when it is a supported activation (that child then becomes ``nn.Identity``)."""

    tail: tuple = ()

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = super().forward(input, residual)
        for name in self.tail:
            out = getattr(self, name)(out)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tail={self.tail!r}"


class BatchNormAct1d(TailMixin, BatchNorm1d):
    """``BatchNorm1d`` then the child modules named in ``tail`` (see ``TailMixin``)."""


class BatchNormAct2d(TailMixin, BatchNorm2d):
    """``BatchNorm2d`` then the child modules named in ``tail`` (see ``TailMixin``)."""


class BatchNormAct3d(TailMixin, BatchNorm3d):
    """``BatchNorm3d`` then the child modules named in ``tail`` (see ``TailMixin``)."""


def has_tail(module: torch.nn.Module) -> bool:
    """Whether anything but identities runs after the BN itself (then nothing may be fused after it)."""
    return any(not isinstance(getattr(module, name), torch.nn.Identity) for name in getattr(module, "tail", ()))


def carry_state(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """Give ``target`` (a fresh BN module) the very parameters, buffers and train/eval mode of ``source``:
    the same tensors, so device, dtype, values and optimizer references stay the original's."""
    target.weight, target.bias = source.weight, source.bias
    target.running_mean, target.running_var = source.running_mean, source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    return target.train(source.training)
