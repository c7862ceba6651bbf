"""Print how much of each model's fusable batch norm convert_model fused (triton_bn.fusion_coverage: the BNs
that feed an activation, directly or through an add, in the original's data flow, against those fused), for
the test zoo's models (tests/zoo.py: torchvision-, timm- and DLA-like idioms built here), a YOLO-style
Conv-BN-SiLU stack, and Hugging Face transformers' architectures that hold BatchNorm (tests/hf_zoo.py, built
from small configurations, no download; skipped with a line saying so where transformers does not import),
each BN left unfused named with the reason (``Coverage.reasons``: convert_model's note on the module around it,
the module of its own its output went through, or the fused forward that fell back).

    python tools/fusion_coverage.py [--zoo-only]
"""
import os
import sys
import warnings

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import triton_bn  # noqa: E402
import zoo  # noqa: E402
from triton_bn.bench.model import ConvBnSiLU  # noqa: E402  (Ultralytics' Conv block)


def models():
    """(name, model, input) for every zoo model that takes a 2x3x16x16 image, and the YOLO-style stack."""
    found = []
    for name in sorted(dir(zoo)):
        cls = getattr(zoo, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and name.endswith("Like"):
            try:
                model = cls()
                x = torch.randn(2, 3, 16, 16)
                with torch.no_grad():
                    model(x)
            except Exception:  # noqa: BLE001 - a zoo model that takes other inputs
                continue
            found.append((name, model, x))
    found.append(("YoloConvStack", nn.Sequential(ConvBnSiLU(3, 8), ConvBnSiLU(8, 8), ConvBnSiLU(8, 16)),
                  torch.randn(2, 3, 16, 16)))
    return found


def hugging_face_models():
    """(name, model, input) for tests/hf_zoo.py's architectures (fp32), or None where transformers does not
    import."""
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or broken beside this torch
        return None
    import hf_zoo
    return [(f"hf:{name}",) + hf_zoo.build(name, torch.float32) for name in hf_zoo.MODELS]


def main() -> int:
    torch.manual_seed(0)
    total_fusable = total_fused = 0
    found = models()
    hugging_face = None if "--zoo-only" in sys.argv else hugging_face_models()
    if hugging_face is None and "--zoo-only" not in sys.argv:
        print("(Hugging Face's models skipped: transformers does not import here; pip install transformers)")
    for name, model, x in found + (hugging_face or []):
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = triton_bn.convert_model(model)
            coverage = triton_bn.fusion_coverage(model, converted, x)
        total_fusable += coverage.fusable
        total_fused += coverage.fused
        print(f"{name:24} {coverage}")
        for path in coverage.missed:
            print(f"{'':24}   {path}: {coverage.reasons[path]}")
    print(f"all: {total_fused} of {total_fusable} fusable BNs fused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
