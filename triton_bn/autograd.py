"""The autograd formula of batch norm (+ activation, + residual). No Triton code here.

``BatchNormFunction`` is an ordinary ``torch.autograd.Function`` and can be used directly; the
library registers its ``setup_context``/``backward`` as the autograd formula of the custom op
``triton_bn::batch_norm_apply`` (see ``ops.py``), which is how the functional API and the modules
reach it, also under ``torch.compile``.

What is saved for backward: x and the per-channel vectors (mean, invstd or running var, weight,
bias). Never y or the pre-activation: the backward kernels recompute z = x * scale + shift from them.
The one exception is forced by the math: with a residual *and* an activation, act'(z) needs
z = bn(x) + residual, so the residual tensor is kept by reference (no copy). With a residual and no
activation nothing is kept for it (d residual = dy).
"""
import torch


class BatchNormFunction(torch.autograd.Function):
    """y = act(bn(x) + residual) given the per-channel statistics.

    forward(x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope):
        x: [N, C, *]; mean, stat: [C] (stat = invstd when batch_stats, else the running variance);
        weight, bias: [C] or None; residual: like x or None; activation: kernel id (activations.py).
    With batch_stats=True, mean and invstd are taken to be x's batch statistics (computed by
    ``triton_bn::batch_stats`` on a detached x), and the gradient w.r.t. x includes their terms.
    """

    @staticmethod
    def forward(x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope):
        return torch.ops.triton_bn.batch_norm_apply(x, mean, stat, weight, bias, residual, eps, batch_stats,
                                                    activation, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, stat, weight, bias, residual, eps, batch_stats, activation, negative_slope = inputs
        keep_residual = residual if (residual is not None and activation != 0) else None
        ctx.save_for_backward(x, mean, stat, weight, bias, keep_residual)
        ctx.config = (eps, batch_stats, activation, negative_slope)
        ctx.has_residual = residual is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, stat, weight, bias, residual = ctx.saved_tensors
        eps, batch_stats, activation, negative_slope = ctx.config
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[3] and weight is not None, needs[4] and bias is not None,
                       needs[5] and ctx.has_residual]
        if not any(output_mask):
            return (None,) * 10
        grads = torch.ops.triton_bn.batch_norm_backward(grad_y, x, mean, stat, weight, bias, residual, eps,
                                                        batch_stats, activation, negative_slope, output_mask)
        dx, dweight, dbias, dresidual = (g if wanted else None for g, wanted in zip(grads, output_mask))
        return dx, None, None, dweight, dbias, dresidual, None, None, None, None
