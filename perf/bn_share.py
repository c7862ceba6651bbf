"""What share of a whole model's CPU step PyTorch spends in batch norm, the activations and the adds that
convert_model can fuse into it: the ceiling of what any BN kernel can gain on that model (a step whose BN,
activation and add cost fell to zero would be 1 / (1 - share) times faster).

    python perf/bn_share.py [--models hf_resnet50,...] [--batch 8] [--steps 2]

Runs the bench's models (triton_bn.bench.model.MODELS, running statistics from one batch as the bench does)
under torch.profiler, original only: the training step (forward, cross-entropy, backward) and the eval forward,
fp32 and bf16 autocast; prints a Markdown table of each share and that ceiling.
"""
import argparse
import sys

import torch

from triton_bn.bench.model import MODELS, with_batch_statistics

# PyTorch's operators for BN, for the activations convert_model fuses (and their backward), and for adds
BN_OPS = {"aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_native_batch_norm_legit",
          "aten::_native_batch_norm_legit_no_training", "aten::batch_norm_backward"}
ACTIVATION_OPS = {"aten::relu", "aten::relu_", "aten::threshold_backward", "aten::silu", "aten::silu_",
                  "aten::silu_backward", "aten::hardtanh", "aten::hardtanh_", "aten::hardtanh_backward",
                  "aten::clamp", "aten::clamp_", "aten::gelu", "aten::gelu_backward", "aten::hardswish",
                  "aten::hardswish_", "aten::hardswish_backward", "aten::sigmoid", "aten::sigmoid_backward",
                  "aten::leaky_relu", "aten::leaky_relu_", "aten::leaky_relu_backward", "aten::elu",
                  "aten::elu_backward", "aten::tanh", "aten::tanh_backward"}
ADD_OPS = {"aten::add", "aten::add_"}


def shares(model, images, labels, dtype, training: bool, steps: int):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if training:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            else:
                with torch.no_grad():
                    return model(images)
        loss.backward()
    model.train(training)
    step()
    with torch.profiler.profile() as profile:
        for _ in range(steps):
            step()
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(e.self_cpu_time_total for e in events if e.key in BN_OPS)
    act = sum(e.self_cpu_time_total for e in events if e.key in ACTIVATION_OPS)
    add = sum(e.self_cpu_time_total for e in events if e.key in ADD_OPS)
    return total / steps / 1e3, bn / total, act / total, add / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="hf_resnet50,hf_mobilenet_v2,hf_efficientnet_b0,hf_mobilevit_s,"
                                            "yolo_backbone")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} profiled "
          "steps after one; share of the step's operator time (self CPU)\n")
    print("| model | precision | step | ms / step | BN | activations | adds | BN + act + add | ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        build, _, size, classes = MODELS[name]
        model = build()
        images = torch.randn(args.batch, 3, size, size)
        labels = torch.randint(0, classes, (args.batch,))
        model = with_batch_statistics(model, images)
        for dtype in ("fp32", "bf16"):
            for training in (True, False):
                ms, bn, act, add = shares(model, images, labels, dtype, training, args.steps)
                fused = bn + act + add
                print(f"| {name} | {dtype} | {'training' if training else 'eval'} | {ms:.0f} | {bn:.1%} | {act:.1%} | "
                      f"{add:.1%} | {fused:.1%} | {1 / (1 - fused):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
