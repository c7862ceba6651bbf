"""[house] ``dispatch.py`` decides which backend serves a call, and every backend computes what the
specification (``spec.py``'s step functions) computes: the choice for each kind of input, with and without the
Triton interpreter; the eager routes (the native kernels' C++ node, the autograd Function, the op itself);
each backend's seven functions against the spec's in float64; and the known eval call (a plain eval call checked
and computed by one C++ op): what it computes, what it refuses and what the long way then does."""
import os
import subprocess
import sys

import pytest
import torch

import triton_bn
from triton_bn import dispatch
from triton_bn.activations import ACTIVATION_IDS, torch_activation
from triton_bn.backends import native_cpu

from helpers import assert_close, make_input, reference_batch_norm

# In a process without the interpreter: the backend each kind of input gets, and the eager route of a CPU fp32
# channels_last training call with ReLU and a gradient (the docstring's example), and of an eval call.
CHOICES = r"""
import torch, triton_bn
from triton_bn import dispatch
from triton_bn.backends import native_cpu
cl = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
cases = {"fp32 channels_last": cl, "fp32 NCHW": torch.randn(4, 3, 5, 5), "bf16 (N, C)": torch.randn(6, 3).bfloat16(),
         "float64 NCDHW": torch.randn(2, 3, 2, 2, 2, dtype=torch.float64),
         "fp32 every other column": torch.randn(4, 3, 5, 10)[..., ::2], "fp32 empty batch": torch.randn(0, 3, 4)}
for name, x in cases.items():
    print(name, "->", dispatch.backend_for(x).name)
x = cl.clone().requires_grad_()
y = triton_bn.batch_norm(x, None, None, training=True, activation="relu")
print("route training+grad ->", y.grad_fn.name())
print("route eval ->", dispatch.apply_step(cl, None, None, None, False) is native_cpu.ops().apply)
statistics = (torch.zeros(3), torch.ones(3))
print("known eval call ->", dispatch.known_eval_call(cl, *statistics, None, None, 1e-5, "relu", 0.01, None, None)
      is not None, dispatch.known_eval_call(cl[..., ::2], *statistics, None, None, 1e-5, None, 0.01, None, None))
"""


def test_the_choice_without_the_interpreter():
    """What a CPU user gets: dense inputs of every dtype on the native kernels (a training call needing a
    gradient through their C++ node, an eval call straight to their op), other strides on PyTorch's kernels,
    an empty batch on the step functions."""
    if not native_cpu.ENABLED:
        pytest.skip("TRITON_BN_NATIVE_CPU=0: the native CPU kernels are switched off")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHOICES], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "fp32 channels_last -> native", "fp32 NCHW -> native", "bf16 (N, C) -> native", "float64 NCDHW -> native",
        "fp32 every other column -> pytorch", "fp32 empty batch -> steps",
        "route training+grad -> BatchNormBackward (triton_bn native CPU)", "route eval -> True",
        "known eval call -> True None"], done.stdout


def test_the_choice_under_the_interpreter():
    """Here (``TRITON_INTERPRET=1``) the kernel dtypes run the Triton kernels on the CPU, an empty batch
    included (it launches nothing); float64 is never a kernel dtype; a training call that needs a gradient goes
    through the autograd Function over the chosen backend."""
    x = torch.randn(4, 3, 5, 5)
    assert dispatch.backend_for(x) is dispatch.TRITON
    assert dispatch.backend_for(x[:0]) is dispatch.TRITON
    assert dispatch.backend_for(x.double()[:0]) is dispatch.STEPS
    assert dispatch.backend_for(x.double()[..., ::2]) is dispatch.PYTORCH
    expected = dispatch.NATIVE if native_cpu.ops() is not None else dispatch.PYTORCH
    assert dispatch.backend_for(x.double()) is expected
    y = dispatch.training_forward(x.requires_grad_(), None, None, None, None, None, None, 0.1, False, 1e-5, 1, 0.0)
    assert y.grad_fn.name() == "TrainingBatchNormFunctionBackward"
    with torch.no_grad():
        assert dispatch.apply_step(x, None, None, None, False) is dispatch.TRITON.apply


def _call(shape, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)[..., ::2]
    channels = shape[1]
    weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    residual = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, weight, bias, residual, grad_y


def _everything(backend, x, weight, bias, residual, grad_y, activation):
    """Every function of ``backend`` on one float64 call (running statistics updated from zeros and ones)."""
    channels = x.shape[1]
    running_mean, running_var = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.long)
    y, mean, invstd = backend.training(x, running_mean, running_var, count, weight, bias, residual, 0.1, False, 1e-5,
                                       activation, 0.0)
    grads = backend.backward(grad_y, x, mean, invstd, None, weight, bias, residual, 1e-5, activation, 0.0,
                             [True, True, True, True])
    eval_y = backend.apply(x, running_mean, None, running_var, weight, bias, residual, 1e-5, activation, 0.0)
    eval_grads = backend.backward(grad_y, x, running_mean, None, running_var, weight, bias, residual, 1e-5,
                                  activation, 0.0, [True, True, True, True])
    stats_mean, stats_invstd = backend.batch_stats(x, None, None, None, 0.1, False, 1e-5)
    moments = backend.moments(x)
    sums = backend.backward_sums(grad_y, x, mean, invstd, None, weight, bias, residual, 1e-5, activation, 0.0)
    count_inverse = channels / x.numel()
    dx, dresidual = backend.backward_elementwise(grad_y, x, mean, invstd, None, weight, bias, residual, sums,
                                                 count_inverse, 1e-5, activation, 0.0, True, True)
    return dict(y=y, mean=mean, invstd=invstd, running_mean=running_mean, running_var=running_var,
                count=count, dx=grads[0], dweight=grads[1], dbias=grads[2], dresidual=grads[3], eval_y=eval_y,
                eval_dx=eval_grads[0], eval_dweight=eval_grads[1], stats_mean=stats_mean, stats_invstd=stats_invstd,
                moments=moments, sums=sums, step_dx=dx, step_dresidual=dresidual)


@pytest.mark.parametrize("activation", [0, 1, 4], ids=["identity", "relu", "silu"])
@pytest.mark.parametrize("name, layout", [("native", "contiguous"), ("native", "channels_last"),
                                          ("pytorch", "contiguous"), ("pytorch", "channels_last"),
                                          ("pytorch", "strided")])  # the native kernels take dense inputs only
def test_every_backend_computes_what_the_spec_computes(name, layout, activation):
    """The two CPU backends of whole calls against the step functions, every one of the seven functions, in
    float64 (where they all compute in double): the interface is one, and so is the arithmetic. (The Triton
    kernels are held to float64 PyTorch by every other test file.)"""
    backend = {"native": dispatch.NATIVE, "pytorch": dispatch.PYTORCH}[name]
    call = _call((4, 3, 5, 6), layout, seed=activation)
    if backend is dispatch.NATIVE and native_cpu.ops() is None:
        pytest.fail("the native CPU kernels could not be built here (see the warning)")
    expected = _everything(dispatch.STEPS, *call, activation)
    actual = _everything(backend, *call, activation)
    for key, value in expected.items():
        assert_close(actual[key], value, torch.float64, key)
    assert int(actual["count"]) == 1


# -- the known eval call: a plain eval call checked and computed by one C++ call (dispatch.known_eval_call) -----
def _eval_call(dtype, layout, seed=0):
    """(x, running_mean, running_var, weight, bias, residual) of a plain eval call the native kernels serve."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input((3, 4, 5, 6), dtype, "cpu", layout, offset=0.5, scale=2.0, generator=gen)
    residual = make_input((3, 4, 5, 6), dtype, "cpu", layout, generator=gen)
    per_channel = torch.float64 if dtype == torch.float64 else torch.float32
    running_mean = torch.randn(4, generator=gen, dtype=per_channel)
    running_var = torch.rand(4, generator=gen, dtype=per_channel) + 0.5
    weight = torch.rand(4, generator=gen, dtype=per_channel) + 0.5
    bias = torch.randn(4, generator=gen, dtype=per_channel)
    return x, running_mean, running_var, weight, bias, residual


@pytest.fixture
def native_ops():
    if not native_cpu.ENABLED:
        pytest.skip("TRITON_BN_NATIVE_CPU=0: the native CPU kernels are switched off")
    ops = native_cpu.ops()
    if ops is None:
        pytest.fail("the native CPU kernels could not be built here (see the warning)")
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation, with_residual", [(None, False), ("relu", True), ("silu", False)])
def test_the_known_eval_call_computes_batch_norm(native_ops, dtype, layout, activation, with_residual):
    """What it takes it computes as PyTorch does in float64, in x's dtype and strides (every dtype here: the
    op is called with ``kernel_dtypes`` true, as without the interpreter)."""
    x, running_mean, running_var, weight, bias, residual = _eval_call(dtype, layout)
    residual = residual if with_residual else None
    y = native_ops.evaluate_call(x, running_mean, running_var, weight, bias, residual, 1e-5,
                                 ACTIVATION_IDS[activation], 0.01, True)
    assert y is not None and y.dtype == dtype and y.stride() == x.stride()
    expected, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, activation,
                                          residual=residual)
    assert_close(y, expected, dtype, "y")


def test_the_known_eval_call_is_functionals_route_for_a_plain_eval_call(native_ops):
    """A float64 eval call goes this way, and its y is the long way's; an fp32 one goes this way only where the
    native kernels serve it (under the interpreter the Triton kernels do: refused)."""
    x, running_mean, running_var, weight, bias, residual = _eval_call(torch.float64, "channels_last")
    arguments = (x, running_mean, running_var, weight, bias, 1e-5, "relu", 0.01, residual, None)
    taken = dispatch.known_eval_call(*arguments)
    assert taken is not None
    long_way = dispatch.batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5, 1, 0.01, residual,
                                   None)
    assert torch.equal(taken, long_way)
    x32 = x.float()
    fp32 = dispatch.known_eval_call(x32, running_mean, running_var, weight, bias, 1e-5, "relu", 0.01,
                                    residual.float(), None)
    assert (fp32 is None) == (dispatch.backend_for(x32) is not dispatch.NATIVE)


# Each: a change to a good call, and what the long way does with it (an error type, or None: it computes it).
REFUSED = {
    "weight of another length": (lambda a: a.update(weight=a["weight"][:-1]), ValueError),
    "running statistics absent": (lambda a: a.update(running_mean=None, running_var=None), ValueError),
    "a running statistic that requires grad": (lambda a: a["running_mean"].requires_grad_(), ValueError),
    "x requires grad": (lambda a: a["input"].requires_grad_(), None),
    "weight requires grad": (lambda a: a["weight"].requires_grad_(), None),
    "residual requires grad": (lambda a: a["residual"].requires_grad_(), None),
    "residual in another layout": (lambda a: a.update(residual=a["residual"].contiguous()), None),
    "residual of another dtype": (lambda a: a.update(residual=a["residual"].float()), TypeError),
    "residual of another shape": (lambda a: a.update(residual=a["residual"][:, :, :1]), ValueError),
    "eps below 0": (lambda a: a.update(eps=-1e-5), ValueError),
    "eps NaN": (lambda a: a.update(eps=float("nan")), ValueError),
    "eps a bool": (lambda a: a.update(eps=True), None),
    "an unknown activation": (lambda a: a.update(activation="swish"), ValueError),
    "an empty batch": (lambda a: a.update(input=a["input"][:0], residual=None), None),
    "a 1-D input": (lambda a: a.update(input=a["input"][0, :, 0, 0], residual=None), ValueError),
    "every other column": (lambda a: a.update(input=a["input"][..., ::2], residual=None), None),  # PyTorch's kernels
    "an integer weight": (lambda a: a.update(weight=a["weight"].long()), TypeError),
    "a weight on the meta device": (lambda a: a.update(weight=a["weight"].to("meta")), RuntimeError),
    "a list for the running mean": (lambda a: a.update(running_mean=a["running_mean"].tolist()), TypeError),
    "num_batches_tracked given": (lambda a: a.update(num_batches_tracked=torch.zeros((), dtype=torch.long)), None),
}


@pytest.mark.parametrize("change", list(REFUSED))
def test_the_known_eval_call_refuses_what_the_long_way_decides(native_ops, change):
    """Anything but a plain call is refused (None), so that the long way computes it or raises its documented
    error, with the same arguments: nothing is written in eval, so a refusal costs nothing but time."""
    x, running_mean, running_var, weight, bias, residual = _eval_call(torch.float64, "channels_last")
    arguments = dict(input=x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias, eps=1e-5,
                     activation="relu", negative_slope=0.01, residual=residual, num_batches_tracked=None)
    alter, error = REFUSED[change]
    assert dispatch.known_eval_call(**arguments) is not None  # the good call is taken
    alter(arguments)
    assert dispatch.known_eval_call(**arguments) is None
    functional_arguments = dict(arguments, training=False)
    if error is None:
        triton_bn.batch_norm(**functional_arguments)
    else:
        with pytest.raises(error):
            triton_bn.batch_norm(**functional_arguments)


# -- a folded BN's activation as a pass of its own (dispatch.activation_pass) ---------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "with-residual"])
def test_activation_pass_computes_the_activation(native_ops, monkeypatch, dtype, layout, activation, with_residual):
    """act(x [+ residual]) by the native kernels, in x's dtype and strides, as PyTorch's activation computes it in
    float64 (fp32, bf16 and fp16 as without the interpreter: the kernels take them), x and the residual unwritten."""
    monkeypatch.setattr(dispatch, "_NATIVE_TAKES_KERNEL_DTYPES", True)
    x, _, _, _, _, residual = _eval_call(dtype, layout)
    residual = residual if with_residual else None
    kept = (x.clone(), None if residual is None else residual.clone())
    y = dispatch.activation_pass(x, activation, 0.01, residual)
    assert y is not None and y.dtype == dtype and y.stride() == x.stride()
    z = x.double() + (0 if residual is None else residual.double())
    expected = torch_activation(activation)(z)
    assert_close(y, expected, dtype, "y")
    assert torch.equal(x, kept[0]) and (residual is None or torch.equal(residual, kept[1]))
    if residual is None:  # written over x: the same values as the new tensor's, in x itself
        assert dispatch.activation_pass(x, activation, 0.01, overwrite=True) is x
        assert torch.equal(x, y)


def test_activate_in_place_takes_only_the_vector_activations(native_ops):
    """The C++ op that writes act(x) over x refuses an activation whose lines are not elementwise in vectors (ReLU
    and its kin go through buffers that may not alias) and a strided x, before writing anything."""
    x, *_ = _eval_call(torch.float64, "contiguous")
    kept = x.clone()
    for activation in ("relu", "hardswish", None):
        with pytest.raises(RuntimeError, match="activate_ takes"):
            native_ops.activate_(x, ACTIVATION_IDS[activation], 0.01)
    with pytest.raises(RuntimeError, match="channels innermost"):
        native_ops.activate_(x[..., ::2], ACTIVATION_IDS["silu"], 0.01)
    assert torch.equal(x, kept)


def test_activation_pass_leaves_the_rest_to_pytorch(native_ops):
    """None (the caller runs PyTorch's activation) for the activations PyTorch's in-place op serves as fast (ReLU
    and its kin, none), for what the known eval call would refuse (an input that needs a gradient, strides the
    kernels do not serve, fp32 where the Triton kernels serve it), and while torch.jit.trace records."""
    x, *_ = _eval_call(torch.float64, "channels_last")
    assert dispatch.activation_pass(x, "silu", 0.01) is not None
    for activation in ("relu", "relu6", "leaky_relu", "hardswish", None):
        assert dispatch.activation_pass(x, activation, 0.01) is None, activation
    assert dispatch.activation_pass(x.clone().requires_grad_(), "silu", 0.01) is None
    recorded = x.clone().requires_grad_() * 2  # a layer's output that autograd records: PyTorch's op, not written
    kept = recorded.detach().clone()
    assert dispatch.activation_pass(recorded, "silu", 0.01, overwrite=True) is None
    assert torch.equal(recorded.detach(), kept)
    with torch.no_grad():
        assert dispatch.activation_pass(x.clone().requires_grad_(), "silu", 0.01) is not None
    assert dispatch.activation_pass(x[..., ::2], "silu", 0.01) is None
    x32 = x.float()
    assert (dispatch.activation_pass(x32, "silu", 0.01) is None) == (dispatch.backend_for(x32) is not dispatch.NATIVE)
    seen = []

    def recorded(t):
        seen.append(dispatch.activation_pass(t, "silu", 0.01))
        return torch.sigmoid(t)

    torch.jit.trace(recorded, x, check_trace=False)
    assert seen == [None]


def test_the_known_eval_call_refuses_kernel_dtypes_where_triton_serves_them(native_ops):
    """``kernel_dtypes`` false (the interpreter or a stand-in driver: the Triton kernels take fp32/fp16/bf16)
    refuses those dtypes and still takes float64; an activation id outside the table and an input on the meta
    device are refused."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, running_mean, running_var, weight, bias, _ = _eval_call(dtype, "contiguous")
        y = native_ops.evaluate_call(x, running_mean, running_var, weight, bias, None, 1e-5, 0, 0.01, False)
        assert (y is None) == (dtype != torch.float64), dtype
    x, running_mean, running_var, weight, bias, _ = _eval_call(torch.float64, "contiguous")
    assert native_ops.evaluate_call(x, running_mean, running_var, weight, bias, None, 1e-5, 99, 0.01, True) is None
    assert native_ops.evaluate_call(x.to("meta"), running_mean, running_var, None, None, None, 1e-5, 0, 0.01,
                                    True) is None


def test_the_known_eval_call_is_not_taken_while_torch_jit_trace_records(native_ops):
    """The long way records PyTorch's own operators (dispatch.portable_batch_norm), so that the traced program
    runs without triton_bn: nothing of triton_bn's may be in its graph."""
    x, running_mean, running_var, weight, bias, _ = _eval_call(torch.float64, "contiguous")
    seen = []

    def traced(x):
        seen.append(dispatch.known_eval_call(x, running_mean, running_var, weight, bias, 1e-5, "relu", 0.01, None,
                                             None))
        return triton_bn.batch_norm(x, running_mean, running_var, weight, bias, False, activation="relu")

    program = torch.jit.trace(traced, x, check_trace=False)
    assert seen == [None]
    kinds = {node.kind() for node in program.graph.nodes()}
    assert not any("triton_bn" in kind for kind in kinds), kinds
    assert "aten::batch_norm" in kinds
