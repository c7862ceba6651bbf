"""``triton-bn bench``: measure triton_bn against eager PyTorch (cuDNN on and off) and torch.compile.

On a GPU it times with ``triton.testing.do_bench`` (median of many runs, L2 flushed between them). On a
machine without a GPU it re-runs itself under the Triton interpreter with tiny shapes: the files are
the same, but those timings are interpreter timings and say nothing about GPU speed.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(prog="triton-bn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark and write CSV, markdown, plots, autotune report")
    bench.add_argument("--quick", action="store_true", help="fp32 NCHW + bf16 channels_last, one pass of each set")
    bench.add_argument("--sets", default=None, help="comma-separated shape sets (resnet50,small,bn1d,latency,tiny)")
    bench.add_argument("--cases", default=None, help="comma-separated cases (default: all)")
    bench.add_argument("--providers", default=None, help="comma-separated providers (default: all available)")
    bench.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16")
    bench.add_argument("--layouts", default=None, help="comma-separated: nchw,channels_last")
    bench.add_argument("--out", default=None, help="output folder (default perf/results/<gpu>-<date>)")
    bench.add_argument("--tune-candidates", type=int, default=None,
                       help="autotune at most this many configurations per kernel key (default: all; --quick: 4)")
    bench.add_argument("--model", default=None, choices=["resnet50", "tiny"],
                       help="time whole training steps of this model (original vs converted) instead of layers")
    bench.add_argument("--precisions", default="bf16,fp32",
                       help="--model: comma-separated, bf16 (autocast, channels_last) and/or fp32 (NCHW)")
    bench.add_argument("--batch", type=int, default=None, help="--model: batch size (default: the model's)")
    bench.add_argument("--steps", type=int, default=20, help="--model: timed steps per variant (median)")
    bench.add_argument("--compile", action="store_true",
                       help="--model: also time torch.compile of the original and of the converted model")
    bench.add_argument("--graphs", action="store_true",
                       help="also time triton_bn and eager cuDNN replayed from a CUDA graph on every set (GPU time "
                            "without the host's launch work; the latency set always gets these)")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="stop starting new measurements after this many seconds and write what was measured "
                            "(jobs run in priority order: the target cases first)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before triton is imported: start again with it switched on.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "triton_bn", *argv], env)
    args = _parse(argv)
    return run_model(args) if args.model else run_bench(args)


def run_model(args) -> int:
    """``--model``: whole training steps; writes model.csv and model.md."""
    import torch
    import pandas as pd
    from .model import model_markdown, run_model_bench
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    precisions = [p for p in args.precisions.split(",") if p]
    if not on_gpu:
        print("No GPU: the model runs through the Triton interpreter. These timings are interpreter timings, "
              "NOT GPU figures; use them only to check that the tool and its files work.")
        if args.model != "tiny":
            raise SystemExit("triton-bn bench --model: without a GPU only --model tiny is practical")
    rows = run_model_bench(args.model, precisions, args.batch, args.steps, args.compile, device,
                           progress=lambda text: _progress(0, 1, text))
    gpu_name = torch.cuda.get_device_name() if on_gpu else "cpu-interpreter"
    stamp = datetime.date.today().isoformat()
    safe_gpu = "".join(ch if ch.isalnum() else "-" for ch in gpu_name).strip("-").lower()
    out = Path(args.out or Path("perf") / "results" / f"{safe_gpu}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "model.csv", index=False)
    header = (f"# triton-bn bench --model {args.model}: {gpu_name}, {stamp}\n\n"
              f"torch {torch.__version__}, triton {__import__('triton').__version__}; a step = forward, "
              f"cross-entropy, backward, SGD; median of {args.steps} steps after two warm-up steps; triton_bn "
              f"autotuning {'off (heuristic tiles)' if os.environ.get('TRITON_BN_AUTOTUNE') == '0' else 'on'}."
              + ("" if on_gpu else "\n\n**Interpreter run: these are CPU interpreter timings, not GPU figures.**"))
    text = model_markdown(rows, header)
    (out / "model.md").write_text(text)
    print(text)
    print(f"wrote {out}/model.csv and model.md")
    return 0


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


def _time_ms(fn, on_gpu: bool):
    """(median, p20, p80) in ms."""
    if on_gpu:
        import triton
        times = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="all")
    else:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def measure_copy_gbps(device: str, on_gpu: bool) -> float:
    """Device-to-device copy bandwidth (bytes read + written), the efficiency reference of this run."""
    import torch
    numel = (256 << 20) if on_gpu else (4 << 20)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = _time_ms(lambda: dst.copy_(src), on_gpu)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def run_bench(args) -> int:
    import torch
    import triton_bn
    from triton_bn.autotune import tuner
    from . import cases as C
    from . import report

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    split = lambda s: [v for v in s.split(",") if v] if s else None  # noqa: E731
    if on_gpu:
        sets = split(args.sets) or list(C.QUICK_SETS)
        combos = ([("fp32", "nchw"), ("bf16", "channels_last")] if args.quick else
                  [(d, l) for d in C.DTYPES for l in C.LAYOUTS])
        providers = split(args.providers) or list(C.PROVIDERS)
        gpu_name = torch.cuda.get_device_name()
        mode = "gpu"
    else:
        sets = split(args.sets) or ["tiny"]
        combos = [("fp32", "nchw"), ("fp32", "channels_last")]
        providers = split(args.providers) or ["triton_bn", "eager_native", "torch_compile"]
        gpu_name = "cpu-interpreter"
        mode = "interpreter"
        print("No GPU: running tiny shapes through the Triton interpreter. These timings are interpreter "
              "timings, NOT GPU figures; use them only to check that the tool and its files work.")
    if args.dtypes or args.layouts:
        dtypes = split(args.dtypes) or sorted({d for d, _ in combos})
        layouts = split(args.layouts) or sorted({l for _, l in combos})
        combos = [(d, l) for d in dtypes for l in layouts]
    case_names = split(args.cases) or list(C.CASES)
    unknown = [p for p in providers if p not in C.PROVIDERS] + [c for c in case_names if c not in C.CASES]
    if unknown:
        raise SystemExit(f"triton-bn bench: unknown provider/case {unknown}")
    if not on_gpu and "eager_cudnn" in providers:
        providers.remove("eager_cudnn")  # cuDNN is a CUDA library
    # --quick compiles the anchor once per case with dynamic shapes (bounded compile time); the full run
    # compiles every shape statically, as a user with one fixed shape would
    compile_dynamic = True if args.quick else False
    tuner.max_candidates = args.tune_candidates or (4 if args.quick else tuner.max_candidates)
    import torch._dynamo
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):  # never let the anchor fall back to eager silently
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 512))

    stamp = datetime.date.today().isoformat()
    safe_gpu = "".join(ch if ch.isalnum() else "-" for ch in gpu_name).strip("-").lower()
    out = Path(args.out or Path("perf") / "results" / f"{safe_gpu}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)

    copy_gbps = measure_copy_gbps(device, on_gpu)
    print(f"device: {gpu_name}; torch {torch.__version__}; triton_bn {triton_bn.__version__}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s")
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
    started = time.perf_counter()
    skipped = []
    for case, shape, dtype_name, layout, set_name in jobs:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped.append(f"{case} {'x'.join(map(str, shape))} {dtype_name} {layout}")
            continue
        dtype = C.DTYPES[dtype_name]
        shape_text = "x".join(map(str, shape))
        reference_output = None
        results = {}
        variants = [(p, False) for p in providers]
        if graphed_set(set_name):
            variants += [(p, True) for p in graph_variants]
        for provider, graphed in variants:
            name = provider + ("+cudagraph" if graphed else "")
            _progress(done, total, f"{case} {shape_text} {dtype_name} {layout} {name}")
            try:
                work = C.build(case, provider, shape, dtype, layout, device, compile_dynamic=compile_dynamic,
                               cuda_graph=graphed)
                output = work.output()
                if provider in ("eager_cudnn",) or (reference_output is None and provider.startswith("eager")):
                    reference_output = output.float()
                results[name] = (work, output)
            except Exception as exc:  # a provider that can not run this case is reported, not fatal
                print(f"\n  {name} failed on {case} {shape_text} {dtype_name} {layout}: {exc}")
            done += 1
        for provider, (work, output) in results.items():
            try:
                ms, p20, p80 = _time_ms(work.run, on_gpu)
            except Exception as exc:
                print(f"\n  {provider} failed to time {case} {shape_text}: {exc}")
                continue
            rel_err = float("nan")
            if reference_output is not None:
                rel_err = ((output.float() - reference_output).norm() / reference_output.norm().clamp_min(1e-30)).item()
            rows.append(dict(case=case, shape=shape_text, dtype=dtype_name, layout=layout, provider=provider,
                             ms=ms, ms_p20=p20, ms_p80=p80, bytes=C.minimal_bytes(case, shape, dtype),
                             gbps=C.minimal_bytes(case, shape, dtype) / (ms * 1e-3) / 1e9,
                             efficiency=C.efficiency(case, shape, dtype, ms, copy_gbps), rel_err=rel_err,
                             device=gpu_name, mode=mode))
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
              f"copy bandwidth {copy_gbps:.1f} GB/s (read + write); efficiency = minimal bytes / copy bandwidth / time."
              + ("\n\n**Interpreter run: these are CPU interpreter timings, not GPU figures.**" if mode != "gpu" else "")
              + (f"\n\n**Cut short by --budget-s {args.budget_s:g}: {len(skipped)} of {len(jobs)} measurements "
                 f"not run:** " + "; ".join(skipped) if skipped else ""))
    (out / "summary.md").write_text(report.summary_markdown(frame, header))
    report.write_plots(frame, out)
    report.write_autotune_report(tuner.report, out)
    print(f"wrote {out}/results.csv, summary.md, autotune.md/.csv and {len(list(out.glob('*.png')))} plots")
    return 0
