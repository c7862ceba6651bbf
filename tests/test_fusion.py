"""[fusion] Activations recognised by what they do, not by their class: Hugging Face's and timm's activation
modules, a YOLO-style Conv-BN-SiLU stack, any library's own, fused as PyTorch's own classes are; modules that
only look like one (a parameter, a child, randomness, a mode flag, another function) left alone. Every converted
model is compared with the original in float64, training and eval."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_bn
from triton_bn.convert import activation_by_behaviour


class SiLUActivation(nn.Module):  # Hugging Face's older SiLU: the formula, not F.silu
    def forward(self, x):
        return x * torch.sigmoid(x)


class GELUActivation(nn.Module):  # Hugging Face's: the function held in an attribute
    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, x):
        return self.act(x)


class HardSwish(nn.Module):  # timm's own, with an inplace flag
    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.mul_(F.relu6(x + 3.0) / 6.0) if self.inplace else x * F.relu6(x + 3.0) / 6.0


class LeakyWhere(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.2 * x)


class GeluTanh(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


class QuickGELU(nn.Module):  # CLIP's: not one of ours
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class ReluThenDropout(nn.Module):  # random in training: not an activation
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(F.relu(x))


class ReluInTrainingOnly(nn.Module):
    def forward(self, x):
        return F.relu(x) if self.training else x


class ScaledSiLU(nn.Module):  # a parameter: state the kernels would not have
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return F.silu(x) * self.scale


RECOGNISED = [(SiLUActivation(), "silu", 0.01), (GELUActivation(), "gelu", 0.01), (HardSwish(), "hardswish", 0.01),
              (HardSwish(inplace=True), "hardswish", 0.01), (LeakyWhere(), "leaky_relu", 0.2),
              (GeluTanh(), "gelu_tanh", 0.01)]
LEFT_ALONE = [QuickGELU(), Mish(), ReluThenDropout(), ReluInTrainingOnly(), ScaledSiLU(), nn.Sequential(nn.ReLU()),
              nn.Tanh(), nn.Hardsigmoid(), nn.ELU(), nn.Identity()]


@pytest.mark.parametrize("module,name,slope", RECOGNISED, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_an_activation_is_recognised_by_what_it_computes(module, name, slope):
    found = activation_by_behaviour(module)
    assert found is not None and found[0] == name and found[1] == pytest.approx(slope)
    assert module.training  # the probes leave the module's mode as it was


@pytest.mark.parametrize("module", LEFT_ALONE, ids=lambda m: type(m).__name__)
def test_what_only_looks_like_an_activation_is_left_alone(module):
    assert activation_by_behaviour(module) is None


class ConvBnAct(nn.Module):
    """Ultralytics' Conv: Conv2d, BatchNorm2d, then an activation module (SiLU by default)."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _stack():
    torch.manual_seed(0)
    acts = [SiLUActivation(), GELUActivation(), HardSwish(inplace=True), LeakyWhere(), nn.SiLU(), QuickGELU()]
    layers, cin = [], 3
    for act in acts:
        layers.append(ConvBnAct(cin, 6, act))
        cin = 6
    return nn.Sequential(*layers).double()


def test_a_conv_bn_act_stack_fuses_every_activation_of_ours_and_stays_exact():
    model = _stack()
    converted = triton_bn.convert_model(model)
    report = converted.fusion_report
    assert report.activation == 5 and report.plain == 1  # QuickGELU is not one of ours
    assert [getattr(layer.bn, "activation", None) for layer in converted] == [
        "silu", "gelu", "hardswish", "leaky_relu", "silu", None]
    assert isinstance(converted[0].act, nn.Identity) and isinstance(converted[5].act, QuickGELU)
    assert converted[3].bn.negative_slope == pytest.approx(0.2)
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        converted.train(mode == "train")
        torch.testing.assert_close(converted(x), model(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(converted[0].bn.running_var, model[0].bn.running_var, atol=1e-12, rtol=1e-12)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: a BN subclass whose forward ends with its own act child."""

    def __init__(self, num_features, act):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        x = self.drop(x)
        return self.act(x)


def test_a_bn_subclass_with_its_own_activation_class_fuses_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, SiLUActivation())).double()
    converted = triton_bn.convert_model(model)
    assert converted[1].activation == "silu" and isinstance(converted[1].act, nn.Identity)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    expected = model(x)
    got = converted(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-10, rtol=1e-10)


# -- fusion coverage: what the original's data flow allows against what was fused ---------------------------
class _Bottleneck(nn.Module):
    """torchvision's Bottleneck idiom: one in-place ReLU module used twice, bn3 + downsample BN, then ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU(inplace=True)
        self.head_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        out = self.relu(out)
        return self.head_bn(out).mean((2, 3)) + self.head_bn(out).amax((2, 3))  # read twice: not fusable


def test_coverage_counts_what_the_data_flow_allows_and_what_was_fused():
    torch.manual_seed(0)
    model = _Bottleneck()
    x = torch.randn(2, 4, 5, 5)
    converted = triton_bn.convert_model(model)
    coverage = triton_bn.fusion_coverage(model, converted, x)
    assert coverage.batch_norms == 4
    assert coverage.feeds_activation == ["bn1"]  # read by the in-place ReLU only (its later readers are not bn1's)
    assert coverage.feeds_add_activation == ["bn3"] and coverage.partners == {"bn3": ["downsample.1"]}
    assert coverage.fusable == 2 and coverage.fused == 2 and coverage.missed == []
    assert converted.fusion_report.coverage is coverage
    assert "2 of 2 fusable BNs fused" in str(coverage)


class _Untraceable(nn.Module):
    """A forward fx can not trace (a branch on a value): its BN + SiLU is swapped, not fused: coverage says so."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow
            return self.act(self.bn(self.conv(x)))
        return x


def test_coverage_names_what_convert_model_missed():
    torch.manual_seed(0)
    model = _Untraceable()
    with pytest.warns(UserWarning, match="could not trace"):
        converted = triton_bn.convert_model(model)
    coverage = triton_bn.fusion_coverage(model, converted, torch.randn(2, 3, 6, 6))
    assert coverage.feeds_activation == ["bn"] and coverage.fused == 0 and coverage.missed == ["bn"]
    assert "missed: bn" in str(coverage)
    # and says why: convert_model's note on the module around it
    assert list(coverage.reasons) == ["bn"] and "could not trace" in coverage.reasons["bn"], coverage.reasons


class _StochasticDepth(nn.Module):
    """timm's DropPath: the identity in eval, a per-sample mask while training."""

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.25).to(x.dtype) / 0.75
        return x * keep


class _BlockWithDropPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop_path = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), \
            _StochasticDepth()

    def forward(self, x):
        return torch.relu(self.drop_path(self.bn(self.conv(x))) + x)


def test_coverage_says_which_module_stood_between_a_missed_bn_and_its_add():
    model = _BlockWithDropPath().eval()
    converted = triton_bn.convert_model(model)
    coverage = triton_bn.fusion_coverage(model, converted, torch.randn(2, 4, 5, 5))
    # in eval the stochastic depth hands the BN's output on as it is: BN + add + ReLU in that data flow, which no
    # fused forward may take over (while training the module masks samples between the BN and the add)
    assert coverage.feeds_add_activation == ["bn"] and coverage.missed == ["bn"]
    assert "drop_path (_StochasticDepth" in coverage.reasons["bn"] and "to the add" in coverage.reasons["bn"]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model.double(), converted.double()
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)


def test_the_coverage_script_runs_over_the_zoo():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "fusion_coverage.py")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    import re
    assert re.search(r"YoloConvStack +3 of 3 fusable BNs fused", done.stdout) and "all: " in done.stdout, done.stdout
    # every BN it names as missed comes with its reason (the zoo's timm-like blocks: stochastic depth between BN
    # and add), and none with "no note"
    assert re.search(r"block1\.bn2: its output goes through block1\.drop_path \(DropPath", done.stdout), done.stdout
    assert re.search(r"stem\.bn: stem: torch\.fx could not trace", done.stdout), done.stdout
    assert "no note saying why" not in done.stdout, done.stdout
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - then the script says it skipped them, and so does this test
        assert "Hugging Face's models skipped" in done.stdout
        pytest.skip("transformers does not import here: the script's Hugging Face lines are not checked")
    # Hugging Face's MobileNetV1 forwards call a padding helper fx can not trace: all of it fused all the same
    assert re.search(r"hf:mobilenet_v1 +27 of 27 fusable BNs fused", done.stdout), done.stdout
    # LeViT's patch embedding checks its input's shape and raises; SegFormer's head zips its argument with a
    # ModuleList: both fused, guarded
    assert re.search(r"hf:levit +3 of 3 fusable BNs fused", done.stdout), done.stdout
    assert re.search(r"hf:segformer +1 of 1 fusable BNs fused", done.stdout), done.stdout


class OptionalShortcut(nn.Module):
    """A block called without its shortcut: its fused forward (traced with one) falls back on every call."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, shortcut=None):
        y = self.bn(x)
        if shortcut is not None:
            y = y + shortcut
        return torch.relu(y)


def test_coverage_counts_what_ran_not_what_was_fused():
    import warnings
    model = nn.Sequential(OptionalShortcut()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = triton_bn.convert_model(model)
        coverage = triton_bn.fusion_coverage(model, converted, torch.randn(2, 3, 4, 4))
    assert converted[0].bn.activation == "relu"  # fused for calls with a shortcut
    assert coverage.feeds_activation == ["0.bn"] and coverage.fused == 0, coverage
    # the fused forward (traced with a shortcut) fell back on this call: the reason says so
    assert "fell back" in coverage.reasons["0.bn"] and "0's fused forward" in coverage.reasons["0.bn"]
    assert converted.fusion_report.fallbacks == {}  # coverage ran a copy: the converted model's own count is untouched
