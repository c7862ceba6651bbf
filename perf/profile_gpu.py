"""Where the time of one call goes on a GPU: host time, GPU time, each kernel's time, and the Python
functions that cost the host most. Run from the repository root on the GPU machine:

    OUT=/some/folder PYTHONPATH=. python3 perf/profile_gpu.py

For each case it prints one row: the call timed as ``triton-bn bench`` times it (``do_bench``, L2
flushed), the same call replayed from a CUDA graph (GPU time alone: no Python between kernels), and the
host's time per call when nothing waits for the GPU. Where the first is far above the second, the host
is the bottleneck. It also writes, under $OUT: ``kernels.txt`` (torch.profiler's per-kernel GPU times for
every case), ``host_profile.txt`` (cProfile of the Python path, sorted by own time), ``profile.csv`` and
``module_host.txt`` (a whole module's host time per call against PyTorch's modules, and the kernels
one training forward launches).
"""
import cProfile
import io
import os
import pstats
import time

import torch
import triton
import triton.language as tl

from triton_bn.autotune import tuner
from triton_bn.bench import cases as C

OUT = os.environ.get("OUT", "/tmp/triton-bn-profile")

CASES = [  # (case, shape, dtype, layout)
    ("train_fwd_relu", (32, 64, 56, 56), "fp32", "nchw"),
    ("train_fwd_relu", (8192, 1024), "bf16", "nchw"),
    ("train_fwd_relu", (128, 256, 56, 56), "fp32", "nchw"),
    ("train_fwd", (128, 256, 56, 56), "fp32", "nchw"),
    ("train_fwd_relu", (128, 1024, 14, 14), "fp32", "nchw"),
    ("train_fwd", (128, 64, 112, 112), "bf16", "channels_last"),
    ("train_fwdbwd_relu", (128, 1024, 14, 14), "bf16", "channels_last"),
    ("train_fwdbwd_relu", (32, 64, 56, 56), "fp32", "nchw"),
    ("eval_fwd_relu", (128, 1024, 14, 14), "bf16", "channels_last"),
    ("eval_fwd", (1, 64, 56, 56), "fp32", "nchw"),
]


@triton.jit
def _store_zero(ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n)


def host_us_per_call(fn, calls: int = 50) -> float:
    """Host time per call with the GPU never in the way (few enough calls not to fill the launch queue)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def module_rows(device: str = "cuda", calls: int = 200):
    """Host time per call of a whole module against PyTorch's, on a layer small enough that the host
    decides (16x64x14x14): training forward, eval forward (both under no_grad) and a training forward +
    backward, triton_bn with its direct launches (``triton_launch.DIRECT_LAUNCH``), with every launch through
    Triton's ``JITFunction`` and through the C++ launch path (``cpp_launch.ACTIVE``, docs/launch.md; where it
    builds here), side by side, alternating; and the kernels one triton_bn training forward
    launches: the module counts the batch in its apply launch, so two kernels and no ``add``
    (nn.BatchNorm launches an ``add_`` for ``num_batches_tracked``). Returns (text lines, kernel names)."""
    import triton_bn
    from triton_bn.backends import triton_launch, cpp_launch
    cpp_available = cpp_launch.ops() is not None  # builds the C++ path here on first use (a warning where it can not)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(16, 64, 14, 14, device=device)
    grad = torch.randn_like(x)
    ours = triton_bn.BatchNorm2d(64, activation="relu").to(device)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU()).to(device)

    def forward(module):
        with torch.no_grad():
            module(x)

    def forward_backward(module):
        module(x.detach().requires_grad_()).backward(grad)

    def per_call(module, direct, call, cpp=False):
        triton_launch.DIRECT_LAUNCH = direct
        with cpp_launch.switched(cpp):
            call(module)  # compile, tune, learn the direct variants (or write the C++ path's plans)
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                call(module)
            elapsed = time.perf_counter() - start
            sync()
        return elapsed / calls * 1e6

    lines = []
    for name, training, call in (("training forward (no_grad)", True, forward), ("eval forward (no_grad)", False,
                                                                                  forward),
                                 ("training forward + backward", True, forward_backward)):
        ours.train(training)
        theirs.train(training)
        direct, through_triton, cpp, torch_us = [], [], [], []
        for _ in range(5):  # alternating rounds, medians
            direct.append(per_call(ours, True, call))
            through_triton.append(per_call(ours, False, call))
            if cpp_available:
                cpp.append(per_call(ours, True, call, cpp=True))
            torch_us.append(per_call(theirs, True, call))
        d, t, p = (sorted(v)[2] for v in (direct, through_triton, torch_us))
        via_cpp = f", C++ launch path {sorted(cpp)[2]:.1f} us ({sorted(cpp)[2] / p:.2f}x)" if cpp else \
            ", C++ launch path not built here"
        lines.append(f"{name}, 16x64x14x14 fp32: triton_bn {d:.1f} us (through JITFunction.run {t:.1f} us), "
                     f"nn.Sequential(BatchNorm2d, ReLU) {p:.1f} us, ratio {d / p:.2f}x ({t / p:.2f}x){via_cpp}")
    triton_launch.DIRECT_LAUNCH = True
    ours.train()
    activities = [torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        ours(x)
        sync()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    lines.append(f"kernels of one training forward: {len(kernels)}: {kernels}")
    return lines, kernels


def main():
    os.makedirs(OUT, exist_ok=True)
    tuner.max_candidates = 4  # as `triton-bn bench --quick`
    buf = torch.empty(16, device="cuda")
    compiled = _store_zero[(1,)](buf, 16, BLOCK=16)
    launch_us = host_us_per_call(lambda: _store_zero[(1,)](buf, 16, BLOCK=16), calls=500)
    runner = compiled[(1, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream
    direct_us = host_us_per_call(lambda: runner(buf, 16, 16, stream=stream), calls=500)
    print(f"bare triton launch (one tiny kernel), host: {launch_us:.1f} us; the compiled kernel called directly "
          f"(CompiledKernel[grid]): {direct_us:.1f} us")
    lines, _ = module_rows()  # first: a few seconds, and written even if the time limit cuts the rest
    with open(os.path.join(OUT, "module_host.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    rows, kernel_tables = [], []
    for case, shape, dtype_name, layout in CASES:
        for provider in ("triton_bn", "eager_cudnn"):
            work = C.build(case, provider, shape, C.DTYPES[dtype_name], layout, "cuda")
            work.run()  # compile, tune
            bench_ms = triton.testing.do_bench(work.run, warmup=10, rep=40, return_mode="median")
            host = host_us_per_call(work.run)
            graphed = C.build(case, provider, shape, C.DTYPES[dtype_name], layout, "cuda", cuda_graph=True)
            graph_ms = triton.testing.do_bench(graphed.run, warmup=10, rep=40, return_mode="median")
            rows.append((case, "x".join(map(str, shape)), dtype_name, layout, provider, bench_ms * 1e3,
                         graph_ms * 1e3, host))
            if provider == "triton_bn":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        work.run()
                    torch.cuda.synchronize()
                kernel_tables.append(f"## {case} {shape} {dtype_name} {layout} (5 calls)\n"
                                     + prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    with open(os.path.join(OUT, "kernels.txt"), "w") as f:
        f.write(f"bare triton launch, host: {launch_us:.1f} us; called directly: {direct_us:.1f} us\n\n"
                + "\n\n".join(kernel_tables))
    with open(os.path.join(OUT, "profile.csv"), "w") as f:
        f.write("case,shape,dtype,layout,provider,bench_us,graph_us,host_us\n")
        for r in rows:
            f.write(",".join(map(str, r[:5])) + f",{r[5]:.1f},{r[6]:.1f},{r[7]:.1f}\n")

    # the Python path of a small training step, where the host dominates
    profiles = []
    for dtype_name, layout in (("fp32", "nchw"), ("bf16", "channels_last")):
        work = C.build("train_fwdbwd_relu", "triton_bn", (32, 64, 56, 56), C.DTYPES[dtype_name], layout, "cuda")
        work.run()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            work.run()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
        profiles.append(f"## train_fwdbwd_relu 32x64x56x56 {dtype_name} {layout}, 200 calls\n{text.getvalue()}")
    with open(os.path.join(OUT, "host_profile.txt"), "w") as f:
        f.write("\n\n".join(profiles))

    print(f"{'case':<20}{'shape':<16}{'dtype':<6}{'layout':<14}{'provider':<13}{'bench us':>9}{'graph us':>9}"
          f"{'host us':>9}")
    for r in rows:
        print(f"{r[0]:<20}{r[1]:<16}{r[2]:<6}{r[3]:<14}{r[4]:<13}{r[5]:9.1f}{r[6]:9.1f}{r[7]:9.1f}")


if __name__ == "__main__":
    main()
