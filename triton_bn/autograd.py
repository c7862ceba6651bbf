"""The autograd formula of batch norm (+ activation, + residual), over whichever backend ``dispatch.py`` chose.
No kernels here.

Three entry points share one formula:
- ``BatchNormFunction`` (a ``torch.autograd.Function``) is the eager path given the statistics: it calls
  the backend's functions directly, because the Python dispatch of a custom op costs tens of microseconds
  per call, which is more than a small BN layer's whole GPU time.
- ``TrainingBatchNormFunction`` is the eager training forward from x (statistics, running update, y in one
  backend call), with the same backward. (On the native CPU kernels ``dispatch.py`` calls their op instead,
  whose C++ autograd node records the same backward: ``csrc/node/``.)
- ``op_setup_context`` / ``op_backward`` are registered (``ops.py``) as the autograd formula of the
  custom op ``triton_bn::batch_norm_apply``, which is what ``torch.compile`` traces.
The two Functions take the backend (``backends.Backend``) as their first argument and keep it for the backward.

What is saved for backward: x and the per-channel vectors (mean, then invstd or the running variance,
weight, bias). Never y or the pre-activation on the kernels: they recompute z = (x - mean) * scale + b from
them. The one exception is forced by the math: with a residual *and* an activation, act'(z) needs
z = bn(x) + residual, so the residual tensor is kept by reference (no copy). With a residual and no
activation nothing is kept for it (d residual = dy).
"""
import functools

import torch
from torch.autograd.function import once_differentiable


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


def _save(ctx, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
    keep_residual = residual if (residual is not None and activation != 0) else None
    ctx.save_for_backward(x, mean, invstd, running_var, weight, bias, keep_residual)
    ctx.config = (eps, activation, negative_slope)
    ctx.has_residual = residual is not None


def _gradients(ctx, grad_y, backward, needs):
    """(dx, dweight, dbias, dresidual), each None unless ``needs`` (the needs_input_grad of x, weight,
    bias, residual) asks for it; ``backward`` is the backend's function or the op that computes them."""
    x, mean, invstd, running_var, weight, bias, residual = ctx.saved_tensors
    eps, activation, negative_slope = ctx.config
    output_mask = [needs[0], needs[1] and weight is not None, needs[2] and bias is not None,
                   needs[3] and ctx.has_residual]
    if not any(output_mask):
        return None, None, None, None
    grads = backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope,
                     output_mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))


def _apply_gradients(ctx, grad_y, backward, needs):
    """The ten input gradients of (x, mean, invstd, running_var, weight, bias, residual, eps, activation,
    negative_slope); ``needs``: their needs_input_grad."""
    dx, dweight, dbias, dresidual = _gradients(ctx, grad_y, backward, (needs[0], needs[4], needs[5], needs[6]))
    return dx, None, None, None, dweight, dbias, dresidual, None, None, None


class BatchNormFunction(torch.autograd.Function):
    """y = act(bn(x) + residual) given the per-channel statistics (the eager path).

    apply(backend, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
        x: [N, C, *]; mean: [C]; exactly one of invstd (batch statistics) and running_var (the running ones,
        or a frozen table) [C], the other None; weight, bias: [C] or None; residual: like x or None;
        activation: kernel id (activations.py).
    Given invstd, mean and invstd are taken to be x's batch statistics (computed on a detached x), and the
    gradient w.r.t. x includes their terms.
    """

    @staticmethod
    def forward(ctx, backend, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
        _save(ctx, x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope)
        ctx.backend = backend
        return backend.apply(x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_y):
        return (None,) + _apply_gradients(ctx, grad_y, ctx.backend.backward, ctx.needs_input_grad[1:])


class TrainingBatchNormFunction(torch.autograd.Function):
    """A whole training forward from x (the eager path): batch statistics, the running-statistics update,
    the batch counted in num_batches_tracked and y = act(bn(x) + residual) in one launcher call
    (``Backend.training``: two kernel launches on the Triton kernels); the same backward as above.

    apply(backend, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
          eps, activation, negative_slope)
    """

    @staticmethod
    def forward(ctx, backend, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
                cumulative, eps, activation, negative_slope):
        y, mean, invstd = backend.training(x, running_mean, running_var, num_batches_tracked, weight, bias, residual,
                                           momentum, cumulative, eps, activation, negative_slope)
        _save(ctx, x, mean, invstd, None, weight, bias, residual, eps, activation, negative_slope)
        ctx.backend = backend
        return y

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_y):
        return (None,) + _gradients(ctx, grad_y, ctx.backend.backward, ctx.needs_input_grad[1:5]) + (None,) * 8


def op_setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def op_backward(ctx, grad_y):
    return _apply_gradients(ctx, grad_y, torch.ops.triton_bn.batch_norm_backward, ctx.needs_input_grad)
