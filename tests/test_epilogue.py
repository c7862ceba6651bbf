"""[epilogue] Fused activations and residual add, the recompute backward, and convert_model."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_bn
from test_core import run_case

ACTIVATIONS = triton_bn.SUPPORTED_ACTIVATIONS


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_fp32(activation, layout, training, with_residual, device):
    # scale 4 spreads the pre-activations over the kinks of relu6 (0, 6) and hardswish (-3, 3)
    run_case((5, 4, 3, 3), torch.float32, device, layout, training, activation, with_residual=with_residual,
             scale=4.0)


@pytest.mark.parametrize("wanted", ["dresidual-only", "dx-only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", (None,) + ACTIVATIONS)
def test_residual_gradient_without_dx_and_dx_without_it(activation, layout, training, wanted, device):
    """A frozen input with a residual that needs its gradient (d residual alone), and a detached residual
    (dx alone): the launchers take other paths for each (d residual = dy without an activation, a dx
    kernel that writes one output), every activation."""
    run_case((5, 4, 3, 3), torch.float32, device, layout, training, activation, with_residual=True, scale=4.0,
             x_grad=wanted == "dx-only", residual_grad=wanted == "dresidual-only")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_half_precision(activation, dtype, device):
    run_case((4, 6, 3, 3), dtype, device, "channels_last", True, activation, with_residual=True)
    run_case((4, 6, 5), dtype, device, "contiguous", False, activation, with_residual=False)


@pytest.mark.parametrize("slope", [0.0, 1.0, 0.2])
def test_leaky_relu_slopes(slope, device):
    run_case((6, 3, 4, 4), torch.float32, device, "contiguous", True, "leaky_relu", negative_slope=slope,
             with_residual=True)


def test_kinks_follow_pytorch_subgradients(device):
    """Pre-activations exactly at the kinks: eval mode with mean 0, var 1 and eps 0 makes z = x exactly, and x holds zeros, small negatives and the relu6 edge 6."""
    values = torch.tensor([0.0, -1e-7, 1e-7, -0.5, 6.0, 3.0, -3.0, 7.0], device=device)
    x = values.repeat(2, 1).reshape(2, 1, 8).requires_grad_()
    rm, rv = torch.zeros(1, device=device), torch.ones(1, device=device)
    for act in ("relu", "leaky_relu", "relu6", "hardswish"):
        x.grad = None
        triton_bn.batch_norm(x, rm, rv, training=False, eps=0.0, activation=act).sum().backward()
        xr = x.detach().clone().requires_grad_()
        triton_bn.activations.torch_activation(act)(xr).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=0, msg=act)


def test_unknown_activation_is_a_value_error(device):
    with pytest.raises(ValueError, match="'relu'.*'sigmoid'"):
        triton_bn.BatchNorm2d(3, activation="tanh")
    with pytest.raises(ValueError, match="unsupported activation 'swish'"):
        triton_bn.batch_norm(torch.randn(4, 3, device=device), None, None, training=True, activation="swish")


def test_extra_repr_shows_activation():
    assert "activation='leaky_relu', negative_slope=0.2" in repr(triton_bn.BatchNorm2d(3, activation="leaky_relu",
                                                                                      negative_slope=0.2))
    assert "activation" not in repr(triton_bn.BatchNorm2d(3))


# -- what the backward keeps --------------------------------------------------------------------------
def _saved_bytes(fn):
    from torch.autograd.graph import saved_tensors_hooks
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), seen


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_keeps_only_x_and_per_channel_vectors(training, device):
    channels = 8
    x = torch.randn(4, channels, 6, 6, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    mod = triton_bn.BatchNorm2d(channels, activation="relu").to(device).train(training)
    per_channel = 4 * channels  # one fp32 [C] vector
    x_bytes = x.numel() * x.element_size()

    total, _ = _saved_bytes(lambda: mod(x))
    assert total == x_bytes + 4 * per_channel  # x + mean, invstd (or running mean/var), weight, bias
    # identity activation + residual: nothing at all is kept for the residual (d residual = dy)
    mod.activation = None
    total, _ = _saved_bytes(lambda: mod(x, residual=residual))
    assert total == x_bytes + 4 * per_channel
    # relu after the add: act'(z) needs z = bn(x) + residual, so the residual is kept by reference
    mod.activation = "relu"
    total, seen = _saved_bytes(lambda: mod(x, residual=residual))
    assert total == 2 * x_bytes + 4 * per_channel
    assert any(ptr == residual.data_ptr() for ptr, _, _ in seen)  # the caller's tensor, not a copy


# -- convert_model ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)).relu()
        out = self.bn3(self.conv3(out))
        out = out + self.downsample(x)
        return torch.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block1 = BasicBlock(8, 8)
        self.block2 = Bottleneck(8, 4, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


# cuDNN convolutions default to TF32 on CUDA: a 1e-7 difference in a BN output can flip a TF32 rounding in
# the next convolution (a 5e-4 relative step), so the two models are compared with full fp32 convolutions
@torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
def test_convert_model_fuses_a_resnet_and_trains_identically(device):
    torch.manual_seed(0)
    original = TinyResNet().to(device)
    reference = TinyResNet().to(device)
    reference.load_state_dict(original.state_dict())
    converted = triton_bn.convert_model(original)
    report = converted.fusion_report
    # stem bn, block1.bn1, block2.bn1, block2.bn2: activation; block1.bn2, block2.bn3: residual;
    # the downsample BN (it is the residual of bn3) and the head's BatchNorm1d stay plain
    assert (report.activation, report.residual, report.plain) == (4, 2, 2)
    assert sum(isinstance(m, (triton_bn.BatchNorm1d, triton_bn.BatchNorm2d)) for m in converted.modules()) == 8
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert list(converted.state_dict().keys()) == list(reference.state_dict().keys())
    assert all(type(m) is nn.BatchNorm2d for m in original.modules() if isinstance(m, nn.BatchNorm2d))

    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt_new = torch.optim.SGD(converted.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, device=device)
        target = torch.randint(0, 5, (4,), device=device)
        losses = []
        for model, opt in ((reference, opt_ref), (converted, opt_new)):
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, target)
            loss.backward()
            opt.step()
            losses.append((out, loss))
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(losses[1][1], losses[0][1], atol=1e-5, rtol=1e-5)
    for (name, p_ref), p_new in zip(reference.named_parameters(), converted.parameters()):
        torch.testing.assert_close(p_new, p_ref, atol=1e-4, rtol=1e-4, msg=name)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=1e-4, rtol=1e-4, msg=key)
    reference.eval()
    converted.eval()
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(converted(x), reference(x), atol=1e-4, rtol=1e-4)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SiLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: fx can not trace it
            y = y * 2
        return self.bn(y)


def test_convert_untraceable_model_falls_back_to_sequential_fusion(device):
    model = Untraceable().to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = triton_bn.convert_model(model)
    assert any("could not trace" in str(w.message) for w in caught)
    assert converted.body[1].activation == "silu" and isinstance(converted.body[2], nn.Identity)
    assert isinstance(converted.bn, triton_bn.BatchNorm2d) and converted.bn.activation is None
    assert (converted.fusion_report.activation, converted.fusion_report.plain) == (1, 1)
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


class SharedUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        y = self.bn(x)
        return self.act(y) + y  # the BN output has two users: no fusion


def test_no_fusion_when_bn_output_has_other_users(device):
    model = SharedUse().to(device)
    converted = triton_bn.convert_model(model)
    assert converted.bn.activation is None and converted.fusion_report.plain == 1
    x = torch.randn(6, 4, device=device)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


def test_convert_without_fusion_and_dtype_device_kept(device):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(device).eval()
    converted = triton_bn.convert_model(model, fuse_activations=False)
    assert isinstance(converted[0], triton_bn.BatchNorm2d) and converted[0].activation is None
    assert not converted[0].training and converted[0].running_mean.device.type == device
    assert converted.fusion_report.plain == 1
