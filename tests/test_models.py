"""[models] Real models convert and run exactly like the originals: the zoo of tests/zoo.py converted in
training and in eval mode, timm-style BN subclasses, state_dict parity, drop-in signatures, float64 and
gradcheck, PyTorch's own sample inputs for batch_norm and the BN modules, and folding."""
import copy
import inspect
import io
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_bn
from conftest import TOLERANCES
from zoo import ZOO, BatchNormAct2d, ScaledBatchNorm2d, TimmLike

MODES = {"train": True, "eval": False}


def _convert(model, mode):
    model.train(MODES[mode])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable model warns, as it should
        return triton_bn.convert_model(model)


def _step(model, x, seed):
    """One training step's output, loss and gradients (float64); the random stream fixed by ``seed``."""
    model.train()
    torch.manual_seed(seed)
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", list(MODES), ids=lambda m: f"converted-in-{m}")
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_converts_exactly(name, mode):
    """float64 (the pure-PyTorch path): one training step, eval, folding, state_dict, class, paths, report."""
    builder, shape, expected = ZOO[name]
    torch.manual_seed(0)
    original = builder().double()
    converted = _convert(copy.deepcopy(original), mode)
    original.train(MODES[mode])

    assert type(converted) is type(original)
    paths = [path for path, _ in original.named_modules()]
    for path in paths:
        converted.get_submodule(path)  # raises if the path is gone
    assert list(converted.state_dict().keys()) == list(original.state_dict().keys())
    report = converted.fusion_report
    assert (report.plain, report.activation, report.residual) == expected, report

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for seed in (3, 4):  # two steps: the second sees the first's running statistics
        out_ref, grads_ref = _step(original, x, seed)
        out_new, grads_new = _step(converted, x, seed)
        torch.testing.assert_close(out_new, out_ref, atol=1e-9, rtol=1e-9)
        assert grads_new.keys() == grads_ref.keys()
        for key in grads_ref:
            torch.testing.assert_close(grads_new[key], grads_ref[key], atol=1e-9, rtol=1e-9, msg=key)
        for model in (original, converted):
            model.zero_grad()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=1e-9, rtol=1e-9, msg=key)

    original.eval()
    converted.eval()
    with torch.no_grad():
        expected_eval = original(x)
        torch.testing.assert_close(converted(x), expected_eval, atol=1e-9, rtol=1e-9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for folded in (triton_bn.fold_batch_norms(converted), triton_bn.fold_batch_norms(original)):
                assert type(folded) is type(original)
                torch.testing.assert_close(folded(x), expected_eval, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["resnext", "timm", "efficientnet"])
def test_zoo_model_on_the_kernels(name):
    """The same models in fp32 through the Triton kernels (the interpreter here): one training step and
    eval against the original, at fp32 tolerance."""
    builder, shape, _ = ZOO[name]
    torch.manual_seed(0)
    original = builder()
    converted = _convert(copy.deepcopy(original), "train")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out_ref, grads_ref = _step(original, x, 3)
    out_new, grads_new = _step(converted, x, 3)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out_new, out_ref, atol=atol, rtol=rtol)
    for key in grads_ref:
        torch.testing.assert_close(grads_new[key], grads_ref[key], atol=atol, rtol=rtol, msg=key)
    original.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=atol, rtol=rtol)


def test_converted_model_is_still_the_users_model(tmp_path):
    """isinstance, indexing into containers, the very same head object, print showing what runs,
    torch.save of the whole model, deepcopy, hooks on named layers."""
    from zoo import ResNeXtLike
    torch.manual_seed(0)
    original = ResNeXtLike()
    converted = triton_bn.convert_model(original)
    assert isinstance(converted, ResNeXtLike)
    block = converted.layer1[0]
    assert isinstance(block.bn1, triton_bn.BatchNorm2d) and block.bn1.activation == "relu"
    assert block.bn3.activation == "relu"  # bn3 + add + relu
    text = repr(converted)
    assert "activation='relu'" in text and "ReLU" not in text  # every ReLU is fused: none is listed as running
    seen = []
    hook = converted.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 8, 8)
    converted.eval()
    original.eval()
    y = converted(x)
    assert len(seen) == 1
    hook.remove()
    converted.fc = nn.Linear(8, 3)  # replacing a head works as on the original
    assert converted(x).shape == (2, 3)
    converted.fc = original.fc
    for clone in (copy.deepcopy(converted), _saved_and_loaded(converted, tmp_path)):
        assert type(clone) is ResNeXtLike
        torch.testing.assert_close(clone(x), y)
        # the copy's fused forward runs against the copy's own modules, not the original's
        clone.layer1[0].conv1.weight.data.zero_()
        assert not torch.equal(clone(x), y) and torch.equal(converted(x), y)


def _saved_and_loaded(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return torch.load(path, weights_only=False)


def test_fused_forward_follows_to_and_new_children():
    """The fused forward looks children and buffers up at call time: .double() and a swapped child take
    effect, as they do on the original."""
    from zoo import ResNeXtLike
    torch.manual_seed(0)
    original = ResNeXtLike().eval()
    converted = triton_bn.convert_model(original).eval().double()
    original.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = converted(x)
    assert before.dtype == torch.float64
    torch.testing.assert_close(before, original(x), atol=1e-12, rtol=1e-12)
    new_conv = nn.Conv2d(4, 8, 1, bias=False).double()
    original.layer1[0].conv3 = new_conv
    converted.layer1[0].conv3 = new_conv
    after = converted(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, original(x), atol=1e-12, rtol=1e-12)


def test_checkpoints_load_both_ways_strict():
    torch.manual_seed(0)
    original = TimmLike()
    original(torch.randn(4, 3, 6, 6))  # some running statistics and batch counts
    converted = triton_bn.convert_model(original)
    fresh_original, fresh_converted = TimmLike(), triton_bn.convert_model(TimmLike())
    fresh_converted.load_state_dict(original.state_dict(), strict=True)
    fresh_original.load_state_dict(converted.state_dict(), strict=True)
    assert "block1.bn1.num_batches_tracked" in converted.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(fresh_converted.state_dict()[key], value) and torch.equal(fresh_original.state_dict()[key], value)


def test_timm_style_batch_norm_act_conversion():
    torch.manual_seed(0)
    model = TimmLike()
    converted = triton_bn.convert_model(model)
    stem_bn = converted.stem[1]
    assert isinstance(stem_bn, triton_bn.BatchNormAct2d) and stem_bn.activation == "silu"
    assert stem_bn.tail == ("drop", "act") and isinstance(stem_bn.act, nn.Identity)
    # a real dropout before the activation: the activation can not be fused, both stay in order
    bn = converted.block2.bn1
    assert bn.activation is None and isinstance(bn.drop, nn.Dropout) and isinstance(bn.act, nn.ReLU)
    # an unsupported activation (PReLU, with a parameter) stays a module, its parameter key kept
    assert isinstance(converted.neck[1].act, nn.PReLU) and "neck.1.act.weight" in converted.state_dict()
    # the subclass whose forward is not "BN then children" is left alone, with a note
    assert type(converted.odd) is ScaledBatchNorm2d
    assert any("ScaledBatchNorm2d" in note for note in converted.fusion_report.notes)


def test_mode_dependent_and_untraceable_modules_are_noted():
    from zoo import UntraceableLike
    with pytest.warns(UserWarning, match="could not trace stem"):
        converted = triton_bn.convert_model(UntraceableLike())
    notes = "\n".join(converted.fusion_report.notes)
    assert "stem: torch.fx could not trace" in notes
    assert "body.3: its forward depends on the training mode" in notes
    assert "forward" not in vars(converted.body[3])  # its own forward, untouched


def test_bare_batch_norm_subclass_and_sync_batch_norm_convert():
    bn = BatchNormAct2d(4, act_layer=nn.GELU)
    converted = triton_bn.convert_model(bn)
    assert isinstance(converted, triton_bn.BatchNormAct2d) and converted.activation == "gelu"
    sync = triton_bn.convert_model(nn.Sequential(nn.SyncBatchNorm(4), nn.ReLU()))
    assert type(sync[0]) is triton_bn.SyncBatchNorm and sync[0].activation == "relu"


@pytest.mark.parametrize("drop", [nn.Identity, lambda: nn.Dropout(0.2)], ids=["no-drop", "dropout"])
def test_timm_style_sync_batch_norm_act_converts(drop):
    from zoo import SyncBatchNormAct as TimmSync
    torch.manual_seed(0)
    bn = TimmSync(4)
    bn.act = nn.SiLU()
    bn.drop = drop()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn).double()
    converted = triton_bn.convert_model(model)
    assert type(converted[1]) is triton_bn.SyncBatchNormAct and set(converted[1].tail) == {"act", "drop"}
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    for training in (True, False):
        model.train(training)
        converted.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(converted(x), expected, atol=1e-9, rtol=1e-9)


def test_convert_sync_batchnorm_keeps_tails_and_leaves_unknown_subclasses():
    torch.manual_seed(0)
    model = nn.Sequential(BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.1)),
                          ScaledBatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match="ScaledBatchNorm2d"):
        synced = triton_bn.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[0]) is triton_bn.SyncBatchNormAct and synced[0].tail == ("drop", "act")
    assert type(synced[1]) is ScaledBatchNorm2d
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(synced(x), model(x), atol=1e-5, rtol=1e-5)
    converted = triton_bn.convert_sync_batchnorm(triton_bn.convert_model(TimmLike()))
    assert type(converted.stem[1]) is triton_bn.SyncBatchNormAct and converted.stem[1].activation == "silu"


# -- guards: a fused forward runs only for the calls its trace stands for -------------------------------------
GUARDED = ["tree", "tree-none-only", "arguments"]


def _converted_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton_bn.convert_model(model)


def test_calls_without_the_traced_argument_run_a_second_fused_graph():
    """The DLA pattern: tree2 is called with shortcut=None, which its fused graph (traced with a shortcut)
    does not stand for; a second graph, traced with shortcut=None (``shortcut = x``), has the same BN + add +
    ReLU made one call with x as the residual, and serves those calls: no fallback."""
    from zoo import TreeLike
    torch.manual_seed(0)
    original = TreeLike().double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    report = converted.fusion_report
    assert report.guarded["tree2"][0].startswith("shortcut is not None") and not report.fallbacks
    assert report.guarded["tree2"][-1].startswith("else a second fused graph, for: shortcut is None")
    (variant_guard, variant), = converted.tree2.forward.variants
    fused_calls = [node for node in variant.graph.nodes if node.op == "call_module" and node.kwargs.get("residual")]
    assert [node.target for node in fused_calls] == ["bn2"]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, so no warning
        for training in (True, False):
            converted.train(training), original.train(training)
            torch.testing.assert_close(converted(x), original(x), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == {}
    assert converted.tree2.bn2.activation == "relu" and isinstance(converted.tree2.relu, nn.Identity)


def test_calls_the_trace_does_not_stand_for_run_unfused_counted_and_warned():
    """A call without ``scale``, whose None branch returns the BN's own value (no second graph can replay the
    fused ReLU there): it runs the module's own forward, is counted, and warned about once."""
    torch.manual_seed(0)
    original = _OptionalScale(none_returns_bn=True).double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    report = converted.fusion_report
    assert report.guarded["model"][0].startswith("scale is not None") and not report.fallbacks
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="model ran its own forward, unfused, because scale is not None"):
        out = converted(x)
    torch.testing.assert_close(out, original(x), atol=1e-12, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        converted(x)
    assert report.fallbacks == {"model": 2}
    # the fused path still serves the calls it stands for, with the fusions in place
    scale = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(converted(x, scale), original(x, scale), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == {"model": 2} and converted.bn.activation == "relu"


@pytest.mark.parametrize("name", GUARDED)
def test_disabling_the_guards_breaks_the_guarded_models(name, monkeypatch):
    """The mutation check: with every guard switched off, the fused graphs serve calls they do not stand
    for, and the converted models compute something else or raise (the zoo test above then fails)."""
    from triton_bn import tracing
    builder, shape, _ = ZOO[name]
    torch.manual_seed(0)
    original = builder().double().eval()
    monkeypatch.setattr(tracing.Guard, "violation", lambda self, owner, args, kwargs: None)
    converted = _converted_quietly(copy.deepcopy(original))
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        try:
            broken = (converted(x) - original(x)).abs().max() > 1e-3
        except TypeError:  # a graph for tensors given None (``out * scale``)
            broken = True
    assert broken


class _Flagged(nn.Module):
    """Python-level decisions on the module's own attributes: a flag, an optional child, a ModuleList loop."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.add_input = True
        self.extra = None
        self.post = nn.ModuleList([nn.Conv2d(4, 4, 1)])

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.add_input:
            out = out + x
        out = self.act(out)
        if self.extra is not None:
            out = self.extra(out)
        for layer in self.post:
            out = layer(out)
        return out


@pytest.mark.parametrize("change", ["flag", "child", "container"])
def test_attributes_changed_after_conversion_run_unfused(change):
    torch.manual_seed(0)
    original = _Flagged().double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    assert converted.fusion_report.residual == 1
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), atol=1e-12, rtol=1e-12)
    for model in (original, converted):
        torch.manual_seed(1)
        if change == "flag":
            model.add_input = False
        elif change == "child":
            model.extra = nn.Tanh()
        else:
            model.post.append(nn.Conv2d(4, 4, 1).double())
    with pytest.warns(UserWarning, match="changed since convert_model traced the forward"):
        out = converted(x)
    torch.testing.assert_close(out, original(x), atol=1e-12, rtol=1e-12)
    assert converted.fusion_report.fallbacks == {"model": 1}


class _FlaggedActivation(nn.Module):
    """conv -> BN -> hardswish (not idempotent: run twice, it changes the result), then a branch on a flag."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardswish()
        self.doubled = False

    def forward(self, x):
        out = self.act(self.bn(self.conv(x)))
        return out * 2 if self.doubled else out


def test_a_folded_activation_runs_once_when_the_fused_forward_falls_back():
    """convert_model fuses the hardswish module into the BN; folding moves it into the conv. A call the guard
    rejects runs the class forward with the hardswish module back: the conv must then leave it out."""
    torch.manual_seed(0)
    original = _FlaggedActivation().double()
    with torch.no_grad():
        original.bn.running_mean.uniform_(-1, 1)
        original.bn.running_var.uniform_(0.5, 2)
    original.eval()
    folded = _folded_quietly(triton_bn.convert_model(copy.deepcopy(original)))
    assert isinstance(folded.conv, triton_bn.fold.Conv2dWithActivation) and isinstance(folded.bn, nn.Identity)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), original(x), atol=1e-12, rtol=1e-12)
    for model in (original, folded):
        model.doubled = True
    with pytest.warns(UserWarning, match="changed since convert_model traced the forward"):
        out = folded(x)
    torch.testing.assert_close(out, original(x), atol=1e-12, rtol=1e-12)
    assert folded.conv.activation == "hardswish"  # the model's own layer keeps it for fused calls


class _TypeTests(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        if self.how == "type":
            single = type(x) is torch.Tensor
        elif self.how == "is_tensor":
            single = torch.is_tensor(x)
        else:
            single = isinstance(x, torch.Tensor)
        if not single:
            x = x[0] - x[1]
        return self.relu(self.bn(x))


@pytest.mark.parametrize("how", ["isinstance", "type", "is_tensor"])
def test_type_tests_on_arguments_are_guarded(how):
    """fx's proxy is no tensor: the graph for a tensor is traced by answering as for one. A second graph is
    traced with the argument as a value that is no tensor where the forward only asks isinstance or
    torch.is_tensor with tensor classes (then the answer is known: False); it serves the calls with a pair. A
    forward that asks type() gets no second graph (no trace can say what type a value that is no tensor has):
    those calls run the module's own forward."""
    torch.manual_seed(0)
    original = _TypeTests(how).double()
    converted = _converted_quietly(copy.deepcopy(original))
    assert converted.fusion_report.activation == 1 and "is a torch.Tensor" in converted.fusion_report.guarded["model"][0]
    second = how != "type"
    assert len(converted.forward.variants) == (1 if second else 0)
    if second:
        assert converted.fusion_report.guarded["model"][-1].startswith(
            "else a second fused graph, for: x is not a torch.Tensor")
    x, y = torch.randn(2, 2, 4, 3, 3, dtype=torch.float64)
    for args in ((x,), ([x, y],), ((x, y),)):
        torch.testing.assert_close(converted(*args), original(*args), atol=1e-12, rtol=1e-12)
    assert converted.fusion_report.fallbacks == ({} if second else {"model": 2})
    # a Parameter is a tensor, but not a plain one: neither graph stands for it, the original's forward runs
    # (with type(), which tells it from a plain tensor, to the original's error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if second:
            torch.testing.assert_close(converted(nn.Parameter(x)), original(nn.Parameter(x)), atol=1e-12, rtol=1e-12)
        else:
            for model in (original, converted):
                with pytest.raises(ValueError, match="expected 4D input"):
                    model(nn.Parameter(x))
    assert converted.fusion_report.fallbacks == ({"model": 1} if second else {"model": 3})


def test_torchvisions_dense_layers_called_with_lists_run_fused():
    """torchvision's DenseNet calls each ``_DenseLayer`` with the list of earlier feature maps; the fused graph
    is traced for a tensor (``isinstance(input, Tensor)``), and the list calls take the second graph (input no
    tensor: ``torch.cat(input, 1)`` on it as it comes): every BN -> ReLU fused there too, no call unfused."""
    from zoo import ListFedDenseBlock
    torch.manual_seed(0)
    original = ListFedDenseBlock(3, 4, 2).double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    assert converted.fusion_report.activation == 6
    for layer in converted.values():
        assert layer.norm1.activation == layer.norm2.activation == "relu" and len(layer.forward.variants) == 1
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for training in (True, False):
            converted.train(training), original.train(training)
            torch.testing.assert_close(converted(x), original(x), atol=1e-12, rtol=1e-12)
        # and a layer called with a tensor takes the first graph
        torch.testing.assert_close(converted.denselayer1(x), original.denselayer1(x), atol=1e-12, rtol=1e-12)
    assert converted.fusion_report.fallbacks == {}
    coverage = triton_bn.fusion_coverage(original, converted, x)
    assert len(coverage.fused_activation) == len(coverage.feeds_activation) == 6


class _InspectsItsOwnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.conv(x)
        if isinstance(out, tuple):  # what a child returns: no argument check can stand for it
            out = out[0]
        return F.relu(self.bn(out))


def test_type_test_on_a_computed_value_is_not_fused():
    with pytest.warns(UserWarning, match="could not trace model"):
        converted = triton_bn.convert_model(_InspectsItsOwnValue())
    assert converted.fusion_report.plain == 1 and "GuardError" in converted.fusion_report.notes[0]


@pytest.mark.parametrize("how", ["if", "assert", "not"])
def test_a_shape_check_that_raises_is_guarded_and_keeps_its_error(how, tmp_path):
    """``if x.shape[1] != self.channels: raise``: the graph takes the side that does not raise; the guard
    asks the condition of each call's argument, and a call that fails it runs the original forward, which
    raises its own error (the fused graph would have computed something, or raised another one)."""
    torch.manual_seed(0)
    from zoo import ShapeChecked
    original = ShapeChecked(how).double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    report = converted.fusion_report
    assert report.activation == 1 and converted.bn.activation == "hardswish" and report.guarded == {}
    assert any(check.kind == "condition" for check in converted.forward.guard.arguments)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for model in (converted, _saved_and_loaded(converted, tmp_path)):
        torch.testing.assert_close(model(x), original(x), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == {}
    wrong = x[:, :2] if how != "not" else x[0]
    with pytest.raises(Exception) as expected:
        original(wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            converted(wrong)
    assert report.fallbacks == {"model": 1}


class _DecidesOtherwise(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y=None):
        if self.how == "no raise":  # neither side raises: no call says which side to take
            if x.shape[0] > 1:
                x = x * 2
        elif self.how == "computed value":  # not metadata: known only by running the graph
            if x.sum() > 1e9:
                raise ValueError("too large")
        elif self.how == "an element's value":  # the argument's data, not its metadata
            if x[0, 0, 0, 0] > 1e9:
                raise ValueError("too large")
        elif self.how == "two arguments":
            if x.shape != y.shape:
                raise ValueError("shapes differ")
        elif self.how == "caught":
            try:
                if x.shape[1] != 4:
                    raise ValueError("4 channels")
            except ValueError:
                x = x[:, :1].expand(-1, 4, -1, -1)
        return F.relu(self.bn(x))


@pytest.mark.parametrize("how", ["no raise", "computed value", "an element's value", "two arguments", "caught"])
def test_other_decisions_on_traced_values_are_not_fused(how):
    with pytest.warns(UserWarning, match="could not trace model"):
        converted = triton_bn.convert_model(_DecidesOtherwise(how))
    assert converted.fusion_report.plain == 1 and converted.fusion_report.activation == 0


class _ZipsItsArgument(nn.Module):
    """SegFormer's decode head: ``for hidden, layer in zip(argument, self.layers)``, then BN -> ReLU."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)])
        self.bn = nn.BatchNorm2d(4)

    def forward(self, hidden_states):
        total = 0
        for hidden, layer in zip(hidden_states, self.layers):
            total = total + layer(hidden)
        return F.relu(self.bn(total))


def test_zip_over_an_argument_and_a_container_is_unrolled_and_guarded():
    """The loop runs as many times as the container has entries, and uses as many elements of the argument:
    the graph unrolls it for an argument of that length, and a call with another length runs the original
    (zip stops at the shorter: one element fewer is another computation)."""
    torch.manual_seed(0)
    original = _ZipsItsArgument().double()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    report = converted.fusion_report
    assert report.activation == 1 and report.guarded["model"] == [
        "hidden_states has 2 elements (forward calls zip() with a container of 2 on it)"]
    first, second = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    for hidden_states in ((first, second), [first, second]):
        torch.testing.assert_close(converted(hidden_states), original(hidden_states), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for hidden_states in ((first,), (first, second, second)):
            torch.testing.assert_close(converted(hidden_states), original(hidden_states), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == {"model": 2}


class _OptionalScale(nn.Module):
    """An optional argument the forward branches on; traced with it given (fx's proxy is not None)."""

    def __init__(self, none_returns_bn):
        super().__init__()
        self.none_returns_bn = none_returns_bn
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale=None):
        out = self.bn(x)
        if scale is not None:
            return F.relu(out) * scale
        if self.none_returns_bn:  # without it the BN's own value is the result: no ReLU to fuse
            return out
        return F.relu(out) - 1


@pytest.mark.parametrize("none_returns_bn", [False, True], ids=["same-fusion", "other-data-flow"])
def test_calls_without_an_optional_argument_run_a_second_fused_graph_where_the_fusion_holds(none_returns_bn,
                                                                                          tmp_path):
    """The graph is traced with ``scale`` given; calls without it get a second graph, traced with it None,
    with the same BN -> ReLU fusion replayed, when the BN's value goes to the same ReLU there. Where it does
    not (the BN's value is returned), such calls run the original forward, unfused."""
    torch.manual_seed(0)
    original = _OptionalScale(none_returns_bn).double()
    converted = _converted_quietly(copy.deepcopy(original))
    report = converted.fusion_report
    assert report.activation == 1 and converted.bn.activation == "relu"
    assert len(converted.forward.variants) == (0 if none_returns_bn else 1)
    x, scale = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (converted, _saved_and_loaded(converted, tmp_path)):
            for args in ((x, scale), (x,), (x, None)):
                torch.testing.assert_close(model(*args), original(*args), atol=1e-12, rtol=1e-12)
    assert report.fallbacks == ({"model": 2} if none_returns_bn else {})


class _NoneShortcut(nn.Module):
    """A residual computed inside the forward (a child's output): checked where the graph computes it."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Identity()

    def forward(self, x):
        return self.bn(x) + self.shortcut(x)


class _ReturnsNone(nn.Module):
    def forward(self, x):
        return None


def test_a_fused_residual_that_is_none_raises_as_the_original_does():
    original = _NoneShortcut()
    converted = triton_bn.convert_model(copy.deepcopy(original))
    assert converted.fusion_report.residual == 1
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(converted(x), original(x), atol=1e-5, rtol=1e-5)
    original.shortcut = converted.shortcut = _ReturnsNone()
    with pytest.raises(TypeError):
        original(x)
    with pytest.raises(TypeError, match="residual add fused by convert_model got None"):
        converted(x)


class _BroadcastShortcut(nn.Module):
    """An add the graph shows after a BN whose other operand only broadcasts to it (a per-image mean) and a
    number: fused as a residual, the BN adds such operands as the original does, after the normalization."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x, offset):
        y = torch.relu(self.bn(self.conv(x)) + x.mean(1, keepdim=True))
        return self.bn2(y) + offset


@pytest.mark.parametrize("mode", list(MODES))
def test_a_residual_that_broadcasts_is_added_as_the_original_adds_it(mode):
    torch.manual_seed(0)
    original = _BroadcastShortcut().double().train(MODES[mode])
    converted = triton_bn.convert_model(copy.deepcopy(original))
    assert converted.fusion_report.residual == 2
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for offset in (0.5, torch.randn(4, 1, 1, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)):
        torch.testing.assert_close(converted(x, offset), original(x, offset), atol=1e-12, rtol=1e-12)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=1e-12, rtol=1e-12, msg=key)


def test_fold_folds_only_where_the_forward_does_not_branch_on_arguments():
    """fold_batch_norms reads the same graphs: the tree blocks branch on ``shortcut is None``, so their BNs
    are frozen (a fixed table) and their convolutions left as they are; the stem is folded."""
    from zoo import TreeLike
    torch.manual_seed(0)
    model = TreeLike().double()
    model(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    model.eval()
    for source in (model, _converted_quietly(copy.deepcopy(model))):
        folded = _folded_quietly(source)
        assert torch.equal(folded.tree1.conv1.weight, model.tree1.conv1.weight)
        assert isinstance(folded.tree1.bn1, triton_bn.FrozenBatchNorm)
        assert not torch.equal(folded.stem[0].weight, model.stem[0].weight)
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


def _folded_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton_bn.fold_batch_norms(model)


# -- drop-in signatures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [(triton_bn.BatchNorm1d, nn.BatchNorm1d), (triton_bn.BatchNorm2d, nn.BatchNorm2d),
                                         (triton_bn.BatchNorm3d, nn.BatchNorm3d),
                                         (triton_bn.SyncBatchNorm, nn.SyncBatchNorm)], ids=lambda c: c.__name__)
def test_constructor_signature_is_torchs_plus_fusion_arguments(ours, theirs):
    """Every argument of the installed torch's constructor, in its order and kind, then activation and
    negative_slope (keyword-only): the next torch release's additions are caught here."""
    mine = list(inspect.signature(ours).parameters.values())
    torchs = list(inspect.signature(theirs).parameters.values())
    assert mine[:len(torchs)] == torchs
    assert [(p.name, p.kind) for p in mine[len(torchs):]] == [("activation", inspect.Parameter.KEYWORD_ONLY),
                                                             ("negative_slope", inspect.Parameter.KEYWORD_ONLY)]
    if "bias" in inspect.signature(theirs).parameters:
        module = ours(4, bias=False, activation="relu", dtype=torch.float64)
        reference = theirs(4, bias=False, dtype=torch.float64)
        assert module.bias is None and list(module.state_dict()) == list(reference.state_dict())
        assert "bias=False" in repr(module)
    with pytest.raises(TypeError):
        ours(4, not_an_argument=1)


# -- float64 and gradcheck ------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_on_the_module(mode, activation, residual, device):
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(3, activation=activation).to(device=device, dtype=torch.float64).train(MODES[mode])
    with torch.no_grad():
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True) if residual else None
    weight = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)

    def call(x, weight, bias, r):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,), {"residual": r})

    assert torch.autograd.gradcheck(call, (x, weight, bias, r), eps=1e-6, atol=1e-6)


# -- PyTorch's own sample inputs --------------------------------------------------------------------------------
SAMPLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _tensors(values):
    return [v for v in values if isinstance(v, torch.Tensor)]


def _run_functional(fn, sample, dtype, compute_dtype):
    """(output, running stats after, grads of input/weight/bias) of one OpInfo sample, its tensors rounded
    to ``dtype`` and computed in ``compute_dtype`` (the reference: float64 on the same rounded values)."""
    def clone(t, grad):
        if t is None:
            return None
        return t.detach().clone().to(dtype).to(compute_dtype).requires_grad_(grad and t.is_floating_point())
    x = clone(sample.input, True)
    running_mean, running_var, weight, bias = (list(sample.args) + [None] * 4)[:4]
    running_mean, running_var = clone(running_mean, False), clone(running_var, False)
    weight, bias = clone(weight, True), clone(bias, True)
    kwargs = dict(sample.kwargs)
    out = fn(x, running_mean, running_var, weight, bias, **kwargs)
    leaves = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True) if out.numel() else []
    return out, [running_mean, running_var], grads


def check_functional_samples(device):
    """Every OpInfo sample of nn.functional.batch_norm: triton_bn against PyTorch (float64 reference for
    the output, running statistics and gradients); PyTorch errors must be triton_bn errors too."""
    from torch.testing._internal.common_methods_invocations import op_db
    ops = [op for op in op_db if op.name == "nn.functional.batch_norm"]
    assert ops
    checked = 0
    for op in ops:
        for dtype in SAMPLE_DTYPES:
            for sample in op.sample_inputs(device, torch.float64, requires_grad=True):
                try:
                    expected = _run_functional(F.batch_norm, sample, dtype, torch.float64)
                except Exception as torch_error:  # noqa: BLE001
                    with pytest.raises(type(torch_error)):
                        _run_functional(triton_bn.batch_norm, sample, dtype, dtype)
                    continue
                actual = _run_functional(triton_bn.batch_norm, sample, dtype, dtype)
                atol, rtol = TOLERANCES[dtype]
                for a, e in zip([actual[0]] + _tensors(actual[1]) + _tensors(actual[2]),
                                [expected[0]] + _tensors(expected[1]) + _tensors(expected[2])):
                    torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol,
                                               msg=lambda m: f"{sample} {dtype}: {m}")
                checked += 1
    return checked


def check_module_samples(device):
    """Every ModuleInfo sample of nn.BatchNorm1d/2d/3d: our module built with the same constructor
    arguments (bias=False included), fed the same inputs, in training and in eval."""
    from torch.testing._internal.common_modules import module_db
    ours = {nn.BatchNorm1d: triton_bn.BatchNorm1d, nn.BatchNorm2d: triton_bn.BatchNorm2d,
            nn.BatchNorm3d: triton_bn.BatchNorm3d}
    checked = 0
    for info in (m for m in module_db if m.module_cls in ours):
        for dtype in SAMPLE_DTYPES:
            for training in (True, False):
                for sample in info.module_inputs_func(info, device=device, dtype=torch.float64, requires_grad=True,
                                                      training=training):
                    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
                    reference = info.module_cls(*args, **kwargs).to(device=device, dtype=torch.float64)
                    module = ours[info.module_cls](*args, **kwargs).to(device=device, dtype=dtype)
                    module.load_state_dict(reference.state_dict())
                    reference.load_state_dict(module.state_dict())  # the float64 reference sees the rounded values
                    reference.train(training)
                    module.train(training)
                    x = sample.forward_input.args[0].detach().to(dtype)
                    for step in range(2):
                        xr = x.clone().double().requires_grad_()
                        xm = x.clone().requires_grad_()
                        expected, actual = reference(xr), module(xm)
                        atol, rtol = TOLERANCES[dtype]
                        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)
                        if expected.numel():
                            expected.backward(torch.ones_like(expected))
                            actual.backward(torch.ones_like(actual))
                            torch.testing.assert_close(xm.grad.double(), xr.grad, atol=atol, rtol=rtol)
                        for (key, a), e in zip(module.state_dict().items(), reference.state_dict().values()):
                            torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=key)
                        for a, e in zip(module.parameters(), reference.parameters()):
                            if e.grad is not None:
                                torch.testing.assert_close(a.grad.double(), e.grad, atol=atol, rtol=rtol)
                    checked += 1
    return checked


def test_pytorch_functional_samples(device):
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    assert check_functional_samples(device) > 20


def test_pytorch_module_samples(device):
    pytest.importorskip("expecttest")
    assert check_module_samples(device) > 30


def test_pytorch_samples_on_the_pure_pytorch_path():
    """The same samples in a process without the Triton interpreter: CPU tensors take the CPU backends (dispatch.py)."""
    pytest.importorskip("expecttest")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=here, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pure path: checked" in proc.stdout


# -- folding --------------------------------------------------------------------------------------------------
def test_fold_keeps_a_float64_model_in_float64():
    from zoo import ResNeXtLike
    torch.manual_seed(0)
    model = ResNeXtLike().double()
    model(torch.randn(4, 3, 8, 8, dtype=torch.float64))  # running statistics away from (0, 1)
    model.eval()
    folded = triton_bn.fold_batch_norms(triton_bn.convert_model(model))
    frozen = [m for m in folded.modules() if isinstance(m, triton_bn.FrozenBatchNorm)]
    assert frozen and all(m.scale.dtype == torch.float64 and m.shift.dtype == torch.float64 for m in frozen)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


def test_fold_keeps_the_activation_of_a_batch_norm_act_subclass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.SiLU), ScaledBatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    folded = triton_bn.fold_batch_norms(model)
    assert isinstance(folded[1], triton_bn.FrozenBatchNorm)  # folded into the conv, the tail (drop, SiLU) kept
    assert type(folded[2]) is ScaledBatchNorm2d  # not understood: neither folded nor frozen
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


if __name__ == "__main__":  # the pure-PyTorch path (no TRITON_INTERPRET): run by a test above
    from triton_bn.backends import triton_kernels
    assert not triton_kernels.INTERPRET, "run without TRITON_INTERPRET (triton_bn is imported before conftest sets it)"
    count = check_functional_samples("cpu") + check_module_samples("cpu")
    print(f"pure path: checked {count} samples")
