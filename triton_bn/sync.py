"""SyncBatchNorm on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) with the fused kernels.

Forward (training, world size > 1): each rank computes its local ``(count, mean, M2)`` per channel
with the statistics kernels, packs them into one [3, C] tensor, and one ``all_gather_into_tensor``
brings every rank's triple; Chan's merge of the k parts runs on the device:

    n = sum n_r      mean = sum n_r mean_r / n      M2 = sum M2_r + sum n_r (mean_r - mean)^2

Ranks with no samples have n_r = 0 and weigh nothing. The running statistics use the global n
(unbiased variance M2 / (n - 1)). Then the usual fused apply kernel (activation, residual).

Backward: the local sums (sum dz, sum dz * xhat) are packed into one [2, C] tensor and all-reduced
once; dx then uses their global means. dweight and dbias are the local sums, as in
``torch.nn.SyncBatchNorm`` (DistributedDataParallel then reduces them like any parameter gradient).

No value crosses to the host: counts stay on the device, so there is no synchronisation beyond the
two collectives. Eval, world size 1 and an uninitialised process group take the local path.
"""
import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import dispatch
from .activations import torch_activation
from .functional import check_arguments
from .modules import TailMixin, FusedBatchNormMixin, fusable, check_added_residual, with_fused_signature


def merge_moments(gathered: Tensor):
    """[world, 3, C] of (count, mean, M2) -> global (count, mean, M2), each [C]."""
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count.clamp_min(1.0)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return count, mean, m2


class SyncBatchNormFunction(torch.autograd.Function):
    """act(bn(x) + residual) with statistics over every rank of ``process_group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
                activation, negative_slope, process_group, world_size):
        backend = dispatch.backend_for(x)
        moments = backend.moments(x.detach())
        gathered = moments.new_empty((world_size * moments.shape[0], moments.shape[1]))  # gloo wants it flat
        dist.all_gather_into_tensor(gathered, moments, group=process_group)  # the one forward collective
        count, mean, m2 = merge_moments(gathered.view(world_size, *moments.shape))
        invstd = torch.rsqrt(m2 / count.clamp_min(1.0) + eps)
        if running_mean is not None:
            factor = (1.0 / num_batches_tracked.to(torch.float32)) if momentum is None else momentum
            unbiased = m2 / (count - 1.0).clamp_min(1.0)
            running_mean.copy_((running_mean.float() * (1 - factor) + mean * factor).to(running_mean.dtype))
            running_var.copy_((running_var.float() * (1 - factor) + unbiased * factor).to(running_var.dtype))
        y = backend.apply(x, mean, invstd, None, weight, bias, residual, eps, activation, negative_slope)
        keep_residual = residual if (residual is not None and activation != 0) else None
        ctx.save_for_backward(x, weight, bias, keep_residual, mean, invstd, count)
        ctx.config = (eps, activation, negative_slope, process_group, residual is not None)
        ctx.backend = backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        eps, activation, negative_slope, process_group, has_residual = ctx.config
        needs = ctx.needs_input_grad
        sums = ctx.backend.backward_sums(grad_y, x, mean, invstd, None, weight, bias, residual, eps, activation,
                                         negative_slope)
        grad_weight = sums[1].to(weight.dtype) if (weight is not None and needs[1]) else None
        grad_bias = sums[0].to(bias.dtype) if (bias is not None and needs[2]) else None
        grad_x = grad_residual = None
        want_dx, want_dresidual = needs[0], has_residual and needs[3]
        if want_dx or want_dresidual:
            global_sums = sums.clone()
            dist.all_reduce(global_sums, group=process_group)  # the one backward collective
            # dx uses the global means of (dz, dz * xhat): the sums already divided by the global count
            grad_x, grad_residual = ctx.backend.backward_elementwise(
                grad_y, x, mean, invstd, None, weight, bias, residual, global_sums / count.clamp_min(1.0), 1.0, eps,
                activation, negative_slope, want_dx, want_dresidual)
        return (grad_x, grad_weight, grad_bias, grad_residual) + (None,) * 9


class SyncBatchNorm(FusedBatchNormMixin, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on the fused kernels, with ``activation`` and
    ``forward(input, residual=None)``."""

    @functools.partial(with_fused_signature, torch_class=nn.SyncBatchNorm)
    def __init__(self, *args, activation: Optional[str] = None, negative_slope: float = 0.01, **kwargs) -> None:
        nn.SyncBatchNorm.__init__(self, *args, **kwargs)
        self._init_fused(activation, negative_slope)

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        world_size = self._world_size() if self.training else 1
        if world_size == 1:
            return super().forward(input, residual)  # the local path, with its own input checks
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        num_batches = self.num_batches_tracked if track else None
        activation, fused = self.activation, residual
        if residual is not None and not fusable(residual, input):  # added after, as in FusedBatchNormMixin
            check_added_residual(residual, input)
            activation, fused = None, None
        act = check_arguments(input, running_mean, running_var, self.weight, self.bias, True, self.momentum, self.eps,
                               activation, fused, num_batches, check_batch_size=False)
        if num_batches is not None:
            num_batches.add_(1)
        y = SyncBatchNormFunction.apply(input, self.weight, self.bias, fused, running_mean, running_var,
                                        num_batches, self.momentum, float(self.eps), act,
                                        float(self.negative_slope), self.process_group, world_size)
        if fused is not residual:
            return torch_activation(self.activation, self.negative_slope)(y + residual)
        return y


class SyncBatchNormAct(TailMixin, SyncBatchNorm):
    """``SyncBatchNorm`` then the child modules named in ``tail`` (see ``modules.TailMixin``): what
    ``convert_model`` makes of timm's ``SyncBatchNormAct``."""
