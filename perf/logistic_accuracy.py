"""How far the native CPU kernels' fp32 SiLU and sigmoid (and PyTorch's own) lie from the exact values, in fp32 ulp.

    python perf/logistic_accuracy.py [--stride 16] [--limit 20]

Takes every ``stride``-th fp32 value z with |z| <= ``limit`` (both signs; stride 1 is every one, 2.2e9 values),
runs each through the native kernels' eval call (mean 0, variance 1, eps 0, no affine: y = act(z) exactly as the
fused kernel computes it, csrc/cpu/kernels.h's exp_vec and logistic_vec) and through PyTorch's own fp32 silu and
sigmoid, and measures both against float64: the largest error in ulp of the exact value (the spacing of fp32 there,
its smallest normal's below it), the share of values more than 2 ulp off, and the share where the two disagree.
Prints a Markdown table. The bound the suite asserts is far wider (1e-5 relative: about 84 ulp); this is what
kernels.h's choice of exp costs against PyTorch's.
"""
import argparse
import sys

import torch

from triton_bn.activations import ACTIVATION_IDS
from triton_bn.backends import native_cpu

CHUNK = 1 << 23  # values per call: 32 MiB of fp32, 64 MiB of float64 reference
EXACT = {"silu": lambda z: z / (1 + torch.exp(-z)), "sigmoid": lambda z: 1 / (1 + torch.exp(-z))}
PYTORCH = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}


def fp32_values(stride: int, limit: float):
    """Every ``stride``-th non-negative fp32 bit pattern up to ``limit``, then their negatives, in chunks."""
    top = int(torch.tensor(limit, dtype=torch.float32).view(torch.int32))
    for start in range(0, top + 1, CHUNK * stride):
        bits = torch.arange(start, min(start + CHUNK * stride, top + 1), stride, dtype=torch.int32)
        positive = bits.view(torch.float32)
        yield positive
        yield -positive


def ulp_error(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of fp32's spacing at the exact value (subnormal spacing below the smallest normal)."""
    tiny = torch.finfo(torch.float32).tiny
    _, exponent = torch.frexp(exact.abs().clamp_min(tiny))
    spacing = torch.ldexp(torch.ones_like(exact), exponent.to(torch.float64) - 24)
    return (got.double() - exact).abs() / spacing


def measure(activation: str, stride: int, limit: float, ops):
    one, zero = torch.ones(1), torch.zeros(1)
    worst = {"native": (0.0, 0.0), "pytorch": (0.0, 0.0)}
    over_two = {"native": 0, "pytorch": 0}
    count = disagree = 0
    for z in fp32_values(stride, limit):
        x = z.reshape(-1, 1)  # rows of one channel: the vector lines (a plane would be the same arithmetic)
        native = ops.apply(x, zero, None, one, None, None, None, 0.0, ACTIVATION_IDS[activation], 0.0).reshape(-1)
        pytorch = PYTORCH[activation](z)
        exact = EXACT[activation](z.double())
        normal = exact.abs() >= torch.finfo(torch.float32).tiny  # subnormal results: both flush or round alike
        count += int(normal.sum())
        disagree += int((native != pytorch)[normal].sum())
        for name, got in (("native", native), ("pytorch", pytorch)):
            error = ulp_error(got[normal], exact[normal])
            if error.numel():
                at = int(torch.argmax(error))
                if float(error[at]) > worst[name][0]:
                    worst[name] = (float(error[at]), float(z[normal][at]))
                over_two[name] += int((error > 2).sum())
    return count, worst, over_two, disagree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=16, help="take every STRIDE-th fp32 value (1: all of them)")
    parser.add_argument("--limit", type=float, default=20.0, help="largest |z|")
    args = parser.parse_args(argv)
    if args.stride < 1 or not 0 < args.limit < float("inf"):
        parser.error("--stride must be >= 1 and --limit a positive finite number")
    ops = native_cpu.ops()
    if ops is None:
        print("the native CPU kernels are not available here: nothing to measure", file=sys.stderr)
        return 1
    print(f"every {args.stride}th fp32 value with |z| <= {args.limit:g}; vector ISA {native_cpu.vector_isa()}; "
          f"torch {torch.__version__}; {torch.get_num_threads()} threads\n")
    print("| activation | values | native: max ulp (at z) | native: > 2 ulp | PyTorch: max ulp (at z) "
          "| PyTorch: > 2 ulp | native != PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for activation in ("silu", "sigmoid"):
        count, worst, over_two, disagree = measure(activation, args.stride, args.limit, ops)
        cells = [f"{worst[name][0]:.2f} ({worst[name][1]:.6g}) | {100 * over_two[name] / count:.4f}%"
                 for name in ("native", "pytorch")]
        print(f"| {activation} | {count:,} | {cells[0]} | {cells[1]} | {100 * disagree / count:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
