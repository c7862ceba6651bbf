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

Models (``MODELS``): ``resnet50`` (torchvision's, batch 128 at 224x224 by default), ``efficientnet_b0`` and
``mobilenet_v3_large`` (torchvision's: depthwise convolutions, SiLU / hardswish, squeeze-excitation; other BN
shapes than ResNet-50's); Hugging Face transformers' ResNet-50, MobileNetV2, EfficientNet-B0 and MobileViT-S
built from their configurations (``hf_*``: where torchvision does not import, as beside the CPU build of
torch); ``yolo_backbone`` (Ultralytics' Conv-BN-SiLU and C2f blocks, written here) and ``tiny`` (a small
ResNet-like network built here, for the interpreter). Several models, comma-separated, run one after the
other into one table, with each variant's geometric mean over them (``model_summary``).
"""
import copy
import math
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .report import quantiles, spread_noise

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


class ConvBnSiLU(nn.Module):
    """Ultralytics' ``Conv``: convolution, BatchNorm2d, SiLU (its ``default_act``, an ``nn.SiLU`` instance)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _YoloBottleneck(nn.Module):
    """Ultralytics' ``Bottleneck``: two Conv blocks and a shortcut add (after the second block's SiLU)."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels)
        self.cv2 = ConvBnSiLU(channels, channels)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class _YoloC2f(nn.Module):
    """Ultralytics' ``C2f``: a 1x1 Conv split in two, bottlenecks on one half, every output concatenated and
    mixed by a last 1x1 Conv."""

    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.hidden = cout // 2
        self.cv1 = ConvBnSiLU(cin, 2 * self.hidden, 1)
        self.cv2 = ConvBnSiLU((2 + blocks) * self.hidden, cout, 1)
        self.m = nn.ModuleList(_YoloBottleneck(self.hidden) for _ in range(blocks))

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        parts.extend(block(parts[-1]) for block in self.m)
        return self.cv2(torch.cat(parts, 1))


class YoloBackbone(nn.Module):
    """A YOLOv8-n-like backbone (Conv-BN-SiLU stem and stride-2 convolutions, C2f stages) with a pooled linear
    classification head, as Ultralytics' classification models put one on it: every BN feeds a SiLU."""

    def __init__(self, classes: int = 1000, width: int = 16):
        super().__init__()
        w = width
        self.layers = nn.Sequential(ConvBnSiLU(3, w, 3, 2), ConvBnSiLU(w, 2 * w, 3, 2), _YoloC2f(2 * w, 2 * w, 1),
                                    ConvBnSiLU(2 * w, 4 * w, 3, 2), _YoloC2f(4 * w, 4 * w, 2),
                                    ConvBnSiLU(4 * w, 8 * w, 3, 2), _YoloC2f(8 * w, 8 * w, 2),
                                    ConvBnSiLU(8 * w, 16 * w, 3, 2), _YoloC2f(16 * w, 16 * w, 1))
        self.head = nn.Linear(16 * w, classes)

    def forward(self, x):
        return self.head(self.layers(x).mean((2, 3)))


class HuggingFaceLogits(nn.Module):
    """A Hugging Face image classifier as a module from images to logits (its forward returns an output
    object)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


def hugging_face(config_name: str, model_name: str, **config) -> Callable[[], nn.Module]:
    """A builder of Hugging Face transformers' ``model_name`` from its ``config_name`` (no download: the
    weights are the random initialisation), 1000 classes."""
    def build():
        import transformers
        configuration = getattr(transformers, config_name)(num_labels=1000, **config)
        return HuggingFaceLogits(getattr(transformers, model_name)(configuration))
    return build


def missing_package(name: str) -> str:
    """The package model ``name`` needs that does not import here ("" when none is missing): torchvision for
    torchvision's models, transformers for Hugging Face's."""
    package = "transformers" if name.startswith("hf_") else "torchvision" if name in _TORCHVISION else ""
    if package:
        try:
            __import__(package)
        except ImportError:
            return package
    return ""


_TORCHVISION = ("resnet50", "efficientnet_b0", "mobilenet_v3_large")
# name -> (builder, default batch, image side, classes). torchvision's where it imports; Hugging Face
# transformers' from their configurations (``pip install transformers``: it installs beside the CPU build of
# torch, where torchvision does not import); the YOLO-like backbone and ``tiny``, built here.
MODELS: Dict[str, tuple] = {
    "resnet50": (lambda: __import__("torchvision").models.resnet50(), 128, 224, 1000),
    "efficientnet_b0": (lambda: __import__("torchvision").models.efficientnet_b0(), 128, 224, 1000),
    "mobilenet_v3_large": (lambda: __import__("torchvision").models.mobilenet_v3_large(), 128, 224, 1000),
    "hf_resnet50": (hugging_face("ResNetConfig", "ResNetForImageClassification"), 128, 224, 1000),
    "hf_mobilenet_v2": (hugging_face("MobileNetV2Config", "MobileNetV2ForImageClassification"), 128, 224, 1000),
    "hf_efficientnet_b0": (hugging_face("EfficientNetConfig", "EfficientNetForImageClassification", image_size=224,
                                        width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, dropout_rate=0.2),
                           128, 224, 1000),
    "hf_mobilevit_s": (hugging_face("MobileViTConfig", "MobileViTForImageClassification"), 128, 256, 1000),
    "yolo_backbone": (YoloBackbone, 128, 224, 1000),
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


def with_batch_statistics(model: nn.Module, images) -> nn.Module:
    """``model`` with every BN's running statistics those of one forward of ``images`` (momentum 1 for that
    forward, then its own again): what a trained model's running statistics do, keep the eval forward's
    activations normalised. Left at their initial zeros and ones, a randomly initialised network's eval
    activations grow layer by layer to values whose arithmetic is several times slower on a CPU (Hugging Face's
    EfficientNet-B0 at batch 8: 1.55 s against 0.42-0.48 s a forward), which would time that, not the model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 1.0
    training = model.training
    with torch.no_grad():
        model.train()(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.train(training)


def _eval_fn(model: nn.Module, images, labels, dtype) -> Callable[[], torch.Tensor]:
    """An inference step: the forward under ``torch.no_grad()`` (and autocast for bf16) and its loss (a number
    to compare across variants)."""
    autocast = dtype != torch.float32

    def step():
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=autocast):
            return F.cross_entropy(model(images), labels)
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
# what each kind of variant is compared with (its first word): the original run the same way
_BASELINES = {"compiled": "compiled original", "graphed": "graphed original", "eval": "eval original"}


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
                    measured: Callable[[List[dict]], object] = lambda rows: None, graphs: bool = False,
                    eval_too: bool = False) -> List[dict]:
    """One row per (precision, variant). The original and the converted model start from the same
    weights and see the same batch; the first step of each is the warm-up (compile, autotune) and gives
    the loss that is compared. ``measured`` gets the rows so far after each precision. ``graphs`` (a GPU
    only) adds each model's whole step replayed from a CUDA graph; ``eval_too`` the inference forward
    (``_eval_fn``) of the original, the converted and the folded model (``fold_batch_norms`` of the converted
    one, as the README deploys it), each compared with the original's."""
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
        if eval_too:
            with_batch_statistics(base, images)
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
        if eval_too:
            variants["eval original"] = copy.deepcopy(base).eval()
            variants["eval converted"] = triton_bn.convert_model(copy.deepcopy(base)).eval()
            # what the README deploys: the converted model folded, so that each fused activation moves into the
            # layer with its BN's table (on a CPU, SiLU and GELU then take the native kernels' pass)
            variants["eval folded"] = triton_bn.fold_batch_norms(triton_bn.convert_model(copy.deepcopy(base)).eval())
        first_loss, step_fns = {}, {}
        for variant, model in variants.items():
            progress(f"model {name} {precision} {variant}: warm-up")
            torch.manual_seed(1)  # the same dropout masks in every variant's first step: comparable losses
            if variant.startswith("graphed"):  # warmed up (its first step's loss is the compared one), captured
                step = step_fns[variant] = graphed_step(model.train(), images, labels, dtype)
                first_loss[variant] = step.first_loss
            elif variant.startswith("eval"):
                step = step_fns[variant] = _eval_fn(model, images, labels, dtype)
                first_loss[variant] = float(step())
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
        spreads = {variant: quantiles(values) for variant, values in step_times.items()}  # (median, p20, p80)
        times = {variant: spread[0] for variant, spread in spreads.items()}
        noise = {variant: spread_noise(*spread) for variant, spread in spreads.items()}
        for variant, ms in times.items():
            baseline = _BASELINES.get(variant.split(" ")[0], "original")
            reference = first_loss[baseline]
            rows.append(dict(model=name, precision=precision, variant=variant, batch=batch, steps=steps,
                             ms_per_step=ms, ms_p20=spreads[variant][1], ms_p80=spreads[variant][2],
                             noise=noise[variant] or (f"its baseline's: {noise[baseline]}" if noise[baseline] else ""),
                             host_ms_per_step=statistics.median(host_step_times[variant]),
                             images_per_s=batch / (ms * 1e-3),
                             speedup_vs_original=times[baseline] / ms,
                             first_loss=first_loss[variant],
                             loss_rel_diff=abs(first_loss[variant] - reference) / max(abs(reference), 1e-30),
                             fusion=fusion if "converted" in variant else "",
                             device=torch.cuda.get_device_name() if on_gpu else "cpu"))
        measured(rows)
    return rows


def model_summary(rows: List[dict]) -> List[str]:
    """Per precision and variant (other than the baselines), the geometric mean of the speedup over the
    models measured and the lowest one, rows flagged as noise (their own steps or their baseline's) left out:
    markdown lines (none for one model)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if not r["variant"].endswith("original"):
            groups.setdefault((r["precision"], r["variant"]), []).append(r)
    if not groups or max(len(g) for g in groups.values()) < 2:
        return []
    lines = ["| precision | variant | models | geomean speedup vs original | lowest | left out as noise |",
             "|---|---|---|---|---|---|"]
    for (precision, variant), group in groups.items():
        kept = [r for r in group if not r.get("noise")]
        left_out = ", ".join(r["model"] for r in group if r.get("noise")) or "none"
        if not kept:
            lines.append(f"| {precision} | {variant} | 0 | - | - | {left_out} |")
            continue
        geomean = math.exp(sum(math.log(r["speedup_vs_original"]) for r in kept) / len(kept))
        lowest = min(kept, key=lambda r: r["speedup_vs_original"])
        lines.append(f"| {precision} | {variant} | {len(kept)} | {geomean:.3f}x | "
                     f"{lowest['speedup_vs_original']:.3f}x ({lowest['model']}) | {left_out} |")
    return lines + [""]


def model_markdown(rows: List[dict], header: str) -> str:
    lines = [header, ""] + model_summary(rows) + [
        "| model | precision | variant | batch | ms / step | p20-p80 | host ms / step | images/s | speedup vs "
        "original (same mode) | first-step loss rel. diff | fused | noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} | "
                     f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g} | {r['host_ms_per_step']:.2f} | {r['images_per_s']:.0f} | "
                     f"{r['speedup_vs_original']:.3f}x | {r['loss_rel_diff']:.1e} | {r['fusion']} | "
                     f"{'*noise*: ' + r['noise'] if r['noise'] else ''} |")
    return "\n".join(lines) + "\n"
