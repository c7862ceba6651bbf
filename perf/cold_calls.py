"""Host time of one eval call with the caches cold: a 64 MiB copy between calls (what the bench's rounds do
to the interpreter's caches), rounds interleaving PyTorch's module and function, triton_bn's, and the native
op alone, on the native CPU path (run without TRITON_INTERPRET). Diagnostic, not a benchmark
(perf/NOTES.md, "The known eval call"); the figures move with the host's load: read them side by side.

    python perf/cold_calls.py 2x64x8x8 [channels_last] [rounds]
"""
import statistics
import sys
import time

import torch

import triton_bn
from triton_bn.backends import native_cpu


def main(argv):
    shape = tuple(int(s) for s in (argv[0] if argv else "2x64x8x8").split("x"))
    x = torch.randn(shape)
    if len(argv) > 1 and argv[1] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rounds = int(argv[2]) if len(argv) > 2 else 300
    channels = shape[1]
    reference = torch.nn.BatchNorm2d(channels).eval()
    ours = triton_bn.BatchNorm2d(channels).eval()
    rm, rv, w, b = reference.running_mean, reference.running_var, reference.weight.detach(), reference.bias.detach()
    op = native_cpu.ops().apply
    calls = {
        "nn.BatchNorm2d": lambda: reference(x),
        "F.batch_norm": lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
        "triton_bn.BatchNorm2d": lambda: ours(x),
        "triton_bn.batch_norm": lambda: triton_bn.batch_norm(x, rm, rv, w, b, False),
        "the native op alone": lambda: op(x, rm, None, rv, w, b, None, 1e-5, 0, 0.01),
    }
    source, target = torch.empty(16 << 20), torch.empty(16 << 20)
    times = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(rounds):
            for name, call in calls.items():
                target.copy_(source)
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    print(f"{'x'.join(map(str, shape))} {'channels_last' if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else 'contiguous'}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds")
    for name, values in times.items():
        values.sort()
        print(f"{name:24s} p20 {values[len(values) // 5] * 1e6:8.1f} us   median {statistics.median(values) * 1e6:8.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:])
