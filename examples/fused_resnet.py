"""Convert a small ResNet with triton_bn.convert_model and train it next to the unconverted model.

Prints which kernels serve, what was fused, then per step both losses, the largest output difference and
each step's time. On a CPU the native C++ kernels serve (compiled on the first call, once per machine: about a
minute on two cores, with progress lines); the steps then take milliseconds:

    python examples/fused_resnet.py                                     # CPU: 5 steps, batch 16, 32x32 images
    python examples/fused_resnet.py --steps 20 --batch 64 --size 64     # GPU
"""
import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_bn


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


def kernels_in_use(device: str) -> str:
    """Which of triton_bn's kernels serve this device (on a CPU this builds the native ones the first time)."""
    if device == "cuda":
        return "the Triton kernels"
    from triton_bn.backends import native_cpu
    if native_cpu.ops() is not None:
        return "the native C++ CPU kernels"
    return "PyTorch's CPU kernels with triton_bn's epilogue (the native ones are off or could not be built)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"triton_bn {triton_bn.__version__} on {device}: {kernels_in_use(device)}", flush=True)
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
        print(f"step {step}: loss torch {losses[0]:.5f} triton_bn {losses[1]:.5f}  "
              f"max |output diff| {(outputs[0] - outputs[1]).abs().max().item():.2e}  "
              f"step ms: torch {times[0]:.2f}, triton_bn {times[1]:.2f}" + (" (the first step includes "
                                                                            "one-time work)" if step == 0 else ""))
    assert abs(losses[0] - losses[1]) < 1e-3


if __name__ == "__main__":
    main()
