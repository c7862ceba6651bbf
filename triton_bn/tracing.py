"""One-level torch.fx traces of a module's ``forward``, the assumptions each trace bakes in, and the
fused forward that runs a rewritten trace only while those assumptions hold.

fx runs ``forward`` once, on proxies, and keeps only the tensor operations it saw. Every decision the
Python code took on the way is frozen into the graph as it went during that one run:

- ``arg is None`` on a proxy is False, so the graph is the branch for an argument that is not None;
- ``isinstance(arg, ...)``, ``type(arg)``, ``callable``, ``hasattr``, ``torch.is_tensor`` answer for
  whatever the proxy is (we answer as for a plain ``torch.Tensor``, and say so in the guard);
- ``a, b = arg`` fixes how many elements ``arg`` has;
- the module's own attributes read in Python (``self.use_se``, ``self.downsample is None``, a
  ``ModuleList`` iterated) are taken as they were during the trace;
- ``zip(arg, self.layers)`` runs as many times as the container has entries (``arg`` must have as many);
- ``if arg.shape[1] != self.channels: raise ...`` (or an ``assert``) takes the side that does not raise: the
  condition, read from ``arg``'s metadata alone, is asked again of each call (``_OneLevelTracer.to_bool``).
  Any other decision on a traced value fails the trace, even where the forward catches fx's error.

``trace_one_level`` records each of these in a ``Guard``. The argument checks come from two sources: the
introspecting builtins are replaced, in ``forward``'s own module namespace and only while it is traced, by
versions that note which argument they were asked about; and ``is None`` tests, which no Python hook can
see, are found by tracing ``forward`` once more with each argument set to None and comparing the graphs
(different graphs, or a trace that fails, mean the code depends on that argument being None).

``TracedForward`` runs a (fused) graph against the module only when its guard holds for the call, and
otherwise runs the module's class ``forward`` with every fusion undone for that call (the BNs without the
activation they took over, the activation modules that became ``nn.Identity`` back in place). Calls that
fall back are counted per module in ``FusionReport.fallbacks`` and warned about once per module.
"""
import builtins
import collections
import contextlib
import copy
import dataclasses
import dis
import importlib
import inspect
import linecache
import operator
import sys
import threading
import types
import warnings
from bisect import bisect_left
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import fx, nn

_MISSING = object()
# attributes every nn.Module has: hooks, registries, flags. ``training`` is covered by tracing each mode.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"forward"}
# containers whose children a forward may iterate: the graph unrolls them as they were
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)
# immutable values that compare by value when a module attribute was re-assigned an equal one
_VALUE_TYPES = (bool, int, float, complex, str, bytes)
# argument checks that only a call the original forward raises on can fail
_KEEPS_AN_ERROR = frozenset({"raises_on_none", "condition"})


class GuardError(RuntimeError):
    """A forward that inspects a value fx can not stand for (the type of something it computed)."""


# -- the checks ---------------------------------------------------------------------------------------------
class ArgumentCheck(NamedTuple):
    """What one argument (or an element of it, at ``path``) must be for the traced graph to apply."""
    name: str           # the parameter's name in forward's signature; "*args" / "**kwargs" for the var ones
    path: Tuple         # indices into the argument, () for the argument itself
    # what the trace decided on (the forward branches on it): "not_none", "plain_tensor" (type is
    # torch.Tensor), "length"; what keeps an error an error: "raises_on_none" (forward raises for None, the
    # graph might not); what a fusion needs: "given" (not None: an operand that became a BN's residual, where
    # None would read as "no residual"); "not_tensor": a second graph's, traced for a value that is no tensor
    # (a list: ``convert._variants``); "condition": forward raises unless ``value``'s program, run on the
    # argument, gives the truth value the trace took (a shape check: ``if x.shape[1] != self.c: raise``)
    kind: str
    length: int = -1    # for kind "length"
    why: str = ""
    value: Any = None   # for kind "equals": the flag's value the graph was traced with; for kind
                        # "condition": (program, the truth value taken), the program an fx.GraphModule

    def describe(self) -> str:
        where = self.name + "".join(f"[{i!r}]" for i in self.path)
        what = {"not_none": "is not None", "raises_on_none": "is not None", "given": "is not None",
                "plain_tensor": "is a torch.Tensor", "not_tensor": "is not a torch.Tensor",
                "length": f"has {self.length} elements",
                "equals": f"is {self.value!r}", "condition": "passes the check that raises"}[self.kind]
        return f"{where} {what} ({self.why})"

    def test(self):
        """A predicate on the argument's value: whether this check holds."""
        kind, length = self.kind, self.length
        if kind in ("not_none", "raises_on_none", "given"):
            test = lambda value: value is not None  # noqa: E731
        elif kind == "plain_tensor":
            test = lambda value: type(value) is torch.Tensor  # noqa: E731
        elif kind == "not_tensor":
            test = lambda value: not isinstance(value, torch.Tensor)  # noqa: E731
        elif kind == "equals":
            expected = self.value

            def test(value):
                return value is expected or (type(value) is type(expected) and value == expected)
        elif kind == "condition":
            program, taken = self.value
            run = program.forward  # its code alone: nn.Module's __call__ costs 3 us a call, the code 0.5

            def test(value):
                try:
                    return bool(run(value)) is taken
                except Exception:  # noqa: BLE001 - the original raises there too; let it, with its own error
                    return False
        else:
            test = lambda value: hasattr(value, "__len__") and len(value) == length  # noqa: E731
        if not self.path:
            return test
        path = self.path

        def test_element(value):
            for index in path:
                try:
                    value = value[index]
                except (IndexError, KeyError, TypeError):
                    return False
            return test(value)
        return test_element


class AttributeCheck(NamedTuple):
    """A module attribute read during the trace: it must still be the same value (``kind`` "same"), or a
    container with the same entries (``kind`` "keys"). ``name`` may be a dotted path (a descendant's
    attribute, for a descendant whose forward was inlined: ``inline_call``); for such a descendant, kind
    "unhooked" says that calling it runs nothing but its forward (no hooks of its own or global ones, the
    same instance ``forward`` as when it was inlined: ``value``)."""
    name: str
    kind: str
    value: Any

    def describe(self) -> str:
        what = {"keys": "has the same entries", "unhooked": "has no hooks and the same forward"}
        return f"self.{self.name} " + what.get(self.kind, "is unchanged")

    def holds(self, owner: nn.Module) -> bool:
        current = attribute_at(owner, self.name)
        if self.kind == "keys":
            return isinstance(current, nn.Module) and _entries(current) == self.value
        if self.kind == "unhooked":
            return isinstance(current, nn.Module) and current.__dict__.get("forward") is self.value \
                and not any(getattr(current, hooks) for hooks in HOOK_REGISTRIES) \
                and not any(getattr(nn.modules.module, hooks, None) for hooks in _GLOBAL_HOOKS)
        return current is self.value or (type(current) is type(self.value) and isinstance(current, _VALUE_TYPES)
                                         and current == self.value)


# What nn.Module.__call__ runs besides forward: a module's own hooks, and every module's (torch.nn.modules.module)
HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def attribute_at(owner: nn.Module, name: str):
    """``owner.name`` as the trace saw it (what a graph's ``get_attr`` reads): the instance dict, then the
    parameter, buffer and module registries (nn.Module.__getattr__'s order), without calling any hook; a dotted
    name walks down the modules. ``_MISSING`` where nothing is there."""
    if "." in name:
        head, rest = name.split(".", 1)
        inner = attribute_at(owner, head)
        return attribute_at(inner, rest) if isinstance(inner, nn.Module) else _MISSING
    value = owner.__dict__.get(name, _MISSING)
    if value is not _MISSING:
        return value
    for registry in ("_parameters", "_buffers", "_modules"):
        entries = owner.__dict__.get(registry)
        if entries is not None and name in entries:
            return entries[name]
    return _MISSING


def _entries(container: nn.Module) -> Tuple:
    return tuple(container._modules), tuple(container._parameters)


def _unique_attributes(checks: Tuple[AttributeCheck, ...]) -> Tuple[AttributeCheck, ...]:
    """One check per attribute and kind (its values may not be hashable: a list, a tensor)."""
    unique = {}
    for check in checks:
        unique.setdefault((check.name, check.kind), check)
    return tuple(unique.values())


class Guard:
    """Everything a traced graph assumed about its call: checks on the arguments and on the module's
    attributes. ``violation`` returns None when the graph applies to a call, else why not. It runs on
    every call of a fused forward, so the checks are compiled once into small functions (rebuilt after
    unpickling: closures do not pickle)."""

    def __init__(self, forward, arguments=(), attributes=()):
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # without self
        self.positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        self.varargs = next(("*" + p.name for p in parameters if p.kind == p.VAR_POSITIONAL), None)
        self.varkw = next(("**" + p.name for p in parameters if p.kind == p.VAR_KEYWORD), None)
        self.named = frozenset(p.name for p in parameters)
        self.arguments = tuple(dict.fromkeys(arguments))  # in order, without repeats
        self.attributes = _unique_attributes(tuple(attributes))
        self._compile()

    def _compile(self) -> None:
        """Per check: where the argument is found (its position, or -1 keyword-only, -2 ``*args``, -3
        ``**kwargs``), its name and default, and the predicate. Of "is not None" and "is a torch.Tensor" on
        one value only the stronger is tested (it implies the other)."""
        strength = {"raises_on_none": 0, "not_none": 0, "given": 0, "plain_tensor": 2}
        strongest = {}
        for check in self.arguments:
            # a length, a flag's value, a condition: each tested on its own
            key = (check.name, check.path, "presence") if check.kind in strength else check
            kept = strongest.get(key)
            if kept is None or strength.get(check.kind, 0) > strength.get(kept.kind, 0):
                strongest[key] = check
        tests = []
        for check in strongest.values():
            if check.name == self.varargs:
                where = -2
            elif check.name == self.varkw:
                where = -3
            else:
                where = self.positional.index(check.name) if check.name in self.positional else -1
            tests.append((where, check.name, self.defaults.get(check.name, _MISSING), check.test(), check))
        self._argument_tests = tuple(tests)

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_argument_tests"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def __bool__(self) -> bool:
        return bool(self.arguments or self.attributes)

    def merged(self, arguments=(), attributes=()) -> "Guard":
        """This guard plus more checks (the same check once)."""
        merged = copy.copy(self)
        merged.arguments = tuple(dict.fromkeys(self.arguments + tuple(arguments)))
        merged.attributes = _unique_attributes(self.attributes + tuple(attributes))
        merged._compile()
        return merged

    def violation(self, owner: nn.Module, args: tuple, kwargs: dict) -> Optional[str]:
        for where, name, default, holds, check in self._argument_tests:
            if where >= 0:
                value = args[where] if where < len(args) else kwargs.get(name, default)
            elif where == -1:
                value = kwargs.get(name, default)
            elif where == -2:
                value = args[len(self.positional):]
            else:
                value = {key: value for key, value in kwargs.items() if key not in self.named}
            # _MISSING: a required argument is absent; the graph raises the TypeError the original would
            if value is not _MISSING and not holds(value):
                broken = [other.describe() for other in self.arguments if other.name == check.name
                          and other.path == check.path and not other.test()(value)]
                return f"{' and '.join(broken)} does not hold for this call"
        for check in self.attributes:
            if not check.holds(owner):
                return f"{check.describe()} does not hold: it changed since convert_model traced the forward"
        return None

    def describe(self) -> List[str]:
        """The checks that a call the original accepts can fail (not those that keep an error an error)."""
        return [check.describe() for check in self.arguments if check.kind not in _KEEPS_AN_ERROR]

    @property
    def narrows(self) -> bool:
        """Whether a call the original forward accepts may fail a check (then the module needs its fused
        forward to send such calls to the unfused one, even where its graph was not rewritten)."""
        return bool(self.describe() or self.attributes)

    @property
    def branches_on_arguments(self) -> bool:
        """Whether the forward takes a Python-level decision on its arguments that the graph froze (then
        calls the guard rejects may take another path through the module's own forward)."""
        return any(check.kind in ("not_none", "plain_tensor", "not_tensor", "length") for check in self.arguments)


# -- recording what the Python code asked about ---------------------------------------------------------------
def root_and_path(node: fx.Node):
    """(placeholder, indices) when ``node`` is an argument or an element of one (a chain of constant
    indexing), else (None, ())."""
    path = []
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and isinstance(node.args[1], (int, str)):
        path.append(node.args[1])
        node = node.args[0]
    return (node, tuple(reversed(path))) if node.op == "placeholder" else (None, ())


class _Recorder:
    """Collects argument checks while fx traces; installed as the tracer's ``recorder``. ``decided``: the
    nodes of conditions the trace decided (``_OneLevelTracer.to_bool``), which the graph then need not compute."""

    def __init__(self, not_tensors=()):
        self.checks: List[ArgumentCheck] = []
        self.decided: List[fx.Node] = []
        self.refused: Optional[BaseException] = None
        self.not_tensors = frozenset(not_tensors)  # arguments traced as values that are no tensor

    def not_a_tensor(self, proxy: fx.Proxy, how: str, classes=torch.Tensor) -> bool:
        """Whether ``proxy`` is an argument traced as no tensor, asked whether it is an instance of ``classes``
        (recorded: the argument must not be a tensor). Only tensor classes have an answer then: a value that is
        no tensor is an instance of none of them, but of a list or a tuple, or not, no trace can say."""
        root, path = root_and_path(proxy.node)
        if root is None or root.target not in self.not_tensors or path:
            return False
        flat = classes if isinstance(classes, tuple) else (classes,)
        if not all(isinstance(cls, type) and issubclass(cls, torch.Tensor) for cls in flat):
            raise self.refuse(GuardError(f"forward calls {how} on {root.target}, traced as no tensor, with classes "
                                         "the trace can not answer for"))
        self.checks.append(ArgumentCheck(root.target, (), "not_tensor", why=f"traced so: forward calls {how} on it"))
        return True

    def refuse(self, error: BaseException) -> BaseException:
        """``error``, noted: the trace fails with it even where the forward catches it (fx's TraceError is a
        ValueError: ``try: ... except ValueError:`` around a decision on a proxy would trace the handler)."""
        if self.refused is None:
            self.refused = error
        return error

    def inspected(self, proxy: fx.Proxy, how: str, kind: str, length: int = -1) -> None:
        root, path = root_and_path(proxy.node)
        if root is not None and root.target in self.not_tensors and not path and kind == "plain_tensor":
            raise self.refuse(GuardError(f"forward calls {how} on {root.target}, traced as no tensor"))
        if root is None:
            raise self.refuse(GuardError(f"forward calls {how} on a value it computed ({proxy.node.format_node()}): "
                                         "the trace can not say what that value will be"))
        self.checks.append(ArgumentCheck(root.target, path, kind, length, f"forward calls {how} on it"))


def _current_instruction(frame) -> Tuple[list, int]:
    """The instructions of ``frame``'s code and the index of the one it is executing."""
    instructions = list(dis.get_instructions(frame.f_code))
    if sys.version_info >= (3, 11):
        return instructions, bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
    return instructions, frame.f_lasti // 2


class _RecordingProxy(fx.Proxy):
    def __iter__(self):
        # fx allows iteration only to unpack a fixed number of values (``a, b = arg``); that number is an
        # assumption about the argument. The calling frame's instruction says how many (as fx itself reads it).
        instructions, index = _current_instruction(sys._getframe(1))
        instruction = instructions[index]
        if instruction.opname == "UNPACK_SEQUENCE":
            if root_and_path(self.node)[0] is not None:
                self.tracer.recorder.inspected(self, "unpacking", "length", instruction.argval)
            return (self[i] for i in range(instruction.argval))
        raise self.tracer.recorder.refuse(fx.proxy.TraceError("forward iterates over a traced value"))

    # what needs the value itself (fx's own ``len`` raises too; noted, as in ``_Recorder.refuse``)
    def __len__(self):
        raise self.tracer.recorder.refuse(fx.proxy.TraceError("forward asks len() of a traced value"))

    def __int__(self):
        raise self.tracer.recorder.refuse(fx.proxy.TraceError("forward converts a traced value to int"))

    def __float__(self):
        raise self.tracer.recorder.refuse(fx.proxy.TraceError("forward converts a traced value to float"))


def _introspecting_builtins(recorder: _Recorder):
    """Replacements for the builtins that look at a value's identity or type: for a proxy they answer as
    for a plain torch.Tensor and record that the argument must be one."""

    def _isinstance(value, classes):
        if isinstance(value, fx.Proxy):
            if recorder.not_a_tensor(value, "isinstance", classes):
                return False
            recorder.inspected(value, "isinstance", "plain_tensor")
            return builtins.issubclass(torch.Tensor, classes)
        return builtins.isinstance(value, classes)

    def _type(*args):
        if len(args) == 1 and isinstance(args[0], fx.Proxy):
            recorder.inspected(args[0], "type()", "plain_tensor")
            return torch.Tensor
        return builtins.type(*args)

    def _callable(value):
        if isinstance(value, fx.Proxy):
            recorder.inspected(value, "callable()", "plain_tensor")
            return False
        return builtins.callable(value)

    def _hasattr(value, name):
        if isinstance(value, fx.Proxy):
            recorder.inspected(value, "hasattr()", "plain_tensor")
            return builtins.hasattr(torch.Tensor, name)
        return builtins.hasattr(value, name)

    def _id(value):
        if isinstance(value, fx.Proxy):
            recorder.inspected(value, "id()", "plain_tensor")
        return builtins.id(value)

    def _is_tensor(value):
        if isinstance(value, fx.Proxy):
            if recorder.not_a_tensor(value, "torch.is_tensor"):
                return False
            recorder.inspected(value, "torch.is_tensor", "plain_tensor")
            return True
        return builtins.isinstance(value, torch.Tensor)

    def _zip(*iterables, **options):
        # ``for hidden, layer in zip(argument, self.layers)``: the loop runs as many times as the container
        # has entries (when the argument has as many: a check)
        lengths = [len(it) for it in iterables if not isinstance(it, fx.Proxy) and builtins.hasattr(it, "__len__")]
        if lengths and any(isinstance(it, fx.Proxy) for it in iterables):
            count = min(lengths)
            for it in iterables:
                if isinstance(it, fx.Proxy):
                    recorder.inspected(it, f"zip() with a container of {count}", "length", count)
            iterables = [[it[i] for i in range(count)] if isinstance(it, fx.Proxy) else it for it in iterables]
        return builtins.zip(*iterables, **options)

    return {"isinstance": _isinstance, "type": _type, "callable": _callable, "hasattr": _hasattr, "id": _id,
            "zip": _zip}, _is_tensor


@contextlib.contextmanager
def _builtins_recorded(forward, recorder: _Recorder):
    """The introspecting builtins replaced in ``forward``'s module namespace (and ``torch.is_tensor``)
    while it is traced; functions of that module that ``forward`` calls see them too. Names the module
    defines itself are left alone."""
    namespace = forward.__globals__
    replacements, is_tensor = _introspecting_builtins(recorder)
    added = {name: fn for name, fn in replacements.items() if name not in namespace}
    namespace.update(added)
    original_is_tensor, torch.is_tensor = torch.is_tensor, is_tensor
    try:
        yield
    finally:
        torch.is_tensor = original_is_tensor
        for name, fn in added.items():
            if namespace.get(name) is fn:
                del namespace[name]


@contextlib.contextmanager
def _attribute_reads_recorded(module: nn.Module, checks: List[AttributeCheck]):
    """While fx traces, ``module`` is an instance of a subclass that notes each of its own attributes the
    code reads: plain instance attributes (the value), registered entries that are None (``self.downsample
    is None``), and containers (their entries, which a loop over them unrolls)."""
    cls = type(module)

    def __getattribute__(self, name):
        value = super(recording, self).__getattribute__(name)
        if name not in _MODULE_INTERNALS and name in object.__getattribute__(self, "__dict__"):
            checks.append(AttributeCheck(name, "same", value))
        return value

    def __getattr__(self, name):
        value = cls.__getattr__(self, name)
        if value is None:
            checks.append(AttributeCheck(name, "same", None))
        elif isinstance(value, _CONTAINERS):
            checks.append(AttributeCheck(name, "keys", _entries(value)))
        return value

    recording = type(cls)(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__getattr__": __getattr__,
                                                  "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__class__ = recording
    try:
        yield
    finally:
        module.__class__ = cls


# -- conditions that only guard a raise -------------------------------------------------------------------------
# the jumps of an ``if`` (3.10's and 3.12's names; 3.11 says FORWARD, and a loop's backward jump is no ``if``)
_BRANCH_JUMPS = frozenset({"POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_FALSE",
                           "POP_JUMP_FORWARD_IF_TRUE"})
# where a straight run of code may end without reaching its raise
_LEAVES = ("JUMP", "RETURN", "YIELD", "FOR_ITER", "SEND", "END_FOR")
# what a condition may read of its argument: metadata, known before any kernel runs, and free to ask again
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_PURE_FUNCTIONS = frozenset({operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                             operator.ge, operator.not_, operator.and_, operator.or_, operator.add, operator.sub,
                             operator.mul, operator.floordiv, operator.mod})


def _side_without_raise(frame) -> Optional[bool]:
    """For a ``bool()`` asked by an ``if`` in ``frame``: the truth value whose side does not raise, when
    exactly one side is a straight run of code ending in ``raise`` (outside any ``try`` or ``with``, which
    could catch it); else None."""
    instructions, index = _current_instruction(frame)
    if instructions[index].opname in ("TO_BOOL", "COMPARE_OP") and index + 1 < len(instructions):
        index += 1  # 3.13 asks bool() in TO_BOOL (or a COMPARE_OP that converts); its jump follows
    jump = instructions[index]
    if jump.opname not in _BRANCH_JUMPS or index + 1 >= len(instructions):
        return None
    after = instructions[index + 1].offset
    when_true, when_false = (after, jump.argval) if jump.opname.endswith("FALSE") else (jump.argval, after)
    raises_if_true, raises_if_false = (_only_raises(frame.f_code, instructions, start)
                                       for start in (when_true, when_false))
    if raises_if_true == raises_if_false:
        return None
    return raises_if_false


def _only_raises(code, instructions, start: int) -> bool:
    """Whether the code from offset ``start`` runs straight into a ``raise`` that nothing in ``code`` catches."""
    for instruction in instructions:
        if instruction.offset < start:
            continue
        if instruction.opname == "RAISE_VARARGS":
            if sys.version_info >= (3, 11):
                return not any(entry.start <= instruction.offset < entry.end
                               for entry in dis.Bytecode(code).exception_entries)
            return not any(other.opname.startswith("SETUP_") for other in instructions)
        if any(word in instruction.opname for word in _LEAVES):
            return False
    return False


def _argument_program(node: fx.Node) -> Optional[Tuple[str, fx.GraphModule]]:
    """(argument, program) when ``node`` is computed from one argument of the forward by reading only its
    metadata (``_METADATA_ATTRIBUTES``, ``_METADATA_METHODS``, of the argument or of an element of it) and
    constants through pure operators: a program that computes it again from that argument's value, before
    the graph runs. Else None: a condition on the argument's values (``x[0, 0] > 5``) is not known before the
    kernels run (on a GPU, asking it would wait for them)."""
    needed, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current not in needed:
            needed.add(current)
            pending.extend(current.all_input_nodes)
    # what each node is, in graph order: the argument or an element of it ("value"), or metadata read off
    # one, or what pure operators make of metadata ("metadata"); anything else (None) refuses
    kinds = {}
    for current in (n for n in node.graph.nodes if n in needed):
        inputs = [kinds[value] for value in current.all_input_nodes]
        if current.op == "placeholder":
            kinds[current] = "value"
        elif current.op == "call_method" and current.target in _METADATA_METHODS \
                or current.op == "call_function" and current.target is getattr \
                and current.args[1] in _METADATA_ATTRIBUTES:
            kinds[current] = "metadata" if inputs == ["value"] else None
        elif current.op == "call_function" and current.target is operator.getitem and inputs == ["value"]:
            kinds[current] = "value"
        elif current.op == "call_function" and current.target in _PURE_FUNCTIONS:
            kinds[current] = "metadata" if all(kind == "metadata" for kind in inputs) else None
        else:
            kinds[current] = None
        if kinds[current] is None:
            return None
    roots = [current for current in needed if current.op == "placeholder"]
    if kinds[node] != "metadata" or len(roots) != 1:
        return None
    program, copies = fx.Graph(), {}
    for current in (n for n in node.graph.nodes if n in needed):
        copies[current] = program.node_copy(current, lambda value: copies[value])
    program.output(copies[node])
    return roots[0].target, fx.GraphModule(nn.Module(), program, "Condition")


def _decided_removed(graph: fx.Graph, decided: List[fx.Node]) -> None:
    """The nodes that computed only conditions the trace decided, out of the graph (they have no users)."""
    needed, pending = set(), list(decided)
    while pending:
        current = pending.pop()
        if current not in needed and current.op != "placeholder":
            needed.add(current)
            pending.extend(current.all_input_nodes)
    for current in reversed(list(graph.nodes)):
        if current in needed and not current.users:
            graph.erase_node(current)


# -- tracing ----------------------------------------------------------------------------------------------------
class _OneLevelTracer(fx.Tracer):
    """Every submodule call stays a call site: only the traced module's own ``forward`` is recorded. The
    functions in ``helpers`` (of ``forward``'s own module namespace) stay call sites too: they run on the
    real values at every call, as in the original (``helper_that_failed`` says which and why)."""

    def __init__(self, recorder: Optional[_Recorder] = None, helpers=()):
        super().__init__(autowrap_functions=tuple(helpers))
        self.recorder = recorder or _Recorder()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _RecordingProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # ``if x.shape[1] != self.channels: raise ValueError(...)``: the graph takes the side that does not
        # raise, and the guard checks the condition on the argument (a call that fails it runs the original,
        # which raises its own error). Any other decision on a traced value stays fx's TraceError.
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("torch.fx"):
            frame = frame.f_back
        taken = _side_without_raise(frame) if frame is not None else None
        program = _argument_program(obj.node) if taken is not None else None
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() if frame is not None else "?"
        if program is None:
            raise self.recorder.refuse(fx.proxy.TraceError(f"forward takes a decision on a traced value: `{line}`"))
        self.recorder.checks.append(ArgumentCheck(program[0], (), "condition", value=(program[1], taken),
                                                  why=f"`{line}` raises unless it is {taken}"))
        self.recorder.decided.append(obj.node)
        return taken

    def create_arg(self, a):
        # fx rebuilds a dict or a list of any subclass (Hugging Face's ModelOutput, an OrderedDict) as the plain
        # type (a tuple keeps its type): a graph that returned one would return something else. A dataclass
        # dict that its fields describe whole becomes a call that builds it again (``rebuild_fields_dict``).
        if isinstance(a, (dict, list)) and type(a) not in (dict, list) and not hasattr(a, "__fx_create_arg__"):
            name = fields_dict_name(a)
            if name is not None:
                node = self.create_node("call_function", rebuild_fields_dict, (name, super().create_arg(dict(a))), {})
                node.meta["is_wrapped"] = True  # fx's code then declares it wrapped: a pickled graph, re-traced
                return node                     # from that code when loaded, keeps it one call
            raise fx.proxy.TraceError(f"forward builds a {type(a).__name__}, which the graph would turn into a "
                                      f"plain {'dict' if isinstance(a, dict) else 'list'}")
        return super().create_arg(a)

    # (A pickled fused forward is re-traced from its code when loaded: fx's generated code declares each
    # helper with ``torch.fx.wrap``, so that trace keeps it a call too.)


def _traced(module: nn.Module, recorder: _Recorder, helpers=(), concrete_args=None) -> fx.Graph:
    """One fx trace of ``module.forward``; a refusal the forward caught fails it all the same."""
    graph = _OneLevelTracer(recorder, helpers).trace(module, concrete_args=concrete_args)
    if recorder.refused is not None:
        raise recorder.refused
    return graph


def fields_dict_name(value) -> Optional[str]:
    """The importable name ("module:qualname") of ``value``'s class where ``value`` is a dict that a dataclass's
    fields describe whole, so that ``rebuild_fields_dict`` builds an equal one from its items: its instance
    holds exactly its fields, its items are exactly the fields that are not None, in field order, each the very
    field value (what Hugging Face's ModelOutput holds); else None."""
    cls = type(value)
    if not (isinstance(value, dict) and dataclasses.is_dataclass(cls) and hasattr(value, "__dict__")):
        return None
    names = [field.name for field in dataclasses.fields(cls)]
    items = [n for n in names if getattr(value, n) is not None]
    if set(vars(value)) != set(names) or list(value) != items or dict.__len__(value) != len(items) \
            or any(dict.__getitem__(value, n) is not getattr(value, n) for n in items):
        return None
    name = f"{cls.__module__}:{cls.__qualname__}"
    return name if _class_named(name) is cls else None


def _class_named(name: str):
    """The class of a ``fields_dict_name``, its module imported if it is not yet (a graph loaded in a new process)."""
    module_name, _, qualname = name.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def rebuild_fields_dict(name: str, items: Dict[str, Any]):
    """The dataclass dict of class ``name`` (``fields_dict_name``) holding ``items``: each field set, None where
    not an item, and the items in field order, without running the class's own ``__init__`` or
    ``__post_init__`` (ModelOutput's reads a lone first field as key/value pairs). What a graph returns in
    place of the forward's ModelOutput."""
    cls = _class_named(name)
    out = cls.__new__(cls)
    for field in dataclasses.fields(cls):
        object.__setattr__(out, field.name, items.get(field.name))
    # the item store of its nearest plain base: an OrderedDict keeps its order apart from dict's own table
    store = next(base for base in cls.__mro__ if base in (collections.OrderedDict, dict))
    for key, value in items.items():
        store.__setitem__(out, key, value)
    return out


def reads_only_settings(call: fx.Node, argument: fx.Node, module: nn.Module) -> bool:
    """Whether the helper ``call`` (a call_function node of a plain Python function) only reads settings off
    ``module``, the value of ``argument``: in the helper's bytecode, the parameter it is bound to is only ever
    loaded to read an attribute whose value is a number, a string, a bool, None or a tuple of these
    (``conv.stride``, ``conv.kernel_size``), never called, passed on, stored, captured or rebound. Such a
    helper can not see a BN's fused activation or a folded layer's new weights; any other use might."""
    function = call.target
    if not isinstance(function, types.FunctionType):
        return False
    try:
        bound = inspect.signature(function).bind(*call.args, **call.kwargs)
    except TypeError:
        return False
    names = [name for name, value in bound.arguments.items() if value is argument]
    code = function.__code__
    if len(names) != 1 or names[0] in code.co_cellvars or any(
            isinstance(value, (list, tuple, dict)) and argument in fx.node.map_aggregate(value, lambda v: v)
            for value in bound.arguments.values()):
        return False
    instructions = list(dis.get_instructions(code))
    for index, instruction in enumerate(instructions):
        if instruction.argval != names[0] or not instruction.opname.startswith(("LOAD_FAST", "STORE_FAST",
                                                                                 "DELETE_FAST")):
            continue
        following = instructions[index + 1] if index + 1 < len(instructions) else None
        if instruction.opname != "LOAD_FAST" or following is None or following.opname != "LOAD_ATTR" \
                or not _is_setting(getattr(module, following.argval, _MISSING)):
            return False
    return True


def _is_setting(value) -> bool:
    if isinstance(value, tuple):
        return all(_is_setting(item) for item in value)
    return value is None or type(value) in _VALUE_TYPES


# How many helper functions one forward may keep as calls before it counts as untraceable.
HELPER_LIMIT = 4


def helper_that_failed(exc: BaseException, forward) -> Optional[Callable]:
    """The function of ``forward``'s own module namespace that ``forward`` called directly and in which
    tracing ``exc`` was raised, or None. Such a helper (Hugging Face's ``apply_tf_padding`` computes a
    padding from ``int(height)``: a proxy has no value) can run as one call on the real values instead
    of being traced through: its result is then an opaque value in the graph, computed as the original
    computes it at every call; nothing of it is fused. A method of the module, or a failure in
    ``forward``'s own lines, is not such a helper."""
    frames = []
    trace = exc.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame.f_code)
        trace = trace.tb_next
    for index, code in enumerate(frames[:-1]):
        if code is forward.__code__:
            called = frames[index + 1]
            for value in forward.__globals__.values():
                if isinstance(value, types.FunctionType) and value.__code__ is called:
                    return value
            return None
    return None


class OneLevelTrace(NamedTuple):
    graph: fx.Graph
    guard: Guard


def _assert_is_none_node(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none"


def _canonical(graph: fx.Graph, as_none: Optional[str] = None) -> List[Tuple]:
    """The graph's operations with nodes replaced by their position, arguments by their name, and the
    argument ``as_none`` by None: two graphs compute the same when these are equal."""
    names: Dict[fx.Node, Any] = {}
    operations = []
    for node in graph.nodes:
        if node.op == "placeholder":
            names[node] = None if node.target == as_none else ("argument", node.target)
            continue
        if _assert_is_none_node(node):
            continue
        names[node] = ("node", len(operations))
        rename = lambda a: names.get(a, ("dropped",)) if isinstance(a, fx.Node) else a  # noqa: E731
        operations.append((node.op, node.target, fx.node.map_aggregate(node.args, rename),
                           fx.node.map_aggregate(node.kwargs, rename)))
    return operations


@contextlib.contextmanager
def _constants_removed(module: nn.Module, added: set):
    """Attributes fx attaches to the module while tracing (tensor constants) are removed again and named in
    ``added``: a graph that needs one could not run against the module itself."""
    before = set(vars(module))
    try:
        yield
    finally:
        added.update(set(vars(module)) - before)
        for name in set(vars(module)) - before:
            delattr(module, name)


def _none_dependent(module: nn.Module, graph: fx.Graph, forward, helpers=(), flags=None,
                    not_tensors=()) -> List[ArgumentCheck]:
    """The named arguments whose being None changes what ``forward`` computes: traced again with each one
    set to None, the graph differs from ``graph`` read with that argument as None, or the trace fails."""
    checks = []
    for parameter in list(inspect.signature(forward).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.name in (flags or {}):
            continue
        added = set()
        try:
            recorder = _Recorder(not_tensors)
            with _builtins_recorded(forward, recorder), _constants_removed(module, added):
                variant = _traced(module, recorder, helpers, {**(flags or {}), parameter.name: None})
            if not added and _canonical(variant) == _canonical(graph, as_none=parameter.name):
                continue
            kind, why = "not_none", "forward computes something else when it is None"
        except Exception:  # noqa: BLE001 - the original raises on None; the fused graph might not
            kind, why = "raises_on_none", "forward raises when it is None"
        checks.append(ArgumentCheck(parameter.name, (), kind, why=why))
    return checks


_tracing = threading.Lock()  # the builtins are replaced in a module namespace while one forward is traced


def _flags(forward, with_none: bool = False) -> Dict[str, Any]:
    """``forward``'s parameters whose default is a flag (a bool, an int or a string): Hugging Face's
    ``output_hidden_states=False``, ``return_dict=True``. When fx can not trace a forward that branches on
    one, it is traced again with every flag at its default (fx's ``concrete_args``), and the guard sends
    a call with any other value to the module's own forward. A None default counts only ``with_none``, the
    last try: that is as often an optional tensor that real calls pass (``attention_mask=None``), whose
    every call would then run unfused; but where the branch for a given one can not be traced at all
    (ViTPose's head: ``flip_pairs``; Parakeet's conv module: ``attention_mask``), the calls without it fuse."""
    flags = {}
    for parameter in list(inspect.signature(forward).parameters.values())[1:]:
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) \
                and (type(parameter.default) in (bool, int, str) or with_none and parameter.default is None):
            flags[parameter.name] = parameter.default
    return flags


def _flag_placeholders(graph: fx.Graph, forward, flags: Dict[str, Any]) -> None:
    """fx leaves a parameter given in ``concrete_args`` out of the graph's signature: put each flag back, in
    its place and with its default, so the fused forward takes every call the original takes (unused: the
    guard checked its value). A None fx keeps as a placeholder of another name (``flip_pairs_1``) with an
    assertion that it is None: both go, the parameter's own placeholder comes back in their place."""
    for node in [node for node in graph.nodes if _assert_is_none_node(node)]:
        placeholder = node.args[0]
        graph.erase_node(node)
        if isinstance(placeholder, fx.Node) and placeholder.op == "placeholder" and not placeholder.users:
            graph.erase_node(placeholder)
    present = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    after = None
    for parameter in list(inspect.signature(forward).parameters.values())[1:]:
        name = parameter.name if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) \
            else ("*" if parameter.kind == parameter.VAR_POSITIONAL else "**") + parameter.name
        if name in present:
            after = present[name]
            continue
        if name not in flags:
            continue
        where = graph.inserting_after(after) if after is not None else graph.inserting_before(next(iter(graph.nodes)))
        with where:
            after = graph.placeholder(name, default_value=flags[name])


def trace_one_level(module: nn.Module, training: bool, fixed: Optional[Dict[str, Any]] = None,
                    not_tensors=()) -> OneLevelTrace:
    """fx graph of ``module.forward`` with ``module.training`` set to ``training`` (its children's flags
    are not touched: they are leaves), and the guard of everything the graph assumed. A graph that needs a
    tensor constant fx attached to the module raises (it could not run against the module itself). A
    helper function that can not be traced through becomes one call in the graph (``helper_that_failed``;
    up to ``HELPER_LIMIT`` of them), the trace is tried again; then with the flags at their defaults
    (``_flags``). ``fixed``: arguments traced at these values (the guard checks each call has them);
    ``not_tensors``: arguments traced as values that are no tensor (``_Recorder.not_a_tensor``)."""
    forward = type(module).forward
    fixed = dict(fixed or {})
    # what the arguments are traced with, try after try: what is fixed, then the flags, then the None defaults
    stages = [fixed, {**_flags(forward), **fixed}, {**_flags(forward, with_none=True), **fixed}]
    was, helpers, flags = module.training, [], fixed or None
    with _tracing:
        module.training = training
        try:
            while True:
                recorder, attributes, added = _Recorder(not_tensors), [], set()
                try:
                    with _builtins_recorded(forward, recorder), _attribute_reads_recorded(module, attributes), \
                            _constants_removed(module, added):
                        graph = _traced(module, recorder, helpers, flags)
                    break
                except Exception as exc:  # noqa: BLE001 - retried for a helper function, or with the flags fixed
                    helper = helper_that_failed(exc, forward)
                    larger = next((stage for stage in stages if len(stage) > len(flags or {})), None)
                    if helper is not None and helper not in helpers and len(helpers) < HELPER_LIMIT:
                        helpers.append(helper)
                    elif larger is not None:
                        flags = larger
                    else:
                        raise
            if added:
                raise RuntimeError(f"forward creates tensor constants ({', '.join(sorted(added))})")
            arguments = recorder.checks + _none_dependent(module, graph, forward, helpers, flags, not_tensors)
            arguments += [ArgumentCheck(name, (), "equals", value=value,
                                        why="traced so" if name in fixed else "the trace took the branches of its default")
                          for name, value in (flags or {}).items()]
            if flags:
                _flag_placeholders(graph, forward, flags)
            _decided_removed(graph, recorder.decided)  # after _none_dependent: its variants still compute them
        finally:
            module.training = was
    # a container the graph calls as a whole (an nn.Sequential) is looked up at call time, entries and all
    targets = [node.target for node in graph.nodes if node.op in ("call_module", "get_attr")]
    attributes = [check for check in attributes if check.kind != "keys" or check.name not in targets
                  or any(target.startswith(check.name + ".") for target in targets)]
    return OneLevelTrace(graph, Guard(forward, arguments, attributes))


# -- one level deeper -------------------------------------------------------------------------------------------
def inline_call(graph: fx.Graph, call: fx.Node, inner: OneLevelTrace, owner: nn.Module) -> List[AttributeCheck]:
    """Replace ``call`` (a call of the descendant ``owner.<call.target>``, with one positional argument per
    parameter of its forward) by the nodes of that descendant's graph ``inner``, their module paths
    prefixed, so that what the descendant returns becomes visible to the caller's graph (a BN that ends a
    child's forward, followed by the caller's activation or add). ``inner.guard`` must hold no argument
    checks. Returns what the caller's guard must add: the descendant is the same object, with the same
    entries, with no hooks (the inlined graph does not go through its ``__call__``), and its own attribute
    checks, by their paths."""
    prefix = call.target
    descendant = owner.get_submodule(prefix)
    checks = [AttributeCheck(prefix, "same", descendant), AttributeCheck(prefix, "keys", _entries(descendant)),
              AttributeCheck(prefix, "unhooked", descendant.__dict__.get("forward"))]
    environment = {}
    placeholders = [node for node in inner.graph.nodes if node.op == "placeholder"]
    for node, argument in zip(placeholders, call.args):
        environment[node] = argument
    result = None
    with graph.inserting_before(call):
        for node in inner.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda value: environment[value])
                break
            if passes_through(descendant, node):  # (Hugging Face's "no activation") left out, while it stays one
                path = f"{prefix}.{node.target}"
                checks += [AttributeCheck(path, "same", descendant.get_submodule(node.target)),
                           AttributeCheck(path, "unhooked", None)]
                environment[node] = environment[node.args[0]]
                continue
            copied = graph.node_copy(node, lambda value: environment[value])
            if node.op in ("call_module", "get_attr"):
                copied.target = f"{prefix}.{node.target}"
            environment[node] = copied
    call.replace_all_uses_with(result)
    graph.erase_node(call)
    return checks + [AttributeCheck(f"{prefix}.{check.name}", check.kind, check.value)
                     for check in inner.guard.attributes]


def passes_through(owner: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` calls a plain ``nn.Identity`` of ``owner`` on one value (no hooks, no forward of its own)."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    module = attribute_at(owner, node.target)
    return type(module) is nn.Identity and "forward" not in module.__dict__ \
        and not any(getattr(module, hooks) for hooks in HOOK_REGISTRIES)


# -- the fused forward ------------------------------------------------------------------------------------------
def _set_path(root: nn.Module, target: str, leaf) -> None:
    *parents, name = target.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        setattr(owner, name, leaf)


class TracedForward:
    """A module's ``forward`` replaced by a (fused) fx graph of it, run against the module itself while
    ``guard`` holds.

    Installed as the instance attribute ``forward``, so ``module(x)`` runs the graph with ``self`` bound
    to the module: every child and buffer is looked up at call time. The generated code lives in a
    code-only GraphModule whose attributes are empty stand-ins, so it holds no reference to the model's
    tensors; it pickles and deep-copies as GraphModules do.

    A call the guard rejects runs the first of ``variants`` (fused graphs of the same forward traced for
    other calls, each with its own guard: ``convert._variant_for_none``) whose guard holds, and otherwise
    the class ``forward`` against a per-call twin of the module whose children are unfused: each BN named
    in ``activation_owners`` without its activation (a twin sharing its parameters, buffers and hooks), and
    each activation module in ``taken`` (name -> the original module, now an ``nn.Identity`` in the model)
    back in place."""

    def __init__(self, owner: nn.Module, graph: fx.Graph, guard: Guard, path: str = "", report=None,
                 activation_owners=(), taken=None, variants=()):
        self.owner = owner
        self.code = _code_only(owner, graph, type(owner).__name__ + "Fused")
        # (guard, code) of other fused graphs, each for calls the first one's guard rejects (``with_none``)
        self.variants = tuple((variant_guard, _code_only(owner, variant_graph, type(owner).__name__ + "FusedVariant"))
                              for variant_graph, variant_guard in variants)
        self.guard = guard
        self.checked = guard if guard else None  # None: nothing to check per call
        self.path, self.report = path or "model", report
        self.activation_owners, self.taken = tuple(activation_owners), dict(taken or {})
        self.warned = False

    @property
    def graph(self) -> fx.Graph:
        return self.code.graph

    # What tools that inspect a module's forward read (torch.export: its code object's file and line,
    # ``inspect.signature``): the original forward's, which this one stands for.
    @property
    def __code__(self):
        return type(self.owner).forward.__code__

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(type(self.owner).forward)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __call__(self, *args, **kwargs):
        if self.checked is not None:
            reason = self.checked.violation(self.owner, args, kwargs)
            if reason is not None:
                for guard, code in self.variants:
                    if guard.violation(self.owner, args, kwargs) is None:
                        return type(code).forward(self.owner, *args, **kwargs)
                return self.unfused(reason, args, kwargs)
        return type(self.code).forward(self.owner, *args, **kwargs)

    def unfused(self, reason: str, args: tuple, kwargs: dict):
        if self.report is not None:
            self.report.fallbacks[self.path] = self.report.fallbacks.get(self.path, 0) + 1
        if not self.warned:
            self.warned = True
            warnings.warn(f"triton_bn: {self.path} ran its own forward, unfused, because {reason}; such calls "
                          "stay correct but are not fused (counted in fusion_report.fallbacks)", stacklevel=3)
        return type(self.owner).forward(self.twin_unfused(), *args, **kwargs)

    @property
    def inlined(self) -> List[str]:
        """Paths of the descendants whose forward this graph holds inlined (``inline_call``): it calls their
        children itself while its guard holds."""
        entries = {check.name for check in self.guard.attributes if check.kind == "keys"}
        # (an identity left out of an inlined graph has an "unhooked" check too, but no "keys" one)
        return [check.name for check in self.guard.attributes if check.kind == "unhooked" and check.name in entries]

    def undone(self) -> Dict[str, nn.Module]:
        """What undoes this forward's fusions: module path -> the module to run there instead."""
        replacements = {}
        for path in self.activation_owners:
            bn = attribute_at(self.owner, path)
            if hasattr(bn, "without_activation"):
                replacements[path] = bn.without_activation()
        replacements.update(self.taken)
        return replacements

    def twin_unfused(self) -> nn.Module:
        """A per-call twin of the module (sharing parameters, buffers, hooks and children; the copy's dicts are
        its own) whose class forward computes the original's: ``undone()`` in place, down dotted paths
        through twins of the modules on the way (each with its own fused forward undone too)."""
        return _twin(self.owner, self.undone())


def _code_only(owner: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``graph``'s generated code in a GraphModule whose attributes are empty stand-ins for ``owner``'s."""
    stand_ins = nn.Module()
    called = [node.target for node in graph.nodes if node.op == "call_module"]
    for target in called:  # before the attributes: a module the graph calls may also be handed on as a value
        _set_path(stand_ins, target, nn.Module())
    for node in graph.nodes:
        if node.op == "get_attr":
            module = isinstance(attribute_at(owner, node.target), nn.Module)
            _set_path(stand_ins, node.target, nn.Module() if module else torch.empty(0))
    return fx.GraphModule(stand_ins, graph, name)


def _twin(module: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    twin = copy.copy(module)
    twin.__dict__.pop("forward", None)  # its class forward runs (a fused one is undone by ``replacements``)
    children = dict(module._modules)
    deeper: Dict[str, Dict[str, nn.Module]] = {}
    for path, replacement in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            deeper.setdefault(head, {})[rest] = replacement
        else:
            children[head] = replacement
    for head, inner in deeper.items():
        child = children[head]
        own = running_graph(child)
        children[head] = _twin(child, {**(own.undone() if own is not None else {}), **inner})
    twin.__dict__["_modules"] = children
    return twin


def running_graph(module: nn.Module) -> Optional[TracedForward]:
    """The module's fused forward, if ``convert_model`` gave it one."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, TracedForward) else None
