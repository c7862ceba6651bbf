"""Which backend serves a call, and how: the one place that decides. Everything it reads is here: the input's
device, dtype, layout and size, training or eval, whether anything needs a gradient, whether torch.compile is
tracing or an exporter recording, and the settings (read once, ``settings.py``).

``functional.batch_norm`` checks a call's arguments, then hands it to ``batch_norm`` below. One kind of call is
taken before those checks: a plain eval call on the native CPU kernels (``known_eval_call``), which C++ checks
and computes in one call, since the Python checks cost more host time than a small eval pass; anything it does
not plainly take goes the long way, which writes nothing in eval either.

1. an exporter recording (torch.export, ONNX, torch.jit.trace): PyTorch's own operators (``portable_batch_norm``),
   so that the program runs where triton_bn is not installed;
2. torch.compile tracing: the custom ops of ``ops.py`` (statistics, then a differentiable apply), each of which
   asks ``backend_for`` when it runs;
3. the C++ launch path (``TRITON_BN_CPP_LAUNCH=1``, GPU tensors, a plan for this kind of call): one C++ call
   (``backends/cpp_launch.py``; a call like one it already served is taken by ``functional.batch_norm`` even
   before the checks, since C++ makes its own);
4. otherwise the backend ``backend_for`` picks, called directly where nothing needs a gradient, else through
   the autograd formula (``autograd.py``), or, on the native CPU kernels, their C++ autograd node.

A folded layer's activation, what is left of a BN folded into the layer before it (fold.py), asks
``activation_pass``: the native kernels' pass where it beats PyTorch's own activation, else PyTorch's.

``backend_for(x)``, in order:
    the Triton kernels   fp32 / fp16 / bf16 on CUDA, or on the CPU under the Triton interpreter (or a stand-in
                         CUDA driver)                                     backends/triton_kernels.py
    the step functions   an empty batch (nothing to launch)               spec.py
    the native kernels   a dense CPU tensor (channels innermost or contiguous), any of the four dtypes, where
                         they are built                                   backends/native_cpu.py
    PyTorch's kernels    everything else: other strides, float64 on a GPU, no compiler
                                                                         backends/pytorch_kernels.py
So a CPU fp32 channels_last training call with ReLU and a gradient, without the interpreter, runs the
native kernels through their C++ autograd node (``training_forward``, below); with ``TRITON_INTERPRET=1`` the Triton
kernels through ``autograd.TrainingBatchNormFunction``.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from . import spec
from .activations import ACTIVATION_IDS, TABLE, torch_activation
from .autograd import BatchNormFunction, TrainingBatchNormFunction
from .backends import (Backend, cpp_launch, known_call_activation, native_cpu, pytorch_kernels,
                       triton_kernels)

TRITON = Backend("triton", triton_kernels.batch_norm_training, triton_kernels.batch_norm_apply,
                 triton_kernels.batch_norm_backward, triton_kernels.batch_stats, triton_kernels.batch_moments,
                 triton_kernels.backward_sums, triton_kernels.backward_elementwise)
STEPS = Backend("steps", spec.batch_norm_training, spec.batch_norm_apply, spec.batch_norm_backward, spec.batch_stats,
                spec.batch_moments, spec.backward_sums, spec.backward_elementwise)


def _eval_or_steps(evaluate):
    """``Backend.apply`` for a backend whose kernels take running statistics only (``evaluate``): batch
    statistics, a split call's step, take the step function."""
    def apply(x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
        if invstd is not None:
            return spec.batch_norm_apply(x, mean, invstd, None, weight, bias, residual, eps, activation, negative_slope)
        return evaluate(x, mean, running_var, weight, bias, residual, eps, activation, negative_slope)
    return apply


# The two CPU backends of whole calls: a split call's steps (SyncBatchNorm, the custom ops) are the spec's.
NATIVE = STEPS._replace(name="native", training=native_cpu.training, apply=_eval_or_steps(native_cpu.evaluate),
                        backward=native_cpu.backward)
PYTORCH = STEPS._replace(name="pytorch", training=pytorch_kernels.training,
                         apply=_eval_or_steps(pytorch_kernels.evaluate), backward=pytorch_kernels.backward)


# Whether the native kernels take fp32/fp16/bf16 CPU inputs: not where the Triton kernels do (``backend_for``)
_NATIVE_TAKES_KERNEL_DTYPES = not (triton_kernels.INTERPRET or triton_kernels.STAND_IN)


def known_eval_call(input, running_mean, running_var, weight, bias, eps, activation, negative_slope, residual,
                    num_batches_tracked) -> Optional[Tensor]:
    """y of a plain eval call (``training=False``) that the native CPU kernels serve, its checks made in C++, or
    None: the long way decides. ``evaluate_call`` (csrc/cpu/ops.cpp) lists what it takes: what
    ``functional.check_arguments`` passes and steps 1-4 below send to the native op as it is, nothing else.
    Never before the native build is loaded, never while torch.compile, torch.export or torch.jit.trace records
    (inside the op it is too late to ask: the tracer has recorded the call and switched itself off)."""
    native = native_cpu.loaded()
    if native is None or num_batches_tracked is not None or torch.compiler.is_compiling() \
            or torch._C._get_tracing_state() is not None:
        return None
    act = known_call_activation(activation, eps, negative_slope)
    if act is None:
        return None
    try:
        return native.evaluate_call(input, running_mean, running_var, weight, bias, residual, eps, act,
                                    negative_slope, _NATIVE_TAKES_KERNEL_DTYPES)
    except (TypeError, RuntimeError):  # an argument the op's schema does not take (a list for a tensor, ...)
        return None                    # the long way raises the documented error


# On a CPU, the activations whose arithmetic (an exp, erf or tanh per value) is most of what a pass over the tensor
# costs (the table's vector_math): the native kernels' vector math runs them faster than PyTorch's own
# activation as a pass of its own: in place over a folded layer's output 2.1x PyTorch's silu_ (the folded
# yolo_backbone at batch 8, fp32, AVX2), and 1.2-1.6x even writing a new tensor (EfficientNet's layer sizes; at
# parity for 56K values; perf/NOTES.md). ReLU and its piecewise-linear kin cost one memory pass either way.
_CPU_KERNEL_ACTIVATIONS = frozenset(a.name for a in TABLE if a.vector_math)


@functools.lru_cache(maxsize=64)
def _unit_statistics(channels: int):
    """Running statistics that make the eval pass the identity: mean 0, variance 1 (with eps 0, z = x exactly)."""
    return torch.zeros(channels), torch.ones(channels)


def activation_pass(x: Tensor, activation: Optional[str], negative_slope: float, residual: Optional[Tensor] = None,
                    overwrite: bool = False) -> Optional[Tensor]:
    """``act(x [+ residual])`` as a pass of its own (what is left of a BN folded into the layer before it: fold.py),
    by the native CPU kernels where they beat PyTorch's own activation (``_CPU_KERNEL_ACTIVATIONS``) and serve ``x``
    (a dense CPU tensor of a dtype they take, as for ``known_eval_call``), with nothing that needs a gradient and
    nothing tracing or recording; else None, and the caller runs PyTorch's. ``overwrite`` (no residual): the result is
    written over ``x``, a tensor the caller just made and nobody else holds (a layer's output), as PyTorch's
    in-place activation would; else a new tensor, ``x`` and the residual unwritten (the known eval call's pass
    with mean 0, variance 1, eps 0: z = x exactly)."""
    if activation not in _CPU_KERNEL_ACTIVATIONS or x.dim() < 2 or needs_gradient(x, None, None, residual) \
            or torch.compiler.is_compiling() or recording_for_export():
        return None
    # the known eval call's rule: the native kernels serve x, and take fp32/fp16/bf16 where Triton's do not
    native = native_cpu.serves(x) if x.dtype == torch.float64 or _NATIVE_TAKES_KERNEL_DTYPES else None
    if native is None:
        return None
    if overwrite and residual is None:
        native.activate_(x, ACTIVATION_IDS[activation], negative_slope)
        return x
    zeros, ones = _unit_statistics(x.shape[1])
    return known_eval_call(x, zeros, ones, None, None, 0.0, activation, negative_slope, residual, None)


def backend_for(x: Tensor) -> Backend:
    """The backend that computes a call on ``x`` (the module docstring's table)."""
    if triton_kernels.uses_kernels(x):
        return TRITON
    if x.numel() == 0:
        return STEPS
    if native_cpu.serves(x) is not None:
        return NATIVE
    return PYTORCH


def needs_gradient(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> bool:
    """Whether autograd must record this call."""
    return torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)
                                        or (residual is not None and residual.requires_grad))


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], training: bool, momentum: Optional[float], eps: float, activation: int,
               negative_slope: float, residual: Optional[Tensor], num_batches_tracked: Optional[Tensor]) -> Tensor:
    """``functional.batch_norm`` after its checks (``activation`` is now the kernel id): steps 1-4 of the
    module docstring."""
    if recording_for_export():
        return portable_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   activation, negative_slope, residual, num_batches_tracked)
    tracing = torch.compiler.is_compiling()
    if not training:
        return apply_step(input, weight, bias, residual, tracing)(
            input, running_mean, None, running_var, weight, bias, residual, eps, activation, negative_slope)
    cumulative = momentum is None
    factor = 0.0 if cumulative else float(momentum)
    # The batch is counted as nn.BatchNorm counts it (only with running statistics), and a cumulative
    # average weighs it 1 / (count before it + 1), as nn.BatchNorm's 1 / count after its increment.
    batches = num_batches_tracked if running_mean is not None else None
    if tracing:  # two ops: the statistics (mutating the running buffers) and the differentiable apply
        mean, invstd = torch.ops.triton_bn.batch_stats(input.detach(), running_mean, running_var,
                                                       batches if cumulative else None, factor, cumulative, eps)
        if batches is not None:
            batches.add_(1)  # after the statistics read the count before this batch
        return torch.ops.triton_bn.batch_norm_apply(input, mean, invstd, None, weight, bias, residual, eps,
                                                    activation, negative_slope)
    return training_forward(input, weight, bias, residual, running_mean, running_var, batches, factor, cumulative,
                            eps, activation, negative_slope)


def training_forward(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum: float,
                     cumulative: bool, eps: float, activation: int, negative_slope: float) -> Tensor:
    """An eager training forward from x: y, the running statistics updated and the batch counted by the backend
    itself (the Triton kernels count it in their normalization launch: no increment kernel)."""
    if cpp_launch.serves(input):  # one C++ call; its node records the backward
        y = cpp_launch.training(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                momentum, cumulative, eps, activation, negative_slope)
        if y is not None:
            return y
    backend = backend_for(input)
    arguments = (input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                 eps, activation, negative_slope)
    if not needs_gradient(input, weight, bias, residual):
        return backend.training(input, running_mean, running_var, num_batches_tracked, weight, bias, residual,
                                momentum, cumulative, eps, activation, negative_slope)[0]
    if backend is NATIVE:
        return native_cpu.training_with_node(*arguments)
    return TrainingBatchNormFunction.apply(backend, *arguments)


def apply_step(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
               tracing: bool):
    """What applies given statistics to ``input`` (eval, and FrozenBatchNorm): a callable of (x, mean, invstd,
    running_var, weight, bias, residual, eps, activation, negative_slope), as ``Backend.apply``. The custom op
    while torch.compile traces; the C++ launch path's; the autograd Function over the backend when something
    needs a gradient; else the backend's ``apply``, or on the native kernels their op itself where nothing needs
    converting, so that no Python runs between here and the C++ (on a small eval call that Python costs as much
    as the pass)."""
    if tracing:
        return torch.ops.triton_bn.batch_norm_apply
    if cpp_launch.serves(input):
        return _cpp_apply
    return _python_apply_step(input, weight, bias, residual)


def _python_apply_step(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]):
    """``apply_step``'s callable off the C++ launch path."""
    backend = backend_for(input)
    if needs_gradient(input, weight, bias, residual):
        return functools.partial(BatchNormFunction.apply, backend)
    if backend is NATIVE and (residual is None or residual.stride() == input.stride()):
        return native_cpu.ops().apply
    return backend.apply


def _cpp_apply(x, mean, invstd, running_var, weight, bias, residual, eps, activation, negative_slope):
    """``apply_step``'s callable on the C++ launch path (running statistics), with the Python one where no
    plan takes the call."""
    if invstd is None:
        y = cpp_launch.apply(x, mean, running_var, weight, bias, residual, eps, activation, negative_slope)
        if y is not None:
            return y
    return _python_apply_step(x, weight, bias, residual)(x, mean, invstd, running_var, weight, bias, residual, eps,
                                                         activation, negative_slope)


def recording_for_export() -> bool:
    """Whether this call is being recorded into a program meant to run elsewhere: ``torch.export`` (and so
    ONNX export) or ``torch.jit.trace``. Such a program must hold PyTorch's own operators only, so that it runs
    where triton_bn and Triton are not installed (docs/deploy.md)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def portable_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, activation: int,
                        negative_slope, residual, num_batches_tracked) -> Tensor:
    """``batch_norm`` from PyTorch's own operators, as ``nn.BatchNorm`` and an activation module compute it:
    the batch counted in ``num_batches_tracked``, a cumulative average weighing it 1 / count. What an exported
    program records in place of the kernels (an exporter then sees BatchNormalization, Add and the
    activation, which it knows)."""
    factor = 0.0 if momentum is None else momentum
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    z = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
    if residual is not None:
        z = z + residual
    return torch_activation(TABLE[activation].name, negative_slope)(z)
