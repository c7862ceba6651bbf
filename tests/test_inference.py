"""[inference] Eval is one elementwise pass whose per-channel table is never stale; BN folding into
Conv/ConvTranspose/Linear; frozen scale/shift for the rest."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import triton_bn
from test_epilogue import TinyResNet, Untraceable


def _randomize_bn_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check(model, x, expected_bns=0, atol=1e-5):
    model = _randomize_bn_stats(model).eval()
    snapshot = copy.deepcopy(model.state_dict())
    folded = triton_bn.fold_batch_norms(model)
    torch.testing.assert_close(folded(x), model(x), atol=atol, rtol=atol)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, snapshot[key]), key
    assert _bn_count(folded) == expected_bns
    return folded


def test_eval_launches_one_pass_and_table_is_never_stale(device):
    """The scale/shift table is computed in each program from the live buffers: change them in place
    or through load_state_dict and the next call sees the change."""
    mod = triton_bn.BatchNorm2d(4, activation="relu").to(device).eval()
    ref = nn.BatchNorm2d(4).to(device).eval()
    x = torch.randn(2, 4, 3, 3, device=device)
    torch.testing.assert_close(mod(x), torch.relu(ref(x)))
    with torch.no_grad():
        mod.running_var.mul_(4.0)  # in-place change of a buffer
        ref.running_var.mul_(4.0)
    torch.testing.assert_close(mod(x), torch.relu(ref(x)))
    other = nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        other.running_mean.uniform_(-2, 2)
        other.weight.uniform_(0.1, 3)
    mod.load_state_dict(other.state_dict())
    torch.testing.assert_close(mod(x), torch.relu(other.eval()(x)))
    with torch.no_grad():
        mod.bias.add_(1.0)  # a parameter change
    torch.testing.assert_close(mod(x), torch.relu(other(x) + 1.0))


def test_training_mode_is_refused():
    with pytest.raises(RuntimeError, match="training mode"):
        triton_bn.fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


def test_resnet_like_model_folds_every_bn(device):
    model = TinyResNet().to(device)
    folded = _check(model, torch.randn(2, 3, 8, 8, device=device), expected_bns=0, atol=1e-4)
    assert not any(isinstance(m, triton_bn.FrozenBatchNorm) for m in folded.modules())  # all folded (Linear too)


def test_converted_resnet_keeps_its_fused_activations(device):
    """A fused activation moves into the layer the BN was folded into (still an nn.Conv2d, with the state_dict
    keys of PyTorch's own folding); a residual add and its activation stay as an identity table."""
    model = triton_bn.convert_model(TinyResNet().to(device))
    folded = _check(model, torch.randn(2, 3, 8, 8, device=device), expected_bns=0, atol=1e-4)
    frozen = [m for m in folded.modules() if isinstance(m, triton_bn.FrozenBatchNorm)]
    assert len(frozen) == 2 and all(m.activation == "relu" for m in frozen)  # the residual forms survive
    assert all(torch.equal(m.scale, torch.ones_like(m.scale)) for m in frozen)  # only the epilogue is left
    layers = [m for m in folded.modules() if isinstance(m, triton_bn.fold.Conv2dWithActivation)]
    assert len(layers) == 4 and all(isinstance(m, nn.Conv2d) and m.activation == "relu" for m in layers)
    # what PyTorch's own folding (fuse_conv_bn_eval) leaves: a weight and a bias per layer, nothing else
    assert set(folded.state_dict()) == {f"{name}.{p}" for name, m in folded.named_modules()
                                        if isinstance(m, (nn.Conv2d, nn.Linear)) for p in ("weight", "bias")}


@pytest.mark.parametrize("activation", ["relu", "hardswish", "gelu", "leaky_relu"])
def test_folded_epilogues_never_write_their_inputs(activation, device):
    """The activation moved into a layer writes only into the layer's own output, and an identity table's
    residual add only into its new sum: the input, the residual and anything else holding them are unchanged
    (also with autograd recording, where nothing is written in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), triton_bn.BatchNorm2d(4, activation=activation)).to(device)
    folded = _check(model, torch.randn(2, 3, 6, 6, device=device))
    assert isinstance(folded[0], triton_bn.fold.Conv2dWithActivation) and isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 3, 6, 6, device=device)
    before = x.clone()
    folded(x)
    assert torch.equal(x, before)
    identity = triton_bn.FrozenBatchNorm(torch.ones(4), torch.zeros(4), activation, identity=True).to(device)
    y, residual = torch.randn(2, 4, 5, 5, device=device), torch.randn(2, 4, 5, 5, device=device)
    kept = (y.clone(), residual.clone())
    out = identity(y, residual)
    torch.testing.assert_close(out, triton_bn.activations.torch_activation(activation)(kept[0] + kept[1]))
    assert torch.equal(y, kept[0]) and torch.equal(residual, kept[1])
    leaf = y.clone().requires_grad_()
    identity(leaf, residual).sum().backward()  # out of place under autograd: a gradient, no error
    assert leaf.grad is not None and torch.equal(leaf.detach(), kept[0])


@pytest.mark.parametrize("activation", ["silu", "gelu", "sigmoid", "relu"])
def test_folded_activation_takes_the_native_pass_where_it_is_faster(activation, monkeypatch):
    """On a CPU a folded layer's SiLU, GELU or sigmoid, and an identity table's activation of a residual sum, run as
    the native kernels' pass (dispatch.activation_pass, faster than PyTorch's for an exp, erf or tanh); ReLU
    stays PyTorch's in-place op, and so does anything autograd records. Either way the folded model computes the
    original's output (float64, which the native kernels serve under the interpreter too) and writes nothing it
    was given."""
    from triton_bn import dispatch
    if dispatch.native_cpu.ops() is None:
        pytest.skip("the native CPU kernels are not available here")
    taken = []
    original_pass = dispatch.activation_pass

    def counting(*args, **kwargs):
        out = original_pass(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(triton_bn.fold, "activation_pass", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), triton_bn.BatchNorm2d(4, activation=activation)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    before = x.clone()
    folded = _check(model, x, atol=1e-12)  # with autograd recording (the folded weights need grad): PyTorch's op
    assert isinstance(folded[0], triton_bn.fold.Conv2dWithActivation) and taken == [False]
    taken.clear()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)
    assert torch.equal(x, before)
    identity = triton_bn.FrozenBatchNorm(torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                                         activation, identity=True)
    y, residual = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    kept = (y.clone(), residual.clone())
    torch.testing.assert_close(identity(y, residual),
                               triton_bn.activations.torch_activation(activation)(kept[0] + kept[1]),
                               atol=1e-12, rtol=1e-12)
    assert torch.equal(y, kept[0]) and torch.equal(residual, kept[1])
    assert taken == [activation != "relu"] * 2, taken


@pytest.mark.parametrize("layer,bn,x_shape", [
    (lambda: nn.Conv2d(4, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), lambda: nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (lambda: nn.Conv1d(3, 5, 3), lambda: nn.BatchNorm1d(5), (2, 3, 9)),
    (lambda: nn.Conv3d(2, 4, 2), lambda: nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, bias=False), lambda: nn.BatchNorm1d(4), (2, 3, 6)),
    (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5), (6, 7)),
], ids=["conv-nobias", "conv-groups-dilation", "conv1d", "conv3d", "convT-groups", "convT1d-nobias", "linear"])
def test_fold_each_layer_kind(layer, bn, x_shape, device):
    model = nn.Sequential(layer(), bn()).to(device)
    _check(model, torch.randn(x_shape, device=device), expected_bns=0)


class MultiUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # conv output has another user: folding would change it


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))  # the conv is called twice: its weights serve both


def test_multi_user_and_shared_layers_are_not_folded(device):
    for cls in (MultiUser, Shared):
        model = cls().to(device)
        conv_weight = model.conv.weight.detach().clone()
        folded = _check(model, torch.randn(2, 3 if cls is MultiUser else 4, 5, 5, device=device), expected_bns=0)
        assert torch.equal(folded.conv.weight, conv_weight), cls.__name__
        assert isinstance(folded.bn, triton_bn.FrozenBatchNorm)


def test_untraceable_model_folds_sequential_neighbours(device):
    model = _randomize_bn_stats(Untraceable().to(device)).eval()
    with torch.no_grad():
        model.body[0].bias.fill_(0.3)  # so that y.sum() > 0 takes one branch for both models
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = triton_bn.fold_batch_norms(model)
    assert any("could not trace" in str(w.message) for w in caught)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, triton_bn.FrozenBatchNorm)
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_frozen_batch_norm_dtypes_and_layouts(device):
    bn = _randomize_bn_stats(triton_bn.BatchNorm2d(5, activation="hardswish").to(device)).eval()
    frozen = getattr(triton_bn.fold_batch_norms(nn.Sequential(bn).eval()), "0")  # a GraphModule now
    assert isinstance(frozen, triton_bn.FrozenBatchNorm) and "hardswish" in repr(frozen)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 4, 4, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        y = frozen(x)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), bn(x.float()), atol=3e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    with pytest.raises(ValueError, match="expected input of shape"):
        frozen(torch.randn(3, 4, 2, 2, device=device))
