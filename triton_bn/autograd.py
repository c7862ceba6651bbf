"""The autograd formula of batch norm (+ activation, + residual). No Triton code here.

Four entry points share one formula:
- ``BatchNormFunction`` (a ``torch.autograd.Function``) is the eager path given the statistics: it calls
  the launchers directly, because the Python dispatch of a custom op costs tens of microseconds per call,
  which is more than a small BN layer's whole GPU time.
- ``TrainingBatchNormFunction`` is the eager training forward from x (statistics, running update, y in one
  launcher call), with the same backward.
- ``training_with_backward`` picks between that Function and the native CPU op whose C++ autograd node
  records the same backward (``csrc/node/``).
- ``op_setup_context`` / ``op_backward`` are registered (``ops.py``) as the autograd formula of the
  custom op ``triton_bn::batch_norm_apply``, which is what ``torch.compile`` traces.

What is saved for backward: x and the per-channel vectors (mean, invstd or running var, weight,
bias). Never y or the pre-activation on the kernels: they recompute z = (x - mean) * scale + b from
them. The one exception is forced by the math: with a residual *and* an activation, act'(z) needs
z = bn(x) + residual, so the residual tensor is kept by reference (no copy). With a residual and no
activation nothing is kept for it (d residual = dy). The pure-PyTorch path comes through here too.
"""
import functools

import torch
from torch.autograd.function import once_differentiable

from . import launch, native, reference


def _differentiable_once(backward):
    """``once_differentiable`` (the kernels' gradients are not differentiable again: a double backward
    raises instead of silently dropping terms), paid for only where it can matter. The engine runs a
    backward with grad mode on only under ``create_graph=True``; otherwise ``once_differentiable`` just
    calls the backward inside a ``no_grad`` block, which this skips (a few microseconds per call)."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            return guarded(ctx, *grad_outputs)
        return backward(ctx, *grad_outputs)
    return wrapper


def _save(ctx, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope):
    keep_residual = residual if (residual is not None and activation != 0) else None
    ctx.save_for_backward(x, mean, stat, weight, bias, keep_residual)
    ctx.config = (eps, batch_stats, activation, negative_slope)
    ctx.has_residual = residual is not None


def _gradients(ctx, grad_y, backward, needs):
    """(dx, dweight, dbias, dresidual), each None unless ``needs`` (the needs_input_grad of x, weight,
    bias, residual) asks for it; ``backward`` is the launcher or the op that computes them."""
    x, mean, stat, weight, bias, residual = ctx.saved_tensors
    eps, batch_stats, activation, negative_slope = ctx.config
    output_mask = [needs[0], needs[1] and weight is not None, needs[2] and bias is not None,
                   needs[3] and ctx.has_residual]
    if not any(output_mask):
        return None, None, None, None
    grads = backward(grad_y, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope,
                     output_mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))


def _apply_gradients(ctx, grad_y, backward):
    """The ten input gradients of (x, mean, stat, weight, bias, residual, eps, batch_stats, activation,
    negative_slope)."""
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dresidual = _gradients(ctx, grad_y, backward, (needs[0], needs[3], needs[4], needs[5]))
    return dx, None, None, dweight, dbias, dresidual, None, None, None, None


class BatchNormFunction(torch.autograd.Function):
    """y = act(bn(x) + residual) given the per-channel statistics (the eager path).

    apply(x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope):
        x: [N, C, *]; mean, stat: [C] (stat = invstd when batch_stats, else the running variance);
        weight, bias: [C] or None; residual: like x or None; activation: kernel id (activations.py).
    With batch_stats=True, mean and invstd are taken to be x's batch statistics (computed on a detached
    x), and the gradient w.r.t. x includes their terms.
    """

    @staticmethod
    def forward(ctx, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope):
        _save(ctx, x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope)
        return launch.batch_norm_apply(x, mean, stat, weight, bias, residual, eps, batch_stats, activation,
                                       negative_slope)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_y):
        return _apply_gradients(ctx, grad_y, launch.batch_norm_backward)


class TrainingBatchNormFunction(torch.autograd.Function):
    """A whole training forward from x (the eager path): batch statistics, the running-statistics update,
    the batch counted in num_batches_tracked and y = act(bn(x) + residual) in one launcher call
    (``launch.batch_norm_training``: two kernel launches, or PyTorch's fused kernel on the pure-PyTorch
    path); the same backward as above.

    apply(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
          eps, activation, negative_slope)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                eps, activation, negative_slope):
        y, mean, invstd = launch.batch_norm_training(x, running_mean, running_var, num_batches_tracked, weight, bias,
                                                     residual, momentum, cumulative, eps, activation, negative_slope)
        _save(ctx, x, mean, invstd, weight, bias, residual, eps, True, activation, negative_slope)
        return y

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, launch.batch_norm_backward, ctx.needs_input_grad[:4]) + (None,) * 8


def op_setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def op_backward(ctx, grad_y):
    return _apply_gradients(ctx, grad_y, torch.ops.triton_bn.batch_norm_backward)


def training_with_backward(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum: float,
                           cumulative: bool, eps: float, activation: int, negative_slope: float):
    """A training forward that records its backward (``functional.batch_norm`` calls it when something needs a
    gradient), with ``TrainingBatchNormFunction``'s arguments. Where the native CPU kernels serve x on the
    pure-PyTorch path, their op records a C++ autograd node instead (``csrc/node/``, the node both devices
    share, with the CPU backward behind it): the same saved tensors, gradients and once-differentiable
    backward, without the Python Function's host time, which on a small layer exceeds the kernels' own)."""
    native_ops = launch.native_ops_for(x)
    if native_ops is not None:
        factor = reference.host_factor(running_mean, num_batches_tracked, momentum, cumulative)
        return native_ops.training(x, weight, bias, native.like(residual, x), running_mean, running_var,
                                   num_batches_tracked, factor, eps, activation, negative_slope)
    return TrainingBatchNormFunction.apply(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                           momentum, cumulative, eps, activation, negative_slope)
