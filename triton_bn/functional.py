"""``triton_bn.batch_norm``: ``torch.nn.functional.batch_norm`` argument for argument, plus a fused
activation and residual add. Every argument is checked here, before anything is written: a bad call
raises and leaves the input, the parameters and the running statistics exactly as they were."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, ops  # noqa: F401  (ops registers the torch.ops.triton_bn operators)
from .activations import activation_id
from .backends import cpp_launch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUPPORTED_DTYPE_SET = frozenset(SUPPORTED_DTYPES)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: Optional[float] = 0.1, eps: float = 1e-5, *, activation: Optional[str] = None,
               negative_slope: float = 0.01, residual: Optional[Tensor] = None,
               num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Batch normalization over dim 1 of ``input`` ([N, C, *]), then ``act(... + residual)``.

    Args:
        input: [N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]; fp32, fp16 or bf16 (the kernels), or
            float64 (the pure-PyTorch path, on any device); any memory format.
        running_mean, running_var: [C] buffers or both None. Updated in place when ``training``.
        weight, bias: [C] or None. May be fp32 while ``input`` is fp16/bf16.
        training: use batch statistics (and update the running ones); else use the running ones.
        momentum: weight of the new batch in the running average. None means a cumulative average,
            which needs ``num_batches_tracked``.
        eps: added to the variance.
        activation: None, "relu", "leaky_relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish" or
            "sigmoid" (``triton_bn.SUPPORTED_ACTIVATIONS``).
        negative_slope: the slope of "leaky_relu".
        residual: a tensor of input's shape and dtype added before the activation.
        num_batches_tracked: a 1-element int64 tensor (the module's buffer). When given in training
            with running statistics it is incremented, as ``nn.BatchNorm`` does.
    Returns: a tensor of input's shape, dtype and memory format.
    """
    arguments = (input, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope,
                 residual, num_batches_tracked)
    if cpp_launch.ACTIVE:  # the C++ launch path (TRITON_BN_CPP_LAUNCH=1): a call like one it already served,
        try:                  # taken before the checks below: C++ makes its own, before any write
            y = cpp_launch.known_call(*arguments)
        except (TypeError, ValueError, RuntimeError):
            # C++ refused the call before any write (its own checks, or pybind's on the argument types): a bad
            # call gets the error the checks below give on every path, the same type and message
            _checked_activation(*arguments)
            raise  # the call passes those checks: C++'s error is the answer
        if y is not None:
            return y
    elif training is False:  # a plain eval call on the native CPU kernels: C++ checks it (dispatch.known_eval_call)
        y = dispatch.known_eval_call(input, running_mean, running_var, weight, bias, eps, activation, negative_slope,
                                     residual, num_batches_tracked)
        if y is not None:
            return y
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0 and all(
            isinstance(t, Tensor) and t.numel() == 0 for t in (running_mean, running_var, weight, bias) if t is not None):
        return input.clone()  # PyTorch reads a 1-D input as zero channels: an empty one is an empty result
    act = _checked_activation(*arguments)
    # -- nothing above writes; everything below may --
    return dispatch.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, float(eps), act,
                               float(negative_slope), residual, num_batches_tracked)


# What a module of triton_bn says to torch.jit.script (through __prepare_scriptable__, which TorchScript calls on
# every module it is about to compile), instead of an error from deep inside the compiler.
SCRIPT_REFUSAL = ("triton_bn: torch.jit.script can not compile triton_bn's modules (their forward calls Triton "
                  "kernels and C++ operators from Python). Routes to a program that runs without triton_bn: "
                  "torch.export.export (and torch.onnx.export(..., dynamo=True)), torch.jit.trace, or loading the "
                  "converted model's state_dict into the original model class (docs/deploy.md).")


def _checked_activation(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                        negative_slope, residual, num_batches_tracked) -> int:
    """Every check of ``batch_norm``'s arguments (raising the documented error); the activation's kernel id."""
    act = check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                           residual, num_batches_tracked)
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"batch_norm: negative_slope must be a number, got {type(negative_slope).__name__}")
    return act


def check_fused_residual(residual, input: Tensor, who: str = "batch_norm") -> None:
    """A residual the kernels add: a Tensor of the input's shape (ValueError), dtype (TypeError) and device
    (RuntimeError)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"{who}: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(f"{who}: residual shape {tuple(residual.shape)} differs from input shape {tuple(input.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"{who}: residual dtype {residual.dtype} differs from input dtype {input.dtype}")
    if residual.device != input.device:
        raise RuntimeError(f"{who}: residual is on {residual.device} but input is on {input.device}")


def _check_running_statistics(running_mean: Tensor, running_var: Tensor, training: bool) -> None:
    """Buffers, not parameters: PyTorch refuses running statistics that require grad while grad mode is on
    (in training and in eval alike), and so do we, on every path and dtype. In training they are written in
    place, so neither may have elements that share memory (a stride-0 ``expand``) or overlap the other:
    PyTorch writes such buffers silently and leaves them holding one of the channels' values; we refuse them.
    (On every call with running statistics: the usual dense pair costs two contiguity tests and two addresses.)"""
    if (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        raise ValueError("batch_norm: running_mean and running_var must not require grad (they are buffers, "
                         "updated in place; PyTorch refuses them too). Detach them, or call under torch.no_grad()")
    if not training:
        return
    dense = running_mean.is_contiguous() and running_var.is_contiguous()
    if not dense:  # a view: stride 0 is possible
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.stride(0) == 0 and t.shape[0] > 1:
                raise ValueError(f"batch_norm: {name} is written in training, but its {t.shape[0]} elements share "
                                 "one memory location (stride 0, as from expand()): pass a tensor of its own (.clone())")
    if running_mean is running_var or (not torch.compiler.is_compiling()  # no addresses while tracing
                                       and _spans_overlap(running_mean, running_var, dense)):
        raise ValueError("batch_norm: running_mean and running_var share memory and are both written in training: "
                         "pass two separate tensors")


def _spans_overlap(a: Tensor, b: Tensor, dense: bool) -> bool:
    """Whether the byte ranges two 1-D tensors span intersect (a cheap, conservative test of shared memory;
    never for tensors without memory: empty, or meta, whose addresses are 0). ``dense``: both contiguous."""
    start_a, start_b = a.data_ptr(), b.data_ptr()
    if not (start_a and start_b):
        return False
    if dense:
        return start_a < start_b + b.nbytes and start_b < start_a + a.nbytes
    end_a = start_a + ((a.shape[0] - 1) * a.stride(0) + 1) * a.element_size()
    end_b = start_b + ((b.shape[0] - 1) * b.stride(0) + 1) * b.element_size()
    return start_a < end_b and start_b < end_a


def check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                     residual, num_batches_tracked, check_batch_size: bool = True) -> int:
    """All validation, in one place; returns the activation's kernel id. SyncBatchNorm passes
    ``check_batch_size=False``: there the count that matters is the global one."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected an input of at least 2 dimensions [N, C, *], got shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in _SUPPORTED_DTYPE_SET:  # one test when all is well
        raise TypeError(f"batch_norm: unsupported input dtype {input.dtype}; expected float32, float16, bfloat16 "
                        f"or float64")
    act = activation_id(activation)
    channels = input.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("batch_norm: running_mean and running_var are required when training=False")
    device, shape = input.device, (channels,)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if isinstance(t, Tensor) and t.dtype in _SUPPORTED_DTYPE_SET and t.shape == shape and t.device == device:
            continue  # the usual case, in four cheap tests; anything else gets the detailed checks below
        if not isinstance(t, Tensor):
            raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"batch_norm: {name} must have shape ({channels},) to match input's {channels} "
                             f"channels, got {tuple(t.shape)}")
        if not t.is_floating_point() or t.is_complex():
            raise TypeError(f"batch_norm: {name} must be floating point, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"batch_norm: {name} is on {t.device} but input is on {input.device}")
    if running_mean is not None:
        _check_running_statistics(running_mean, running_var, training)
    if residual is not None:
        check_fused_residual(residual, input)
    if training:
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"batch_norm: eps must be > 0 in training, got {eps}")
        if check_batch_size and input.numel() > 0 and input.numel() // channels == 1:
            # PyTorch's own message (torch.nn.functional._verify_batch_size)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if running_mean is not None:
            if momentum is None:
                if num_batches_tracked is None:
                    raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
            elif not (isinstance(momentum, (int, float)) and math.isfinite(momentum)):
                raise ValueError(f"batch_norm: momentum must be a finite number or None, got {momentum!r}")
    elif not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"batch_norm: eps must be >= 0, got {eps}")
    if num_batches_tracked is not None and (not isinstance(num_batches_tracked, Tensor)
                                            or num_batches_tracked.numel() != 1
                                            or num_batches_tracked.device != input.device):
        raise ValueError("batch_norm: num_batches_tracked must be a 1-element tensor on input's device")
    return act
