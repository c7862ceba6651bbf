"""Inference: fold batch norms into the layer before them, or freeze them into a per-channel
scale/shift table applied in one elementwise pass.

For a BN in eval mode, bn(y) = y * scale + shift with (computed in float64, then cast back)

    scale = weight / sqrt(running_var + eps)          shift = bias - running_mean * scale

so when y = conv(x) (or conv_transpose, linear), the BN disappears into the layer:

    W'[o] = W[o] * scale[o]        b'[o] = b[o] * scale[o] + shift[o]

(``o`` is the output channel: dim 0 of a Conv/Linear weight, dim 1 within each group of a
ConvTranspose weight). A fused activation moves into the layer (``Conv2dWithActivation`` and its
siblings: the layer, then the activation on its own fresh output, in place, as a model's
``nn.ReLU(inplace=True)`` would; on a CPU, an activation that needs an exp, erf or tanh takes the native
kernels' pass instead, faster than PyTorch's); a residual add survives as a ``FrozenBatchNorm`` with scale 1
and shift 0, which adds and activates with PyTorch's own ops on a CPU (in place on the new sum; the native
kernels' one pass for those activations) and with one fused pass on a GPU: the add and the activation had to
be done anyway.
"""
import copy
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .activations import activation_id, torch_activation
from .convert import FusionReport, OUR_MODULES, set_module, call_counts, swap_batch_norms, one_level_graphs
from .dispatch import activation_pass, apply_step, recording_for_export
from .functional import SCRIPT_REFUSAL, check_fused_residual
from .tracing import OneLevelTrace, running_graph

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class FrozenBatchNorm(nn.Module):
    """``act(input * scale + shift [+ residual])`` with fixed per-channel ``scale`` and ``shift`` buffers
    (fp32, or float64 for a float64 model): an eval-mode BN whose table was computed once, one kernel
    launch per call. ``tail`` names child modules run afterwards, in order (what a BN-with-activation
    subclass kept as modules: a dropout, an unsupported activation).

    ``identity=True``: what is left of a BN folded into the layer before it, the epilogue alone
    (``act(input [+ residual])``); its table is fixed at 1 and 0 and not part of the ``state_dict``, and an
    exported program records no multiply or add for it. In eager it runs PyTorch's own add and activation,
    except for a residual add on a GPU, where the fused kernel saves a pass."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str] = None,
                 negative_slope: float = 0.01, tail: Sequence[Tuple[str, nn.Module]] = (), identity: bool = False):
        super().__init__()
        self.act_id = activation_id(activation)
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.identity = identity
        table_dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
        if identity:
            scale, shift = torch.ones_like(scale), torch.zeros_like(shift)
        self.register_buffer("scale", scale.detach().to(table_dtype).clone(), persistent=not identity)
        self.register_buffer("shift", shift.detach().to(table_dtype).clone(), persistent=not identity)
        # mean 0 and variance 1 with eps 0 turn the eval kernel's (x - mean) * w * rsqrt(var + eps) + b
        # into exactly x * scale + shift
        self.register_buffer("_zeros", torch.zeros_like(self.scale), persistent=False)
        self.register_buffer("_ones", torch.ones_like(self.scale), persistent=False)
        self.tail = tuple(name for name, _ in tail)
        for name, module in tail:
            self.add_module(name, module)

    @property
    def num_features(self) -> int:
        return self.scale.numel()

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        buffers = self._buffers  # straight from the dict: nn.Module's __getattr__ costs a microsecond a name
        scale = buffers["scale"]
        if input.dim() < 2 or input.shape[1] != scale.shape[0]:
            raise ValueError(f"FrozenBatchNorm: expected input of shape (N, {scale.shape[0]}, *), got "
                             f"{tuple(input.shape)}")
        if residual is not None:
            check_fused_residual(residual, input, "FrozenBatchNorm")
        if recording_for_export():
            out = self._portable(input, residual)
        elif self.identity and (residual is None or not input.is_cuda):
            # on a CPU at inference sizes the fused kernel's fixed cost per call is more than a ReLU's pass
            # (perf/NOTES.md), not than an exp's (activation_pass); on a GPU it stays for a residual add, where it
            # saves a pass (x and the residual read once, y written once)
            out = activation_pass(input, self.activation, self.negative_slope, residual)
            if out is None:
                out = self._portable(input, residual, may_overwrite=True)
        else:
            apply = apply_step(input, None, None, residual, torch.compiler.is_compiling())
            out = apply(input, buffers["_zeros"], None, buffers["_ones"], scale, buffers["shift"], residual, 0.0,
                        self.act_id, self.negative_slope)
        for name in self.tail:
            out = getattr(self, name)(out)
        return out

    def _portable(self, input: torch.Tensor, residual: Optional[torch.Tensor],
                  may_overwrite: bool = False) -> torch.Tensor:
        """The same result from PyTorch's own operators (what an exported program records, and what an
        identity runs in eager), computed in the table's dtype and rounded once to the input's, as the kernel
        does. ``may_overwrite``: the activation may write into the intermediate it is given when that is a new
        tensor (the table applied, or the residual added) and autograd records nothing; ``input`` is never
        written (another module may hold it)."""
        z, fresh = input, False
        if not self.identity:
            view = [1, -1] + [1] * (input.dim() - 2)
            z, fresh = input.to(self.scale.dtype) * self.scale.view(view) + self.shift.view(view), True
        if residual is not None:
            z, fresh = z + residual, True
        in_place = may_overwrite and fresh and _may_overwrite(z)
        return torch_activation(self.activation, self.negative_slope, in_place)(z).to(input.dtype)

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_REFUSAL)

    def without_activation(self) -> nn.Module:
        """This table with no fused activation (see ``FusedBatchNormMixin.without_activation``)."""
        if self.activation is None:
            return self
        twin = copy.copy(self)
        twin.activation, twin.act_id = None, activation_id(None)
        return twin

    def extra_repr(self) -> str:
        return (f"{self.num_features}" + (f", activation={self.activation!r}" if self.activation else "")
                + (f", tail={self.tail!r}" if self.tail else ""))


def _may_overwrite(fresh: torch.Tensor) -> bool:
    """Whether an activation may write into ``fresh``, a tensor just made by the caller: only where autograd
    records nothing (an in-place activation would have to save its input for the backward)."""
    return not (torch.is_grad_enabled() and fresh.requires_grad)


class _ActivationAfter:
    """A Conv/ConvTranspose/Linear that a BN with an activation was folded into: the layer, whose weights
    now carry the BN's table, then the BN's activation on the layer's own output. That output is a new
    tensor nothing else holds, so the activation works in place on it (where autograd records nothing), as
    a model's ``nn.ReLU(inplace=True)`` after its BN would: no second tensor, no second allocation. On a CPU,
    SiLU, GELU, GELU-tanh and sigmoid take the native kernels' pass over it instead (``dispatch.activation_pass``:
    their vector math is faster than PyTorch's). The
    ``state_dict`` is the layer's own (the activation is not state), and an exported program records the
    layer and the activation, as PyTorch's own folding of the original would."""

    activation: Optional[str] = None
    negative_slope: float = 0.01

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        activated = activation_pass(out, self.activation, self.negative_slope, overwrite=True)  # SiLU, GELU: CPU
        if activated is not None:
            return activated
        return torch_activation(self.activation, self.negative_slope, _may_overwrite(out))(out)

    def without_activation(self) -> nn.Module:
        """This layer without the activation (see ``FusedBatchNormMixin.without_activation``): a parent's fused
        forward that falls back to its own forward runs the model's activation module itself."""
        twin = copy.copy(self)
        twin.activation = None
        return twin

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_REFUSAL)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        return text + (f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else "")


# layer class -> the same with a folded BN's activation after it; module attributes, so a folded model pickles
WITH_ACTIVATION = {}
for _layer in _CONVS + _TRANSPOSED + (nn.Linear,):
    _name = f"{_layer.__name__}WithActivation"
    WITH_ACTIVATION[_layer] = globals()[_name] = type(_name, (_ActivationAfter, _layer), {
        "__module__": __name__, "__doc__": f"``nn.{_layer.__name__}``, then a folded BN's activation (see _ActivationAfter)"})
del _layer, _name


def _move_activation_into(parent: nn.Module, layer_name: str, bn_name: str) -> None:
    """Make ``parent``'s child ``layer_name`` (of one of WITH_ACTIVATION's exact classes) apply the activation of
    its child ``bn_name`` itself. Where that activation was a module of the model that ``convert_model`` fused
    into the BN, the parent's fused forward, on a call its guard rejects, runs the class forward with that
    module back in place and the BN's activation taken off: it must now take it off the layer instead, or
    the activation would run twice."""
    layer, bn = parent.get_submodule(layer_name), parent.get_submodule(bn_name)
    layer.__class__ = WITH_ACTIVATION[type(layer)]
    layer.activation, layer.negative_slope = bn.activation, bn.negative_slope
    fused = running_graph(parent)
    if fused is not None and bn_name in fused.activation_owners:
        fused.activation_owners = tuple(layer_name if name == bn_name else name for name in fused.activation_owners)


def _scale_shift(bn: nn.Module):
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    table_dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    return scale.to(table_dtype), shift.to(table_dtype), scale, shift


def _tail(bn: nn.Module):
    return [(name, getattr(bn, name)) for name in getattr(bn, "tail", ())]


def _frozen(bn: nn.Module, identity: bool = False) -> FrozenBatchNorm:
    scale, shift, _, _ = _scale_shift(bn)
    # identity: the table went into the layer before; only the activation / residual / tail remain
    return FrozenBatchNorm(scale, shift, bn.activation, bn.negative_slope, _tail(bn), identity=identity)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if bn.running_mean is None or not isinstance(layer, _CONVS + _TRANSPOSED + (nn.Linear,)):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    _, _, scale, shift = _scale_shift(bn)  # float64: the folded weights are rounded once, at the end
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


def _fold_module(module: nn.Module, trace: OneLevelTrace, counts) -> None:
    """Fold each BN child of ``module`` whose input, in ``module``'s own graph, is the sole output of a
    Conv/ConvTranspose/Linear child; neither may be called from anywhere else. Not in a module whose graph
    holds only for some of its calls (its forward branches on its arguments): folding changes the layer for every
    call, and the calls the guard sends to the module's own forward may not pass through that BN."""
    if trace.guard.branches_on_arguments:
        return
    children = dict(module.named_children())  # and what an inlined child's graph calls, by its path
    children.update({node.target: module.get_submodule(node.target) for node in trace.graph.nodes
                     if node.op == "call_module" and node.target not in children})
    for node in trace.graph.nodes:
        if node.op != "call_module" or node.target not in children:
            continue
        bn = children[node.target]
        if not isinstance(bn, OUR_MODULES) or bn.running_mean is None or len(node.args) != 1:
            continue
        producer = node.args[0]
        layer = (children.get(producer.target) if isinstance(producer, fx.Node) and producer.op == "call_module"
                 else None)
        if not (layer is not None and counts[id(bn)] == 1 and counts[id(layer)] == 1 and len(producer.users) == 1
                and _foldable(layer, bn)):
            continue
        _fold_into(layer, bn)
        if node.kwargs or getattr(bn, "tail", ()) or (bn.activation is not None and type(layer) not in WITH_ACTIVATION):
            # a residual add, a tail of modules, or a layer subclass whose forward is its own: an identity table
            set_module(module, node.target, _frozen(bn, identity=True))
            continue
        if bn.activation is not None:
            _move_activation_into(module, producer.target, node.target)
        set_module(module, node.target, nn.Identity())


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``model`` with every foldable BN folded into the Conv/ConvTranspose/Linear
    before it (replaced by ``nn.Identity``, a fused activation moving into the layer, which becomes
    ``Conv2dWithActivation`` or its sibling; or by an identity ``FrozenBatchNorm`` that keeps a residual
    add or a tail), and every other BN with running statistics frozen into a
    ``FrozenBatchNorm``, in place: the result is an instance of the model's class, every submodule path
    still resolves.

    The rules are ``convert_model``'s: BN subclasses are handled only when understood (a BN with its
    own activation keeps it), a module's graph is read one level deep, so a module fx can not trace
    keeps its own forward (its BNs are frozen, not folded). A BN is folded only when, in its parent's
    graph, its input is the sole output of that layer and neither module is used anywhere else. BNs
    without running statistics normalise with batch statistics even in eval and are left as they are.
    Tables are computed in float64 and kept in float64 for a float64 model. The input is not modified.

    Raises RuntimeError when ``model`` is in training mode."""
    if model.training:
        raise RuntimeError("fold_batch_norms: the model is in training mode; call model.eval() first "
                           "(folding uses the running statistics, which training would keep changing)")
    report = FusionReport()
    model = swap_batch_norms(copy.deepcopy(model), report, fuse=False)
    traces, failures = one_level_graphs(model, (False,), skip=(FrozenBatchNorm,))  # eval: what a folded model runs
    untraced = [path for path, module, _ in failures if any(isinstance(c, OUR_MODULES) for c in module.children())]
    counts = call_counts(model, traces)
    for module, trace in traces.items():
        _fold_module(module, trace, counts)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, OUR_MODULES) and child.running_mean is not None:
                setattr(module, name, _frozen(child))
    if untraced:
        warnings.warn(f"triton_bn.fold_batch_norms: torch.fx could not trace {', '.join(untraced)}; the BNs directly "
                      "inside were frozen, not folded")
    return model.eval()
