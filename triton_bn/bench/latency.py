"""``triton-bn bench --latency``: the deployed model at batch 1 and 8 (inference, the edge case), on this
machine's CPU (or GPU), every way a trained model can be run, side by side in one process.

Variants of each model, all from the same weights and running statistics:
- ``original``: the model as built, eager, eval mode;
- ``converted``: ``convert_model`` of it (fused BN + activation, BN + add + activation), eval mode;
- ``folded``: ``fold_batch_norms`` of the converted model (BNs folded into the convolutions before them,
  the rest frozen into per-channel tables, epilogues kept);
- ``no BN (bound)``: the original with every BN replaced by an identity. Not the same function (its rel.
  error is large and meaningless), but what the convolutions, activations and the rest cost alone: the
  floor that no way of running the BNs faster, folding included, can get under;
- ``folded, compiled``: ``torch.compile`` of the folded model (its compile time not counted);
- ``onnxruntime``: the folded model exported with ``torch.onnx.export(..., dynamo=True)`` and run by ONNX
  Runtime's CPU provider; ``onnxruntime, original``: the original exported the same way (the exporter
  folds its BNs itself), for the comparison the deployment story rests on: nothing in triton_bn's export
  costs time at run time.

Models (built here: torchvision does not import beside the CPU build of torch used in CI): a
ResNet-18-like CNN (BasicBlocks, stages of 32-256 channels) and a MobileNet-like one (inverted residual
blocks, depthwise convolutions, hardswish, squeeze-excitation), on 3x96x96 images. The variants take
turns (``ROUNDS`` rounds of ``CALLS`` calls each, medians), so that a slow spell of the machine hits all;
``speedup_paired`` is the median over the rounds of each round's original ms / the variant's ms, which a
slow spell lasting a few rounds moves less than it moves the ratio of the two medians.
"""
import contextlib
import copy
import logging
import statistics
import time
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUNDS, CALLS, SIDE = 15, 5, 96


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Like(nn.Module):
    """torchvision's ResNet-18 layout at a quarter of its widths: stem, four stages of two BasicBlocks."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        widths, blocks, cin = (32, 64, 128, 256), [], 32
        for i, width in enumerate(widths):
            blocks += [_BasicBlock(cin, width, 1 if i == 0 else 2), _BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(8, channels // 4), 1)
        self.expand = nn.Conv2d(max(8, channels // 4), channels, 1)

    def forward(self, x):
        s = F.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * F.hardsigmoid(self.expand(s))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                       nn.Hardswish())
        self.se = _SqueezeExcite(mid)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class MobileNetLike(nn.Module):
    """MobileNetV3's ingredients: a hardswish stem, inverted residual blocks with depthwise convolutions and
    squeeze-excitation, a 1x1 head with BN + hardswish."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(_InvertedResidual(16, 24, 2), _InvertedResidual(24, 24, 1),
                                    _InvertedResidual(24, 40, 2), _InvertedResidual(40, 40, 1),
                                    _InvertedResidual(40, 80, 2), _InvertedResidual(80, 80, 1))
        self.head = nn.Sequential(nn.Conv2d(80, 256, 1, bias=False), nn.BatchNorm2d(256), nn.Hardswish())
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


MODELS = {"resnet18_like": ResNet18Like, "mobilenet_like": MobileNetLike}


def _trained(builder) -> nn.Module:
    """The model after a few training steps' worth of running statistics, in eval mode."""
    torch.manual_seed(0)
    model = builder()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIDE, SIDE))
    return model.eval()


@contextlib.contextmanager
def _exporter_quiet():
    """The ONNX exporter's warnings and log lines kept off the console while it runs (it logs one "torchvision is
    not installed. Skipping torchvision::..." per operator of that library, on every export, where torchvision
    is not installed: nothing to do with these models)."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def _onnx_session(model: nn.Module, x: torch.Tensor):
    import onnxruntime as ort
    with _exporter_quiet():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's threads spin for a while after each run by default: on a small machine they would take
    # the cores from whichever variant is timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    ops = sorted(Counter(node.op_type for node in program.model_proto.graph.node).items())
    return (lambda: session.run(None, feed)[0]), len(program.model_proto.SerializeToString()), ops


def without_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BN module an ``nn.Identity`` (the ``no BN (bound)`` variant)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, nn.Identity())
    return model


BOUND_NOTE = "not the same function: every BN an identity (the floor of any BN speed-up)"


def variants(model: nn.Module, x: torch.Tensor, device: str, progress: Callable[[str], None]) -> Dict[str, tuple]:
    """{variant: (callable, its output, what it is)} for one model and input."""
    import triton_bn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = triton_bn.convert_model(model).eval()
        folded = triton_bn.fold_batch_norms(converted)
    out = {}
    with torch.no_grad():
        for name, m in (("original", model), ("converted", converted), ("folded", folded)):
            out[name] = (lambda m=m: m(x), m(x), "")
        bound = without_batch_norms(model)
        out["no BN (bound)"] = (lambda: bound(x), bound(x), BOUND_NOTE)
        progress("compiling the folded model")
        compiled = torch.compile(folded)
        compiled(x)  # the compile itself, not timed
        out["folded, compiled"] = (lambda: compiled(x), compiled(x), "")
    if device == "cpu":
        try:
            sessions = {}
            for name, m in (("onnxruntime", folded), ("onnxruntime, original", model)):
                progress(f"exporting to ONNX: {name}")
                sessions[name] = _onnx_session(m, x)
            same = sessions["onnxruntime"][2] == sessions["onnxruntime, original"][2]
            for name, (run, size, ops) in sessions.items():
                note = f"{size} bytes, {sum(n for _, n in ops)} nodes" + (
                    "" if name != "onnxruntime" else ", the same operators as the original's export" if same else
                    ", operators differ from the original's export")
                out[name] = (run, torch.from_numpy(run()), note)
        except ImportError:
            progress("onnxruntime / onnxscript not installed: no ONNX rows (pip install onnx onnxruntime onnxscript)")
    return out


def _say_progress(done: int, total: int, text: str) -> None:
    print(f"[{done}/{total}] {text}", flush=True)


def run_latency_bench(batches: List[int], device: str, progress: Callable[[int, int, str], None] = _say_progress,
                      models: Optional[List[str]] = None) -> List[dict]:
    """One row per (model, batch, variant): median ms per call over the interleaved rounds, p20/p80, the
    speedup over the original's eager call, and the relative error of its output against the original's.
    ``progress(done, total, text)`` hears of each step: (model, batch) pairs done of all, what runs now."""
    rows = []
    models = models or list(MODELS)
    total, done = len(models) * len(batches), 0
    for model_name in models:
        base = _trained(MODELS[model_name]).to(device)
        for batch in batches:
            x = torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(batch)).to(device)
            step = f"{model_name} batch {batch}"
            progress(done, total, step)
            runs = variants(base, x, device, lambda text, step=step, done=done: progress(done, total, f"{step}: {text}"))
            samples = {name: [] for name in runs}
            with torch.no_grad():
                for fn, _, _ in runs.values():
                    fn()
                for _ in range(ROUNDS):
                    for name, (fn, _, _) in runs.items():
                        start = time.perf_counter()
                        for _ in range(CALLS):
                            fn()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        samples[name].append((time.perf_counter() - start) / CALLS * 1e3)
            reference = runs["original"][1].double()
            original_ms = statistics.median(samples["original"])
            for name, (_, output, note) in runs.items():
                times = sorted(samples[name])
                ms = statistics.median(times)
                paired = statistics.median(o / v for o, v in zip(samples["original"], samples[name]))
                error = ((output.double().cpu() - reference.cpu()).norm() / reference.norm()).item()
                rows.append(dict(model=model_name, batch=batch, variant=name, ms=ms, ms_p20=times[len(times) // 5],
                                 ms_p80=times[(4 * len(times)) // 5], speedup_vs_original=original_ms / ms,
                                 speedup_paired=paired, rel_err=error, note=note))
            done += 1
            progress(done, total, f"{step}: timed")
    return rows


def latency_markdown(rows: List[dict], header: str) -> str:
    lines = [header, "", "| model | batch | variant | ms per call | p20-p80 | speedup vs original eager | speedup, "
             "paired by round | rel. error | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['ms_p20']:.3f}-"
                     f"{r['ms_p80']:.3f} | {r['speedup_vs_original']:.2f}x | {r['speedup_paired']:.2f}x | "
                     f"{r['rel_err']:.1e} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot_latency(rows: List[dict], path) -> None:
    """One panel per model: ms per call for each variant, a bar per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        names = [r["variant"] for r in rows if r["model"] == model and r["batch"] == batches[0]]
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            ms = [next(r["ms"] for r in rows if r["model"] == model and r["batch"] == batch and r["variant"] == n)
                  for n in names]
            ax.bar([j + i * width for j in range(len(names))], ms, width, label=f"batch {batch}")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per call (median)")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

