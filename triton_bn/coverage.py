"""How much of a model's fusable batch norm ``convert_model`` fused, read off the data flow of one call.

``fusion_coverage(original, converted, *inputs)`` runs a copy of each model once on ``inputs`` (no gradients)
and watches every tensor a BatchNorm returns:

- in the original, which operations read it (a ``TorchFunctionMode`` sees every torch function and tensor
  method; activation modules, PyTorch's and any other ``convert_model`` recognises, are seen as one
  operation by module hooks). A BN whose output is read by exactly one operation, an activation, *feeds an
  activation*; one whose output is read only by an add whose sum is read only by an activation *feeds an add
  and an activation*. Those are the BNs a fusing converter should fuse; every other one (its output read twice,
  by a pooling, a concatenation, nothing but an add) is plain;
- in the converted model, which BNs ran with a fused activation and which took a residual.

The result (``Coverage``) lists both and what was missed, by module path (``convert_model``'s paths are the
original's, so the two line up), each miss with the reason: the note ``convert_model`` left on the module
around it, the module of its own the BN's output went through on its way to the add or activation (timm's
stochastic depth), or the fused forward that fell back on this call. Runtime data flow sees what fx can not
trace (a forward with data-dependent control flow is read as the call took it). ``tools/fusion_coverage.py``
prints it for a zoo of models.
"""
import copy
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .activations import TABLE as ACTIVATION_TABLE

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
         torch.Tensor.__radd__, operator.add, operator.iadd}
_ACTIVATION_CALLS = ({fn for a in ACTIVATION_TABLE for fn in a.functions}
                     | {getattr(torch.Tensor, m) for a in ACTIVATION_TABLE for m in a.methods})


@dataclass
class Coverage:
    """BNs by module path: what the original's data flow allows and what the converted model fused."""
    batch_norms: int = 0
    feeds_activation: List[str] = field(default_factory=list)  # BN -> activation
    feeds_add_activation: List[str] = field(default_factory=list)  # BN -> add -> activation
    fused_activation: List[str] = field(default_factory=list)  # ran with a fused activation (no residual)
    fused_add_activation: List[str] = field(default_factory=list)  # ran with a residual (and its activation)
    # a BN of feeds_add_activation -> the other BNs added to the same sum (a ResNet block's downsample BN): one
    # of them takes the other as its residual, so the sum counts once, as fused when any of them is
    partners: Dict[str, List[str]] = field(default_factory=dict)
    reasons: Dict[str, str] = field(default_factory=dict)  # a BN of ``missed`` -> why it was not fused

    @property
    def fusable(self) -> int:
        return len(self.feeds_activation) + len(self.feeds_add_activation)

    def _done(self, name: str) -> bool:
        done = set(self.fused_activation) | set(self.fused_add_activation)
        return name in done or any(partner in done for partner in self.partners.get(name, ()))

    @property
    def fused(self) -> int:
        return sum(self._done(name) for name in self.feeds_activation + self.feeds_add_activation)

    @property
    def missed(self) -> List[str]:
        return sorted(name for name in self.feeds_activation + self.feeds_add_activation if not self._done(name))

    def __str__(self) -> str:
        return (f"{self.fused} of {self.fusable} fusable BNs fused ({len(self.feeds_activation)} BN+act, "
                f"{len(self.feeds_add_activation)} BN+add+act in the original's data flow; {self.batch_norms} BNs"
                f" in all)" + (f"; missed: {', '.join(self.missed)}" if self.missed else ""))


class _Flow(TorchFunctionMode):
    """Records, for every tensor a BN returned (and the sums made of one), the operations that read it."""

    def __init__(self):
        super().__init__()
        self.origin: Dict[int, tuple] = {}  # id(tensor) -> (bn path, "bn" or "add")
        self.readers: Dict[tuple, List[str]] = {}  # (bn path, stage) -> what read it: "activation", "add", other
        self.kept: List[torch.Tensor] = []  # the watched tensors stay alive, so that their ids stay theirs
        self.quiet = 0  # inside an activation module: its own operations are not readers
        self.partners: Dict[str, List[str]] = {}  # the first BN added into a sum -> the other BNs added into it
        # (bn path, stage) -> the modules (not activations) it was handed to: a reader fx sees as one call,
        # whatever that module's own forward does with it (returns it as it is, as stochastic depth in eval)
        self.handed_to: Dict[tuple, List[Tuple[str, str]]] = {}

    def watch(self, tensor, source: tuple) -> None:
        self.origin[id(tensor)] = source
        self.kept.append(tensor)
        self.readers.setdefault(source, [])

    def forget(self, tensor) -> None:
        self.origin.pop(id(tensor), None)

    def read(self, tensors, what: str) -> List[tuple]:
        sources = []
        for t in tensors:
            source = self.origin.get(id(t)) if isinstance(t, torch.Tensor) else None
            if source is not None and source not in sources:
                self.readers[source].append(what)
                sources.append(source)
        return sources

    def handed(self, tensors, path: str, module: nn.Module) -> None:
        if self.quiet:
            return
        for t in tensors:
            source = self.origin.get(id(t)) if isinstance(t, torch.Tensor) else None
            if source is not None:
                self.handed_to.setdefault(source, []).append((path, type(module).__name__))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        inputs = list(args) + list(kwargs.values())
        what = "activation" if func in _ACTIVATION_CALLS else "add" if func in _ADDS else getattr(func, "__name__",
                                                                                                 str(func))
        sources = self.read(inputs, what)
        if isinstance(out, torch.Tensor) and id(out) in self.origin and what != "add":
            self.forget(out)  # written in place (relu_, mul_): what it holds now is no BN's output
        added = [bn for bn, stage in sources if stage == "bn"]
        if what == "add" and added and isinstance(out, torch.Tensor):
            self.watch(out, (added[0], "add"))  # the sum, watched for the first BN added into it
            self.partners[added[0]] = added[1:]
        return out


def _only(readers: List[str], what: str) -> bool:
    return readers == [what]


def fusion_coverage(original: nn.Module, converted: nn.Module, *inputs) -> Coverage:
    """The ``Coverage`` of ``converted`` (``convert_model(original)``) on one call with ``inputs``; both models
    run as copies, in their current modes, without gradients, and are left untouched. Also stored in
    ``converted.fusion_report.coverage`` when there is such a report."""
    from .convert import activation_of_module  # (convert imports the modules this sits beside)
    coverage = Coverage()
    model = copy.deepcopy(original)
    flow = _Flow()
    handles = []
    names = {module: name for name, module in model.named_modules()}
    for module, name in names.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            coverage.batch_norms += 1
            own = [child for child in module.children() if not isinstance(child, nn.Identity)]
            if own and activation_of_module(own[0]) is not None:
                # a BN subclass whose own first child after it is an activation (timm's BatchNormAct2d: drop,
                # then act); a real dropout first is data flow no kernel may fuse across
                coverage.feeds_activation.append(name)
                continue
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: flow.watch(out, (name, "bn")) if isinstance(out, torch.Tensor)
                else None))
        elif not any(True for _ in module.children()) and activation_of_module(module) is not None:
            def before(m, args):
                flow.read(args, "activation")
                flow.quiet += 1

            def after(m, args, out):
                flow.quiet -= 1
                flow.forget(out)  # an in-place activation returns its input: no longer a BN's output
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        elif name:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: flow.handed(list(args) + list(kwargs.values()), name, m),
                with_kwargs=True))
    try:
        with torch.no_grad(), flow:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for (name, stage), readers in flow.readers.items():
        if stage != "bn":
            continue
        if _only(readers, "activation"):
            coverage.feeds_activation.append(name)
        elif _only(readers, "add") and _only(flow.readers.get((name, "add"), []), "activation"):
            coverage.feeds_add_activation.append(name)
            coverage.partners[name] = flow.partners.get(name, [])
    coverage.feeds_activation.sort()
    coverage.feeds_add_activation.sort()
    fallbacks = _fused(converted, inputs, coverage)
    report = getattr(converted, "fusion_report", None)
    for name in coverage.missed:
        coverage.reasons[name] = _why_missed(name, flow, getattr(report, "notes", []), fallbacks)
    if report is not None:
        report.coverage = coverage
    return coverage


def _within(name: str, path: str) -> bool:
    """Whether the module at ``name`` is ``path`` or one of its descendants ("model": the root, everything)."""
    return path == "model" or name == path or name.startswith(path + ".")


def _why_missed(name: str, flow: "_Flow", notes: List[str], fallbacks: Dict[str, int]) -> str:
    """Why the fusable BN at ``name`` ran unfused: the note ``convert_model`` left on the nearest module around
    it, else the module its output was handed to before the add or activation, else the fused forward around
    it that fell back on this call; else that nothing says why (which should not happen: a gap to report)."""
    around = [note for note in notes if _within(name, note.split(": ", 1)[0])]
    if around:
        return max(around, key=lambda note: len(note.split(": ", 1)[0]))
    handed = flow.handed_to.get((name, "bn"), []) + flow.handed_to.get((name, "add"), [])
    if handed:
        path, kind = handed[0]
        reader = "activation" if flow.readers.get((name, "bn")) == ["activation"] else "add"
        return (f"its output goes through {path} ({kind}, a module of its own) on its way to the {reader}"
                f": convert_model fuses what the BN's parent applies to it directly, not across another module's "
                f"forward, which may differ between calls and modes (dropout, stochastic depth)")
    fell_back = sorted(path for path in fallbacks if _within(name, path))
    if fell_back:
        return (f"{fell_back[-1]}'s fused forward fell back to its own on this call (fusion_report.fallbacks; "
                f"fusion_report.guarded says what it assumes)")
    return "convert_model left no note saying why (a gap worth reporting)"


def _fused(converted: nn.Module, inputs, coverage: Coverage) -> Dict[str, int]:
    """Which of ``converted``'s BNs ran with a fused activation, and which took a residual, on ``inputs``;
    returns the module paths whose fused forward fell back to their own on that call (with how often)."""
    from .modules import FusedBatchNormMixin
    model = copy.deepcopy(converted)
    seen: Dict[str, Tuple[bool, bool]] = {}  # path -> (took a residual, ran an activation) on every call
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, FusedBatchNormMixin):
            # ``m`` is what ran: a fused forward that fell back runs a twin without the activation (sharing hooks)
            def took(m, args, kwargs, name=name):
                residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
                ran = (residual is not None, getattr(m, "activation", None) is not None)
                seen[name] = tuple(a and b for a, b in zip(seen.get(name, ran), ran))
            handles.append(module.register_forward_pre_hook(took, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, (residual, activation) in seen.items():
        if residual:
            coverage.fused_add_activation.append(name)
        elif activation:
            coverage.fused_activation.append(name)
    coverage.fused_activation.sort()
    coverage.fused_add_activation.sort()
    report = getattr(model, "fusion_report", None)  # the copy's, which its fused forwards counted in
    before = getattr(converted, "fusion_report", None)
    if report is None or before is None:
        return {}
    return {path: count - before.fallbacks.get(path, 0) for path, count in report.fallbacks.items()
            if count > before.fallbacks.get(path, 0)}
