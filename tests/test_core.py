"""[core] The kernels against PyTorch in float64: every layout family, dtype and mode."""
import math

import pytest
import torch

import triton_bn
from conftest import TOLERANCES
from helpers import LAYOUTS, assert_close, make_input, reference_batch_norm

SHAPES = [
    (4, 3, 5, 3),  # odd spatial 5x3
    (2, 1, 7, 7),  # C = 1, 7x7
    (6, 5, 1, 1),  # spatial 1
    (9, 4),  # (N, C)
    (3, 6, 10),  # (N, C, L)
    (2, 3, 3, 4, 5),  # (N, C, D, H, W)
    (1, 4, 6, 6),  # N = 1 with spatial > 1
    (40, 3, 9, 11),  # rows span several splits of the reduction
    (3, 70, 2, 3),  # more channels than one channel block
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run_case(shape, dtype, device, layout="contiguous", training=True, activation=None, negative_slope=0.01,
             with_residual=False, affine=True, running=True, momentum=0.1, eps=1e-5, offset=0.0, scale=1.0,
             param_dtype=torch.float32, grad_layout=None, seed=0, x_grad=True, residual_grad=True):
    """Forward + backward of triton_bn.batch_norm against the float64 reference; every output compared.

    Channel 0 has a spread of 1e-2 around the input's offset, and its running variance is 1e-4: there eps
    (1e-5) moves y by 5%, in training and in eval, so a kernel that drops eps or adds it twice fails.
    ``x_grad`` / ``residual_grad`` False: that input does not require a gradient (a frozen input, a
    detached residual), so the backward computes the others alone."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = make_input(shape, dtype, device, layout, offset, scale, gen)
    with torch.no_grad():
        x.select(1, 0).sub_(offset).mul_(1e-2).add_(offset)
    x.requires_grad_(x_grad)
    weight = bias = None
    if affine:
        weight = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype).requires_grad_()
        bias = torch.randn(channels, generator=gen).to(device, param_dtype).requires_grad_()
    rm = rv = None
    if running:
        rm = torch.randn(channels, generator=gen).to(device, param_dtype)
        rv = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype)
        rv[0] = 1e-4
    residual = None
    if with_residual:
        residual = make_input(shape, dtype, device, "contiguous", generator=gen).requires_grad_(residual_grad)

    ref_y, (xd, wd, bd, rd), (ref_rm, ref_rv) = reference_batch_norm(
        x, rm, rv, weight, bias, training, momentum, eps, activation, negative_slope, residual)
    rm_before, rv_before = (None, None) if rm is None else (rm.clone(), rv.clone())
    y = triton_bn.batch_norm(x, rm, rv, weight, bias, training, momentum, eps, activation=activation,
                             negative_slope=negative_slope, residual=residual)

    assert y.dtype == x.dtype and y.shape == x.shape
    if layout == "contiguous":
        assert y.is_contiguous()
    elif layout == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    assert_close(y, ref_y, dtype, "y")
    if running:
        if training:
            assert_close(rm, ref_rm, param_dtype, "running_mean")
            assert_close(rv, ref_rv, param_dtype, "running_var")
        else:
            assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "eval must not touch the running statistics"

    grad = make_input(shape, dtype, device, grad_layout or "contiguous", generator=gen)
    y.backward(grad)
    ref_y.backward(grad.double())
    if x_grad:
        assert_close(x.grad, xd.grad, dtype, "dx")
    else:
        assert x.grad is None
    if affine:
        assert_close(weight.grad, wd.grad, param_dtype, "dweight")
        assert_close(bias.grad, bd.grad, param_dtype, "dbias")
    if with_residual and residual_grad:
        assert_close(residual.grad, rd.grad, dtype, "dresidual")
    elif with_residual:
        assert residual.grad is None
    return y


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_matches_pytorch(shape, layout, dtype, training, device):
    run_case(shape, dtype, device, layout, training)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offset_where_naive_variance_fails(layout, device):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 has no correct digit left; the kernels must stay at the
    accuracy the input itself has. fp32 spacing at 1e4 is 1e-3, and the fp32 mean alone is off by up to
    5e-4, so this case gets a fixed tolerance of 1e-3 (the naive formula misses it by 100x)."""
    gen = torch.Generator().manual_seed(3)
    x = make_input((16, 3, 8, 8), torch.float32, device, layout, offset=1e4, generator=gen)
    true_var = x.double().var((0, 2, 3), unbiased=False)
    naive = (x.double() ** 2).float().mean((0, 2, 3)) - x.float().mean((0, 2, 3)) ** 2
    assert (naive.double() - true_var).abs().max() > 0.1  # the trap is real
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = triton_bn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(rv.double(), true_var * 1024 / 1023, atol=1e-3, rtol=0)
    torch.testing.assert_close(rm.double(), x.double().mean((0, 2, 3)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(2048, 3), (512, 3, 1, 1), (8, 3, 64)], ids=lambda s: "x".join(map(str, s)))
def test_large_offset_on_row_summed_inputs(shape, device):
    """The same trap where PyTorch's CPU kernel adds the rows of a channel without compensation (2-D and
    [N, C, 1, 1] inputs; a transposed [N, C, L]): its mean is off by up to 6e-3 standard deviations at a
    mean of 1e4, six times the tolerance. The pure-PyTorch path must not inherit that."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) + 1e4).to(device)
    if len(shape) == 3:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost
    dims = [0] + list(range(2, len(shape)))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = triton_bn.batch_norm(x, rm, rv, training=True, momentum=1.0, activation="relu")
    ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, training=True))
    torch.testing.assert_close(y.double(), ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(rm.double(), x.double().mean(dims), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype, shape, layout, offset", [
    (torch.bfloat16, (7, 3, 4, 5), "channels_last", 30.0),  # 16-bit mean in blocks (rows summed by PyTorch)
    (torch.float16, (7, 6), "contiguous", 30.0),
    (torch.float32, (7, 3, 4, 5), "contiguous", 1e4),  # fp32 planes: mean, then the variance in blocks
    (torch.float32, (7, 3, 12), "contiguous", 1e4),
], ids=lambda v: str(v).replace("torch.", "").replace(", ", "x") if not isinstance(v, float) else f"mean{v:g}")
def test_statistics_in_blocks(dtype, shape, layout, offset, monkeypatch):
    """The pure-PyTorch path's blocked reductions (a large 16-bit input's mean, a large fp32 input's
    variance), forced onto a small input: seven samples in blocks of two, the last one short, must give
    float64's mean, variance, running statistics and normalized output, also at a mean of 1e4 std. (The
    backend of PyTorch's kernels, called directly: the native CPU kernels serve these inputs where they are
    built.)"""
    from triton_bn import dispatch
    from triton_bn.backends import pytorch_kernels
    per_sample = math.prod(shape[1:])
    monkeypatch.setattr(pytorch_kernels, "BLOCK_ELEMENTS", 2 * per_sample)
    monkeypatch.setattr(pytorch_kernels, "BLOCKED_STATISTICS_MIN_ELEMENTS", 0)
    blocks = []
    split = torch.Tensor.split
    monkeypatch.setattr(torch.Tensor, "split", lambda t, *a, **k: blocks.append(split(t, *a, **k)) or blocks[-1])
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels, dims = shape[1], [0] + list(range(2, len(shape)))
    weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    rm, rv = torch.zeros(channels), torch.ones(channels)
    y, mean, invstd = dispatch.PYTORCH.training(x, rm, rv, None, weight, bias, None, 1.0, False, 1e-5, 1, 0.0)
    assert blocks and all(len(b) == 4 for b in blocks), "the blocked path did not run"
    var, ref_mean = torch.var_mean(x.double(), dims, correction=0)
    tol = dict(atol=0, rtol=1e-6)  # an fp32 mean: its own rounding (6e-8) and the blocks' sums
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    torch.testing.assert_close(rm.double(), ref_mean, **tol)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-4)
    count = x.numel() // channels
    torch.testing.assert_close(rv.double(), var * count / (count - 1), atol=0, rtol=1e-4)
    ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, weight.double(), bias.double(),
                                                    training=True))
    assert y.dtype == dtype
    if offset > 100:  # PyTorch's eval kernel folds the mean into the shift (x * a + b): rounded at x's size
        torch.testing.assert_close(y.double(), ref, atol=1e-3, rtol=0)  # as test_large_offset_on_row_summed_inputs
    else:
        assert_close(y, ref, dtype, "y")


def test_16bit_inputs_with_dy_in_their_layout(device):
    """16-bit inputs whose dy has x's memory format (what a model's backward passes): on the pure-PyTorch
    path these run in PyTorch's mixed-precision kernels (no activation or ReLU; with a residual, z + r in
    fp32 and the sum rounded once) and must keep the kernels' accuracy: y rounded once, dweight and dbias
    as fp32 sums."""
    for dtype in (torch.bfloat16, torch.float16):
        for layout in ("contiguous", "channels_last"):
            for activation in (None, "relu"):
                for training in (True, False):
                    for with_residual in (False, True):
                        run_case((6, 5, 4, 3), dtype, device, layout, training, activation,
                                 with_residual=with_residual, grad_layout=layout)
        run_case((6, 5, 4, 3), dtype, device, "channels_last", activation="relu", grad_layout="channels_last",
                 offset=30.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_16bit_residual_and_relu_round_once(layout, device):
    """act(bn(x) + r) for bf16 is computed in fp32 and rounded once: every element within half a bf16 ulp
    of the float64 result (plus fp32's own error, 1% of that). Rounding bn(x) to bf16 before the add, a
    second rounding, lands up to a whole ulp away. (The Triton interpreter truncates fp32 -> bf16 stores,
    whatever `fp_downcast_rounding` says, where a GPU rounds to nearest: there one truncation stays under
    one ulp, two reach two.)"""
    from triton_bn.backends import triton_kernels
    from triton_bn.autotune import INTERPRET
    gen = torch.Generator().manual_seed(6)
    x = make_input((8, 6, 5, 5), torch.bfloat16, device, layout, generator=gen)
    r = make_input((8, 6, 5, 5), torch.bfloat16, device, layout, generator=gen)
    weight = (torch.rand(6, generator=gen) + 0.5).to(device)
    bias = torch.randn(6, generator=gen).to(device)
    y = triton_bn.batch_norm(x, None, None, weight, bias, training=True, activation="relu", residual=r)
    ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, weight.double(), bias.double(),
                                                    training=True) + r.double())
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    bound = 1.01 if (triton_kernels.uses_kernels(x) and INTERPRET and not x.is_cuda) else 0.505
    assert ((y.double() - ref).abs() <= bound * ulp).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_when_the_first_values_are_far_from_the_mean(layout, device):
    """The statistics kernels shift each split's sums by the mean of its first tile. Make that tile as
    unrepresentative as possible: the first image of every channel sits 100 standard deviations above
    the others (and is what split 0 starts with), around an offset of 1e3. The variance must still come
    out as float64 computes it from the same fp32 values (rounding of ~1e3 inputs allows ~1e-4)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((16, 3, 8, 8), generator=gen) + 1e3
    x[0] += 100.0
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(device).contiguous(memory_format=fmt)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = triton_bn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    true_var = x.double().var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(rv.double(), true_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(rm.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parameters_in_input_dtype(dtype, device):
    """A module converted with .half()/.bfloat16() has weight, bias and running stats in that dtype."""
    run_case((4, 5, 3, 3), dtype, device, "channels_last", param_dtype=dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_false_and_no_running_stats(training, device):
    run_case((4, 5, 3, 3), torch.float32, device, training=training, affine=False, running=not training or False)
    run_case((4, 5, 3, 3), torch.float32, device, training=True, affine=True, running=False)


def test_grad_output_layout_differs_from_input(device):
    run_case((4, 6, 3, 5), torch.float32, device, "channels_last", grad_layout="contiguous")
    run_case((4, 6, 3, 5), torch.float32, device, "contiguous", grad_layout="channels_last")


def test_saved_statistics_are_fp32(device):
    """The saved mean/invstd are fp32 even for bf16 input (PyTorch does the same)."""
    from torch.autograd.graph import saved_tensors_hooks
    saved = []
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16, device=device, requires_grad=True)
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_bn.batch_norm(x, None, None, None, None, training=True)
    per_channel = [t for t in saved if t.dim() == 1]
    assert per_channel and all(t.dtype == torch.float32 for t in per_channel)


def test_only_needed_gradients_are_computed(device):
    """Gradients come back for what requires one, and only for that, with float64's values."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen).to(device).requires_grad_()
    w = torch.rand(3, generator=gen).to(device) + 0.5  # no grad
    b = torch.randn(3, generator=gen).to(device).requires_grad_()
    triton_bn.batch_norm(x, None, None, w, b, training=True).sum().backward()
    ref, (xd, _, bd, _), _ = reference_batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    ref.sum().backward()
    assert w.grad is None
    assert_close(x.grad, xd.grad, torch.float32, "dx")
    assert_close(b.grad, bd.grad, torch.float32, "dbias")
    x2 = torch.randn(4, 3, 5, 5, generator=gen).to(device)  # only the parameters need grads
    w2 = (torch.rand(3, generator=gen) + 0.5).to(device).requires_grad_()
    y = triton_bn.batch_norm(x2, None, None, w2, None, training=True)
    weights = torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape)
    (y * weights).sum().backward()
    ref2, (x2d, w2d, _, _), _ = reference_batch_norm(x2, None, None, w2, None, True, 0.1, 1e-5)
    (ref2 * weights.double()).sum().backward()
    assert x2d.grad is None
    assert_close(w2.grad, w2d.grad, torch.float32, "dweight")


# -- modules ------------------------------------------------------------------------------------------
MODULES = [(triton_bn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4, 5)),
           (triton_bn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 5, 3)),
           (triton_bn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 3, 3, 2))]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("ours,theirs,shape", MODULES, ids=["1d", "2d", "3d"])
def test_module_matches_torch_over_steps(ours, theirs, shape, momentum, device):
    torch.manual_seed(0)
    ref = theirs(shape[1], momentum=momentum).to(device)
    mod = ours(shape[1], momentum=momentum).to(device)
    assert isinstance(mod, theirs)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    mod.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape, device=device) * (step + 1) + step
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    mod.eval()
    ref.eval()
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_both_ways(device):
    ref = torch.nn.BatchNorm2d(5).to(device)
    ref(torch.randn(4, 5, 3, 3, device=device))
    mod = triton_bn.BatchNorm2d(5).to(device)
    assert list(mod.state_dict().keys()) == list(ref.state_dict().keys()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    mod.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(5).to(device)
    back.load_state_dict(mod.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    mod.reset_parameters()
    assert torch.equal(mod.running_var, torch.ones(5, device=device)) and mod.num_batches_tracked.item() == 0


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_module_flags_match_torch(affine, track, device):
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).to(device)
    mod = triton_bn.BatchNorm2d(3, affine=affine, track_running_stats=track).to(device)
    assert (mod.weight is None) == (not affine) and (mod.running_mean is None) == (not track)
    for train in (True, False):
        mod.train(train)
        ref.train(train)
        x = torch.randn(4, 3, 5, 5, device=device)
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)


def test_one_value_per_channel_in_training_raises(device):
    mod = triton_bn.BatchNorm2d(3).to(device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mod(torch.randn(1, 3, 1, 1, device=device))
    assert mod.num_batches_tracked.item() == 0 and torch.equal(mod.running_mean, torch.zeros(3, device=device))
    mod.eval()
    assert mod(torch.randn(1, 3, 1, 1, device=device)).shape == (1, 3, 1, 1)  # fine in eval


def test_check_input_dim_is_torchs(device):
    with pytest.raises(ValueError, match="expected 4D input"):
        triton_bn.BatchNorm2d(3).to(device)(torch.randn(2, 3, device=device))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        triton_bn.BatchNorm1d(3).to(device)(torch.randn(2, 3, 4, 4, device=device))


def test_version_and_public_api():
    assert isinstance(triton_bn.__version__, str)
    for name in ("batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        assert name in triton_bn.__all__


def test_float64_channels_last_statistics_take_one_fused_call():
    """Where PyTorch's kernels serve float64 (the native kernels switched off or not built): float64 rows are
    summed in float64 by PyTorch's kernel, so at a mean of 1e4 standard deviations its channels_last
    statistics are still within the float64 tolerance, and the pure path makes one fused call there (no
    accurate-mean pass, which fp32 rows need)."""
    from triton_bn import dispatch
    calls = []
    fused = torch.native_batch_norm

    def counting(*args):
        calls.append(args[0].stride())
        return fused(*args)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 8, 16, 16, generator=gen, dtype=torch.float64) + 1e4).contiguous(
        memory_format=torch.channels_last)
    rm, rv = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "native_batch_norm", counting)
        y, mean, invstd = dispatch.PYTORCH.training(x, rm, rv, None, None, None, None, 0.1, False, 1e-5, 0, 0.0)
    assert calls == [x.stride()]
    var, exact_mean = torch.var_mean(x, (0, 2, 3), correction=0)
    atol, rtol = TOLERANCES[torch.float64]
    assert ((mean - exact_mean) / var.sqrt()).abs().max() < atol
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt(), atol=0, rtol=rtol)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "pytorch-kernels"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, parameter_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                    (torch.float64, torch.float32)], ids=str)
def test_parameters_of_another_dtype_take_the_fast_path(layout, dtype, parameter_dtype, native_kernels, monkeypatch):
    """A model cast with ``.to(torch.bfloat16)`` has 16-bit weights and running statistics. The pure
    path's fast path converts them to the compute dtype (the step functions' arithmetic), writes the
    running statistics back in their own dtype and returns dweight / dbias in the parameters' dtype;
    it no longer falls back to the step functions (18x slower at 2x512x28x28). Checked on both of its
    routes, the native kernels and PyTorch's (where they are not built): the step functions never run;
    training forward, running statistics, backward and eval against float64."""
    from triton_bn import dispatch, spec
    from triton_bn.backends import native_cpu
    backend = dispatch.NATIVE if native_kernels else dispatch.PYTORCH
    if native_kernels and native_cpu.ops() is None:
        pytest.fail("the native CPU kernels could not be built here (see the warning)")
    fused = []  # PyTorch's batch-norm kernels, called by the library's training forward
    for name in ("native_batch_norm", "batch_norm", "batch_norm_update_stats"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _original=original, **k: fused.append(1) or _original(*a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("a step function ran: the fast path declined")
    for step in ("batch_stats", "backward_sums", "backward_elementwise"):
        monkeypatch.setattr(spec, step, refuse)
    gen = torch.Generator().manual_seed(3)
    shape, channels, dims = (4, 6, 5, 3), 6, (0, 2, 3)
    x = make_input(shape, dtype, "cpu", layout, offset=1.0, generator=gen)
    grad = make_input(shape, dtype, "cpu", layout, generator=gen)
    weight = (torch.rand(channels, generator=gen) + 0.5).to(parameter_dtype)
    bias = torch.randn(channels, generator=gen).to(parameter_dtype)
    rm = (torch.randn(channels, generator=gen) * 0.1).to(parameter_dtype)
    rv = (torch.rand(channels, generator=gen) + 0.5).to(parameter_dtype)
    rm0, rv0 = rm.double(), rv.double()
    y, mean, invstd = backend.training(x, rm, rv, None, weight, bias, None, 0.1, False, 1e-5, 1, 0.0)
    assert bool(fused) != native_kernels, "the route under test did not serve"
    y_ref, (xd, wd, bd, _), (rm_ref, rv_ref) = reference_batch_norm(
        x.requires_grad_(), rm0, rv0, weight.requires_grad_(), bias.requires_grad_(), True, 0.1, 1e-5, "relu")
    assert y.dtype == dtype and rm.dtype == rv.dtype == parameter_dtype
    assert_close(y, y_ref, dtype, "y")
    for actual, expected, what in ((rm, rm_ref, "running mean"), (rv, rv_ref, "running var")):
        assert_close(actual, expected, parameter_dtype, what)
    grad_x, grad_weight, grad_bias, _ = backend.backward(
        grad, x.detach(), mean, invstd, None, weight.detach(), bias.detach(), None, 1e-5, 1, 0.0,
        [True, True, True, False])
    y_ref.backward(grad.double())
    assert grad_weight.dtype == grad_bias.dtype == parameter_dtype
    assert_close(grad_x, xd.grad, dtype, "dx")
    for actual, expected, what in ((grad_weight, wd.grad, "dweight"), (grad_bias, bd.grad, "dbias")):
        assert_close(actual, expected, parameter_dtype, what)
    y_eval = backend.apply(x.detach(), rm, None, rv, weight.detach(), bias.detach(), None, 1e-5, 1, 0.0)
    eval_ref, _, _ = reference_batch_norm(x, rm.double(), rv.double(), weight, bias, False, 0.1, 1e-5, "relu")
    assert_close(y_eval, eval_ref, dtype, "eval y")



PURE_PYTORCH_SCRIPT = r"""
import torch, triton_bn
from triton_bn.backends import triton_kernels
assert not triton_kernels.uses_kernels(torch.empty(1)), "the interpreter should be off in this process"
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for act in (None,) + triton_bn.SUPPORTED_ACTIVATIONS:
        mod = triton_bn.BatchNorm2d(4, activation=act).to(dtype)
        ref = torch.nn.BatchNorm2d(4).to(dtype)
        with torch.no_grad():
            mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-1, 1)
        ref.load_state_dict(mod.state_dict())
        f = triton_bn.activations.torch_activation(act)
        x = torch.randn(3, 4, 5, 5, dtype=dtype).to(memory_format=torch.channels_last)
        r = torch.randn_like(x)
        xa, xb, ra, rb = [t.clone().requires_grad_() for t in (x, x, r, r)]
        ya, yb = mod(xa, residual=ra), f(ref(xb) + rb)
        g = torch.randn_like(ya)
        ya.backward(g); yb.backward(g)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
        for a, b in ((ya, yb), (xa.grad, xb.grad), (ra.grad, rb.grad), (mod.weight.grad, ref.weight.grad),
                     (mod.bias.grad, ref.bias.grad), (mod.running_var, ref.running_var)):
            torch.testing.assert_close(a, b, **tol)
        assert ya.is_contiguous(memory_format=torch.channels_last)
        mod.eval(); ref.eval()
        torch.testing.assert_close(mod(x), f(ref(x)), **tol)
print("pure-pytorch-ok")
"""


def test_pure_pytorch_path_without_the_interpreter():
    """CPU tensors without TRITON_INTERPRET take the CPU backends (dispatch.py): same semantics, float64 included."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PURE_PYTORCH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "pure-pytorch-ok" in proc.stdout, proc.stderr[-3000:]


def _count_launches(monkeypatch):
    """Wrap every kernel the launchers use, counting launches by name."""
    from triton_bn.kernels import KERNELS
    counts = {}

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.kernel[grid]

    for family, kernels in KERNELS.items():
        for role, kernel in kernels.items():
            monkeypatch.setitem(kernels, role, Counting(f"{family}.{role}", kernel))
    return counts


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten ops run while active (the interpreter's own copies included)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launch_counts(layout, monkeypatch):
    """Few launches keep host overhead small: eval is one pass, a training forward two (statistics,
    merged by their last program, then apply, which also counts the batch: no increment op on the side,
    where a GPU would pay a third launch), a training backward two (reduce, dx); passes nobody needs are
    skipped."""
    from triton_bn.backends import triton_kernels
    if not triton_kernels.uses_kernels(torch.empty(1)):
        pytest.skip("launch counts are the kernels': this process runs the pure-PyTorch path")
    counts = _count_launches(monkeypatch)
    mod = triton_bn.BatchNorm2d(4, activation="relu")
    x = make_input((3, 4, 5, 5), torch.float32, "cpu", layout).requires_grad_()
    with _RecordOps() as recorded:
        y = mod(x)
    assert sorted(k.split(".")[1] for k in counts) == ["apply", "stats"] and sum(counts.values()) == 2
    assert "add_" not in recorded.ops and mod.num_batches_tracked.item() == 1
    counts.clear()
    y.sum().backward()
    assert sorted(k.split(".")[1] for k in counts) == ["bwd_dx", "bwd_reduce"] and sum(counts.values()) == 2
    counts.clear()
    mod.eval()
    with torch.no_grad():
        mod(x)
    assert sum(counts.values()) == 1 and all("apply" in k for k in counts)
    counts.clear()
    mod.weight.requires_grad_(False)
    mod.bias.requires_grad_(False)
    mod(x).sum().backward()  # eval, no parameter gradients: the dx pass alone
    assert sum(counts.values()) == 2 and list(counts.values()).count(1) == 2  # apply + dx


def test_import_is_light():
    """``import triton_bn`` loads no report or export tooling (pandas, matplotlib, onnx, the bench) and builds
    nothing: the native kernels and the C++ launch path are built on first use. (What it costs in seconds is
    perf/import_cost.py's, in perf/NOTES.md.)"""
    import subprocess
    import sys
    child = ("import sys, torch; before = set(sys.modules); import triton_bn; "
             "from triton_bn.backends import native_cpu, cpp_launch; "
             "new = {m.split('.')[0] if not m.startswith('triton_bn') else m for m in set(sys.modules) - before}; "
             "print(sorted(new & {'pandas', 'matplotlib', 'onnx', 'onnxruntime', 'onnxscript', 'triton_bn.bench'})); "
             "print(native_cpu._loaded, cpp_launch._library)")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "{} {}"], done.stdout
