"""The backends: what computes a call once ``dispatch.py`` has chosen. Each is a ``Backend``, the same seven
functions with the same arguments, so that the autograd formula (``autograd.py``), the custom ops (``ops.py``)
and SyncBatchNorm (``sync.py``) run on any of them:

    training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual, momentum, cumulative,
             eps, activation, negative_slope)            -> (y, mean, invstd); running statistics updated once,
                                                            the batch counted in num_batches_tracked (if given)
    apply(x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope) -> y
                                                            exactly one of invstd (batch statistics: their
                                                            gradient terms in the backward) and running_var
                                                            (running statistics, a frozen table) given
    backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope,
             output_mask)                                -> (dx, dweight, dbias, d residual), None where unasked
    batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps) -> (mean, invstd)
    moments(x)                                           -> [3, C] (count, mean, M2), for SyncBatchNorm
    backward_sums(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope,
                  grad_weight=None, grad_bias=None)      -> [2, C] (sum dz, sum dz * xhat)
    backward_elementwise(grad_y, x, mean, invstd, running_var, weight, bias, residual, sums, inv_count, eps,
                         activation, negative_slope, want_dx, want_dresidual) -> (dx, d residual)

The first three are whole calls; the last four are the steps of a call split across processes or ops
(SyncBatchNorm, torch.compile's custom ops). Where they live:
- the Triton kernels (``triton_kernels.py``: launchers, grids and tuning; ``kernels/``): CUDA tensors, and CPU
  tensors under the Triton interpreter; every function;
- the native CPU kernels (``native_cpu.py``, built from ``csrc/cpu/``): whole calls on dense CPU tensors;
- PyTorch's own kernels with the epilogue after them (``pytorch_kernels.py``): whole calls elsewhere (other
  strides, float64 off the CPU, no compiler). These two offer ``evaluate`` (running statistics only);
  ``dispatch.py`` makes their ``apply`` of it, batch statistics going to the step functions;
- the step functions of ``spec.py`` (the specification, torch ops): the steps off the Triton kernels, and
  whole calls on an empty batch;
- the C++ launch path (``cpp_launch.py``, opt-in) is a way of launching the Triton kernels, chosen by
  ``dispatch.py`` before any of these.

Arguments arrive checked (``functional.check_arguments``); activation is a kernel id (``activations.TABLE``).
"""
from typing import Callable, NamedTuple, Optional

import torch

from ..activations import ACTIVATION_IDS

PLAIN_NUMBERS = (float, int)  # what a known call takes for a number (not a bool, a tensor or numpy's)


def known_call_activation(activation, eps, negative_slope) -> Optional[int]:
    """The activation's kernel id for a call taken before ``functional``'s checks (the C++ launch path's known
    call, the native kernels' known eval call), or None where anything is unusual: an activation that is not
    one of the table's names, an eps or negative_slope that is not a plain number (a bool, a NaN eps). Such a
    call goes the long way, whose checks raise the documented error."""
    act = ACTIVATION_IDS.get(activation) if activation is None or type(activation) is str else None
    if act is None or type(eps) not in PLAIN_NUMBERS or type(negative_slope) not in PLAIN_NUMBERS or eps != eps:
        return None
    return act


class Backend(NamedTuple):
    """One backend's seven functions (the module docstring gives their arguments)."""
    name: str
    training: Callable
    apply: Callable
    backward: Callable
    batch_stats: Callable
    moments: Callable
    backward_sums: Callable
    backward_elementwise: Callable


def kernel_statistic(invstd, running_var):
    """(stat, batch_stats): the one per-channel vector the kernels read beside the mean, and whether it is invstd
    (batch statistics) rather than the running variance. The kernels' ABI (Triton and C++ alike) takes one
    pointer and a flag; the interfaces above take the two statistics by name."""
    return (invstd, True) if invstd is not None else (running_var, False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype every backend computes and keeps statistics in: float64 for float64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor):
    """Every dim but the channels' (dim 1): what a per-channel statistic reduces over."""
    return [d for d in range(x.dim()) if d != 1]


def host_factor(running_mean, num_batches_tracked, momentum: float, cumulative: bool) -> float:
    """The weight of this batch in the running average, as a number: PyTorch's kernels and the native ones
    take it so, and a cumulative one (1 / (count before this batch + 1)) is read on the host."""
    return (1.0 / (float(num_batches_tracked) + 1)) if (cumulative and running_mean is not None) else momentum


def in_parameter_dtypes(grads, weight, bias):
    """(dx, dweight, dbias, d residual) with dweight and dbias in the parameters' own dtype, as the step functions
    give them (the CPU backends compute them in the compute dtype)."""
    grad_x, grad_weight, grad_bias, grad_residual = grads
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias, grad_residual
