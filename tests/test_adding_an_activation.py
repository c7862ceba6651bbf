"""[house] docs/adding-an-activation.md is right: its edits, made by this test to a scratch copy of the
repository exactly as the page writes them, give a ninth activation (softplus) that the table checks accept and
that every CPU backend (the Triton kernels under the interpreter, the native kernels, built in the copy, and
PyTorch's kernels) computes as PyTorch does, forward and backward, in float64 comparisons; ``convert_model``
fuses ``nn.Softplus()`` and leaves ``nn.Softplus(beta=2)`` alone. With the table edited and nothing else,
tests/test_activation_table.py fails, as the page says it does."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "adding-an-activation.md"
INSERT = re.compile(r"In `([^`]+)`, after the line with `([^`]+)`:\n\n```\w+\n(.*?)\n```", re.S)
REPLACE = re.compile(r"In `([^`]+)`, replace `([^`]+)` with `([^`]+)`\.")


def page_edits():
    """The page's edits in its order: ("insert", path, anchor, lines) or ("replace", path, old, new)."""
    text = PAGE.read_text()
    edits = [(m.start(), ("insert",) + m.groups()) for m in INSERT.finditer(text)]
    edits += [(m.start(), ("replace",) + m.groups()) for m in REPLACE.finditer(text)]
    return [edit for _, edit in sorted(edits)]


def apply_edit(root: Path, edit) -> None:
    kind, path, anchor, text = edit
    target = root / path
    source = target.read_text()
    if kind == "replace":
        assert source.count(anchor) == 1, f"{path}: the page's {anchor!r} is not there exactly once"
        source = source.replace(anchor, text)
    else:
        lines = source.split("\n")
        hits = [i for i, line in enumerate(lines) if anchor in line]
        assert len(hits) == 1, f"{path}: the page's anchor {anchor!r} is on {len(hits)} lines, not one"
        lines[hits[0] + 1:hits[0] + 1] = text.split("\n")
        source = "\n".join(lines)
    target.write_text(source)


def scratch_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", ".hypothesis")
    for folder in ("triton_bn", "tools"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=ignore)
    (copy / "tests").mkdir()
    for name in ("conftest.py", "helpers.py", "test_activation_table.py"):
        shutil.copy(ROOT / "tests" / name, copy / "tests" / name)
    return copy


def run_in(copy: Path, args, interpret: bool, timeout: float, tmp_path: Path, native: bool = True):
    env = dict(os.environ, PYTHONPATH=f"{copy}{os.pathsep}{copy / 'tests'}",
               TRITON_BN_BUILD_DIR=str(tmp_path / "build"), TRITON_BN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if not native:
        env["TRITON_BN_NATIVE_CPU"] = "0"
    return subprocess.run([sys.executable] + list(args), cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)


def table_tests(copy: Path, tmp_path: Path):
    """The copy's table tests. They read sources and never run a native kernel: the native build is switched
    off, or the copy's conftest would build it (80 s or more on two cores) before each of the three runs."""
    return run_in(copy, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                         "tests/test_activation_table.py"], True, 600, tmp_path, native=False)


def test_the_page_lists_every_kind_of_edit():
    """What the other tests apply is the page: an edit in each file the page names, in its order."""
    edits = page_edits()
    paths = [edit[1] for edit in edits]
    assert paths[0] == "triton_bn/activations.py", "the table comes first"
    for path in ("triton_bn/kernels/activations.py", "triton_bn/csrc/cpu/kernels.h",
                 "triton_bn/backends/pytorch_kernels.py"):
        assert path in paths, path
    assert "python tools/activation_header.py" in PAGE.read_text()


def test_the_table_tests_catch_a_half_done_job_and_pass_the_page_s(tmp_path):
    """Table only: the package refuses to import, naming the missing Triton constant. Table and Triton
    edits: the table tests fail on the C++ header. Every edit and the header script: they pass."""
    copy = scratch_copy(tmp_path)
    edits = page_edits()
    apply_edit(copy, edits[0])
    table_only = table_tests(copy, tmp_path)
    output = table_only.stdout + table_only.stderr
    assert table_only.returncode != 0 and "no constant for ['SOFTPLUS']" in output, output[-3000:]

    triton_edits = [edit for edit in edits if edit[1] == "triton_bn/kernels/activations.py"]
    for edit in triton_edits:
        apply_edit(copy, edit)
    no_cpp = table_tests(copy, tmp_path)
    assert no_cpp.returncode == 1 and "run python tools/activation_header.py" in no_cpp.stdout, no_cpp.stdout[-3000:]

    for edit in edits[1:]:
        if edit not in triton_edits:
            apply_edit(copy, edit)
    header = run_in(copy, ["tools/activation_header.py"], False, 120, tmp_path)
    assert header.returncode == 0, header.stdout + header.stderr
    assert "kSoftplus = 9" in (copy / "triton_bn/csrc/cpu/activation_ids.h").read_text()
    done = table_tests(copy, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


CHECK = r'''
"""softplus, added by the page, against PyTorch in float64 on the backends this process has."""
import sys
import torch
import torch.nn as nn
import triton_bn
from triton_bn import dispatch
from helpers import assert_close, make_input, reference_batch_norm

assert triton_bn.__file__.startswith(sys.argv[2]), triton_bn.__file__  # the scratch copy's package
CASES = {  # (dtype, layout, the backend dispatch must pick)
    "interpreter": [(torch.float32, "contiguous", "triton"), (torch.float32, "channels_last", "triton")],
    "cpu": [(torch.float32, "contiguous", "native"), (torch.bfloat16, "channels_last", "native"),
            (torch.float64, "contiguous", "native"), (torch.float32, "strided", "pytorch"),
            (torch.float64, "strided", "pytorch")],
}[sys.argv[1]]
gen = torch.Generator().manual_seed(0)
C = 6
for dtype, layout, backend in CASES:
    x = make_input((4, C, 5, 3), dtype, "cpu", layout, generator=gen).requires_grad_()
    residual = make_input((4, C, 5, 3), dtype, "cpu", layout, generator=gen).requires_grad_()
    vectors = torch.float64 if dtype == torch.float64 else torch.float32  # parameters and running statistics
    weight = (torch.randn(C, generator=gen) * 4).to(vectors).requires_grad_()
    bias = torch.linspace(-30, 30, C, dtype=vectors).requires_grad_()  # z past -20 and +20: both sides of the threshold
    assert dispatch.backend_for(x).name == backend, (dtype, layout, dispatch.backend_for(x).name)
    for training in (True, False):
        running_mean = torch.randn(C, generator=gen).to(vectors)
        running_var = (torch.rand(C, generator=gen) + 0.5).to(vectors)
        y_ref, leaves, (rm_ref, rv_ref) = reference_batch_norm(x, running_mean, running_var, weight, bias, training,
                                                               0.1, 1e-5, "softplus", residual=residual)
        y = triton_bn.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                                 activation="softplus", residual=residual)
        what = f"{backend} {dtype} {layout} training={training}"
        assert_close(y, y_ref, dtype, what + " y")
        assert_close(running_mean, rm_ref, vectors, what + " running mean")
        assert_close(running_var, rv_ref, vectors, what + " running var")
        grad = make_input(tuple(x.shape), dtype, "cpu", "contiguous", generator=gen)
        got = torch.autograd.grad(y, (x, weight, bias, residual), grad)
        expected = torch.autograd.grad(y_ref, leaves, grad.double())
        for name, g, e in zip(("dx", "dweight", "dbias", "dresidual"), got, expected):
            assert_close(g, e, dtype, f"{what} {name}")
    print("checked", backend, dtype, layout)

if sys.argv[1] == "cpu":
    for activation, fused in ((nn.Softplus(), "softplus"), (nn.Softplus(beta=2.0), None)):
        torch.manual_seed(0)
        original = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), activation)
        converted = triton_bn.convert_model(original)
        bn = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][0]
        assert bn.activation == fused, (activation, bn.activation)
        x = torch.randn(2, 3, 6, 6, generator=gen)
        assert_close(converted(x), original(x), torch.float32, f"converted {activation}")
    print("checked convert_model")
print("all checked")
'''


def test_the_page_s_softplus_runs_on_every_cpu_backend(tmp_path):
    """The page's edits, then the native kernels built in the copy (about as long as a first build:
    70-120 s on two cores) and softplus checked in each backend's process."""
    from triton_bn.backends import native_cpu
    if native_cpu.ops() is None:
        pytest.skip("the native CPU kernels do not build on this machine (the session's first lines say why)")
    copy = scratch_copy(tmp_path)
    for edit in page_edits():
        apply_edit(copy, edit)
    header = run_in(copy, ["tools/activation_header.py"], False, 120, tmp_path)
    assert header.returncode == 0, header.stdout + header.stderr
    (copy / "check_softplus.py").write_text(CHECK)
    for backends, expected in (("cpu", "checked convert_model"), ("interpreter", "checked triton")):
        done = run_in(copy, ["check_softplus.py", backends, str(copy)], backends == "interpreter", 1500, tmp_path)
        assert done.returncode == 0 and "all checked" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
        assert expected in done.stdout, done.stdout
