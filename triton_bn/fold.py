"""Inference: fold batch norms into the layer before them, or freeze them into a per-channel
scale/shift table applied in one elementwise pass.

For a BN in eval mode, bn(y) = y * scale + shift with (computed in float64, then cast back)

    scale = weight / sqrt(running_var + eps)          shift = bias - running_mean * scale

so when y = conv(x) (or conv_transpose, linear), the BN disappears into the layer:

    W'[o] = W[o] * scale[o]        b'[o] = b[o] * scale[o] + shift[o]

(``o`` is the output channel: dim 0 of a Conv/Linear weight, dim 1 within each group of a
ConvTranspose weight). A fused activation or residual add survives as a ``FrozenBatchNorm`` with
scale 1 and shift 0, which is one elementwise pass: the activation had to be applied anyway.
"""
import copy
import warnings
from typing import Optional

import torch
from torch import fx, nn

from .activations import activation_id
from .convert import trace_model

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # triton_bn's subclass these
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class FrozenBatchNorm(nn.Module):
    """``act(input * scale + shift [+ residual])`` with fixed per-channel fp32 ``scale`` and ``shift``
    buffers: an eval-mode BN whose table was computed once. One kernel launch per call."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str] = None,
                 negative_slope: float = 0.01):
        super().__init__()
        self.act_id = activation_id(activation)
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("shift", shift.detach().float().clone())
        # mean 0 and variance 1 with eps 0 turn the eval kernel's (x - mean) * w * rsqrt(var + eps) + b
        # into exactly x * scale + shift
        self.register_buffer("_zeros", torch.zeros_like(self.scale), persistent=False)
        self.register_buffer("_ones", torch.ones_like(self.scale), persistent=False)

    @property
    def num_features(self) -> int:
        return self.scale.numel()

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm: expected input of shape (N, {self.num_features}, *), got "
                             f"{tuple(input.shape)}")
        if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
            raise ValueError("FrozenBatchNorm: residual must have the input's shape and dtype")
        return torch.ops.triton_bn.batch_norm_apply(input, self._zeros, self._ones, self.scale, self.shift, residual,
                                                    0.0, False, self.act_id, self.negative_slope)

    def extra_repr(self) -> str:
        return f"{self.num_features}" + (f", activation={self.activation!r}" if self.activation else "")


def _scale_shift(bn: nn.Module):
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fusion(bn: nn.Module):
    return getattr(bn, "activation", None), getattr(bn, "negative_slope", 0.01)


def _frozen(bn: nn.Module, identity: bool = False) -> FrozenBatchNorm:
    activation, slope = _fusion(bn)
    if identity:
        ones = torch.ones(bn.num_features, device=bn.running_mean.device)
        return FrozenBatchNorm(ones, torch.zeros_like(ones), activation, slope)
    scale, shift = _scale_shift(bn)
    return FrozenBatchNorm(scale, shift, activation, slope)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if bn.running_mean is None or not isinstance(layer, _CONVS + _TRANSPOSED + (nn.Linear,)):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    scale, shift = _scale_shift(bn)
    weight = layer.weight.detach().double()
    if isinstance(layer, _TRANSPOSED):
        groups = layer.groups
        per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        view = [groups, 1, weight.shape[1]] + [1] * (weight.dim() - 2)
        weight = (per_group * scale.reshape(view)).reshape(weight.shape)
    else:
        weight = weight * scale.reshape([-1] + [1] * (weight.dim() - 1))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    layer.weight.copy_(weight.to(layer.weight.dtype))
    new_bias = (bias * scale + shift).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fold_graph(gm: fx.GraphModule) -> None:
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BATCH_NORMS):
            continue
        bn = gm.get_submodule(node.target)
        producer = node.args[0] if node.args else None
        layer = gm.get_submodule(producer.target) if (isinstance(producer, fx.Node)
                                                      and producer.op == "call_module") else None
        foldable = (layer is not None and calls[node.target] == 1 and calls[producer.target] == 1
                    and len(producer.users) == 1 and _foldable(layer, bn))
        if foldable:
            _fold_into(layer, bn)
        if foldable and _fusion(bn)[0] is None and not node.kwargs:
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
        elif bn.running_mean is not None:
            _set_module(gm, node.target, _frozen(bn, identity=foldable))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _fold_sequentials(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, layer), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(bn, _BATCH_NORMS) and _foldable(layer, bn):
                    _fold_into(layer, bn)
                    setattr(module, bn_name, nn.Identity() if _fusion(bn)[0] is None else _frozen(bn, identity=True))
    for name, module in list(model.named_modules()):
        if isinstance(module, _BATCH_NORMS) and module.running_mean is not None:
            _set_module(model, name, _frozen(module))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``model`` with every foldable BN folded into the Conv/ConvTranspose/Linear
    before it, and every other BN (with running statistics) frozen into a ``FrozenBatchNorm``.

    A BN is folded only when its input is the sole output of that layer, neither module is called from
    more than one place, and the channel counts match. Fused activations and residual adds are kept.
    BNs without running statistics (``track_running_stats=False`` normalises with batch statistics even
    in eval) are left as they are. The input model is not modified.

    Raises RuntimeError when ``model`` is in training mode."""
    if model.training:
        raise RuntimeError("fold_batch_norms: the model is in training mode; call model.eval() first "
                           "(folding uses the running statistics, which training would keep changing)")
    model = copy.deepcopy(model)
    try:
        traced = trace_model(model)
    except Exception as exc:
        warnings.warn(f"triton_bn.fold_batch_norms: torch.fx could not trace the model ({type(exc).__name__}: {exc}); "
                      "only BNs right after a layer inside an nn.Sequential were folded, the rest frozen")
        _fold_sequentials(model)
        return model
    _fold_graph(traced)
    return traced.eval()
