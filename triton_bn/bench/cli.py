"""``triton-bn bench``: measure triton_bn against eager PyTorch (cuDNN on and off) and torch.compile.

On a GPU it times with ``triton.testing.do_bench`` (median of many runs, L2 flushed between them). On a
machine without a GPU (or with ``--device cpu``) it measures triton_bn's CPU path (its native C++ kernels;
PyTorch's kernels where those do not serve) against PyTorch's own CPU batch norm, on real shapes scaled to
finish in about a minute on two cores: CPU figures, labelled so. ``--interpreter`` instead sends tiny shapes
through the Triton interpreter, a smoke check of the kernels whose timings mean nothing. ``--model`` times
whole training steps, ``--latency`` deployed models at batch 1 and 8.
"""
import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

from .heap import keep_freed_memory
from .report import quantiles


def _parse(argv):
    from . import cases as C
    from .model import MODELS
    from .. import __version__
    parser = argparse.ArgumentParser(prog="triton-bn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"triton-bn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark and write CSV, markdown, plots, autotune report")
    bench.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                       help="auto: the GPU when there is one, else the CPU path")
    bench.add_argument("--interpreter", action="store_true",
                       help="tiny shapes through the Triton interpreter on the CPU: checks the kernels and the "
                            "tool, its timings are no figures")
    bench.add_argument("--quick", action="store_true",
                       help="GPU: fp32 NCHW + bf16 channels_last over the default sets; CPU: fp32 in both layouts "
                            "on the three largest ResNet-50 layers at batch 2 (under a minute on two quiet cores)")
    bench.add_argument("--sets", default=None,
                       help=f"comma-separated shape sets, of: {', '.join(C.SHAPE_SETS)} (default GPU: "
                            f"{', '.join(C.QUICK_SETS)}; CPU: {', '.join(C.CPU_SETS)}; interpreter: tiny)")
    bench.add_argument("--cases", default=None, help=f"comma-separated cases, of: {', '.join(C.CASES)} (default: "
                       f"{', '.join(C.DEFAULT_CASES)})")
    bench.add_argument("--providers", default=None,
                       help=f"comma-separated providers, of: {', '.join(C.PROVIDERS)} (default: all a device has, "
                            "except torch_compile on the CPU, whose compiles take ~10 s a row there)")
    bench.add_argument("--dtypes", default=None, help=f"comma-separated, of: {', '.join(C.DTYPES)}")
    bench.add_argument("--layouts", default=None, help=f"comma-separated, of: {', '.join(C.LAYOUTS)}")
    bench.add_argument("--out", default=None,
                       help="output folder (default: a new folder <device>-<date>-<time> in $TRITON_BN_RESULTS_DIR, "
                            "or ~/triton_bn-results; an earlier run is never overwritten)")
    bench.add_argument("--tune-candidates", type=int, default=None,
                       help="autotune at most this many configurations per kernel key (default: all; --quick: 4)")
    bench.add_argument("--model", default=None,
                       help=f"time whole training steps of these models (comma-separated, of: {', '.join(MODELS)}), "
                            "original vs converted, instead of layers (resnet50, efficientnet_b0 and "
                            "mobilenet_v3_large need torchvision, hf_* need transformers)")
    bench.add_argument("--eval", action="store_true",
                       help="--model: also time the inference forward (no_grad) of the original, the converted and "
                            "the folded model (fold_batch_norms)")
    bench.add_argument("--precisions", default="bf16,fp32",
                       help="--model: comma-separated, bf16 (autocast, channels_last) and/or fp32 (NCHW)")
    bench.add_argument("--batch", type=int, default=None, help="--model: batch size (default: the model's)")
    bench.add_argument("--steps", type=int, default=20, help="--model: timed steps per variant (median)")
    bench.add_argument("--compile", action="store_true",
                       help="--model: also time torch.compile of the original and of the converted model")
    bench.add_argument("--graphs", action="store_true",
                       help="also time triton_bn and eager cuDNN replayed from a CUDA graph on every set (GPU time "
                            "without the host's launch work; the latency set always gets these); with --model, each "
                            "model's whole training step captured once and replayed (a GPU only)")
    bench.add_argument("--latency", action="store_true",
                       help="deployed models at batch 1 and 8: the original, converted, folded, the folded one "
                            "compiled and exported to ONNX Runtime, side by side (latency.csv, latency.md, "
                            "latency.png)")
    bench.add_argument("--batches", default="1,8", help="--latency: comma-separated batch sizes")
    bench.add_argument("--models", default=None,
                       help="--latency: comma-separated, of: resnet18_like, mobilenet_like (default: both)")
    bench.add_argument("--page-faults", action="store_true",
                       help="CPU: leave glibc's malloc as it is (by default the layer bench keeps freed blocks below 32 "
                            "MiB, so that a row's output does not fault in fresh pages on some calls and not on "
                            "others: triton_bn/bench/heap.py)")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="stop starting new measurements after this many seconds and write what was measured "
                            "(jobs run in priority order: the target cases first)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    # The interpreter is chosen (or not) before triton is imported: start again with the right setting.
    want = "1" if args.interpreter else None
    if os.environ.get("TRITON_INTERPRET") != want and not _uses_gpu(args):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if want:
            env["TRITON_INTERPRET"] = want
        os.execve(sys.executable, [sys.executable, "-m", "triton_bn", *argv], env)
    if args.latency:
        return run_latency(args)
    return run_model(args) if args.model else run_bench(args)


def _uses_gpu(args) -> bool:
    import torch
    return not args.interpreter and args.device != "cpu" and torch.cuda.is_available()


_MODE_NOTES = {
    "gpu": "",
    "cpu": "\n\n**CPU figures** ({threads} threads): triton_bn's CPU path (its native kernels for fp32/bf16/fp16/"
           "float64 inputs in either dense layout, {native}; PyTorch's fused kernels with the epilogue in place for "
           "other strides) against PyTorch's own CPU batch norm. Not GPU figures.",
    "interpreter": "\n\n**Interpreter run: these are CPU interpreter timings, not figures of anything.**",
}


def _mode_note(mode: str) -> str:
    import torch
    from ..backends import native_cpu
    if not native_cpu.ENABLED:
        built = "switched off by TRITON_BN_NATIVE_CPU=0: PyTorch's kernels"
    elif mode == "cpu" and native_cpu.ops() is not None:
        fp32_lanes, double_lanes = native_cpu.vector_lanes()
        built = (f"built and used; their SiLU/GELU/sigmoid vector math on ATen's Vectorized for "
                 f"{native_cpu.vector_isa()}: {fp32_lanes} fp32 / {double_lanes} double lanes")
    else:
        built = "not available here: PyTorch's kernels"
    return _MODE_NOTES[mode].format(threads=torch.get_num_threads(), native=built)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run_model(args) -> int:
    """``--model``: whole training steps; writes model.csv and model.md."""
    import torch
    import pandas as pd
    from .model import MODELS, ROUNDS, missing_package, model_markdown, run_model_bench
    from ..autotune import tuner
    on_gpu = _uses_gpu(args)
    device = "cuda" if on_gpu else "cpu"
    precisions = [p for p in args.precisions.split(",") if p]
    names = [name for name in args.model.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise SystemExit(f"triton-bn bench --model: unknown model {', '.join(unknown) or repr(args.model)}; "
                         f"expected comma-separated names of: {', '.join(MODELS)}")
    for name in names:
        package = missing_package(name)
        if package:
            raise SystemExit(f"triton-bn bench --model {name}: needs {package}, which does not import here "
                             f"(pip install {package}; transformers installs beside the CPU torch, torchvision "
                             "only beside a torch of its own: README)")
    mode = "gpu" if on_gpu else ("interpreter" if args.interpreter else "cpu")
    if mode == "interpreter" and names != ["tiny"]:
        raise SystemExit("triton-bn bench --model --interpreter: only --model tiny is practical")
    if args.steps < 1:
        raise SystemExit(f"triton-bn bench --model: --steps must be at least 1, got {args.steps}")
    if args.graphs and not on_gpu:
        raise SystemExit("triton-bn bench --model --graphs: CUDA graphs need a CUDA GPU; this run is on the CPU "
                         "(leave out --graphs to time eager steps)")
    gpu_name = {"gpu": torch.cuda.get_device_name() if on_gpu else "", "interpreter": "cpu-interpreter",
                "cpu": "cpu-" + _cpu_name()}[mode]
    stamp = datetime.date.today().isoformat()
    out = results_folder(args.out, _safe(gpu_name) + "-model")
    header = (f"# triton-bn bench --model {args.model}: {gpu_name}, {stamp}\n\n"
              f"torch {torch.__version__}, triton {__import__('triton').__version__}; a step = forward, "
              f"cross-entropy, backward, SGD"
              f"{' (eval: the forward and its loss under no_grad)' if args.eval else ''}; "
              f"median of {args.steps} steps after two warm-up steps, the variants "
              f"taking turns in {ROUNDS} rounds; host ms = until the step's Python returned; triton_bn "
              f"autotuning {'on' if tuner.autotune else 'off (heuristic tiles)'}."
              + _mode_note(mode))

    def write(rows) -> str:  # after each precision: a run cut short by a time limit keeps what it measured
        pd.DataFrame(rows).to_csv(out / "model.csv", index=False)
        text = model_markdown(rows, header)
        (out / "model.md").write_text(text)
        return text
    rows = []
    for name in names:
        rows += run_model_bench(name, precisions, args.batch, args.steps, args.compile, device,
                                progress=lambda text: print(text, file=sys.stderr, flush=True),
                                measured=lambda done: write(rows + done), graphs=args.graphs, eval_too=args.eval)
    print(write(rows))
    print(f"wrote {out}/model.csv and model.md")
    return 0


def run_latency(args) -> int:
    """``--latency``: the deployed models at small batches; writes latency.csv, latency.md, latency.png."""
    import torch
    import pandas as pd
    from .latency import CALLS, MODELS, ROUNDS, SIDE, latency_markdown, plot_latency, run_latency_bench
    on_gpu = _uses_gpu(args)
    device = "cuda" if on_gpu else "cpu"
    batches = [int(b) for b in args.batches.split(",") if b]
    models = [m for m in (args.models or ",".join(MODELS)).split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"triton-bn bench --models: unknown {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    rows = run_latency_bench(batches, device, progress=_progress, models=models)
    name = torch.cuda.get_device_name() if on_gpu else "cpu-" + _cpu_name()
    stamp = datetime.date.today().isoformat()
    out = results_folder(args.out, _safe(name) + "-latency")
    pd.DataFrame(rows).to_csv(out / "latency.csv", index=False)
    header = (f"# triton-bn bench --latency: {name}, {stamp}\n\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; inference (no_grad), 3x{SIDE}x{SIDE} "
              f"images; median ms per call of {ROUNDS} rounds of {CALLS} calls, the variants taking turns (the paired "
              "speedup: the median of each round's ratio to the original); rel. "
              "error of each output against the original's; the compiled model's compile time not counted.")
    text = latency_markdown(rows, header)
    (out / "latency.md").write_text(text)
    plot_latency(rows, out / "latency.png")
    print(text)
    print(f"wrote {out}/latency.csv, latency.md and latency.png")
    return 0


def results_folder(out: Optional[str], name: str) -> Path:
    """``--out`` as given, or a new folder ``<name>-<date>-<time>`` under ``$TRITON_BN_RESULTS_DIR`` (default
    ``~/triton_bn-results``): never inside the package's source, never an earlier run's."""
    if out:
        folder = Path(out)
    else:
        from .. import settings
        root = Path(settings.folder("TRITON_BN_RESULTS_DIR", str(Path.home() / "triton_bn-results")))
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        folder = root / f"{name}-{stamp}"
        suffix = 2
        while folder.exists():
            folder = root / f"{name}-{stamp}-{suffix}"
            suffix += 1
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty():  # a log file gets a line every tenth of the run instead of a live bar
        if done == total or done % max(1, total // 10) == 0:
            sys.stderr.write(f"[{done}/{total}] {label}\n")
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


# Seconds a CPU measurement takes (a row's providers and its copy timed in rounds for at least a quarter of a
# second each, the float64 reference, the setup), measured on this project's 2-core VM with nothing else
# running: the duration a run announces before its first measurement. A busy machine takes longer.
CPU_SECONDS_PER_ROW_PROVIDER = 0.45


def _expected_duration(rows: int, measurements: int, providers, mode: str, budget_s) -> str:
    """The line a run prints before its first measurement: how many, and (on a CPU) about how long."""
    text = f"{measurements} measurements ({rows} rows x {len(providers)} providers)"
    if mode == "cpu":
        # inductor compiles each row's function: ~10 s a row on two cores with its on-disk cache cold (a 156-row
        # run took 30 minutes), ~2 s with it warm (the same run again: 7 minutes)
        seconds = measurements * CPU_SECONDS_PER_ROW_PROVIDER + (10 if "torch_compile" in providers else 0) * rows
        text += (f"; about {seconds / 60:.1f} minutes on two quiet cores (more on a busy machine; add the native "
                 "kernels' build, a minute or two, the first time)" if seconds >= 90 else
                 f"; about {seconds:.0f} s on two quiet cores (more on a busy machine; add the native kernels' "
                 "build, a minute or two, the first time)")
    elif mode == "gpu":
        text += "; the first call of each kernel key compiles (and autotunes: TRITON_BN_AUTOTUNE=0 skips that)"
    if budget_s is not None:
        text += f"; stopping after {budget_s:g} s (--budget-s)"
    return text


def _time_ms(fn, on_gpu: bool):
    """(median, p20, p80) in ms. On the CPU: after one warm-up call, at least 5 calls and a quarter of a
    second (at most 50 calls)."""
    if on_gpu:
        import triton
        times = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="all")
    else:
        fn()
        times = []
        begin = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - begin < 0.25 and len(times) < 50):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def _time_cpu_interleaved(runs):
    """{name: sorted times} in ms for CPU workloads measured side by side: rounds alternate between them, so
    that a slow spell of a shared machine hits every provider (and the copy each row is measured against)
    alike. One warm-up call each, then at least 5 rounds and a quarter of a second per workload (at most 50
    rounds)."""
    samples = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    begin = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - begin < 0.25 * len(runs) and rounds < 50):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return {name: sorted(times) for name, times in samples.items()}


def measure_copy_gbps(device: str, on_gpu: bool, numel: Optional[int] = None, dtype=None) -> float:
    """Copy bandwidth (bytes read + written), the efficiency reference. On a GPU: one 1 GiB copy (L2 flushed
    by do_bench). On a CPU: ``numel`` elements of ``dtype`` (default 64 MiB of fp32, beyond the caches), the
    best of several copies with every thread, after the buffers were touched once: a row's efficiency is
    measured against a copy of its own size, which its data's cache residence favours alike."""
    import torch
    dtype = dtype or torch.float32
    if on_gpu:
        numel = numel or (256 << 20)
        src = torch.randn(numel, device=device).to(dtype)
        dst = torch.empty_like(src)
        ms, _, _ = _time_ms(lambda: dst.copy_(src), on_gpu)
    else:
        numel = numel or (16 << 20)
        src = torch.randn(numel).to(dtype)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best, began, count = float("inf"), time.perf_counter(), 0
        while count < 10 or (time.perf_counter() - began < 0.2 and count < 400):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
            count += 1
        ms = best * 1e3
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


COPY = "copy of the row's size"  # the workload a CPU row's efficiency is measured against, timed beside it


def row_copy(numel: int, dtype):
    """(a copy of ``numel`` elements of ``dtype``, its bytes read + written): on a CPU the efficiency reference
    of a row, timed in the same rounds as the row's providers, so that both see the same load and caches. It
    copies into a new tensor each call, as every provider writes its output into a new one: with freed memory
    kept (heap.py), each lands where the last workload's output was freed, still warm in the caches. Copying
    into one standing buffer instead, cold by then, made the copy slower than our eval rows (32x64x56x56 fp32:
    1.8 ms against 1.4-1.5), a floor that was no floor."""
    import torch
    src = torch.randn(numel).to(dtype)
    return (lambda: src.clone()), 2 * src.numel() * src.element_size()


def run_bench(args) -> int:
    import torch
    import triton_bn
    from triton_bn.autotune import tuner
    from . import cases as C
    from . import report

    on_gpu = _uses_gpu(args)
    device = "cuda" if on_gpu else "cpu"
    heap_note = None  # what the CPU run did to malloc (heap.py)
    split = lambda s: [v for v in s.split(",") if v] if s else None  # noqa: E731
    if on_gpu:
        sets = split(args.sets) or list(C.QUICK_SETS)
        combos = ([("fp32", "nchw"), ("bf16", "channels_last")] if args.quick else
                  [(d, l) for d in C.GPU_DTYPES for l in C.LAYOUTS])
        providers = split(args.providers) or list(C.PROVIDERS)
        gpu_name = torch.cuda.get_device_name()
        mode = "gpu"
    elif args.interpreter:
        sets = split(args.sets) or ["tiny"]
        combos = [("fp32", "nchw"), ("fp32", "channels_last")]
        providers = split(args.providers) or ["triton_bn", "eager_native", "torch_compile"]
        gpu_name = "cpu-interpreter"
        mode = "interpreter"
        print("Interpreter run: tiny shapes through the Triton interpreter. These timings are interpreter "
              "timings, NOT figures; use them only to check that the kernels and the tool work.")
    else:
        sets = split(args.sets) or (["cpu_quick"] if args.quick else list(C.CPU_SETS))
        combos = ([("fp32", "nchw"), ("fp32", "channels_last")] if args.quick else
                  [("fp32", "nchw"), ("fp32", "channels_last"), ("bf16", "channels_last")])
        providers = split(args.providers) or ["triton_bn", "eager_native"]
        gpu_name = "cpu-" + _cpu_name()
        mode = "cpu"
        print(f"CPU run ({_cpu_name()}, {torch.get_num_threads()} threads): triton_bn's CPU path against PyTorch's "
              "own CPU batch norm. These are CPU figures, not GPU figures.")
        heap_note = None if args.page_faults else keep_freed_memory()
        print(f"heap: {heap_note or 'malloc as it is (a large output may fault in fresh pages on some calls)'}")
    if args.dtypes or args.layouts:
        dtypes = split(args.dtypes) or sorted({d for d, _ in combos})
        layouts = split(args.layouts) or sorted({l for _, l in combos})
        combos = [(d, l) for d in dtypes for l in layouts]
    case_names = split(args.cases) or list(C.DEFAULT_CASES)
    for kind, asked, valid in (("provider", providers, C.PROVIDERS), ("case", case_names, C.CASES),
                               ("shape set", sets, C.SHAPE_SETS), ("dtype", [d for d, _ in combos], C.DTYPES),
                               ("layout", [l for _, l in combos], C.LAYOUTS)):
        unknown = sorted({name for name in asked if name not in valid})
        if unknown:
            raise SystemExit(f"triton-bn bench: unknown {kind} {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not on_gpu:
        for provider in [p for p in providers if p in C.GPU_ONLY_PROVIDERS]:
            print(f"  {provider} needs CUDA: not measured on the CPU")
            providers.remove(provider)
    # --quick compiles the anchor once per case with dynamic shapes (bounded compile time); the full run
    # compiles every shape statically, as a user with one fixed shape would
    compile_dynamic = True if args.quick else False
    tuner.max_candidates = args.tune_candidates or (4 if args.quick else tuner.max_candidates)
    import torch._dynamo
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):  # never let the anchor fall back to eager silently
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 512))

    stamp = datetime.date.today().isoformat()
    out = results_folder(args.out, _safe(gpu_name))

    copy_gbps = measure_copy_gbps(device, on_gpu)
    print(f"device: {gpu_name}" + ("" if on_gpu else f" ({torch.backends.cpu.get_cpu_capability()})")
          + f"; torch {torch.__version__}; triton_bn {triton_bn.__version__}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s" + ("" if on_gpu else " (a large buffer; each row's efficiency "
                                                     "uses a copy of its own size)") + f"; writing to {out}")
    jobs = []
    # case-major, the cases the targets name first: a run cut short by --budget-s still holds them
    for case in sorted(case_names, key=C.CASE_PRIORITY.index):
        for set_name in sets:
            if set_name == "latency" and case not in C.LATENCY_CASES:
                continue
            for shape in C.SHAPE_SETS[set_name]:
                for dtype_name, layout in combos:
                    if layout == "channels_last" and len(shape) != 4:
                        if (dtype_name, "nchw") in combos:
                            continue  # (N, C) has one layout: measure it once
                    jobs.append((case, shape, dtype_name, layout, set_name))

    rows = []
    graph_variants = [p for p in C.GRAPH_PROVIDERS if p in providers] if on_gpu else []
    graphed_set = lambda set_name: set_name == "latency" or args.graphs  # noqa: E731
    total = sum(len(providers) + (len(graph_variants) if graphed_set(job[4]) else 0) for job in jobs)
    done = 0
    print(_expected_duration(len(jobs), total, providers, mode, args.budget_s), flush=True)
    started = time.perf_counter()
    skipped = []
    for case, shape, dtype_name, layout, set_name in jobs:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped.append(f"{case} {'x'.join(map(str, shape))} {dtype_name} {layout}")
            continue
        dtype = C.DTYPES[dtype_name]
        shape_text = "x".join(map(str, shape))
        try:
            reference_output = C.build(case, C.REFERENCE, shape, dtype, layout, device).output()
        except Exception as exc:  # no float64 on this device: the errors are then not reported
            print(f"\n  the float64 reference failed on {case} {shape_text} {dtype_name} {layout}: {exc}")
            reference_output = None
        results = {}
        variants = [(p, False) for p in providers]
        if graphed_set(set_name):
            variants += [(p, True) for p in graph_variants]
        for provider, graphed in variants:
            name = provider + ("+cudagraph" if graphed else "")
            left = (time.perf_counter() - started) / done * (total - done) if done else None
            _progress(done, total, f"{case} {shape_text} {dtype_name} {layout} {name}"
                      + (f", ~{left:.0f} s left" if left is not None else ""))
            try:
                work = C.build(case, provider, shape, dtype, layout, device, compile_dynamic=compile_dynamic,
                               cuda_graph=graphed)
                output = work.output()
                results[name] = (work, output)
            except Exception as exc:  # a provider that can not run this case is reported, not fatal
                print(f"\n  {name} failed on {case} {shape_text} {dtype_name} {layout}: {exc}")
            done += 1
        timings, row_copy_gbps = {}, copy_gbps
        if not on_gpu:  # a shape's data may sit in the caches: its efficiency is against a copy of the same size,
            copy, copy_bytes = row_copy(math.prod(shape), dtype)  # timed in the same rounds (the same load)
            samples = _time_cpu_interleaved({**{name: work.run for name, (work, _) in results.items()}, COPY: copy})
            row_copy_gbps = copy_bytes / (samples.pop(COPY)[0] * 1e-3) / 1e9  # its best round
            timings = {name: quantiles(times) for name, times in samples.items()}
        for provider, (work, output) in results.items():
            try:
                ms, p20, p80 = _time_ms(work.run, on_gpu) if on_gpu else timings[provider]
            except Exception as exc:
                print(f"\n  {provider} failed to time {case} {shape_text}: {exc}")
                continue
            rel_err = float("nan")
            if reference_output is not None:  # the worst of y, the gradients and the running statistics
                rel_err = C.worst_relative_error(output, reference_output)
            row = dict(case=case, shape=shape_text, dtype=dtype_name, layout=layout, provider=provider,
                       ms=ms, ms_p20=p20, ms_p80=p80, bytes=C.minimal_bytes(case, shape, dtype),
                       gbps=C.minimal_bytes(case, shape, dtype) / (ms * 1e-3) / 1e9,
                       efficiency=C.efficiency(case, shape, dtype, ms, row_copy_gbps), rel_err=rel_err,
                       device=gpu_name, mode=mode)
            rows.append(dict(row, noise=report.noise_of(row)))
        if rows:  # after every job, so that a run killed from outside still leaves what it measured
            report.write_csv(rows, out / "results.csv")
    _progress(total, total, "done")
    if not rows:
        print(f"triton-bn bench: nothing was measured ({len(skipped)} measurements skipped by --budget-s)")
        return 1
    report.add_speedups(rows, sorted({row["provider"] for row in rows}))
    frame = report.write_csv(rows, out / "results.csv")
    header = (f"# triton-bn bench: {gpu_name}, {stamp}\n\n"
              f"torch {torch.__version__}, triton {__import__('triton').__version__}, python {platform.python_version()}; "
              + ("" if on_gpu else f"PyTorch's CPU kernels for {torch.backends.cpu.get_cpu_capability()}; ")
              + f"copy bandwidth {copy_gbps:.1f} GB/s (read + write{'' if on_gpu else ', a 64 MiB buffer; each row uses a copy of its own size, timed in the same rounds'}); efficiency = minimal bytes / copy bandwidth / time; "
              "rel err = the worst relative error of y, the gradients and the updated running statistics against "
              "PyTorch in float64 on the same inputs."
              + _mode_note(mode)
              + (f" Heap: {heap_note}." if heap_note else "")
              + (f"\n\n**Cut short by --budget-s {args.budget_s:g}: {len(skipped)} of {len(jobs)} measurements "
                 f"not run:** " + "; ".join(skipped) if skipped else ""))
    (out / "summary.md").write_text(report.summary_markdown(frame, header))
    report.write_plots(frame, out)
    report.write_autotune_report(tuner.report, out)
    print(f"wrote {out}/results.csv, summary.md, autotune.md/.csv and {len(list(out.glob('*.png')))} plots")
    print("\ntriton_bn against the fastest anchor of each row (> 1: faster):")
    for line in report.headline(frame):
        print("  " + line)
    for line in report.noise_lines(frame):
        print(line)
    return 0
