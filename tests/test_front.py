"""[front] What a new user meets first: convert_model's copy (and inplace), its errors, and a short bench."""
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
import torch.nn as nn

import triton_bn
from triton_bn.bench import cases


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2))


def test_convert_model_returns_a_copy_that_an_earlier_optimizer_does_not_train():
    """The default: the original is untouched and the copy's parameters are new tensors (so the README tells the
    user to build the optimizer on the copy)."""
    model = _model()
    converted = triton_bn.convert_model(model)
    assert converted is not model and isinstance(model[1], nn.BatchNorm2d) and type(model[1]) is nn.BatchNorm2d
    assert isinstance(converted[1], triton_bn.BatchNorm2d)
    assert not any(p is q for p in model.parameters() for q in converted.parameters())


def test_convert_model_inplace_keeps_the_parameter_tensors_an_optimizer_holds():
    model = _model()
    before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    converted = triton_bn.convert_model(model, inplace=True)
    assert converted is model and isinstance(model[1], triton_bn.BatchNorm2d) and model[1].activation == "relu"
    assert {name: p for name, p in model.named_parameters()} == before  # the very tensors
    weight = model[1].weight.detach().clone()
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, weight), "the optimizer built before the conversion trains the BN"


@pytest.mark.parametrize("wrong", ["resnet18", None, 3, nn.BatchNorm2d])
def test_convert_model_of_something_else_than_a_module_says_what_to_pass(wrong):
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        triton_bn.convert_model(wrong)


def test_convert_model_warns_once_when_there_is_nothing_to_convert():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        triton_bn.convert_model(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        triton_bn.convert_model(_model())
        triton_bn.convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3)))  # a norm, not a BN
    said = [str(w.message) for w in caught if "no BatchNorm" in str(w.message)]
    assert len(said) == 2 and all("Sequential has no BatchNorm layer" in text for text in said)


def test_bench_quick_on_a_cpu_is_fp32_on_the_three_largest_resnet50_layers(tmp_path):
    """``--quick`` on a CPU: one dtype (fp32, both layouts) on the three ResNet-50 layers that decide, and the
    run says how many measurements and about how long before the first one (one case here, to stay short)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--quick", "--cases", "eval_fwd_relu",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(out / "results.csv")
    assert set(frame["shape"]) == {"x".join(map(str, s)) for s in cases.SHAPE_SETS["cpu_quick"]}
    assert set(frame["dtype"]) == {"fp32"} and set(frame["layout"]) == {"nchw", "channels_last"}
    announced = proc.stdout.index("12 measurements (6 rows x 2 providers); about")
    assert announced >= 0 and "on two quiet cores" in proc.stdout
    assert "[0/12]" in proc.stderr
