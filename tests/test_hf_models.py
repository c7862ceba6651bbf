"""Hugging Face transformers architectures (tests/hf_zoo.py, built from small configurations) converted: exact
against the original in float64, training and eval, and every BN that feeds an activation (or an add and then
one) in the original's data flow fused, except those hf_zoo.UNFUSED names with the reason. Also the three ways
convert_model reaches forwards that a plain one-level fx trace can not: a helper function kept as one call
(Hugging Face's ``apply_tf_padding``), flag arguments traced at their defaults, and a child whose forward ends
in a BN inlined into its caller (the residual BN one module deeper in ResNet blocks)."""
import copy
import dataclasses
import io
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_bn
import hf_zoo

transformers = pytest.importorskip("transformers")

# float64: what the converted model may differ from the original by, relative to the output's largest value.
# Training mode normalises with a batch of 2 (deep layers' variances near eps magnify rounding: HGNetV2's
# original and converted differ by ~1e-7 there, as two orders of PyTorch's own summation would); a wrong fusion
# is wrong by O(1).
TRAINING_RTOL, EVAL_RTOL = 1e-6, 1e-8


def _convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton_bn.convert_model(model)


def _relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((expected - got).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def _outputs(model, x, training: bool):
    model.train(training)
    torch.manual_seed(1)  # the same dropout masks
    return hf_zoo.first_tensor(model(x))


@pytest.mark.parametrize("name", sorted(hf_zoo.MODELS))
def test_hugging_face_model_is_exact_and_fused_where_its_data_flow_allows(name):
    model, x = hf_zoo.build(name)
    converted = _convert(model)
    model.eval(), converted.eval()
    coverage = triton_bn.fusion_coverage(model, converted, x)  # (before any call: LeViT caches tensors in eval)
    fusable = set(coverage.feeds_activation + coverage.feeds_add_activation)
    fused = set(coverage.fused_activation + coverage.fused_add_activation)
    expected_missed = hf_zoo.UNFUSED.get(name, {})
    missed = {path for path in fusable - fused}
    assert {path for path in missed if not any(path.endswith(end) for end in expected_missed)} == set(), \
        f"{name}: fusable but not fused: {sorted(missed)}; notes: {converted.fusion_report.notes}"
    assert all(any(path.endswith(end) for path in missed) for end in expected_missed), \
        f"{name}: hf_zoo.UNFUSED lists {sorted(expected_missed)}, but only {sorted(missed)} were missed"
    assert fusable, f"{name}: no BN feeds an activation: the model no longer tests fusion"
    for training, rtol in ((True, TRAINING_RTOL), (False, EVAL_RTOL)):
        expected, got = _outputs(model, x, training), _outputs(converted, x, training)
        assert expected.shape == got.shape
        assert _relative_error(expected, got) <= rtol, (name, training, _relative_error(expected, got))
    assert converted.fusion_report.fallbacks == {}


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet"])
def test_saved_and_loaded_converted_model_computes_the_same(name):
    model, x = hf_zoo.build(name)
    converted = _convert(model).eval()
    loaded = _saved_and_loaded(converted).eval()
    assert torch.equal(hf_zoo.first_tensor(converted(x)), hf_zoo.first_tensor(loaded(x)))
    assert sum(1 for m in loaded.modules() if getattr(m, "activation", None) is not None) > 0


# -- a child's tail BN, inlined -----------------------------------------------------------------------------------
def _resnet():
    model, x = hf_zoo.build("resnet")
    return model, _convert(model), x


def test_a_residual_bn_one_module_deeper_takes_the_add_and_the_activation():
    model, converted, x = _resnet()
    block = converted.encoder.stages[0].layers[0]
    bn = block.layer[2].normalization
    assert bn.activation == "relu" and isinstance(block.activation, nn.Identity)
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("residual") is not None),
                                          with_kwargs=True)
    converted.eval()(x)
    handle.remove()
    assert seen == [True]


@pytest.mark.parametrize("change", ["hook on the inlined child", "inlined child replaced", "identity replaced",
                                    "global hook"])
def test_an_inlined_child_changed_after_conversion_runs_the_original_forward(change):
    model, converted, x = _resnet()
    block, original_block = converted.encoder.stages[0].layers[0], model.encoder.stages[0].layers[0]
    calls, handle = [], None
    if change == "hook on the inlined child":
        handle = block.layer[2].register_forward_hook(lambda *args: calls.append(1))
    elif change == "inlined child replaced":  # the same computation, another object: the guard sees the swap
        block.layer[2] = copy.deepcopy(block.layer[2])
    elif change == "identity replaced":  # the last conv layer gains an activation the graph does not hold
        block.layer[2].activation = nn.Tanh()
        original_block.layer[2].activation = nn.Tanh()
    else:
        handle = nn.modules.module.register_module_forward_hook(lambda *args: calls.append(1))
    try:
        for training, rtol in ((True, TRAINING_RTOL), (False, EVAL_RTOL)):
            expected, got = _outputs(model, x, training), _outputs(converted, x, training)
            assert _relative_error(expected, got) <= rtol, (change, training)
    finally:
        if handle is not None:
            handle.remove()
    assert converted.fusion_report.fallbacks.get("encoder.stages.0.layers.0", 0) >= 2, converted.fusion_report.fallbacks
    if change in ("hook on the inlined child", "global hook"):
        assert calls, "the hook did not run"


# -- helpers kept as calls, and flags traced at their defaults -------------------------------------------------------
def pad_to_even(features: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Hugging Face's apply_tf_padding's kind: Python arithmetic on the shape (fx can not trace int() of it)."""
    height, width = features.shape[-2:]
    return F.pad(features, (0, int(width) % 2, 0, int(height) % 2 + conv.stride[0] - 1))


def normalize_twice(features: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """A helper handed a BN: it calls it where the graph can not see."""
    return bn(features) + int(features.shape[0])


class PaddedConvLayer(nn.Module):
    def __init__(self, helper_gets_bn: bool = False):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()
        self.helper_gets_bn = helper_gets_bn

    def forward(self, x):
        x = self.conv(pad_to_even(x, self.conv))
        y = self.act(self.bn(x))
        return y + normalize_twice(x, self.bn) if self.helper_gets_bn else y


class FlaggedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, output_hidden=False, scale: int = 1):
        hidden = self.conv(x)
        out = F.relu(self.bn(hidden)) * scale
        if output_hidden:
            return out, hidden
        return out


@pytest.mark.parametrize("helper_gets_bn", [False, True])
def test_a_helper_fx_can_not_trace_runs_as_one_call(helper_gets_bn):
    torch.manual_seed(0)
    model = nn.Sequential(PaddedConvLayer(helper_gets_bn)).double()
    converted = _convert(model)
    bn = converted[0].bn
    # the helper that gets the BN may call it unseen: then nothing of that BN is fused
    assert (bn.activation is None) == helper_gets_bn
    assert not any("could not trace" in note for note in converted.fusion_report.notes), converted.fusion_report.notes
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for training, rtol in ((True, 1e-12), (False, 1e-12)):
        assert _relative_error(_outputs(model, x, training), _outputs(converted, x, training)) <= rtol
    folded = triton_bn.fold_batch_norms(model.eval())
    assert torch.allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)
    # pad_to_even reads only the conv's stride: the BN folds into it; a BN the helper calls is not folded away
    assert isinstance(folded[0].bn, nn.Identity) != helper_gets_bn, folded


def _reads_stride(x, conv):
    return x * conv.stride[0]


def _reads_weight(x, conv):
    return x * conv.weight.sum()


def _calls_it(x, conv):
    return conv(x) * 0 + x


def _passes_it_on(x, conv):
    return _reads_stride(x, conv)


def _keeps_it(x, conv):
    layers = [conv]
    return x * len(layers)


def _captures_it(x, conv):
    return (lambda: conv.stride[0])() * x


@pytest.mark.parametrize("helper, only_settings", [(_reads_stride, True), (_reads_weight, False), (_calls_it, False),
                                                   (_passes_it_on, False), (_keeps_it, False), (_captures_it, False)])
def test_a_module_handed_to_a_helper_counts_as_unused_only_where_it_reads_settings(helper, only_settings):
    from torch import fx
    from triton_bn.tracing import reads_only_settings
    conv = nn.Conv2d(2, 2, 1)
    graph = fx.Graph()
    x, attribute = graph.placeholder("x"), graph.get_attr("conv")
    call = graph.call_function(helper, (x, attribute))
    assert reads_only_settings(call, attribute, conv) == only_settings
    handed_twice = graph.call_function(helper, (attribute, attribute))
    assert not reads_only_settings(handed_twice, attribute, conv)


def test_flags_are_traced_at_their_defaults_and_other_values_run_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(FlaggedLayer()).double()
    converted = _convert(model)
    layer, original = converted[0], model[0]
    assert layer.bn.activation == "relu"
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for training in (True, False):
        layer.train(training), original.train(training)
        assert torch.allclose(layer(x), original(x), rtol=1e-12, atol=1e-12)
        assert converted.fusion_report.fallbacks == ({} if training else {"0": 1})
        got, expected = layer(x, True, scale=3), original(x, True, scale=3)
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, expected))
    assert converted.fusion_report.fallbacks == {"0": 2}


class ReturnsOrderedDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        from collections import OrderedDict
        return OrderedDict(out=F.relu(self.bn(x)))


def test_a_forward_returning_a_dict_subclass_keeps_its_own_forward():
    model = nn.Sequential(ReturnsOrderedDict()).double()
    converted = _convert(model)
    out = converted[0](torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert type(out).__name__ == "OrderedDict"
    assert any("OrderedDict" in note for note in converted.fusion_report.notes), converted.fusion_report.notes


@dataclasses.dataclass
class FieldsDict(OrderedDict):
    """What Hugging Face's ModelOutput is, written here: a dataclass dict whose items are its fields that are not
    None, in field order."""
    last: torch.Tensor = None
    hidden: tuple = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class ReturnsFieldsDict(nn.Module):
    def __init__(self, extra_item: bool = False):
        super().__init__()
        self.bn, self.extra_item = nn.BatchNorm2d(3), extra_item

    def forward(self, x):
        out = FieldsDict(last=F.relu(self.bn(x)))
        if self.extra_item:  # an item no field holds: the class can not build it again
            out["more"] = x
        return out


def test_a_forward_returning_a_dataclass_dict_is_fused_and_returns_the_same_class():
    """A forward that returns a ModelOutput-like dataclass dict (EfficientNet's encoder) is fused: the graph
    builds the very class again, every field as the original's (None where not an item), the items in order,
    also after pickling; one with an item no field holds keeps its own forward."""
    model = nn.Sequential(ReturnsFieldsDict()).double()
    converted = _convert(model)
    assert converted[0].bn.activation == "relu", converted.fusion_report.notes
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    # each beside a copy of the original made before any call (each call in training updates the statistics)
    for layer, original in ((converted, copy.deepcopy(model)), (_saved_and_loaded(converted), copy.deepcopy(model))):
        for training in (True, False):
            layer.train(training), original.train(training)
            got, expected = layer[0](x), original[0](x)
            assert type(got) is FieldsDict and list(got) == ["last"] and got.hidden is None
            assert torch.allclose(got.last, expected.last, rtol=1e-12, atol=1e-12) and got["last"] is got.last
    refused = _convert(nn.Sequential(ReturnsFieldsDict(extra_item=True)).double())
    assert refused[0].bn.activation is None
    assert list(refused[0](x)) == ["last", "more"]
    assert any("FieldsDict" in note for note in refused.fusion_report.notes), refused.fusion_report.notes


class NoneFlagLayer(nn.Module):
    def __init__(self, optional_tensor=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.optional_tensor = optional_tensor

    def forward(self, x, verbose=None):
        out = F.relu(self.bn(self.conv(x)))
        if self.optional_tensor:
            if verbose is not None:  # traceable with a tensor given: the graph is that branch
                out = out * verbose
        elif verbose:  # a decision on a given value: traced only with the None default fixed
            out = out * 2
        return out


@pytest.mark.parametrize("optional_tensor", [False, True])
def test_a_none_default_is_fixed_only_when_nothing_else_traces(optional_tensor):
    """A None default is as often an optional tensor that real calls pass: fixed at None (every call with
    something else then runs the original) only when the forward can not be traced otherwise."""
    torch.manual_seed(0)
    model = nn.Sequential(NoneFlagLayer(optional_tensor)).double()
    converted = _convert(model)
    layer, report = converted[0], converted.fusion_report
    assert layer.bn.activation == "relu" and report.notes == []
    guard = layer.forward.guard.describe()
    assert any(line.startswith("verbose is None" if not optional_tensor else "verbose is not None") for line in guard)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    given = True if not optional_tensor else torch.tensor(3.0, dtype=torch.float64)
    for args in ((x,), (x, given)):
        assert torch.allclose(layer(*args), model[0](*args), rtol=1e-12, atol=1e-12)
    # verbose=True runs the original; with an optional tensor, the call without it runs a second fused graph
    assert report.fallbacks == ({"0": 1} if not optional_tensor else {})
    assert layer.forward.variants == () if not optional_tensor else len(layer.forward.variants) == 1
