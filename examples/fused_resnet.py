"""Convert a small ResNet with triton_bn.convert_model and train it next to the unconverted model.

Prints what was fused, then per step both losses and the largest output difference (and timings on a
GPU). On a CPU the kernels run through the Triton interpreter, so keep it small:

    python examples/fused_resnet.py --steps 3 --batch 4 --size 16      # CPU (default sizes)
    python examples/fused_resnet.py --steps 20 --batch 64 --size 64     # GPU
"""
import argparse
import copy
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_bn  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    original = SmallResNet().to(device)
    reference = copy.deepcopy(original)
    converted = triton_bn.convert_model(original)
    if device == "cuda":
        reference = reference.to(memory_format=torch.channels_last)
        converted = converted.to(memory_format=torch.channels_last)
    print("fusion report:", converted.fusion_report)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    opt_new = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        target = torch.randint(0, 10, (args.batch,), device=device)
        outputs, losses, times = [], [], []
        for model, opt in ((reference, opt_ref), (converted, opt_new)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, target)
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            outputs.append(out.detach())
            losses.append(loss.item())
        timing = f"  step ms: torch {times[0]:.2f}, triton_bn {times[1]:.2f}" if device == "cuda" else ""
        print(f"step {step}: loss torch {losses[0]:.5f} triton_bn {losses[1]:.5f}  "
              f"max |output diff| {(outputs[0] - outputs[1]).abs().max().item():.2e}{timing}")
    assert abs(losses[0] - losses[1]) < 1e-3


if __name__ == "__main__":
    main()
