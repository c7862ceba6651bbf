"""``triton-bn bench --model NAME``: a whole training step of a real model, original against converted.

A step is forward, cross-entropy loss, backward and an SGD step, on random images and labels. For each
precision (fp32 NCHW; bf16 autocast with channels_last) it times, side by side in one process:
``original`` (the model as built), ``converted`` (``triton_bn.convert_model`` of a copy with the same
weights), on a GPU where the opt-in C++ launch path builds also ``converted, C++ launch`` (the same, each step
with that path switched on), with ``--compile`` the ``torch.compile`` of each, and with ``--graphs`` (a GPU
only) each one's whole step (forward, loss, backward, optimizer step) captured once in a CUDA graph and
replayed, as NVIDIA's MLPerf ResNet-50 trains (``graphed_step``). Reported: median ms per step,
images/s, the speedup over the original in the same mode (eager or compiled), the host's share of a
step, and the relative difference of the first step's loss from the original's (the converted model
must compute the same function: a fast wrong model must not hide).

The variants take turns: ``ROUNDS`` rounds, each timing a slice of every variant's steps, so that a
drift in the machine's speed (clocks, other processes) lands on all of them alike. Host ms per step is
the time until ``step()`` returns, before waiting for the GPU: where it is close to the whole step, the
step is host-bound (Python, autograd, launches), and its time follows the host's speed from one process
to the next.

Models: ``resnet50`` (torchvision's, batch 128 at 224x224 by default), ``efficientnet_b0`` and
``mobilenet_v3_large`` (torchvision's: depthwise convolutions, SiLU / hardswish, squeeze-excitation; other BN
shapes than ResNet-50's) and ``tiny`` (a small ResNet-like network built here, for machines without
torchvision or a GPU).
"""
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

# (dtype, memory format) per precision name
PRECISIONS = {"fp32": (torch.float32, torch.contiguous_format),
              "bf16": (torch.bfloat16, torch.channels_last)}


class _TinyBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """stem (conv, BN, ReLU), two residual blocks, pooled linear head: every fusion convert_model does."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(_TinyBlock(channels), _TinyBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# name -> (builder, default batch, image side, classes)
MODELS: Dict[str, tuple] = {
    "resnet50": (lambda: __import__("torchvision").models.resnet50(), 128, 224, 1000),
    "efficientnet_b0": (lambda: __import__("torchvision").models.efficientnet_b0(), 128, 224, 1000),
    "mobilenet_v3_large": (lambda: __import__("torchvision").models.mobilenet_v3_large(), 128, 224, 1000),
    "tiny": (TinyResNet, 4, 16, 10),
}


def _step_fn(model: nn.Module, images, labels, dtype) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = dtype != torch.float32

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    return step


def graphed_step(model: nn.Module, images, labels, dtype, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """The whole training step of ``model`` on the static ``images`` and ``labels`` captured once in a CUDA graph;
    returns a step that replays it (and the loss tensor the graph writes). As PyTorch's docs capture a whole
    network: warm-up steps on a side stream (so that kernels are compiled and tuned and the optimizer's state
    exists before the capture: a triton_bn layer seen first inside a capture is refused), the gradients set to
    None, then one step captured (its backward allocates the gradients in the graph's pool; replays overwrite
    them). SGD with momentum keeps no step counter: nothing in its step reads the host. ``replay.first_loss`` is
    the first warm-up step's loss (what the bench compares with the original's first step)."""
    if images.device.type != "cuda":
        raise RuntimeError("triton-bn bench --model --graphs: CUDA graphs need a CUDA GPU")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = dtype != torch.float32

    def body():
        with torch.autocast(images.device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        losses = []
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            losses.append(body().detach())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = body()

    def replay():
        graph.replay()
        return static_loss
    replay.first_loss = float(losses[0]) if losses else float("nan")  # the first step's, as the others report it
    return replay


CPP_VARIANT = "converted, C++ launch"


def cpp_launch_available() -> bool:
    """Whether the C++ launch path (docs/launch.md) is off by default here but can be built: then the bench
    times it as a variant of its own (``CPP_VARIANT``), each of its steps run with it switched on."""
    from triton_bn.backends import cpp_launch
    return not cpp_launch.ACTIVE and cpp_launch.ops() is not None


def with_cpp_launch(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` with the C++ launch path switched on while it runs, and back as it was after (even if it raises)."""
    from triton_bn.backends import cpp_launch

    def run():
        with cpp_launch.switched(True):
            return step()
    return run


ROUNDS = 3


def _timed_steps(step: Callable, steps: int, on_gpu: bool, times: List[float], host_times: List[float]) -> None:
    """Run ``steps`` steps, appending each one's ms (GPU events around it on a GPU, wall clock on a CPU)
    to ``times`` and the host's ms until ``step()`` returned to ``host_times``."""
    for _ in range(steps):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            step()
            host_times.append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            host_times.append(times[-1])


def run_model_bench(name: str, precisions: List[str], batch: int, steps: int, compile_too: bool, device: str,
                    progress: Callable[[str], None] = print,
                    measured: Callable[[List[dict]], object] = lambda rows: None, graphs: bool = False) -> List[dict]:
    """One row per (precision, variant). The original and the converted model start from the same
    weights and see the same batch; the first step of each is the warm-up (compile, autotune) and gives
    the loss that is compared. ``measured`` gets the rows so far after each precision. ``graphs`` (a GPU
    only) adds each model's whole step replayed from a CUDA graph."""
    import triton_bn
    builder, default_batch, side, classes = MODELS[name]
    batch = batch or default_batch
    on_gpu = device == "cuda"
    if graphs and not on_gpu:
        raise RuntimeError("triton-bn bench --model --graphs: CUDA graphs need a CUDA GPU (this run is on the CPU)")
    rows = []
    for precision in precisions:
        dtype, fmt = PRECISIONS[precision]
        torch.manual_seed(0)
        base = builder().to(device).to(memory_format=fmt)
        images = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=fmt)
        labels = torch.randint(0, classes, (batch,), device=device)
        converted = triton_bn.convert_model(copy.deepcopy(base))
        report = converted.fusion_report
        fusion = f"{report.activation} BN+act, {report.residual} BN+add+act, {report.plain} plain"
        variants = {"original": copy.deepcopy(base), "converted": converted}
        if on_gpu and cpp_launch_available():  # the opt-in C++ launch path, side by side with the default one
            variants[CPP_VARIANT] = triton_bn.convert_model(copy.deepcopy(base))
        if compile_too:
            variants["compiled original"] = torch.compile(copy.deepcopy(base))
            variants["compiled converted"] = torch.compile(triton_bn.convert_model(copy.deepcopy(base)))
        if graphs:
            variants["graphed original"] = copy.deepcopy(base)
            variants["graphed converted"] = triton_bn.convert_model(copy.deepcopy(base))
        first_loss, step_fns = {}, {}
        for variant, model in variants.items():
            progress(f"model {name} {precision} {variant}: warm-up")
            if variant.startswith("graphed"):  # warmed up (its first step's loss is the compared one), captured
                step = step_fns[variant] = graphed_step(model.train(), images, labels, dtype)
                first_loss[variant] = step.first_loss
            else:
                step = _step_fn(model.train(), images, labels, dtype)
                step = step_fns[variant] = with_cpp_launch(step) if variant == CPP_VARIANT else step
                first_loss[variant] = float(step().detach())
            step()  # a second warm-up: the optimizer's state exists from here on
        step_times = {variant: [] for variant in variants}
        host_step_times = {variant: [] for variant in variants}
        for round_index in range(ROUNDS):  # the variants take turns (module docstring)
            progress(f"model {name} {precision}: timing, round {round_index + 1} of {ROUNDS}")
            for variant, step in step_fns.items():
                done = len(step_times[variant])
                _timed_steps(step, steps * (round_index + 1) // ROUNDS - done, on_gpu, step_times[variant],
                             host_step_times[variant])
        times = {variant: statistics.median(values) for variant, values in step_times.items()}
        for variant, ms in times.items():
            baseline = ("compiled original" if variant.startswith("compiled") else
                        "graphed original" if variant.startswith("graphed") else "original")
            reference = first_loss["original"]
            rows.append(dict(model=name, precision=precision, variant=variant, batch=batch, steps=steps,
                             ms_per_step=ms, host_ms_per_step=statistics.median(host_step_times[variant]),
                             images_per_s=batch / (ms * 1e-3),
                             speedup_vs_original=times[baseline] / ms,
                             first_loss=first_loss[variant],
                             loss_rel_diff=abs(first_loss[variant] - reference) / max(abs(reference), 1e-30),
                             fusion=fusion if "converted" in variant else "",
                             device=torch.cuda.get_device_name() if on_gpu else "cpu"))
        measured(rows)
    return rows


def model_markdown(rows: List[dict], header: str) -> str:
    lines = [header, "", "| model | precision | variant | batch | ms / step | host ms / step | images/s | speedup vs "
             "original (same mode) | first-step loss rel. diff | fused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} | "
                     f"{r['host_ms_per_step']:.2f} | {r['images_per_s']:.0f} | {r['speedup_vs_original']:.3f}x | "
                     f"{r['loss_rel_diff']:.1e} | {r['fusion']} |")
    return "\n".join(lines) + "\n"
