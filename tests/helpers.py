"""Reference computations for the tests: PyTorch itself, in float64."""
import importlib.util
import os

import torch
import torch.nn.functional as F

from triton_bn.activations import torch_activation
from conftest import TOLERANCES

LAYOUTS = ("contiguous", "channels_last", "strided")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """A script of the repository that is not part of the package (``perf/*.py``), imported as a module by its path."""
    name = os.path.splitext(os.path.basename(relative_path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_input(shape, dtype, device, layout="contiguous", offset=0.0, scale=1.0, generator=None):
    """Random input in the requested layout. "strided" is a non-contiguous view (every other element
    of a wider tensor along the last dim), which belongs to neither layout family."""
    if layout == "strided":
        wide = list(shape[:-1]) + [shape[-1] * 2]
        base = torch.randn(wide, generator=generator) * scale + offset
        x = base.to(device=device, dtype=dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, generator=generator) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
        if fmt is None:  # (N, C, L): C innermost through a transpose
            return x.transpose(1, -1).contiguous().transpose(1, -1) if len(shape) == 3 else x
        return x.contiguous(memory_format=fmt)
    return x


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         activation=None, negative_slope=0.01, residual=None):
    """PyTorch's F.batch_norm + activation, in float64, on leaf copies. Returns (y, leaves, running)."""
    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    xd, wd, bd, rd = leaf(x), leaf(weight), leaf(bias), leaf(residual)
    rm = None if running_mean is None else running_mean.detach().double().clone()
    rv = None if running_var is None else running_var.detach().double().clone()
    z = F.batch_norm(xd, rm, rv, wd, bd, training, momentum, eps)
    if rd is not None:
        z = z + rd
    y = torch_activation(activation, negative_slope)(z)
    return y, (xd, wd, bd, rd), (rm, rv)


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")
