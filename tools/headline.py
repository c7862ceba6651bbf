"""Draw the README's picture from two committed bench runs (nothing is measured here):

- left, the GPU: efficiency (share of copy bandwidth) of a training forward + backward of BN + ReLU on
  ResNet-50's layers at batch 128, triton_bn against eager cuDNN and torch.compile, fp32 NCHW and bf16
  channels_last (``perf/results/nvidia-h100-80gb-hbm3-2026-11-27-run9/``, ``perf/gpu_check.sh``);
- right, the CPU: triton_bn's speedup over PyTorch's CPU batch norm per case, geomean over the shapes of each
  dtype and layout (``perf/results/cpu-amd-epyc-2026-12-03-lanes/``, ``triton-bn bench --device cpu --dtypes
  fp32,bf16,fp16,fp64``).

    python tools/headline.py                       # writes docs/headline.png
    python tools/headline.py --out /tmp/h.png
"""
import argparse
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_RUN = os.path.join(ROOT, "perf", "results", "nvidia-h100-80gb-hbm3-2026-11-27-run9", "results.csv")
CPU_RUN = os.path.join(ROOT, "perf", "results", "cpu-amd-epyc-2026-12-03-lanes", "results.csv")
GPU_SHAPES = ["128x64x112x112", "128x256x56x56", "128x512x28x28", "128x1024x14x14", "128x2048x7x7"]
GPU_PROVIDERS = {"triton_bn+cudagraph": "triton_bn", "eager_cudnn+cudagraph": "cuDNN", "torch_compile": "torch.compile"}
CPU_CASES = {"eval_fwd_relu": "eval BN+ReLU", "train_fwd_relu": "train fwd BN+ReLU",
             "train_fwdbwd_relu": "train fwd+bwd BN+ReLU", "train_add_relu_fwdbwd": "BN+add+ReLU fwd+bwd",
             "train_fwdbwd": "train fwd+bwd, plain"}


def geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values))


def draw(out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    gpu, cpu = pd.read_csv(GPU_RUN), pd.read_csv(CPU_RUN)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, (dtype, layout) in zip(axes[:2], [("fp32", "nchw"), ("bf16", "channels_last")]):
        rows = gpu[(gpu["case"] == "train_fwdbwd_relu") & (gpu["dtype"] == dtype) & (gpu["layout"] == layout)]
        width = 0.8 / len(GPU_PROVIDERS)
        for i, (provider, label) in enumerate(GPU_PROVIDERS.items()):
            mine = rows[rows["provider"] == provider].set_index("shape").reindex(GPU_SHAPES)
            ax.bar([x + i * width for x in range(len(GPU_SHAPES))], mine["efficiency"], width, label=label)
        ax.set_xticks([x + width for x in range(len(GPU_SHAPES))])
        ax.set_xticklabels([s.split("x", 1)[1] for s in GPU_SHAPES], fontsize=7)
        ax.set_ylim(0, 0.8)
        ax.set_ylabel("share of copy bandwidth")
        ax.set_title(f"H100, train fwd+bwd BN+ReLU, batch 128, {dtype} {layout}\n(triton_bn, cuDNN: CUDA-graph replay)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    groups = sorted({(d, l) for d, l in zip(cpu["dtype"], cpu["layout"])})
    labels = list(CPU_CASES.values())
    width = 0.8 / len(groups)
    for i, (dtype, layout) in enumerate(groups):
        values = []
        for case in CPU_CASES:
            rows = cpu[(cpu["case"] == case) & (cpu["dtype"] == dtype) & (cpu["layout"] == layout)
                       & (cpu["provider"] == "triton_bn")]
            values.append(geomean(rows["speedup_vs_eager_native"]))
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=f"{dtype} {layout}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7, rotation=15)
    ax.set_ylabel("speedup over PyTorch (geomean)")
    ax.set_title("2-core CPU (AMD EPYC VM), against PyTorch's CPU BN", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "headline.png"))
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
