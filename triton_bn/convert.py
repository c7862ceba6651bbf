"""``convert_model``: swap PyTorch's BatchNorm modules for triton_bn's and fuse what follows them.

Fusion works on a ``torch.fx`` trace of the model:
- BN -> activation             becomes BN(activation=...)
- BN -> add(other) [-> activation]  becomes BN(activation=..., residual=other)   (the ResNet block tail)
only when the BN's output has no other user, the add's output has no other user than the activation,
and the BN module is called from one place (a shared module can not carry one call site's activation).
A model that fx can not trace still gets its BN modules replaced, and activations that directly
follow a BN inside an ``nn.Sequential`` are fused; a warning says why the rest was not.
"""
import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, carry_state

_SWAPS = ((nn.BatchNorm1d, BatchNorm1d), (nn.BatchNorm2d, BatchNorm2d), (nn.BatchNorm3d, BatchNorm3d))
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


@dataclass
class FusionReport:
    """What ``convert_model`` did: BNs left plain, fused with an activation, fused with add (+ act)."""
    plain: int = 0
    activation: int = 0
    residual: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def converted(self) -> int:
        return self.plain + self.activation + self.residual


def _activation_of_module(module: nn.Module) -> Optional[Tuple[str, float]]:
    if type(module) in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid):
        return {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                nn.Sigmoid: "sigmoid"}[type(module)], 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.GELU:
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.01
    return None


_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
              F.silu: "silu", F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
              F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu"}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}


def _activation_of_node(node: fx.Node, modules) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) when ``node`` applies a supported activation to its first argument."""
    if node.op == "call_module":
        return _activation_of_module(modules[node.target])
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name = _FUNCTIONS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            name = "gelu_tanh"
        slope = 0.01
        if name == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if not isinstance(slope, (int, float)):
                return None
        return name, float(slope)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return _METHODS[node.target], 0.01
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


class _Tracer(fx.Tracer):
    """fx's default tracer keeps only ``torch.nn`` modules opaque; ours must stay call sites too."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _OURS) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module) -> fx.GraphModule:
    """fx-trace ``model`` keeping torch.nn and triton_bn modules as call sites (shared by fold.py)."""
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def _swap_batch_norms(model: nn.Module) -> int:
    swapped = 0
    for name, child in list(model.named_children()):
        match = next((ours for theirs, ours in _SWAPS if type(child) is theirs), None)
        if match is not None:
            new = match(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            setattr(model, name, carry_state(child, new))
            swapped += 1
        else:
            swapped += _swap_batch_norms(child)
    return swapped


def _fuse_graph(gm: fx.GraphModule, report: FusionReport) -> None:
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _OURS):
            continue
        bn = modules[node.target]
        if calls[node.target] > 1:
            report.notes.append(f"{node.target}: module called from {calls[node.target]} places, not fused")
            continue
        if len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        fused = _activation_of_node(user, modules)
        if fused is not None and user.args[0] is node:
            bn.activation, bn.negative_slope = fused
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            report.activation += 1
            continue
        if _is_add(user):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(other, fx.Node) or other is node:
                continue
            tail = user
            after = next(iter(user.users)) if len(user.users) == 1 else None
            act = _activation_of_node(after, modules) if after is not None else None
            if act is not None and after.args[0] is user:
                bn.activation, bn.negative_slope = act
                tail = after
            with gm.graph.inserting_after(tail):
                fused_node = gm.graph.call_module(node.target, (node.args[0],), {"residual": other})
            tail.replace_all_uses_with(fused_node)
            for dead in ([after] if tail is after else []) + [user, node]:
                gm.graph.erase_node(dead)
            report.residual += 1
    gm.graph.lint()
    gm.recompile()


def _fuse_sequentials(model: nn.Module, report: FusionReport) -> None:
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, first), (second_name, second) in zip(children, children[1:]):
            act = _activation_of_module(second)
            if isinstance(first, _OURS) and first.activation is None and act is not None:
                first.activation, first.negative_slope = act
                setattr(module, second_name, nn.Identity())
                report.activation += 1


def convert_model(module: nn.Module, fuse_activations: bool = True) -> nn.Module:
    """A converted copy of ``module``: every ``torch.nn.BatchNorm1d/2d/3d`` replaced by triton_bn's,
    and, with ``fuse_activations``, the activations and residual adds that follow them fused.

    The input model is left untouched. The result carries ``fusion_report`` (a ``FusionReport``)."""
    model = copy.deepcopy(module)
    report = FusionReport()
    if isinstance(model, _OURS):
        total = 1
    else:
        match = next((ours for theirs, ours in _SWAPS if type(model) is theirs), None)
        if match is not None:  # a bare BN module: wrap so the swap has a parent to write into
            holder = nn.Module()
            holder.bn = model
            _swap_batch_norms(holder)
            model, total = holder.bn, 1
        else:
            total = _swap_batch_norms(model)
    if fuse_activations and not isinstance(model, _OURS):
        try:
            traced = trace_model(model)
        except Exception as exc:  # fx can not trace data-dependent control flow and the like
            warnings.warn(f"triton_bn.convert_model: torch.fx could not trace the model ({type(exc).__name__}: "
                          f"{exc}); BN modules were replaced and only nn.Sequential neighbours were fused")
            _fuse_sequentials(model, report)
        else:
            _fuse_graph(traced, report)
            traced.train(model.training)
            model = traced
    report.plain = total - report.activation - report.residual
    model.fusion_report = report
    return model
