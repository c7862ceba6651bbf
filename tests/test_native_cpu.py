"""[cpu]: the native CPU kernels (``triton_bn/backends/native_cpu.py``, ``csrc/cpu/``) that serve
channels-innermost CPU tensors on the pure-PyTorch path, called through their backend record
(``dispatch.NATIVE``, what ``dispatch.backend_for`` picks for these inputs without the interpreter), against
float64 PyTorch: every activation, fp32 / bf16 / fp16 / float64, every channels-innermost
layout, the residual, the statistics at a large mean, the backward with batch and with running
statistics, and results independent of the thread count. (The whole semantic suite also runs on this
path: ``test_robust.py::test_the_semantic_tests_pass_on_the_pure_pytorch_path``.)"""
import os
import re

import pytest
import torch

from triton_bn import dispatch
from triton_bn.backends import native_cpu
from triton_bn.activations import ACTIVATION_IDS, torch_activation

from conftest import TOLERANCES
from helpers import assert_close, load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ACTIVATIONS = [name for name in ACTIVATION_IDS]


@pytest.fixture(autouse=True)
def _native_kernels():
    """Skipped only where switched off on purpose; a build that fails is a failure (everything else would
    pass on PyTorch's kernels and hide it)."""
    if not native_cpu.ENABLED:
        pytest.skip("TRITON_BN_NATIVE_CPU=0: the native CPU kernels are switched off")
    if native_cpu.ops() is None:
        pytest.fail("the native CPU kernels could not be built on this machine (see the warning)")


def _input(shape, dtype, layout, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a float64 input drawn in float64, so that it has bits below fp32's (a kernel computing in fp32 shows)
    drawn = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=gen, dtype=drawn) * 2 + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)])
    elif layout == "c_innermost":  # (N, C, L) with C innermost
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    elif layout == "channels_last, odd strides of size-1 dims":  # still dense: a size-1 dim's stride is never used
        x = x.contiguous(memory_format=torch.channels_last)
        x = x.as_strided(x.shape, [97 if size == 1 else stride for size, stride in zip(x.shape, x.stride())])
    assert native_cpu.serves(x) is not None, "the native kernels must serve this input"
    return x


def _parameters(channels, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)


def _float64_forward(x, weight, bias, residual, training, running_mean, running_var, activation):
    z = torch.nn.functional.batch_norm(x.double(), None if training else running_mean.double(),
                                       None if training else running_var.double(),
                                       None if weight is None else weight.double(),
                                       None if bias is None else bias.double(), training, 0.0, 1e-5)
    if residual is not None:
        z = z + residual.double()
    return torch_activation(activation, 0.2)(z)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_training_forward_every_activation_and_dtype(activation, dtype, layout):
    """y, mean, invstd and both running statistics (momentum 0.1, unbiased variance) of a training forward
    with a residual, channels_last (rows) and NCHW (planes). The statistics are fp32 (float64 for a float64
    x, computed in double: float64's tolerance)."""
    shape = (3, 5, 6, 7)
    x, residual = _input(shape, dtype, layout), _input(shape, dtype, layout, seed=2)
    weight, bias = _parameters(5)
    statistics_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = weight.to(statistics_dtype), bias.to(statistics_dtype)
    rm, rv = torch.zeros(5, dtype=statistics_dtype), torch.ones(5, dtype=statistics_dtype)
    y, mean, invstd = dispatch.NATIVE.training(x, rm, rv, None, weight, bias, residual, 0.1, False, 1e-5,
                                                    ACTIVATION_IDS[activation], 0.2)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert mean.dtype == invstd.dtype == statistics_dtype
    assert_close(y, _float64_forward(x, weight, bias, residual, True, None, None, activation), dtype, "y")
    var, exact_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    tol = 1e-6 if statistics_dtype == torch.float32 else TOLERANCES[torch.float64][0]
    torch.testing.assert_close(mean.double(), exact_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=10 * tol)
    count = x.numel() // 5
    torch.testing.assert_close(rm.double(), 0.1 * exact_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var * count / (count - 1), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(8, 7, 5, 5), (64, 23, 5, 5)], ids=["two chunks", "chunks on both threads"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_short_planes_with_a_transcendental_activation(dtype, activation, shape):
    """NCHW planes of 25 values take normalize_short_planes (kernels.h) in every dtype: consecutive planes run as
    one line of per-value scale and shift, in chunks of whole planes that start mid-way through the channels
    (40 planes of 25 to a chunk, 7 or 23 channels) and, in the larger shape, on both threads. Training and eval
    y with a residual against float64."""
    x, residual = _input(shape, dtype, "contiguous"), _input(shape, dtype, "contiguous", seed=2)
    channels = shape[1]
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = (p.to(parameter_dtype) for p in _parameters(channels))
    y, _, _ = dispatch.NATIVE.training(x, None, None, None, weight, bias, residual, 0.1, False, 1e-5,
                                       ACTIVATION_IDS[activation], 0.0)
    assert_close(y, _float64_forward(x, weight, bias, residual, True, None, None, activation), dtype, "training y")
    rm = (torch.randn(channels) * 0.1).to(parameter_dtype)
    rv = (torch.rand(channels) + 0.5).to(parameter_dtype)
    y = dispatch.NATIVE.apply(x, rm, None, rv, weight, bias, residual, 1e-5, ACTIVATION_IDS[activation], 0.0)
    assert_close(y, _float64_forward(x, weight, bias, residual, False, rm, rv, activation), dtype, "eval y")


@pytest.mark.parametrize("shape", [(3, 45, 11, 13), (2, 96, 20, 20), (4, 16, 9, 9), (2, 64, 3, 40, 5),
                                   (2, 160, 6, 6)],
                         ids=["32 + 8 + 5 channels", "three groups of 32, rows over both threads", "16 channels",
                              "3-D, 64 channels", "160 channels: fp32 a row at a time"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_row_statistics_block_by_block(shape, dtype):
    """Channels-last statistics over blocks of 128 rows: down the rows in registers, 32 channels at a time, the last
    channels row by row (statistics_block_sums, kernels.h): fp16 and bf16 rows of any width, fp32 rows of fewer than
    128 channels; wider fp32 rows a row at a time. Groups, tails, several blocks and chunks, 3-D, against float64 on
    the same values."""
    x = _input(shape, dtype, "channels_last", offset=3.0)
    channels = shape[1]
    weight, bias = _parameters(channels)
    _, mean, invstd = dispatch.NATIVE.training(x, None, None, None, weight, bias, None, 0.1, False, 1e-5, 0, 0.0)
    dims = [d for d in range(x.dim()) if d != 1]
    var, exact_mean = torch.var_mean(x.double(), dims, correction=0)
    # fp32 sums over blocks of 128 rows (about 2e-6 from exact here, the same before the change): a tenth of the
    # suite's fp32 bound
    torch.testing.assert_close(mean.double(), exact_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 45, 11, 13), (2, 64, 20, 20), (2, 240, 3, 3), (4, 16, 9, 9), (2, 48, 3, 5, 7),
                                   (2, 256, 4, 4)],
                         ids=["32 + 8 + 5 channels, four blocks", "two passes of 32, chunks on both threads",
                              "seven passes of 32 and two of 8 (fp32 a row at a time)", "16 channels",
                              "3-D, 32 + 16", "256 channels: a row at a time"])
@pytest.mark.parametrize("activation", [None, "relu"], ids=["identity", "relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_backward_sums_block_by_block(dtype, activation, shape):
    """The backward's sums over channels-last rows of few channels (fp16 and bf16 below 256, fp32 below 96) take a
    block of 128 rows at a time, 32 channels down the rows in registers, then 8, the last fewer than 8 row by row
    (backward_block_sums, kernels.h); wider rows a row at a time. Groups, tails, several blocks and chunks, both
    threads, 3-D, with ReLU a residual in z: dx, dweight, dbias and d residual against float64 autograd on the
    same values."""
    x, residual = _input(shape, dtype, "channels_last"), _input(shape, dtype, "channels_last", seed=2)
    grad_y = _input(shape, dtype, "channels_last", seed=3)
    channels = shape[1]
    weight, bias = _parameters(channels)
    act = ACTIVATION_IDS[activation]
    for res in ([None, residual] if activation else [None]):
        _, mean, invstd = dispatch.NATIVE.training(x, None, None, None, weight, bias, res, 0.1, False, 1e-5, act, 0.0)
        grads = dispatch.NATIVE.backward(grad_y, x, mean, invstd, None, weight, bias, res, 1e-5, act, 0.0,
                                         [True, True, True, res is not None])
        leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
        leaves += [res.detach().double().requires_grad_()] if res is not None else []
        expected_y = _float64_forward(*leaves[:3], leaves[3] if res is not None else None, True, None, None,
                                      activation)
        expected = torch.autograd.grad(expected_y, leaves, grad_y.double())
        for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, expected):
            if name in ("dweight", "dbias"):  # sums in fp32 over the batch: the fp32 tolerance scaled by the rows
                rows = x.numel() // channels
                torch.testing.assert_close(got.double(), want, atol=TOLERANCES[torch.float32][0] * rows,
                                           rtol=TOLERANCES[torch.float32][1])
            else:
                assert got.stride() == x.stride()
                assert_close(got, want, dtype, name)


@pytest.mark.parametrize("shape", [(3, 64, 5, 7), (2, 16, 40, 40), (2, 240, 3, 3), (2, 48, 3, 5, 7)],
                         ids=["a part chunk", "chunks on both threads", "four rows a chunk", "3-D, 21 rows a chunk"])
@pytest.mark.parametrize("activation", [None, "relu"], ids=["identity", "relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_short_rows_of_the_16_bit_packs(dtype, activation, shape):
    """Channels-last rows of fewer than 256 channels, a multiple of 16, with the 16-bit packs (fp16, bf16; identity
    or ReLU) take normalize_short_rows (kernels.h): consecutive rows run as one line of repeated per-channel
    values, in chunks of 1024 values (16 rows of 64 channels; the last chunk a part one: 105 rows), over both
    threads, and bf16's pack order holds across the repeats. Training and eval y, with and without a residual,
    against float64."""
    x = _input(shape, dtype, "channels_last")
    channels = shape[1]
    weight, bias = _parameters(channels)
    rm, rv = torch.randn(channels) * 0.1, torch.rand(channels) + 0.5
    for residual in (None, _input(shape, dtype, "channels_last", seed=2)):
        y, _, _ = dispatch.NATIVE.training(x, None, None, None, weight, bias, residual, 0.1, False, 1e-5,
                                           ACTIVATION_IDS[activation], 0.0)
        assert y.stride() == x.stride()
        assert_close(y, _float64_forward(x, weight, bias, residual, True, None, None, activation), dtype, "training y")
        y = dispatch.NATIVE.apply(x, rm, None, rv, weight, bias, residual, 1e-5, ACTIVATION_IDS[activation], 0.0)
        assert_close(y, _float64_forward(x, weight, bias, residual, False, rm, rv, activation), dtype, "eval y")


@pytest.mark.parametrize("shape, layout", [((4, 6, 3, 5), "channels_last"), ((3, 4, 2, 3, 5), "channels_last"),
                                           ((17, 6), "contiguous"), ((4, 6, 9), "c_innermost"),
                                           ((5, 6, 1, 1), "contiguous"), ((4, 6, 3, 5), "contiguous"),
                                           ((3, 4, 2, 3, 5), "contiguous"), ((4, 6, 9), "contiguous"),
                                           ((2, 3, 2500), "contiguous"),
                                           ((1, 6, 1, 5), "channels_last, odd strides of size-1 dims")], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_every_channels_innermost_layout_in_training_and_eval(shape, layout, affine):
    x = _input(shape, torch.float32, layout)
    channels = shape[1]
    weight, bias = _parameters(channels) if affine else (None, None)
    y, _, _ = dispatch.NATIVE.training(x, None, None, None, weight, bias, None, 0.1, False, 1e-5, 1, 0.0)
    assert y.stride() == x.stride()
    assert_close(y, _float64_forward(x, weight, bias, None, True, None, None, "relu"), torch.float32, "training y")
    rm, rv = torch.randn(channels) * 0.1, torch.rand(channels) + 0.5
    y = dispatch.NATIVE.apply(x, rm, None, rv, weight, bias, None, 1e-5, 2, 0.2)
    assert y.stride() == x.stride()
    assert_close(y, _float64_forward(x, weight, bias, None, False, rm, rv, "leaky_relu"), torch.float32, "eval y")


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_statistics_at_a_large_mean_stay_accurate(layout, dtype):
    """Shifted sums: at a mean of 1e4 standard deviations the mean is right to fp32's own spacing there
    (PyTorch's uncompensated row sums are off by ~5e-3 std: docs/cpu-path.md) and the variance to 1e-3;
    float64, summed in double, to float64's tolerance."""
    x = _input((64, 8, 16, 16), dtype, layout, offset=1e4)
    _, mean, invstd = dispatch.NATIVE.training(x, None, None, None, None, None, None, 0.1, False, 1e-5, 0, 0.0)
    var, exact_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    tol = 1e-3 if dtype == torch.float32 else TOLERANCES[torch.float64][0]
    assert ((mean.double() - exact_mean) / var.sqrt()).abs().max() < tol
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=tol)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("activation", [None, "relu"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_floats_in_vector_lanes(layout, activation, dtype):
    """fp16 and bf16 with the conversions in registers where the build has the vector instructions
    (identity and ReLU: packs of 16 values, for fp16 then 8; fp16's backward), on rows of 24 channels
    and planes of 35 values (the vector bodies and their tails; bf16 rows read their per-channel values
    in the packs' order): the statistics at the fp32 statistics' tolerances of the training-forward test,
    y, and every gradient with a residual, against float64."""
    shape = (6, 24, 5, 7)
    x, residual = _input(shape, dtype, layout), _input(shape, dtype, layout, seed=2)
    grad_y = _input(shape, dtype, layout, seed=3)
    weight, bias = _parameters(24)
    act = ACTIVATION_IDS[activation]
    y, mean, invstd = dispatch.NATIVE.training(x, None, None, None, weight, bias, residual, 0.1, False, 1e-5,
                                                    act, 0.0)
    var, exact_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    # fp32 sums over blocks of 128 rows (about 2e-6 from exact here, the same before the change): a tenth of the
    # suite's fp32 bound
    torch.testing.assert_close(mean.double(), exact_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    expected_y = _float64_forward(*leaves, True, None, None, activation)
    assert_close(y, expected_y, dtype, "y")
    grads = dispatch.NATIVE.backward(grad_y, x, mean, invstd, None, weight, bias, residual, 1e-5, act, 0.0,
                                     [True, True, True, True])
    expected = torch.autograd.grad(expected_y, leaves, grad_y.double())
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, expected):
        if name in ("dweight", "dbias"):  # sums over the batch, compared at the tolerances scaled by n
            torch.testing.assert_close(got.double(), want, atol=TOLERANCES[dtype][0] * 60, rtol=TOLERANCES[dtype][1])
        else:
            assert got.stride() == x.stride()
            assert_close(got, want, dtype, name)


# which of (dx, dweight, dbias, d residual) are asked for: all; no d residual (a detached residual); d
# residual alone (a frozen input): the kernels have a loop of their own for each output set they serve
WANTED = {"all": [True, True, True, True], "no-dresidual": [True, True, True, False],
          "dresidual-only": [False, False, False, True]}


@pytest.mark.parametrize("wanted", list(WANTED))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_backward_every_activation(activation, dtype, batch_stats, layout, wanted):
    """dx, dweight, dbias and d residual against float64 autograd (z recomputed from x inside), rows and
    planes; only the gradients asked for come back. dweight and dbias are sums in fp32 (double for
    float64), checked at the fp32 (float64) tolerance whatever the input's dtype."""
    shape = (4, 6, 3, 5)
    x, residual = _input(shape, dtype, layout), _input(shape, dtype, layout, seed=2)
    grad_y = _input(shape, dtype, layout, seed=3)
    weight, bias = _parameters(6)
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5
    if dtype == torch.float64:  # a float64 model: float64 parameters and statistics
        weight, bias, rm, rv = (t.double() for t in (weight, bias, rm, rv))
    if batch_stats:
        _, mean, stat = dispatch.NATIVE.training(x, None, None, None, weight, bias, residual, 0.1, False, 1e-5,
                                                      ACTIVATION_IDS[activation], 0.2)
    else:
        mean, stat = rm, rv
    invstd, running_var = (stat, None) if batch_stats else (None, stat)
    grads = dispatch.NATIVE.backward(grad_y, x, mean, invstd, running_var, weight, bias, residual, 1e-5,
                                     ACTIVATION_IDS[activation], 0.2, WANTED[wanted])
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    y = _float64_forward(leaves[0], leaves[1], leaves[2], leaves[3], batch_stats, rm, rv, activation)
    expected = torch.autograd.grad(y, leaves, grad_y.double())
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, got, want, asked in zip(("dx", "dweight", "dbias", "dresidual"), grads, expected, WANTED[wanted]):
        if not asked:
            assert got is None, name
        elif name in ("dweight", "dbias"):
            assert got.dtype == weight.dtype
            torch.testing.assert_close(got.double(), want, atol=TOLERANCES[sums_dtype][0],
                                       rtol=TOLERANCES[sums_dtype][1])
        else:
            assert got.dtype == dtype and got.stride() == x.stride()
            assert_close(got, want, dtype, name)


def test_backward_takes_gradients_of_any_layout_and_skips_what_is_not_wanted():
    """A dy of another layout (an expanded tensor of ones, as ``y.sum().backward()`` passes) is read
    correctly; gradients not asked for come back as None."""
    x = _input((3, 4, 5, 2), torch.float32, "channels_last")
    weight, bias = _parameters(4)
    _, mean, invstd = dispatch.NATIVE.training(x, None, None, None, weight, bias, None, 0.1, False, 1e-5, 1, 0.0)
    grad_y = torch.ones(()).expand(x.shape)
    dx, dweight, dbias, dresidual = dispatch.NATIVE.backward(grad_y, x, mean, invstd, None, weight, bias, None, 1e-5,
                                                             1, 0.0, [True, False, True, False])
    assert dweight is None and dresidual is None
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = _float64_forward(leaves[0], leaves[1], leaves[2], None, True, None, None, "relu")
    want_dx, _, want_dbias = torch.autograd.grad(y.sum(), leaves)
    assert_close(dx, want_dx, torch.float32, "dx")
    torch.testing.assert_close(dbias.double(), want_dbias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_results_do_not_depend_on_the_thread_count(layout, dtype, activation):
    """The reductions cut the rows (planes) by their count alone and merge in order: 1 thread and 2 threads
    give bitwise the same statistics, output and gradients (ReLU: fp16's and bf16's vector loops)."""
    act = ACTIVATION_IDS[activation]
    x = _input((16, 8, 20, 20), dtype, layout)
    grad_y = _input((16, 8, 20, 20), dtype, layout, seed=4)
    weight, bias = _parameters(8)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y, mean, invstd = dispatch.NATIVE.training(x, None, None, None, weight, bias, None, 0.1, False, 1e-5,
                                                            act, 0.0)
            grads = dispatch.NATIVE.backward(grad_y, x, mean, invstd, None, weight, bias, None, 1e-5, act, 0.0,
                                             [True, True, True, False])
            results.append((y, mean, invstd) + tuple(grads[:3]))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_nan_propagates_per_channel():
    x = _input((4, 3, 5, 5), torch.float32, "channels_last")
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    y, mean, _ = dispatch.NATIVE.training(x, None, None, None, None, None, None, 0.1, False, 1e-5, 1, 0.0)
    ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(y[:, 2], ref[:, 2])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "relu6", "hardswish"])
def test_kinks_follow_pytorch_subgradients(activation):
    """z exactly at a kink (eval, mean 0, variance 1, eps 0: z = x): the derivative PyTorch's own backward
    picks there (hardswish: 0 at -3, 1 at 3; relu6: 0 at 0 and at 6)."""
    values = torch.tensor([0.0, -1e-7, 1e-7, -0.5, 6.0, 3.0, -3.0, 7.0])
    x = values.repeat(3, 1).contiguous()  # (N, C) = (3, 8): each kink is a channel
    mean, var = torch.zeros(8), torch.ones(8)
    grad_y = torch.full_like(x, 2.0)
    dx = dispatch.NATIVE.backward(grad_y, x, mean, None, var, None, None, None, 0.0, ACTIVATION_IDS[activation],
                                  0.2, [True, False, False, False])[0]
    z = x.clone().requires_grad_()
    torch_activation(activation, 0.2)(z).backward(grad_y)
    assert torch.equal(dx, z.grad), (dx, z.grad)


def _activation_inputs(dtype=torch.float32):
    """z over the range where the transcendental activations change (a fine grid over [-20, 20]), their far
    ends (over- and underflow of e^z, values past fp32's), the infinities, NaN and signed zeros; in ``dtype``
    (float64: the grid drawn in float64, with bits below fp32's)."""
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 80.0, -80.0, 87.5, -87.5, 88.5, -88.5, 89.0, -89.0, 100.0,
               -100.0, 1e30, -1e30, 710.0, -710.0, 1e300, -1e300, float("inf"), float("-inf"), float("nan")]
    return torch.cat([torch.linspace(-20, 20, 40001, dtype=dtype), torch.tensor(special, dtype=dtype)])


# (relative, absolute) bounds of the vector math against float64 PyTorch: fp32 within 1e-5 relative plus 1e-6
# absolute (ATen's fp32 erf is a polynomial of 1.5e-7 absolute error, its exp_u20 a few ulp where the
# activations use it (kernels.h's exp_vec), its tanh Sleef's 1 ulp); float64 within 1e-13 relative plus 1e-15
# absolute (Sleef's double functions are 1 ulp; the formulas add a few). bf16 and fp16 are computed in fp32 and
# rounded once: fp32's bound plus half an ulp of the 16-bit type at the exact value.
VECTOR_MATH_BOUNDS = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-13, 1e-15), torch.bfloat16: (1e-5, 1e-6),
                      torch.float16: (1e-5, 1e-6)}
SIXTEEN_BIT = [torch.bfloat16, torch.float16]


def _half_ulp(values, dtype):
    """Half the spacing of ``dtype`` at each of ``values`` (subnormals included): what rounding an exact value once
    to that type can cost; 0 for fp32 and float64, whose bounds are relative."""
    if dtype not in SIXTEEN_BIT:
        return torch.zeros_like(values)
    info = torch.finfo(dtype)
    return 0.5 * info.eps * torch.exp2(torch.floor(torch.log2(values.abs().clamp_min(info.tiny))))


def _assert_within(got, expected, z, dtype):
    relative, absolute = VECTOR_MATH_BOUNDS[dtype]
    error = (got.double() - expected).abs()
    bound = absolute + relative * expected.abs() + _half_ulp(expected, dtype)
    worst = int(torch.argmax(error / bound))
    assert bool((error <= bound).all()), (float(z[worst]), float(got[worst]), float(expected[worst]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + SIXTEEN_BIT, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["planes", "rows of one channel"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
def test_transcendental_activations_against_float64(activation, layout, dtype):
    """SiLU, GELU, GELU-tanh and sigmoid computed in vector registers (at::vec::Vectorized of the compute
    type, fp32 or double) against float64 PyTorch, z = x exactly (eval, mean 0, variance 1, eps 0): within
    VECTOR_MATH_BOUNDS, NaN and the infinities where PyTorch's formulas give them. Planes of 40025 values take
    the vector body and a partial last vector; rows of one channel take only partial vectors. bf16 and fp16
    inputs (the grid rounded to them) are computed in fp32 and rounded once."""
    z = _activation_inputs(dtype)
    x = z.reshape(1, 1, -1).contiguous() if layout == "planes" else z.reshape(-1, 1).contiguous()
    y = native_cpu.ops().apply(x, torch.zeros(1), None, torch.ones(1), None, None, None, 0.0,
                               ACTIVATION_IDS[activation], 0.0).reshape(-1)
    assert y.dtype == dtype
    expected = torch_activation(activation)(z.double())
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    finite = torch.isfinite(expected)
    assert torch.equal(y[~finite & ~torch.isnan(expected)], expected[~finite & ~torch.isnan(expected)].to(dtype))
    _assert_within(y[finite], expected[finite], z[finite], dtype)


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_fp32_logistic_within_a_few_ulp(activation):
    """fp32 SiLU and sigmoid take ATen's inlined exp_u20 (kernels.h's exp_vec), not PyTorch's 1-ulp Sleef exp: the
    cost, measured over every 16th fp32 value with |z| <= 20 (perf/logistic_accuracy.py), is 4.2 ulp of the exact
    value at worst (PyTorch's own: 2.3). Far inside VECTOR_MATH_BOUNDS, so this holds the choice of exp to it: within
    5 ulp over a million values spread over |z| <= 20 (a faster, rougher exp would not pass)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.cat([torch.rand(1 << 20, generator=generator) * 40 - 20, _activation_inputs()])
    z = z[z.abs() <= 20]
    y = native_cpu.ops().apply(z.reshape(-1, 1), torch.zeros(1), None, torch.ones(1), None, None, None, 0.0,
                               ACTIVATION_IDS[activation], 0.0).reshape(-1)
    exact = torch_activation(activation)(z.double())
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    _, exponent = torch.frexp(exact[normal].abs())
    spacing = torch.ldexp(torch.ones_like(exact[normal]), exponent.double() - 24)  # fp32's ulp at the exact value
    ulps = (y[normal].double() - exact[normal]).abs() / spacing
    worst = int(torch.argmax(ulps))
    assert float(ulps[worst]) <= 5, (float(z[normal][worst]), float(ulps[worst]))



def test_logistic_accuracy_script_measures_both(capsys):
    """perf/logistic_accuracy.py, which the docs cite for the ulp figures, runs (on a coarse sample) and reports
    the kernels' worst error within the test's 5 ulp and PyTorch's within Sleef's few."""
    script = load_script("perf/logistic_accuracy.py")
    assert script.main(["--stride", "4096"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| silu") or
            line.startswith("| sigmoid")]
    assert len(rows) == 2
    for row in rows:
        native_worst, pytorch_worst = float(row[3].split()[0]), float(row[5].split()[0])
        assert 0 < native_worst <= 5 and 0 < pytorch_worst <= 3, row

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + SIXTEEN_BIT, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["planes", "rows of one channel"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
def test_transcendental_activation_derivatives_against_float64(activation, layout, dtype):
    """Their derivatives in vector registers, the same way: the backward with running statistics (mean 0,
    variance 1, eps 0, weight 1: dx = dz = dy * act'(x)) against float64 autograd within VECTOR_MATH_BOUNDS,
    and the per-channel sums of pass 1 (dbias = sum dz, dweight = sum dz * x) against float64 within its
    relative bound (for bf16 and fp16, sums of fp32 dz in fp32 parameters). Finite inputs up to 100 in magnitude
    (beyond, z^3 overflows fp32 in GELU-tanh's derivative, as in PyTorch's own fp32 kernel)."""
    z = _activation_inputs(dtype)
    z = z[torch.isfinite(z) & (z.abs() <= 100)]
    grad_y = torch.linspace(-2, 3, z.numel(), dtype=dtype)
    shape = (1, 1, -1) if layout == "planes" else (-1, 1)
    x, dy = z.reshape(shape).contiguous(), grad_y.reshape(shape).contiguous()
    # dweight and dbias come in the parameters' dtype: x's, fp32 beside a 16-bit x (whose sums here pass fp16's range)
    parameter_dtype = torch.float32 if dtype in SIXTEEN_BIT else dtype
    zero, one = torch.zeros(1, dtype=parameter_dtype), torch.ones(1, dtype=parameter_dtype)
    dx, dweight, dbias, _ = dispatch.NATIVE.backward(dy, x, zero, None, one, one, zero, None, 0.0,
                                                     ACTIVATION_IDS[activation], 0.0, [True, True, True, False])
    assert dx.dtype == dtype and dbias.dtype == parameter_dtype
    leaf = z.double().requires_grad_()
    torch_activation(activation)(leaf).backward(grad_y.double())
    expected = leaf.grad
    _assert_within(dx.reshape(-1), expected, z, dtype)
    relative, absolute = VECTOR_MATH_BOUNDS[dtype]
    torch.testing.assert_close(dbias.double(), expected.sum().reshape(1), atol=absolute, rtol=relative)
    torch.testing.assert_close(dweight.double(), (expected * z.double()).sum().reshape(1), atol=absolute,
                               rtol=relative)


def test_vector_math_built_for_pytorchs_isa():
    """The build names the vector ISA PyTorch dispatches to on this CPU (torch.backends.cpu.get_cpu_capability),
    and the loaded library's vector type has that ISA's lanes: 16 fp32 / 8 double for AVX-512, 8 / 4 for AVX2.
    Without the capability macros ATen's Vectorized is its portable code (on x86, scalar calls in a loop)."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = native_cpu.vector_isa()
    flags = native_cpu._compile_flags()
    lanes = native_cpu.vector_lanes()
    if capability in ("AVX512", "AVX2"):
        assert isa == capability
        assert f"-DCPU_CAPABILITY={isa}" in flags and f"-DCPU_CAPABILITY_{isa}" in flags
        assert lanes == {"AVX512": (16, 8), "AVX2": (8, 4)}[isa]
    else:
        assert isa == "DEFAULT" and not any(flag.startswith("-DCPU_CAPABILITY") for flag in flags)
        assert lanes[0] >= 1 and lanes[1] >= 1


def test_the_ops_refuse_bad_arguments_before_writing_the_running_statistics():
    """The C++ ops check what they are handed (the functional layer has checked it already; this is
    the second line): an unknown activation or a residual of another layout raises, and the running
    statistics are left as they were."""
    training_forward = native_cpu.ops().training_forward
    x = _input((2, 3, 4, 4), torch.float32, "channels_last")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="unknown activation"):
        training_forward(x, None, None, None, rm, rv, 0.1, 1e-5, 99, 0.0)
    with pytest.raises(RuntimeError, match="x's shape, strides and dtype"):
        training_forward(x, None, None, x.contiguous(), rm, rv, 0.1, 1e-5, 1, 0.0)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# -- the training op with its C++ autograd node (what dispatch.training_forward calls) ---------------
def _train_node(x, weight, bias, residual, rm, rv, count, activation, factor=0.1):
    return native_cpu.ops().training(x, weight, bias, residual, rm, rv, count, factor, 1e-5, ACTIVATION_IDS[activation],
                                 0.2)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"], ids=str)
@pytest.mark.parametrize("dtype, parameter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32), (torch.float64, torch.float64)],
                         ids=str)
def test_training_node_against_float64_autograd(activation, dtype, parameter_dtype):
    """y, every gradient (a dy of another layout, read correctly), the running statistics (written back in
    their own dtype) and the batch counted once, against float64 autograd; dweight and dbias come back in
    the parameters' dtype."""
    shape = (4, 6, 3, 5)
    x = _input(shape, dtype, "channels_last").requires_grad_()
    residual = _input(shape, dtype, "channels_last", seed=2).contiguous().requires_grad_()  # NCHW
    weight, bias = (t.to(parameter_dtype).requires_grad_() for t in _parameters(6))
    rm, rv = torch.zeros(6, dtype=parameter_dtype), torch.ones(6, dtype=parameter_dtype)
    count = torch.zeros((), dtype=torch.long)
    y = _train_node(x, weight, bias, native_cpu.like(residual, x), rm, rv, count, activation)
    grad_y = _input(shape, dtype, "channels_last", seed=3).contiguous()  # NCHW: copied to x's layout inside
    y.backward(grad_y)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    expected_y = _float64_forward(*leaves, True, None, None, activation)
    expected = torch.autograd.grad(expected_y, leaves, grad_y.double())
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, expected_y, dtype, "y")
    for name, leaf, want in zip(("dx", "dweight", "dbias", "dresidual"), (x, weight, bias, residual), expected):
        assert leaf.grad.dtype == leaf.dtype, name
        if name in ("dweight", "dbias"):  # sums over the batch, compared at fp32 tolerances scaled by n
            torch.testing.assert_close(leaf.grad.double(), want, atol=TOLERANCES[dtype][0] * 60,
                                       rtol=TOLERANCES[parameter_dtype][1])
        else:
            assert_close(leaf.grad, want, dtype, name)
    var, mean = torch.var_mean(x.detach().double(), (0, 2, 3), correction=0)
    n = x.numel() // 6
    assert rm.dtype == rv.dtype == parameter_dtype and int(count) == 1
    assert_close(rm, 0.1 * mean, parameter_dtype, "running mean")
    assert_close(rv, 0.9 + 0.1 * var * n / (n - 1), parameter_dtype, "running var")


@pytest.mark.parametrize("activation", [None, "relu"], ids=str)
def test_training_node_saves_x_and_per_channel_vectors_only(activation):
    """The saved-tensor policy of TrainingBatchNormFunction: x itself (no copy), fp32 mean and invstd, weight,
    bias; the residual only when an activation follows it; never y."""
    from torch.autograd.graph import saved_tensors_hooks
    x = _input((3, 4, 5, 2), torch.bfloat16, "channels_last").requires_grad_()
    residual = _input((3, 4, 5, 2), torch.bfloat16, "channels_last", seed=2)
    weight, bias = (t.requires_grad_() for t in _parameters(4))
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _train_node(x, weight, bias, residual, None, None, None, activation)
    full_size = [t for t in saved if t.shape == x.shape]
    assert [t.data_ptr() for t in full_size] == [x.data_ptr()] + ([residual.data_ptr()] if activation else [])
    assert all(t.data_ptr() != y.data_ptr() for t in saved)
    per_channel = sorted((t for t in saved if t.dim() == 1), key=lambda t: t.dtype == torch.float32)
    assert len(per_channel) == 4 and all(t.dtype == torch.float32 for t in per_channel)


def test_training_node_computes_only_the_gradients_asked_for():
    """needs_input_grad decides: with only the weight requiring a gradient, x gets none and the bias none."""
    x = _input((3, 4, 5, 2), torch.float32, "channels_last")
    weight, bias = _parameters(4)
    weight.requires_grad_()
    y = _train_node(x, weight, bias, None, None, None, None, "relu")
    y.sum().backward()
    assert weight.grad is not None and bias.grad is None and x.grad is None
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(_float64_forward(*leaves, None, True, None, None, "relu").sum(), leaves[1])[0]
    torch.testing.assert_close(weight.grad.double(), expected, atol=1e-4, rtol=1e-4)


def test_training_node_refuses_a_second_derivative():
    """As once_differentiable: the gradient is computed under create_graph, differentiating it raises."""
    x = _input((3, 4, 5, 2), torch.float32, "channels_last").requires_grad_()
    y = _train_node(x, None, None, None, None, None, None, "silu")
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad_x.sum().backward()


def test_training_node_is_the_shared_node_and_refuses_forward_mode_ad():
    """The node is the one both devices record (csrc/node/batch_norm_backward.h), with the CPU kernels behind it;
    a dual input (forward-mode AD, which has no formula here) raises before the running statistics move."""
    import torch.autograd.forward_ad as fwAD
    x = _input((3, 4, 5, 2), torch.float32, "channels_last").requires_grad_()
    y = _train_node(x, None, None, None, None, None, None, "relu")
    assert y.grad_fn.name() == "BatchNormBackward (triton_bn native CPU)"
    assert [edge[0] is not None for edge in y.grad_fn.next_functions] == [True, False, False, False]
    rm, rv, count = torch.zeros(4), torch.ones(4), torch.zeros((), dtype=torch.long)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        _train_node(fwAD.make_dual(x.detach(), torch.ones_like(x)), None, None, None, rm, rv, count, "relu")
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)) and int(count) == 0


def test_training_node_keeps_version_counters_and_frees_what_it_saved():
    """SavedVariables: x modified in place after the forward is an error at the backward (not a wrong
    gradient); after a backward the saved tensors are freed (a second backward says so)."""
    x = _input((3, 4, 5, 2), torch.float32, "channels_last").requires_grad_()
    leaf = x.detach().clone().requires_grad_()
    y = _train_node(leaf * 1.0, None, None, None, None, None, None, "relu")
    y.sum().backward(retain_graph=False)
    with pytest.raises(RuntimeError, match="freed|second time"):
        y.sum().backward()
    inner = leaf * 1.0
    y = _train_node(inner, None, None, None, None, None, None, "relu")
    with torch.no_grad():
        inner.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_training_node_refuses_bad_arguments_before_any_write():
    """Running statistics, the batch count and the output stay untouched when the op refuses its arguments;
    under inference mode (no autograd key) the same op runs its plain CPU kernel."""
    x = _input((2, 3, 4, 4), torch.float32, "channels_last").requires_grad_()
    rm, rv, count = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    with pytest.raises(RuntimeError, match="unknown activation"):
        native_cpu.ops().training(x, None, None, None, rm, rv, count, 0.1, 1e-5, 99, 0.0)
    with pytest.raises(RuntimeError, match="running statistics"):
        native_cpu.ops().training(x, None, None, None, rm, torch.ones(4), count, 0.1, 1e-5, 1, 0.0)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(count) == 0
    with torch.inference_mode():
        y = native_cpu.ops().training(x.detach(), None, None, None, rm, rv, count, 0.1, 1e-5, 1, 0.0)
    assert int(count) == 1 and y.grad_fn is None
    assert_close(y, _float64_forward(x.detach(), None, None, None, True, None, None, "relu"), torch.float32, "y")


@pytest.mark.parametrize("layout", ["rows", "wide rows", "planes"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_conversions_are_exact_for_every_bit_pattern(layout, dtype):
    """Every one of the 65536 fp16 or bf16 patterns through the loops' reads and writes (one value at a
    time, or, where the build has the vector instructions, packs of 16 in registers (fp16 also through
    fp32 buffers): the rows of 2 channels take the one-value tails, the wide rows and the planes the vector
    bodies, bf16's wide rows with each channel's weight in the packs' order): y = x * 1 + 0 gives x back
    bitwise (subnormals, infinities, signed zeros; NaN stays NaN), y = x * w rounds the fp32 product to
    nearest even exactly as PyTorch's conversion does (ties, overflow to inf, results in the subnormal
    range), and so does ReLU(x * w). A bf16 NaN is written as 0xFFFF by every loop, SiLU's vector line
    (ATen's conversion) included: the NaN PyTorch's own vectorized kernels write (its conversion, its BN)."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    rounding = torch.tensor([1.37, 1e-4])  # products that round at every spacing, down into the subnormals
    if layout == "rows":  # (N, C) = (65536, 2): every pattern in both channels
        x = patterns.reshape(-1, 1).expand(-1, 2).contiguous()
        weight = rounding
    elif layout == "wide rows":  # (N, C) = (256, 256): each pattern once, rows of 256 channels
        x = patterns.reshape(256, 256)
        weight = rounding.repeat(128) * (1 + torch.arange(256) / 512)  # a weight of its own for every channel
    else:  # (N, C, L) = (1, 2, 65536), contiguous: two planes of every pattern
        x = patterns.reshape(1, 1, -1).expand(1, 2, -1).contiguous()
        weight = rounding
    channels = x.shape[1]
    per_channel = [1, channels] + [1] * (x.dim() - 2)
    apply = native_cpu.ops().apply
    zero, one = torch.zeros(channels), torch.ones(channels)

    def check(y, expected):
        finite = ~torch.isnan(expected)
        assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16))
        assert torch.isnan(y[~finite]).all()
        if dtype == torch.bfloat16:
            assert (y[~finite].view(torch.int16) == -1).all()  # 0xFFFF

    y = apply(x, zero, None, one, None, None, None, 0.0, 0, 0.0)  # eval: (x - 0) / sqrt(1 + 0) * 1 + 0
    check(y, (x.float() + 0.0).to(dtype))  # x itself, but -0 + 0 = +0
    y = apply(x, zero, None, one, weight, None, None, 0.0, 0, 0.0)
    check(y, (x.float() * weight.reshape(per_channel) + 0.0).to(dtype))
    # ReLU (its own vector loop): z < 0 gives 0, anything else z itself, NaN included
    y = apply(x, zero, None, one, weight, None, None, 0.0, ACTIVATION_IDS["relu"], 0.0)
    z = x.float() * weight.reshape(per_channel) + 0.0
    check(y, torch.where(z < 0, torch.zeros_like(z), z).to(dtype))
    # SiLU (ATen's vectors): NaN where PyTorch's silu gives NaN, written as PyTorch writes it
    y = apply(x, zero, None, one, None, None, None, 0.0, ACTIVATION_IDS["silu"], 0.0)
    nan = torch.isnan(torch.nn.functional.silu(x.float()))
    assert torch.equal(torch.isnan(y), nan)
    if dtype == torch.bfloat16:
        assert torch.equal(y[nan].view(torch.int16), torch.nn.functional.silu(x)[nan].view(torch.int16))


def test_the_kernels_run_on_an_emulated_arm_cpu():
    """tools/check_aarch64.py --run: the kernels built for aarch64 (NEON, Sleef) and run under qemu-aarch64,
    every entry point against ATen's float64 reference in the same process (tools/arm_harness.cpp). Needs the
    cross compiler, qemu-user and torch's aarch64 wheel already downloaded (the script fetches it; a test does
    not): skipped, saying which, where one is missing (CI's machine has none of them)."""
    import shutil
    import subprocess
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_aarch64
    wheel = os.path.join(os.path.expanduser("~"), ".cache", "triton_bn", "torch-aarch64",
                         f"{torch.__version__.split('+')[0]}-aarch64", "torch", "lib")
    for need, present in ((check_aarch64.CROSS, shutil.which(check_aarch64.CROSS)),
                          (check_aarch64.QEMU, shutil.which(check_aarch64.QEMU)),
                          ("torch's aarch64 wheel (python tools/check_aarch64.py downloads it)", os.path.isdir(wheel))):
        if not present:
            pytest.skip(f"needs {need}")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_aarch64.py"), "--run"],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"activation vectors of 4 fp32 / 2 double lanes", done.stdout), done.stdout[-2000:]
    checks = re.search(r"(\d+) of (\d+) checks within tolerance", done.stdout)
    assert checks and checks.group(1) == checks.group(2) and int(checks.group(2)) >= 1000, done.stdout[-2000:]


def test_the_kernels_compile_for_avx512():
    """tools/check_avx512.py compiles the sources for an AVX-512 CPU with the build's flags for that ISA, on any x86
    host (the AVX-512 instantiations are built nowhere else on an AVX2 one): one kernel file passes; with a target
    CPU that has no AVX-512, kernels.h's own check stops the compile and the script says so and exits 1."""
    import platform
    import subprocess
    import sys
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 compiler target")
    script = [sys.executable, os.path.join(ROOT, "tools", "check_avx512.py"), "--files", "kernels_double_forward.cpp"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "AVX-512: every source compiles" in done.stdout, done.stdout + done.stderr
    assert "-DCPU_CAPABILITY_AVX512" in done.stdout
    refused = subprocess.run(script + ["--target", "haswell"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "1 file(s) do not compile" in refused.stdout, refused.stdout
    assert "CPU_CAPABILITY_AVX512 without the AVX-512 instructions" in refused.stdout


def test_compile_flags_per_machine_and_isa():
    """What native_cpu.compile_flags gives each machine: x86 the target CPU and the CPU_CAPABILITY macros of the ISA
    (none for DEFAULT); aarch64 its CPU and ATen's switch to Sleef behind NEON, never an x86 capability macro
    (tools/check_aarch64.py cross-compiles and links with these)."""
    avx512 = native_cpu.compile_flags("x86_64", "AVX512")
    assert "-march=native" in avx512 and "-DCPU_CAPABILITY=AVX512" in avx512 and "-DCPU_CAPABILITY_AVX512" in avx512
    assert not any(flag.startswith("-DCPU_CAPABILITY") for flag in native_cpu.compile_flags("x86_64", "DEFAULT"))
    arm = native_cpu.compile_flags("aarch64", "DEFAULT", "armv8-a")
    assert "-march=armv8-a" in arm and "-DAT_BUILD_ARM_VEC256_WITH_SLEEF" in arm
    assert not any(flag.startswith(("-DCPU_CAPABILITY", "-march=native")) for flag in arm)
    assert "-mcpu=native" in native_cpu.compile_flags("aarch64", "DEFAULT")
