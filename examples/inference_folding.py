"""Fold batch norms for inference and compare the outputs (a few seconds on a CPU, after the native
kernels' one-time build).

    python examples/inference_folding.py
"""
import torch
import torch.nn as nn

import triton_bn


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Flatten(), nn.Linear(8 * 16 * 16, 10), nn.BatchNorm1d(10),
    ).to(device)
    model.train()
    for _ in range(3):  # give the running statistics something to hold
        model(torch.randn(8, 3, 8, 8, device=device))
    model.eval()
    print("converting (BN+ReLU, BN+SiLU fused), then folding the BNs into the layers before them", flush=True)
    fused = triton_bn.convert_model(model)            # BN+ReLU, BN+SiLU fused
    folded = triton_bn.fold_batch_norms(fused)         # BNs folded into conv/convT/linear
    x = torch.randn(4, 3, 8, 8, device=device)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    frozen = [m for m in folded.modules() if isinstance(m, triton_bn.FrozenBatchNorm)]
    print(f"BN modules left: {batch_norms}; epilogue-only passes kept for fused activations: {len(frozen)}")
    print(f"max |folded - original| = {(got - expected).abs().max().item():.2e}")
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    main()
