"""Host cost per call: triton_bn's own work against PyTorch's BN + ReLU, side by side in one process.

Two modes:
- default, the Python launch path: every Triton launch is replaced by a no-op (under ``TRITON_INTERPRET=1``,
  ``InterpretedFunction.run`` returns at once), so what is timed is triton_bn's own work per call:
  validation, layout planning, configuration lookup, allocations, the autograd Function.
- ``--cpp-null``, the C++ launch path (backends/cpp_launch.py, csrc/cuda/) under its null stand-in driver
  (``TRITON_BN_CUDA_DRIVER=null``): one C++ call per forward (the plan found, outputs allocated, parameters
  packed, nothing launched), the C++ autograd node in the backward.
PyTorch's ``nn.Sequential(BatchNorm, ReLU)`` runs for real on a tensor so small (2x8x2x2) that its
arithmetic is negligible: what it costs is its host path too. One thread; medians of repeated rounds; each
module's train/eval mode set once before its calls, as a training loop does.

    python perf/host_overhead.py              # prints the table (the ratio column is triton_bn / torch)
    python perf/host_overhead.py --cpp-null   # the same for the C++ launch path
"""
import os
import statistics
import sys
import time

CPP_NULL = "--cpp-null" in sys.argv
if CPP_NULL:  # before triton_bn is imported: CPU tensors take the C++ path, nothing is launched
    os.environ["TRITON_BN_CUDA_DRIVER"] = "null"
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: launches become interpreter calls, stubbed

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import triton_bn  # noqa: E402

CALLS_PER_ROUND = int(os.environ.get("HOST_OVERHEAD_CALLS", 100))
ROUNDS = int(os.environ.get("HOST_OVERHEAD_ROUNDS", 25))


def _stub_launches():
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def per_call_us(ours, theirs, calls: int = CALLS_PER_ROUND, rounds: int = ROUNDS):
    """(ours, theirs) in us per call: rounds alternate between the two, so that a slow spell of the
    machine hits both sides alike; the median round of each."""
    for fn in (ours, theirs):
        for _ in range(20):
            fn()
    samples = ([], [])
    for _ in range(rounds):
        for fn, out in zip((ours, theirs), samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _cases(ours: nn.Module, theirs: nn.Module, shape, memory_format):
    """(name, training mode, triton_bn callable, torch callable) for training forward, eval forward, forward +
    backward; the caller sets the mode once before timing a case."""
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    x_grad = x.clone().requires_grad_()
    grad = torch.ones_like(x)

    def forward(module):
        def call():
            with torch.no_grad():
                module(x)
        return call

    def forward_backward(module):
        def call():
            module(x_grad).backward(grad)
        return call

    return [("training forward (no_grad)", True, forward(ours), forward(theirs)),
            ("eval forward (no_grad)", False, forward(ours), forward(theirs)),
            ("training forward + backward", True, forward_backward(ours), forward_backward(theirs))]


class _EmptyFunction(torch.autograd.Function):
    """An autograd.Function with TrainingBatchNormFunction's twelve arguments, its saved tensors and
    nothing else: the floor any Python Function pays per forward + backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                eps, activation, negative_slope):
        ctx.save_for_backward(x, weight, weight, None, weight, bias, residual)
        ctx.config = (eps, activation, negative_slope)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_y):
        x, _, _, _, weight, bias, _ = ctx.saved_tensors
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)) + (None,) * 9


def _function_floor():
    """The same forward + backward row for ``_EmptyFunction`` against PyTorch's BN + ReLU."""
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    running = (torch.zeros(8), torch.ones(8))
    grad = torch.ones_like(x)
    theirs = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()).train()
    return ("empty autograd.Function, the same 12 arguments (the floor of any Python Function)",
            "training forward + backward",
            *per_call_us(lambda: _EmptyFunction.apply(x, weight, bias, None, *running, None, 0.1, False, 1e-5, 1,
                                                      0.01).backward(grad),
                         lambda: theirs(x).backward(grad)))


def measure():
    torch.set_num_threads(1)
    channels_last = torch.channels_last
    rows = []
    setups = [
        ("BatchNorm2d(8, relu), 2x8x2x2 channels_last", triton_bn.BatchNorm2d(8, activation="relu"),
         nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), (2, 8, 2, 2), channels_last),
        ("BatchNorm1d(8, relu), 4x8", triton_bn.BatchNorm1d(8, activation="relu"),
         nn.Sequential(nn.BatchNorm1d(8), nn.ReLU()), (4, 8), torch.contiguous_format),
        ("BatchNorm3d(8, relu), 2x8x2x2x2", triton_bn.BatchNorm3d(8, activation="relu"),
         nn.Sequential(nn.BatchNorm3d(8), nn.ReLU()), (2, 8, 2, 2, 2), torch.contiguous_format),
        ("SyncBatchNorm(8, relu) local, 2x8x2x2", triton_bn.SyncBatchNorm(8, activation="relu"),
         nn.Sequential(nn.SyncBatchNorm(8), nn.ReLU()), (2, 8, 2, 2), torch.contiguous_format),
    ]
    for label, ours, theirs, shape, fmt in setups:
        for case, training, mine, reference in _cases(ours, theirs, shape, fmt):
            ours.train(training)
            theirs.train(training)
            rows.append((label, case, *per_call_us(mine, reference)))
    rows.append(_function_floor())
    frozen = triton_bn.fold_batch_norms(nn.Sequential(triton_bn.BatchNorm2d(8, activation="relu")).eval())
    reference = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=channels_last)
    with torch.no_grad():
        rows.append(("FrozenBatchNorm(relu) (fold_batch_norms), 2x8x2x2", "eval forward (no_grad)",
                     *per_call_us(lambda: frozen(x), lambda: reference(x))))
    return rows


def main():
    if not CPP_NULL:
        _stub_launches()
    rows = measure()
    path = ("the C++ launch path, null driver (nothing launched)" if CPP_NULL else
            "the Python launch path, launches stubbed")
    print(f"host time per call, us (median of {ROUNDS} rounds of {CALLS_PER_ROUND} calls; triton_bn: {path}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread)\n")
    print("| module, input | call | triton_bn | torch BN + ReLU | ratio |")
    print("|---|---|---|---|---|")
    for label, case, mine, theirs in rows:
        print(f"| {label} | {case} | {mine:.1f} | {theirs:.1f} | {mine / theirs:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
