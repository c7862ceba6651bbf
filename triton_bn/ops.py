"""The library's PyTorch custom operators (namespace ``triton_bn``).

    triton_bn::batch_stats(x, running_mean!, running_var!, num_batches_tracked, momentum, cumulative, eps)
        -> (mean, invstd)        fp32 [C]; updates the running statistics in place (declared mutated); a
                                 cumulative average reads num_batches_tracked as the count before this batch
    triton_bn::batch_norm_apply(x, mean, invstd?, running_var?, weight, bias, residual, eps, activation,
                                negative_slope) -> y
        exactly one of invstd (batch statistics) and running_var (running ones) given; differentiable: its
        autograd formula is in ``autograd.py`` (shared with the eager path)
    triton_bn::batch_norm_backward(grad_y, x, mean, invstd?, running_var?, weight, bias, residual, eps,
                                   activation, negative_slope, output_mask) -> (dx, dweight, dbias, dresidual)

Why two forward ops: an op that mutates its arguments can not carry an autograd formula, and the
statistics need none of their own. ``batch_stats`` runs on ``x.detach()``; ``batch_norm_apply`` with
an invstd knows that mean/invstd are x's batch statistics, so its backward returns the
full gradient through them. Every op has a fake (meta) implementation, so ``torch.compile`` traces
models that use them without graph breaks. Each op runs the backend ``dispatch.backend_for`` picks for its
input. Eager calls skip the op dispatch (it costs tens of microseconds per call) and reach the same backends
through ``autograd.BatchNormFunction``; ``dispatch.py`` picks the path with ``torch.compiler.is_compiling()``.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .activations import ACTIVATION_IDS
from .autograd import op_backward, op_setup_context


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("triton_bn::batch_stats", mutates_args=("running_mean", "running_var"))
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: float, cumulative: bool,
                eps: float) -> Tuple[Tensor, Tensor]:
    from .functional import check_arguments  # (functional imports this module)
    # functional checked a traced call already; a direct call of the op gets the same errors before any write
    check_arguments(x, running_mean, running_var, None, None, True, None if cumulative else momentum, eps, None,
                     None, num_batches_tracked)
    return dispatch.backend_for(x).batch_stats(x, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                                               eps)


@batch_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    return (x.new_empty(x.shape[1], dtype=_stats_dtype(x)), x.new_empty(x.shape[1], dtype=_stats_dtype(x)))


@torch.library.custom_op("triton_bn::batch_norm_apply", mutates_args=())
def batch_norm_apply(x: Tensor, mean: Tensor, invstd: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                     activation: int, negative_slope: float) -> Tensor:
    from .functional import check_arguments
    if activation not in ACTIVATION_IDS.values():
        raise ValueError(f"triton_bn::batch_norm_apply: unknown activation id {activation}")
    _check_one_statistic(invstd, running_var)
    check_arguments(x, mean, invstd if running_var is None else running_var, weight, bias, False, None, eps, None,
                    residual, None)
    return dispatch.backend_for(x).apply(x, mean, invstd, running_var, weight, bias, residual, eps, activation,
                                         negative_slope)


def _check_one_statistic(invstd, running_var) -> None:
    if (invstd is None) == (running_var is None):
        raise ValueError("triton_bn: give exactly one of invstd (batch statistics) and running_var (running ones)")


@batch_norm_apply.register_fake
def _(x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
    return torch.empty_like(x)


@torch.library.custom_op("triton_bn::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor], eps: float, activation: int, negative_slope: float,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_one_statistic(invstd, running_var)
    grads = dispatch.backend_for(x).backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps,
                                             activation, negative_slope, output_mask)
    # A custom op returns tensors only: an output that was not asked for is an empty placeholder.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@batch_norm_backward.register_fake
def _(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope, output_mask):
    want_dx, want_dweight, want_dbias, want_dresidual = output_mask
    return (torch.empty_like(x) if want_dx else x.new_empty(0),
            torch.empty_like(weight) if (want_dweight and weight is not None) else x.new_empty(0),
            torch.empty_like(bias) if (want_dbias and bias is not None) else x.new_empty(0),
            torch.empty_like(x) if want_dresidual else x.new_empty(0))


batch_norm_apply.register_autograd(op_backward, setup_context=op_setup_context)

