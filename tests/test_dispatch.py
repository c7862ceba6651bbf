"""[house] ``dispatch.py`` decides which backend serves a call, and every backend computes what the
specification (``spec.py``'s step functions) computes: the choice for each kind of input, with and without the
Triton interpreter; the eager routes (the native kernels' C++ node, the autograd Function, the op itself); and
each backend's seven functions against the spec's in float64."""
import os
import subprocess
import sys

import pytest
import torch

from triton_bn import dispatch
from triton_bn.backends import native_cpu

from helpers import assert_close

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
        "route training+grad -> BatchNormBackward (triton_bn native CPU)", "route eval -> True"], done.stdout


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
