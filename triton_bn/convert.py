"""``convert_model``: swap a model's BatchNorm modules for triton_bn's and fuse what follows them, in place
in a copy of the model, so that the result is still the user's model.

What it guarantees (tests/test_models.py checks each on a zoo of real-model idioms):
- The result is the same class as the input, every submodule path of the original resolves, and the
  ``state_dict`` has exactly the original's keys (checkpoints load both ways with ``strict=True``).
  ``torch.save`` of the whole model and ``copy.deepcopy`` work.
- It never changes what the model computes, in training or in eval mode, whichever mode it was in when
  converted. Fusion needs a module's ``forward`` as a graph: each module is traced *one level deep* by
  torch.fx (its children stay calls to their own ``forward``, so a child that reads ``self.training``
  or anything else at run time keeps doing so), once per mode; a module whose graph differs between the
  modes, or that fx can not trace, keeps its own ``forward`` and its BNs are only swapped, not fused
  (``FusionReport.notes`` says which and why). Where a plain trace stops, ``tracing.trace_one_level`` keeps
  a helper function fx can not trace through as one call, traces flag arguments at their defaults
  (guarded), takes the side of a shape check that does not raise (the condition asked again per call) and
  unrolls a zip of an argument with a container; ``_fuse_module`` inlines a child whose forward ends in a BN
  into its caller's graph (``tracing.inline_call``), so that BN takes the caller's add and activation.
- BN -> activation becomes BN(activation=...), BN -> add [-> activation] becomes BN(residual=...). When
  the activation is a child module called only there, the BN takes it over and the child becomes
  ``nn.Identity`` (``print(model)`` shows what runs). Anything else (a functional activation, an add, a
  child called twice) needs the module's ``forward`` replaced by its fused graph: a ``TracedForward``
  instance attribute that runs the graph against the module itself, so later changes to the module's
  children and buffers (``.to()``, a new head) are seen.
- A fused forward runs only for the calls its trace stands for: ``tracing.trace_one_level`` records what
  fx froze (``is None`` tests, type tests and unpacking of arguments, the module's own attributes), and
  ``_fuse_module`` adds "an argument fused as a residual is a tensor"; a call that breaks one of these
  runs a second fused graph where one stands for it (traced with an optional argument None, or with an
  argument that is no tensor, the same fusions made again in it: ``_variants``), else the module's own
  forward with its fusions undone (``tracing.TracedForward``), counted in ``FusionReport.fallbacks``.
- BatchNorm subclasses: one that does not override ``forward`` is swapped like its base. One that does
  is converted only when its ``forward`` is understood as "BN, then some of its own children in order"
  (timm's ``BatchNormAct2d``: ``drop`` then ``act``) *and* the replacement behaves identically on probe
  inputs in training and in eval; it becomes ``BatchNormAct*d`` (``SyncBatchNormAct``), with the first of
  those children fused when it is a supported activation. Any other subclass is left as it is, with a
  note.

One assumption: a module that fx can not trace calls its descendants only through its direct children
(the universal PyTorch idiom); fusion changes a module's children only where that module's own traced
graph shows every use.
"""
import copy
import itertools
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import SUPPORTED_ACTIVATIONS, torch_activation
from .activations import TABLE as ACTIVATION_TABLE
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
                      FusedBatchNormMixin, carry_state, has_tail)
from .sync import SyncBatchNorm, SyncBatchNormAct
from .tracing import (HOOK_REGISTRIES, ArgumentCheck, OneLevelTrace, TracedForward, attribute_at, inline_call,
                      passes_through, reads_only_settings, root_and_path, running_graph, trace_one_level)

# PyTorch's exact classes -> (ours, ours followed by a tail of children). SyncBatchNorm first: it is
# not a BatchNorm2d, but the order keeps the lookup of a subclass's base unambiguous.
_SWAPS = {nn.SyncBatchNorm: (SyncBatchNorm, SyncBatchNormAct), nn.BatchNorm1d: (BatchNorm1d, BatchNormAct1d),
          nn.BatchNorm2d: (BatchNorm2d, BatchNormAct2d), nn.BatchNorm3d: (BatchNorm3d, BatchNormAct3d)}
OUR_MODULES = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)  # the tailed classes subclass these
_BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm
# a probe input per base class, for the behaviour check of BN subclasses: (N, C) -> shape
_PROBE_SHAPES = {nn.BatchNorm1d: lambda c: (5, c), nn.BatchNorm2d: lambda c: (3, c, 2, 3),
                 nn.BatchNorm3d: lambda c: (2, c, 2, 2, 2), nn.SyncBatchNorm: lambda c: (3, c, 2, 3)}


@dataclass
class FusionReport:
    """What ``convert_model`` did: BNs left plain, fused with an activation, fused with add (+ act), and
    notes on everything it left alone (untraceable or mode-dependent modules, unknown BN subclasses).

    ``guarded``: per module path, what its fused forward assumes about its arguments (checked on every
    call); ``fallbacks``: per module path, how many calls broke an assumption and ran the module's own
    forward, unfused (counted as the model runs)."""
    plain: int = 0
    activation: int = 0
    residual: int = 0
    notes: List[str] = field(default_factory=list)
    guarded: Dict[str, List[str]] = field(default_factory=dict)
    fallbacks: Dict[str, int] = field(default_factory=dict)
    coverage: Optional[object] = None  # a coverage.Coverage once triton_bn.fusion_coverage measured it

    @property
    def converted(self) -> int:
        return self.plain + self.activation + self.residual


# -- activations ------------------------------------------------------------------------------------------
def activation_of_module(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) of the activation ``module`` computes, or None: PyTorch's own classes by type,
    any other module (Hugging Face's ``SiLUActivation``/``GELUActivation``, timm's, a library's own) by what it
    does (``activation_by_behaviour``)."""
    name = _MODULES.get(type(module))
    if name == "leaky_relu":
        return name, float(module.negative_slope)
    if name == "gelu":
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.01
    if name is not None:
        return name, 0.01
    return activation_by_behaviour(module)


def _probe_values(dtype: torch.dtype) -> torch.Tensor:
    """The inputs an activation is recognised on: the range where they differ (-8 to 8, fine steps), every kink
    (-3, 0, 3, 6 and their neighbours), large values (where sigmoid saturates and GELU's tails vanish) and tiny
    ones (where leaky slopes and GELU's curvature show), in a [2, C, H, W] tensor as a BN's output is."""
    grid = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    points = torch.tensor([-3.0, 0.0, 3.0, 6.0], dtype=torch.float64)
    near = torch.cat([points - 1e-3, points, points + 1e-3])
    extremes = torch.tensor([-1e4, -100.0, -30.0, -1e-3, -1e-6, 1e-6, 1e-3, 30.0, 100.0, 1e4], dtype=torch.float64)
    values = torch.cat([grid, near, extremes])
    values = torch.cat([values, values.flip(0)])[:192]  # 2 x 4 x 4 x 6
    return values.reshape(2, 4, 4, 6).to(dtype)


# What a module's output may differ from ours by on the probes and still be that activation (a formula written
# another way, x * sigmoid(x) for silu, rounds differently), and the dtypes it is probed in.
_PROBE_TOLERANCE = {torch.float64: (1e-12, 1e-9), torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-2, 2e-2),
                    torch.float16: (2e-3, 2e-3)}


def activation_by_behaviour(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) when ``module`` behaves as one of triton_bn's activations, else None.

    A module is taken for an activation only when it holds no parameters, no buffers (no state the kernels
    would not have) and no child modules (a container's children must keep their paths), and its output equals
    that activation's within rounding on every probe value (``_probe_values``), in float64, fp32, bf16 and fp16, in training and in eval mode, returning the input's
    shape and dtype, without error; an in-place one (``inplace=True``) is probed on copies and counts as the
    activation it computes. The slope of a leaky ReLU is read off the probes, then checked with the rest.
    Modules whose output depends on anything else (dropout in training, randomness, a flag they read later)
    fail some probe in some mode and are left alone."""
    if isinstance(module, nn.Identity) or any(True for _ in module.children()) or any(True for _ in module.buffers()) \
            or any(True for _ in module.parameters()):
        return None  # a container is not taken whole: its children's paths must still resolve in the copy
    was_training = module.training
    try:
        outputs = {}
        for training in (True, False):
            module.train(training)
            for dtype in _PROBE_TOLERANCE:
                probe = _probe_values(dtype)
                with torch.no_grad():
                    out = module(probe.clone())
                if not isinstance(out, torch.Tensor) or out.shape != probe.shape or out.dtype != dtype:
                    return None
                outputs[training, dtype] = (probe, out)
    except Exception:  # noqa: BLE001 - a module that can not take a tensor alone is no activation
        return None
    finally:
        module.train(was_training)
    probe, out = outputs[False, torch.float64]
    slope = float(out[probe == -1e-3].mean() / -1e-3) if bool((probe == -1e-3).any()) else 0.01
    for name in SUPPORTED_ACTIVATIONS:
        negative_slope = slope if name == "leaky_relu" else 0.01
        if name == "leaky_relu" and not (0.0 < slope < 1.0):
            continue
        expected = torch_activation(name, negative_slope)
        if all(_close(out, expected(probe), *_PROBE_TOLERANCE[dtype]) for (_, dtype), (probe, out) in outputs.items()):
            return name, negative_slope
    return None


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool(torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True).all())


# What convert_model takes for an activation by type (activations.TABLE): PyTorch's classes, the functions and
# the tensor methods a traced forward may call
_MODULES = {cls: a.name for a in ACTIVATION_TABLE for cls in a.modules}
_FUNCTIONS = {fn: a.name for a in ACTIVATION_TABLE for fn in a.functions}
_METHODS = {method: a.name for a in ACTIVATION_TABLE for method in a.methods}


def _activation_of_node(node: fx.Node, children: Dict[str, nn.Module]) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) when ``node`` applies a supported activation to its first argument and
    nothing else."""
    if node.op == "call_module" and node.target in children:
        return activation_of_module(children[node.target]) if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name = _FUNCTIONS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            name = "gelu_tanh"
        slope = 0.01
        if name == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if not isinstance(slope, (int, float)):
                return None
        elif len(node.args) > 1 and not isinstance(node.args[1], bool):  # relu(x, inplace) only
            return None
        return name, float(slope)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
        return _METHODS[node.target], 0.01
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


# -- BN swap ----------------------------------------------------------------------------------------------
def _torch_base(module: nn.Module) -> Optional[type]:
    return next((base for base in _SWAPS if isinstance(module, base)), None)


def _new_batch_norm(cls, module: nn.Module) -> nn.Module:
    extra = (getattr(module, "process_group", None),) if issubclass(cls, SyncBatchNorm) else ()
    new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, *extra)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return carry_state(module, new)


def _tail_candidates(module: nn.Module):
    """Orders in which ``module``'s children might run after its BN: first what fx reads off its
    ``forward`` (eval mode: a training-mode forward may assign buffers, which fx can not record), then,
    for a forward fx can not read, every order of up to three children."""
    names = [name for name, _ in module.named_children()]
    try:
        graph = trace_one_level(module, training=False).graph
        nodes = list(graph.nodes)
        bn = [n for n in nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(bn) == 1 and len(inputs) == 1 and bn[0].args and bn[0].args[0] is inputs[0]:
            chain, node = [], bn[0]
            while len(node.users) == 1:
                user = next(iter(node.users))
                if user.op == "output":
                    yield tuple(chain)
                    break
                if user.op != "call_module" or user.target not in names or user.args != (node,) or user.kwargs:
                    break
                chain.append(user.target)
                node = user
    except Exception:  # noqa: BLE001 - an unreadable forward just leaves the brute-force candidates
        pass
    if len(names) <= 3:
        for order in itertools.permutations(names):
            yield order


def _behaves_like(original: nn.Module, candidate: nn.Module, base: type) -> bool:
    """Same outputs, running statistics and batch count on float64 probes: two training steps (with the
    same random stream, for dropout), then eval."""
    shape = _PROBE_SHAPES[base](original.num_features)
    original, candidate = copy.deepcopy(original).double().cpu(), candidate.double().cpu()
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    try:
        for step, probe in enumerate(probes):
            training = step < 2
            outputs = []
            for module in (original, candidate):
                module.train(training)
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(step)
                    outputs.append(module(probe))
            if not torch.allclose(outputs[0], outputs[1], rtol=1e-9, atol=1e-12):
                return False
        states = [m.state_dict() for m in (original, candidate)]
        return states[0].keys() == states[1].keys() and all(
            torch.allclose(states[0][k].double(), states[1][k].double(), rtol=1e-9, atol=1e-12) for k in states[0])
    except Exception:  # noqa: BLE001 - a candidate that fails to run is simply not the same module
        return False


def replacement(module: nn.Module, report: Optional[FusionReport] = None, path: str = "") -> Optional[nn.Module]:
    """triton_bn's module for a PyTorch BN (or one of its subclasses), sharing its parameters and buffers;
    None when ``module`` is not a BN, is already ours, or is a subclass whose ``forward`` is not
    understood (then ``report`` gets a note)."""
    base = _torch_base(module)
    if base is None or isinstance(module, OUR_MODULES):
        return None
    plain_cls, tail_cls = _SWAPS[base]
    if type(module) is base or type(module).forward is base.forward:
        return _new_batch_norm(plain_cls, module)
    for tail in _tail_candidates(module):
        candidate = _new_batch_norm(tail_cls, copy.deepcopy(module))
        candidate.tail = tail
        for name, child in module.named_children():
            candidate.add_module(name, copy.deepcopy(child))
        if _behaves_like(module, candidate, base):
            new = _new_batch_norm(tail_cls, module)
            new.tail = tail
            for name, child in module.named_children():
                new.add_module(name, child)
            new.train(module.training)
            return new
    if report is not None:
        report.notes.append(f"{path or 'model'}: {type(module).__name__} subclasses {base.__name__} with its own "
                            "forward, which was not recognised; left as it is")
    return None


def _fuse_own_activation(bn: nn.Module) -> bool:
    """A tailed BN takes over the first non-identity module of its tail when that is a supported
    activation (that child becomes an Identity, so its name and state_dict stay)."""
    for name in bn.tail:
        child = getattr(bn, name)
        if isinstance(child, nn.Identity):
            continue
        act = activation_of_module(child)
        if act is None:
            return False
        bn.activation, bn.negative_slope = act
        setattr(bn, name, nn.Identity())
        return True
    return False


def swap_batch_norms(model: nn.Module, report: FusionReport, fuse: bool) -> nn.Module:
    """Replace every convertible BN of ``model`` (the root too) in place; returns the (new) root."""
    root_replacement = replacement(model, report)
    if root_replacement is not None:
        model = root_replacement
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            new = replacement(child, report, f"{path}.{name}" if path else name)
            if new is not None:
                setattr(module, name, new)
    if fuse:
        for module in model.modules():
            if getattr(module, "tail", ()) and isinstance(module, OUR_MODULES) and _fuse_own_activation(module):
                report.activation += 1
    return model


# -- fusion -------------------------------------------------------------------------------------------------
def _plain(module: nn.Module) -> bool:
    """One of our BNs with nothing fused yet and nothing running after it."""
    return isinstance(module, OUR_MODULES) and module.activation is None and not has_tail(module)


def one_level_graphs(model: nn.Module, modes, skip=()):
    """({module: OneLevelTrace}, [(path, module, why not)]) for every module with children (but those of the
    types in ``skip``, and ours) whose forward torch.fx traces, the same way in every training mode of
    ``modes``. A module that already runs a fused forward gives that one (it is what runs). The others keep
    their own forward."""
    traces, failures = {}, []
    inlined = {id(owner.get_submodule(path)) for owner in model.modules() if running_graph(owner) is not None
               for path in running_graph(owner).inlined}  # their calls are in their caller's graph
    for path, module in model.named_modules():
        if isinstance(module, OUR_MODULES + tuple(skip)) or not any(True for _ in module.children()) \
                or id(module) in inlined:
            continue
        fused = running_graph(module)
        if fused is not None:
            traces[module] = OneLevelTrace(fused.graph, fused.guard)
            continue
        try:
            traces[module] = _trace_in_modes(module, modes)
        except _DependsOnMode:
            failures.append((path or "model", module, "its forward depends on the training mode"))
        except Exception as exc:  # noqa: BLE001 - data-dependent control flow, unsupported constructs, ...
            failures.append((path or "model", module, f"torch.fx could not trace its forward ({type(exc).__name__}: "
                                                      f"{str(exc)[:120]})"))
    return traces, failures


class _DependsOnMode(Exception):
    """A forward whose graph differs between training modes."""


def _trace_in_modes(module: nn.Module, modes, fixed=None, not_tensors=()) -> OneLevelTrace:
    """``tracing.trace_one_level`` in every training mode of ``modes``: their one graph, with the guard of all
    of them. Raises _DependsOnMode where the graphs differ, and trace_one_level's error where fx can not trace."""
    traced = [trace_one_level(module, mode, fixed, not_tensors) for mode in modes]
    if any(t.graph.python_code("self").src != traced[0].graph.python_code("self").src for t in traced[1:]):
        raise _DependsOnMode()
    guard = traced[0].guard
    for other in traced[1:]:
        guard = guard.merged(other.guard.arguments, other.guard.attributes)
    return OneLevelTrace(traced[0].graph, guard)


def _traces(model: nn.Module, report: FusionReport):
    """The one-level traces to fuse in (the same in both modes), and notes for the modules with BN
    children that have none."""
    traces, failures = one_level_graphs(model, (True, False))
    untraced = []
    for path, module, why in failures:
        if any(_plain(child) for child in module.children()):
            report.notes.append(f"{path}: {why}; its BNs were swapped, not fused")
            if why.startswith("torch.fx"):
                untraced.append(path)
    return traces, untraced


def call_counts(model: nn.Module, traces) -> Counter:
    """How often each module object is called, over every traced graph, plus one for every extra place it
    is registered (a module shared between parents is never fused or replaced). A module a graph hands to
    a function as a value (a helper kept as a call, ``tracing.helper_that_failed``) may be called there
    unseen: it and its descendants count as called twice more, so none of them is fused or folded, unless
    the function only reads settings off it (``tracing.reads_only_settings``: Hugging Face's
    ``apply_tf_padding`` reads the conv's stride and kernel size)."""
    counts = Counter()
    for module, trace in traces.items():
        for node in trace.graph.nodes:
            if node.op == "call_module":
                counts[id(module.get_submodule(node.target))] += 1
            elif node.op == "get_attr":
                value = attribute_at(module, node.target)
                if isinstance(value, nn.Module) and not all(
                        user.op == "call_function" and reads_only_settings(user, node, value) for user in node.users):
                    for inner in value.modules():
                        counts[id(inner)] += 2
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for key, times in registered.items():
        counts[key] += times - 1
    return counts


def residual_operand(value):
    """The other operand of a fused ``bn(x) + other``, where the graph computes it: fused, a None would
    read as "no residual" where the original add raises, so None raises here. (Anything else the BN module
    adds as the original would: ``modules.fusable``.) Traced again by fx (a pickled fused forward is
    re-traced when loaded), it stays one call."""
    if isinstance(value, fx.Proxy):
        return value.tracer.create_proxy("call_function", residual_operand, (value,), {})
    if value is None:
        raise TypeError("triton_bn: a residual add fused by convert_model got None (the original model would have "
                        "added it to a BN output)")
    return value


def _current_trace(module: nn.Module, traces) -> Optional[OneLevelTrace]:
    """What ``module``'s forward runs now, as a trace: its fused forward's graph and guard, or its own."""
    fused = running_graph(module)
    return OneLevelTrace(fused.graph, fused.guard) if fused is not None else traces.get(module)


def _fusable_user(node: fx.Node, children: Dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value goes only to an activation of it, or to an add with another computed value."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    if _activation_of_node(user, children) is not None and user.args and user.args[0] is node:
        return True
    if _is_add(user):
        other = user.args[1] if user.args[0] is node else user.args[0]
        return isinstance(other, fx.Node) and other is not node and other.op != "get_attr"
    return False


def _partner_is_batch_norm(node: fx.Node, children: Dict[str, nn.Module], counts: Counter) -> bool:
    """Whether ``node`` goes to an add whose other operand is a plain BN of the module's own, called only there."""
    user = next(iter(node.users))
    if not _is_add(user):
        return False
    other = user.args[1] if user.args[0] is node else user.args[0]
    partner = children.get(other.target) if other.op == "call_module" else None
    return partner is not None and _plain(partner) and counts[id(partner)] == 1 and len(other.users) == 1


def _inlinable(owner: nn.Module, node: fx.Node, traces, counts: Counter, depth: int = 0) -> Optional[OneLevelTrace]:
    """The trace to inline for ``node``, a call of a descendant of ``owner`` whose forward ends in a plain BN
    (or in a call of a descendant that does, down to ``depth`` 4), or None. The descendant must be called
    only there, be one argument per parameter of its forward, hold no hooks, and its forward's graph hold
    for every call (no argument checks: only attributes, which the caller's guard takes over)."""
    if node.op != "call_module" or node.kwargs or depth > 4:
        return None
    try:
        inner_module = owner.get_submodule(node.target)
    except AttributeError:
        return None
    inner = _current_trace(inner_module, traces)
    if inner is None or isinstance(inner_module, OUR_MODULES) or counts[id(inner_module)] != 1 \
            or inner.guard.arguments or any(getattr(inner_module, hooks) for hooks in HOOK_REGISTRIES):
        return None
    placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(node.args) or any(n.target.startswith("*") for n in placeholders):
        return None
    result = next(n for n in inner.graph.nodes if n.op == "output").args[0]
    while isinstance(result, fx.Node) and passes_through(inner_module, result) and len(result.users) == 1:
        result = result.args[0]  # inline_call leaves it out
    if not isinstance(result, fx.Node) or result.op != "call_module" or len(result.users) != 1:
        return None
    tail = inner_module.get_submodule(result.target)
    if _plain(tail):
        ends_in_bn = counts[id(tail)] == 1 and len(result.args) == 1 and not result.kwargs
    else:
        ends_in_bn = _inlinable(inner_module, result, traces, counts, depth + 1) is not None
    return inner if ends_in_bn else None


def set_module(owner: nn.Module, path: str, value: nn.Module) -> None:
    """``owner.<path> = value`` for a dotted path (a descendant's child)."""
    parent, _, name = path.rpartition(".")
    setattr(owner.get_submodule(parent) if parent else owner, name, value)


def _fuse_module(module: nn.Module, trace: OneLevelTrace, counts: Counter, report: FusionReport, path: str,
                 traces=None) -> None:
    """Fuse the activations and residual adds that follow ``module``'s own plain BN children in its graph,
    and those that follow a BN ending a child's forward (that child's graph inlined: ``inline_call``, so
    the BN is a node of this graph). What the graph assumed (``trace.guard``, plus the inlined children's
    checks), plus "a fused residual taken from an argument is given", is checked on every call of the
    fused forward; a call that breaks it runs the module's own forward with these fusions undone
    (``TracedForward``), so everything changed on a descendant is noted here."""
    graph, guard = trace.graph, trace.guard
    children = dict(module.named_children())
    own_calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    rewrite, activation_owners, taken = False, [], {}
    followers = {}  # BN path -> what followed it and is now fused: for replaying on another graph
    inlined_any = False
    inlined = True
    while inlined and traces is not None:  # a child's tail BN, then a grandchild's in what was inlined, ...
        inlined, served = False, set()
        for node in list(graph.nodes):
            if not _fusable_user(node, children) or next(iter(node.users)) in served \
                    or _partner_is_batch_norm(node, children, counts):
                continue  # (one operand of an add is enough: the fusion takes one BN, a child of its own first)
            inner = _inlinable(module, node, traces, counts)
            if inner is not None:
                served.add(next(iter(node.users)))
                guard = guard.merged(attributes=inline_call(graph, node, inner, module))
                inlined = rewrite = inlined_any = True
        children.update({node.target: module.get_submodule(node.target) for node in graph.nodes
                         if node.op == "call_module" and node.target not in children})
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in children or not _plain(children[node.target]):
            continue
        bn = children[node.target]
        if counts[id(bn)] != 1 or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        act = _activation_of_node(user, children)
        if act is not None and user.args[0] is node:
            bn.activation, bn.negative_slope = act
            activation_owners.append(node.target)
            if user.op == "call_module" and counts[id(children[user.target])] == 1:
                taken[user.target] = children[user.target]
                set_module(module, user.target, nn.Identity())  # the graph's call now passes through
                followers[node.target] = ("taken", user.target)
            else:
                followers[node.target] = ("erased", _call_of(user))
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                rewrite = True
            report.activation += 1
        elif _is_add(user):
            other = user.args[1] if user.args[0] is node else user.args[0]
            # a parameter or buffer operand broadcasts: only an operand shaped like the BN output is fused
            if not isinstance(other, fx.Node) or other is node or other.op == "get_attr":
                continue
            after = next(iter(user.users)) if len(user.users) == 1 else None
            act = _activation_of_node(after, children) if after is not None else None
            if act is not None and after.args[0] is user:
                bn.activation, bn.negative_slope = act
                activation_owners.append(node.target)
            else:
                after = None
            followers[node.target] = ("residual", _call_of(user), _call_of(after) if after is not None else None)
            check = _fuse_residual(graph, node, user, other, after)
            if check is not None:  # checked before the graph runs: a call with anything else runs unfused
                guard = guard.merged([check])
            rewrite = True
            report.residual += 1
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    for name, child in module.named_children():  # activations nothing calls any more: show that they do nothing
        unused = name not in called and counts[id(child)] == own_calls[name]
        if unused and own_calls[name] and activation_of_module(child) is not None and name not in taken:
            taken[name] = child
            setattr(module, name, nn.Identity())
    if not (rewrite or (guard.narrows and (activation_owners or taken))):
        return  # the module's own forward, with the children changed above, computes the fused result
    graph.lint()
    previous = running_graph(module)  # converted twice: keep what the first conversion undoes
    variants = []
    if previous is not None:
        activation_owners = list(previous.activation_owners) + activation_owners
        taken = {**taken, **previous.taken}
    elif not inlined_any:
        variants = _variants(module, guard, followers, taken)
    if guard.describe():
        report.guarded[path or "model"] = guard.describe() + [
            f"else a second fused graph, for: {'; '.join(variant_guard.describe())}" for _, variant_guard in variants]
    forward = TracedForward(module, graph, guard, path, report, activation_owners, taken, variants)
    object.__setattr__(module, "forward", forward)  # not a submodule: bypass nn.Module


def _call_of(node: fx.Node) -> tuple:
    """What ``node`` calls and with what besides its first operand: two graphs' nodes that compare equal here
    compute the same from that operand (constants only: a node of another graph never compares equal)."""
    return node.op, node.target, tuple(node.args[1:]), dict(node.kwargs)


def _fuse_residual(graph: fx.Graph, node: fx.Node, user: fx.Node, other: fx.Node,
                   after: Optional[fx.Node]) -> Optional[ArgumentCheck]:
    """``node`` (a BN call) -> ``user`` (its add with ``other``) [-> ``after``, the activation the BN now applies]
    made one call of the BN with ``residual=other``. Returns the check the guard needs where ``other`` is (part
    of) an argument: given, not None (else a None would read as "no residual"); a computed one goes through
    ``residual_operand``, which raises for None."""
    tail = after if after is not None else user
    argument, indices = root_and_path(other)
    if argument is not None:
        check, residual = ArgumentCheck(argument.target, indices, "given",
                                        why=f"fused as the residual of {node.target}"), other
    else:
        check = None
        with graph.inserting_after(tail):
            residual = graph.call_function(residual_operand, (other,))
    with graph.inserting_after(tail if argument is not None else residual):
        fused = graph.call_module(node.target, (node.args[0],), {"residual": residual})
    tail.replace_all_uses_with(fused)
    for dead in ([after] if after is not None else []) + [user, node]:
        graph.erase_node(dead)
    return check


def _variants(module: nn.Module, guard, followers: Dict[str, tuple], taken: Dict[str, nn.Module]):
    """[(graph, guard)]: for each argument the fused graph needs given ("not_none": ViTPose's head is traced
    with ``flip_pairs``, and called without; DLA's tree blocks with ``shortcut``) or a tensor ("plain_tensor":
    torchvision's dense layers test ``isinstance(input, Tensor)`` and are called with lists), the forward
    traced again with it None, or as a value that is no tensor (of the converted module: its children already
    changed), its fusions replayed there (``_fusions_replayed``). Where they can not be (that branch's data
    flow differs at a fused BN, or it does not trace), such calls run the original, as before. Not for a
    module that inlined a child's graph (``inline_call``)."""
    fixed = {check.name: check.value for check in guard.arguments if check.kind == "equals"}
    variants, tried = [], set()
    for check in guard.arguments:
        if check.path or check.kind not in ("not_none", "plain_tensor") or check.name.startswith("*") \
                or (check.kind, check.name) in tried:
            continue
        tried.add((check.kind, check.name))
        none = {check.name: None} if check.kind == "not_none" else {}
        not_tensors = (check.name,) if check.kind == "plain_tensor" else ()
        try:
            traced = _trace_in_modes(module, (True, False), {**fixed, **none}, not_tensors)
        except Exception:  # noqa: BLE001 - that branch does not trace (or differs by mode): such calls run the original
            continue
        checks = _fusions_replayed(traced.graph, followers, taken)
        if checks is not None:
            traced.graph.lint()
            variants.append((traced.graph, traced.guard.merged(checks)))
    return variants


def _fusions_replayed(graph: fx.Graph, followers: Dict[str, tuple], taken: Dict[str, nn.Module]):
    """The fused graph's rewrites made again in ``graph`` (another trace of the same forward), where each fused
    BN is called at most once and its value goes exactly where it went in the fused graph: to the activation
    module it took (an Identity now: the call stays), to the same activation function (erased: the BN applies
    it), or to the same add [and activation] (made one call with ``residual``). Returns the argument checks the
    residuals need, or None where the data flow differs (or a taken activation module is called elsewhere: it
    is an Identity now)."""
    matched, checks = Counter(), []
    for target, follower in followers.items():
        calls = [node for node in graph.nodes if node.op == "call_module" and node.target == target]
        if not calls:
            continue  # not called for these calls: nothing fused to replay
        node = calls[0]
        if len(calls) > 1 or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if follower[0] == "taken":
            if (user.op, user.target) != ("call_module", follower[1]) or user.args[:1] != (node,):
                return None
            matched[follower[1]] += 1
        elif follower[0] == "erased":
            if _call_of(user) != follower[1] or user.args[:1] != (node,):
                return None
            user.replace_all_uses_with(node)
            graph.erase_node(user)
        else:  # "residual": the add, then the activation the BN took (or None)
            _, add, act = follower
            if not _is_add(user) or (user.op, user.target, dict(user.kwargs)) != (add[0], add[1], add[3]):
                return None
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(other, fx.Node) or other is node or other.op == "get_attr":
                return None
            after = None
            if act is not None:
                after = next(iter(user.users)) if len(user.users) == 1 else None
                if after is None or _call_of(after) != act or after.args[:1] != (user,):
                    return None
            check = _fuse_residual(graph, node, user, other, after)
            checks += [check] if check is not None else []
    called = Counter(node.target for node in graph.nodes if node.op == "call_module" and node.target in taken)
    return checks if called == matched else None


def convert_model(module: nn.Module, fuse_activations: bool = True, *, inplace: bool = False) -> nn.Module:
    """``module`` with every PyTorch BatchNorm (1d/2d/3d, SyncBatchNorm, and understood subclasses) replaced by
    triton_bn's, and, with ``fuse_activations``, the activations and residual adds that follow them fused. The
    result is an instance of the same class, carrying ``fusion_report`` (a ``FusionReport``). See the module
    docstring for the guarantees.

    By default it is a converted **copy** and the input model is left untouched: its parameters are new
    tensors, so an optimizer built on the original's parameters before the conversion does not train the
    copy (build it from ``converted.parameters()``). ``inplace=True`` converts ``module`` itself, as
    ``torch.ao.quantization.fuse_modules(..., inplace=True)`` does: the BN modules are replaced, but their
    parameters and buffers are the very tensors they were, so an optimizer built before keeps training them.

    Raises TypeError for anything but an ``nn.Module`` (a model's name is not one: build the model first);
    warns when the model holds no BatchNorm (nothing to convert)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"triton_bn.convert_model: expected a torch.nn.Module (a model instance, such as "
                        f"torchvision.models.resnet18()), got {type(module).__name__} {module!r:.60}")
    report = FusionReport()
    model = swap_batch_norms(module if inplace else copy.deepcopy(module), report, fuse_activations)
    if fuse_activations:
        traces, untraced = _traces(model, report)
        counts = call_counts(model, traces)
        paths = {module: path for path, module in model.named_modules()}
        # the deepest modules first: a child's forward is fused before its caller may inline it
        for owner, trace in reversed(list(traces.items())):
            _fuse_module(owner, trace, counts, report, paths[owner], traces)
        if untraced:
            warnings.warn(f"triton_bn.convert_model: torch.fx could not trace {', '.join(untraced)}; the BNs directly "
                          "inside were swapped but not fused (details in fusion_report.notes)")
    total = sum(1 for m in model.modules() if isinstance(m, OUR_MODULES))
    if total == 0 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn(f"triton_bn.convert_model: {type(model).__name__} has no BatchNorm layer; nothing was "
                      "converted (the result computes what the original does, on PyTorch's layers)")
    report.plain = total - report.activation - report.residual
    model.fusion_report = report
    return model


# -- SyncBatchNorm ------------------------------------------------------------------------------------------
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # triton_bn's modules subclass these


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm*d`` and ``triton_bn.BatchNorm*d`` in ``module`` (in place, like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) by ``triton_bn.SyncBatchNorm``, keeping the
    fused activation (and so the residual form of converted models), the tail of a ``BatchNormAct*d``
    (it becomes a ``SyncBatchNormAct``), parameters, buffers and mode. A PyTorch BN subclass with its own
    forward is converted only when ``convert_model`` understands it; otherwise it is left as it is, with a
    warning."""
    out = module
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, nn.SyncBatchNorm):
        source = module
        if type(module) not in _CONVERTIBLE and not isinstance(module, FusedBatchNormMixin):
            source = replacement(module)
            if source is None:
                warnings.warn(f"triton_bn.convert_sync_batchnorm: {type(module).__name__} has its own forward, which "
                              "was not recognised; left as it is (not synchronised)")
        if source is not None:
            tail = getattr(source, "tail", ())
            out = carry_state(source, (SyncBatchNormAct if tail else SyncBatchNorm)(
                source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats,
                process_group, activation=getattr(source, "activation", None),
                negative_slope=getattr(source, "negative_slope", 0.01)))
            out.tail = tail
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
