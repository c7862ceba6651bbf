"""[robust] Bad inputs raise clear errors and change nothing; odd-but-valid inputs work; results are
bitwise reproducible; property-based comparison against the float64 reference."""
import pytest
import torch
from hypothesis import given, strategies as st

import triton_bn
from triton_bn.backends import native_cpu
from helpers import make_input
from test_core import run_case


def _state(*tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def _unchanged(before, *tensors):
    """Every watched tensor still holds its values (meta tensors hold none and are skipped)."""
    return all((b is None and t is None) or t.device.type == "meta" or torch.equal(b, t.detach())
               for b, t in zip(before, tensors))


def _base(device, channels=3):
    x = torch.randn(4, channels, 5, 5, device=device)
    return dict(input=x, running_mean=torch.zeros(channels, device=device),
                running_var=torch.ones(channels, device=device), weight=torch.ones(channels, device=device),
                bias=torch.zeros(channels, device=device), training=True,
                num_batches_tracked=torch.zeros((), dtype=torch.long, device=device))


BAD_CALLS = [
    ("weight length", lambda a: a.update(weight=torch.ones(4, device=a["input"].device)), ValueError, "weight must have shape"),
    ("bias length", lambda a: a.update(bias=torch.ones(2, device=a["input"].device)), ValueError, "bias must have shape"),
    ("running_var length", lambda a: a.update(running_var=torch.ones(5, device=a["input"].device)), ValueError, "running_var"),
    ("only running_mean", lambda a: a.update(running_var=None), ValueError, "given together"),
    ("integer input", lambda a: a.update(input=torch.ones(4, 3, 5, 5, dtype=torch.int32, device=a["input"].device)),
     TypeError, "unsupported input dtype"),
    ("bool input", lambda a: a.update(input=torch.ones(4, 3, 2, device=a["input"].device, dtype=torch.bool)),
     TypeError, "unsupported input dtype"),
    ("complex input", lambda a: a.update(input=torch.ones(4, 3, 2, device=a["input"].device, dtype=torch.complex64)),
     TypeError, "unsupported input dtype"),
    ("float8 input", lambda a: a.update(input=torch.ones(4, 3, 2, device=a["input"].device).to(torch.float8_e4m3fn)),
     TypeError, "unsupported input dtype"),
    ("unknown activation", lambda a: a.update(activation="mish"), ValueError, "unsupported activation 'mish'"),
    ("negative_slope not a number", lambda a: a.update(activation="leaky_relu", negative_slope="0.1"), TypeError,
     "negative_slope must be a number"),
    ("eps zero in training", lambda a: a.update(eps=0.0), ValueError, "eps must be > 0"),
    ("residual shape", lambda a: a.update(residual=torch.randn(4, 3, 5, 4, device=a["input"].device)), ValueError,
     "residual shape"),
    ("residual dtype", lambda a: a.update(residual=a["input"].half()), TypeError, "residual dtype"),
    ("one value per channel", lambda a: a.update(input=torch.randn(1, 3, 1, 1, device=a["input"].device)), ValueError,
     "Expected more than 1 value per channel"),
    ("rank 1 input", lambda a: a.update(input=torch.randn(3, device=a["input"].device)), ValueError, "at least 2"),
    ("running stats on another device", lambda a: a.update(running_mean=torch.zeros(3, device="meta")), RuntimeError,
     "is on meta"),
]


@pytest.mark.parametrize("name,mutate,error,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_changes_nothing(name, mutate, error, match, device):
    args = _base(device)
    mutate(args)
    watched = [args[k] for k in ("input", "running_mean", "running_var", "weight", "bias", "num_batches_tracked")]
    before = _state(*watched)
    with pytest.raises(error, match=match):
        triton_bn.batch_norm(**args)
    assert _unchanged(before, *watched)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_double_backward_raises_instead_of_dropping_terms(training, device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    running = (torch.zeros(3, device=device), torch.ones(3, device=device))
    y = triton_bn.batch_norm(x, *running, training=training, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gx.sum().backward()


def test_module_wrong_rank_changes_nothing(device):
    mod = triton_bn.BatchNorm3d(3).to(device)
    before = _state(*mod.state_dict().values())
    with pytest.raises(ValueError, match="expected 5D input"):
        mod(torch.randn(2, 3, 4, 4, device=device))
    assert _unchanged(before, *mod.state_dict().values())


def test_float64_takes_the_pure_pytorch_path_on_every_device(device):
    """float64 is not a kernel dtype: on CUDA and under the interpreter alike it runs the native CPU kernels or
    PyTorch's (dispatch.py), with PyTorch's results (the tests' float64 tolerance) and no kernel launch."""
    from triton_bn.backends import triton_kernels
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    assert not triton_kernels.uses_kernels(x)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    y = triton_bn.batch_norm(x, rm, rv, training=True, activation="relu")
    ref = torch.relu(torch.nn.functional.batch_norm(x, ref_rm, ref_rv, training=True))
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((rm, rv), (ref_rm, ref_rv), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_matches_pytorch(training, device):
    ref = torch.nn.BatchNorm2d(3).to(device).train(training)
    mod = triton_bn.BatchNorm2d(3, activation="relu").to(device).train(training)
    x = torch.empty(0, 3, 4, 4, device=device, requires_grad=True)
    y = mod(x)
    ref(torch.empty(0, 3, 4, 4, device=device))
    assert y.shape == x.shape
    assert torch.equal(mod.running_mean, ref.running_mean) and torch.equal(mod.running_var, ref.running_var)
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item()
    y.sum().backward()
    assert torch.equal(mod.weight.grad, torch.zeros(3, device=device)) and torch.equal(mod.bias.grad, torch.zeros(3, device=device))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_like_pytorch(layout, device):
    x = make_input((4, 3, 5, 5), torch.float32, device, layout)
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    y = triton_bn.batch_norm(x, None, None, training=True, activation="relu")
    ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(y[:, 2], ref[:, 2])


@pytest.mark.parametrize("pytorch_kernels", [False, True], ids=["default-path", "pytorch-kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (32, 3, 33, 17)], ids=["one-split", "many-splits"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_infinite_values_give_pytorchs_statistics(shape, layout, dtype, pytorch_kernels, device, monkeypatch):
    """A channel holding +inf has the mean +inf, one holding -inf has -inf, one holding both NaN; the variance
    of each is NaN (PyTorch's sum / n and its variance), on every path: the Triton kernels (interpreter), the
    native CPU kernels and PyTorch's kernels with our epilogue (the last two when this file runs without the
    interpreter). Before, the Triton kernels' shifted sums took an infinite shift or pivot (inf - inf), their
    split merge mean_a + delta * w gave NaN, the native kernels' shift was an infinite first value, and the
    channels-last correction of PyTorch's mean added inf - inf."""
    if pytorch_kernels:
        monkeypatch.setattr(native_cpu, "serves", lambda t: None)
    torch.manual_seed(0)
    x = make_input(shape, dtype, device, layout)
    x[1, 0, 2, 3] = float("inf")
    x[0, 1, 0, 0] = float("-inf")  # the pivot of channel 1
    x[2, 1, 1, 1] = float("-inf")
    x[3, 2, 4, 4] = float("inf")
    x[0, 2, 0, 0] = float("-inf")
    stats = [torch.zeros(3, device=device), torch.ones(3, device=device)]
    expected = [torch.zeros(3, device=device), torch.ones(3, device=device)]
    with torch.no_grad():
        y = triton_bn.batch_norm(x, *stats, training=True)
    ref = torch.nn.functional.batch_norm(x.float(), *expected, training=True)
    assert expected[0][:2].isinf().all() and expected[0][2].isnan()  # what PyTorch gives, for the record
    for got, want in zip(stats, expected):
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


def test_constant_channel_and_tiny_eps(device):
    x = torch.full((6, 2, 3, 3), 3.25, device=device)
    # near-constant: a spread of 1e-4 is ~400 fp32 steps at 3.25; the fp32 mean itself is then off by up
    # to half a step, i.e. 1.2e-3 of a std, which bounds what any fp32 implementation can reach here
    x[:, 1] += torch.randn(6, 3, 3, device=device) * 1e-4
    w, b = torch.tensor([2.0, 1.0], device=device), torch.tensor([0.5, -1.0], device=device)
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    y = triton_bn.batch_norm(x, rm, rv, w, b, training=True, eps=1e-12)
    assert torch.equal(y[:, 0], torch.full_like(y[:, 0], 0.5))  # zero variance: exactly the bias
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, eps=1e-12)
    torch.testing.assert_close(y[:, 1].double(), ref[:, 1], atol=5e-3, rtol=5e-3)
    assert rv[0].item() == pytest.approx(0.9) and torch.isfinite(y).all()


def test_running_statistics_as_views_into_a_larger_buffer(device):
    buffer = torch.zeros(2, 8, device=device)
    running_mean, running_var = buffer[0, ::2], buffer[1, 1::2]  # strided views
    running_var.fill_(1.0)
    x = torch.randn(5, 4, 3, device=device)
    triton_bn.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)
    ref_m, ref_v = torch.zeros(4, device=device), torch.ones(4, device=device)
    torch.nn.functional.batch_norm(x, ref_m, ref_v, training=True, momentum=0.5)
    torch.testing.assert_close(running_mean, ref_m)
    torch.testing.assert_close(running_var, ref_v)
    assert torch.equal(buffer[0, 1::2], torch.zeros(4, device=device))  # the gaps are untouched
    assert torch.equal(buffer[1, ::2], torch.zeros(4, device=device))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(training, layout, device):
    def once():
        torch.manual_seed(0)
        mod = triton_bn.BatchNorm2d(5, activation="silu").to(device).train(training)
        x = make_input((9, 5, 7, 3), torch.float32, device, layout, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
        y = mod(x, residual=r)
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad, r.grad, mod.weight.grad, mod.bias.grad, mod.running_mean, mod.running_var]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def _primes_and_ones():
    return st.sampled_from([1, 2, 3, 5, 7, 11, 13])


@given(n=st.sampled_from([1, 2, 3, 5, 8]), c=_primes_and_ones(), spatial=st.lists(_primes_and_ones(), max_size=3),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       activation=st.sampled_from((None,) + triton_bn.SUPPORTED_ACTIVATIONS),
       training=st.booleans(), residual=st.booleans(), momentum=st.sampled_from([0.1, 0.9, 1.0, 0.0]),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_property_against_reference(n, c, spatial, layout, dtype, activation, training, residual, momentum, eps):
    shape = (n, c, *spatial)
    if training and n * int(torch.tensor(spatial).prod().item() if spatial else 1) == 1:
        shape = (n + 1, c, *spatial)
    if layout == "strided" and len(shape) == 2:
        layout = "contiguous"
    run_case(shape, dtype, "cpu", layout, training, activation, with_residual=residual, momentum=momentum, eps=eps)


@given(momentum_none=st.booleans(), steps=st.integers(1, 3), training_first=st.booleans())
def test_property_module_momentum_none(momentum_none, steps, training_first):
    torch.manual_seed(steps)
    mod = triton_bn.BatchNorm1d(3, momentum=None if momentum_none else 0.3)
    ref = torch.nn.BatchNorm1d(3, momentum=None if momentum_none else 0.3)
    for step in range(steps):
        mod.train(training_first or step > 0)
        ref.train(training_first or step > 0)
        x = torch.randn(5, 3, 4) + step
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.running_var, ref.running_var, atol=1e-5, rtol=1e-5)


def cuda_only(test):
    """GPU-only: skipped (and reported as skipped) without CUDA; marked ``gpu`` for perf/gpu_check.sh."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@cuda_only
def test_more_than_2_to_the_31_elements():
    """(65537, 128, 256) bf16 has 2^31 + 2^15 elements (4.3 GB): offsets past 2^31 must be int64.
    Checked on the last image, which lies entirely beyond element 2^31."""
    x = torch.randn(65537, 128, 256, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    y = triton_bn.batch_norm(x, None, None, training=True)
    var, mean = torch.var_mean(x.float(), dim=(0, 2), unbiased=False, keepdim=True)
    ref_last = (x[-1:].float() - mean) * torch.rsqrt(var + 1e-5)
    assert (y[-1:].float() - ref_last).abs().max().item() < 0.05
    assert torch.isfinite(y[::4096]).all()


@cuda_only
def test_thousand_steps_keep_running_statistics_stable():
    mod = triton_bn.BatchNorm2d(16, activation="relu").cuda()
    ref = torch.nn.BatchNorm2d(16).cuda()
    for step in range(1000):
        x = torch.randn(8, 16, 8, 8, device="cuda") * 2 + 1
        mod(x)
        ref(x)
    torch.testing.assert_close(mod.running_mean, ref.running_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mod.running_var, ref.running_var, atol=1e-4, rtol=1e-4)


def test_the_semantic_tests_pass_on_the_pure_pytorch_path():
    """The core, epilogue, robustness and inference tests once more in a process without the Triton
    interpreter, where CPU tensors take the pure-PyTorch path (PyTorch's fused kernels where they compute
    what the kernels do, the step functions elsewhere): every semantic holds there too."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_core.py",
                           "test_epilogue.py", "test_robust.py", "test_inference.py", "test_seams.py", "-k",
                           "not the_semantic_tests_pass_on_the_pure_pytorch_path"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1]
