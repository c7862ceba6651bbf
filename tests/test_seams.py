"""[seams] Every promise holds on every path: a bad call raises its documented error before anything is
written, on every entry point; bad settings and broken files never crash or mislead.

The bad calls come from tests/bad_calls.py (the C++ launch path runs the same table in tests/launch_child.py,
check "errors-alike"). Each test snapshots the raw bytes of every tensor involved and compares them after the
error."""
import json
import os
import subprocess
import sys
import warnings

import hypothesis
import pytest
import torch
from hypothesis import given, strategies as st

import triton_bn
from bad_calls import bad_calls, snapshot, tensors_of
from helpers import make_input
from triton_bn import settings
from triton_bn.autotune import tuner

LAYOUTS = ["contiguous", "channels_last"]


def _state(x, residual=True):
    c = x.shape[1]
    return dict(running_mean=torch.randn(c), running_var=torch.rand(c) + 0.5,
                weight=torch.randn(c, requires_grad=True), bias=torch.randn(c, requires_grad=True),
                num_batches_tracked=torch.tensor(3), residual=torch.randn_like(x) if residual else None)


def _raises_before_any_write(call, tensors, error):
    before = snapshot(tensors)
    with pytest.raises(error):
        call()
    assert snapshot(tensors) == before, "a tensor was written before the error"


# -- the functional API: every bad call of the table --------------------------------------------------------
BAD_CALLS = [name for name, _, _ in bad_calls(torch.empty(2, 3, 2, 2), _state(torch.empty(2, 3, 2, 2)))]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)), ids=BAD_CALLS)
@hypothesis.settings(max_examples=3)
@given(layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.bfloat16]), grad=st.booleans())
def test_every_bad_functional_call_raises_before_any_write(case, layout, dtype, grad):
    x = make_input((3, 4, 3, 2), dtype, "cpu", layout).requires_grad_(grad)
    state = _state(x)
    state["residual"] = state["residual"].to(dtype)
    name, kwargs, error = bad_calls(x, state)[case]
    tensors = tensors_of(state, x) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    _raises_before_any_write(lambda: triton_bn.batch_norm(**kwargs), tensors, error)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_statistics_that_require_grad_are_refused_on_every_dtype(training):
    """One rule for every path and dtype (it was accepted in fp32 and raised after a write in fp16): refused
    while grad mode is on, as PyTorch refuses them; used and updated under torch.no_grad()."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(4, 3, 5, 5, dtype=dtype)
        rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype, requires_grad=True)
        _raises_before_any_write(lambda: triton_bn.batch_norm(x, rm, rv, training=training), [x, rm, rv], ValueError)
        with torch.no_grad():
            triton_bn.batch_norm(x, rm, rv, training=training)
        assert training == bool((rm != 0).any())


# -- the modules: input, residual, and the module's own state --------------------------------------------------
def _module_bad_calls(module, x):
    """[(name, how the module or the call is broken, exception type)] for a BatchNorm2d(4)."""
    c = x.shape[1]

    def state(**changes):
        def breaks(m):
            for key, value in changes.items():
                setattr(m, key, value)
        return breaks
    return [
        ("input of other channels", state(), dict(input=torch.randn(2, c + 1, 3, 3)), ValueError),
        ("integer input", state(), dict(input=torch.ones(2, c, 3, 3, dtype=torch.int32)), TypeError),
        ("3-D input to BatchNorm2d", state(), dict(input=torch.randn(2, c, 3)), ValueError),
        ("residual that does not broadcast", state(), dict(residual=torch.randn(2, c, 2, 2)), ValueError),
        ("complex residual", state(), dict(residual=torch.randn(2, c, 3, 3, dtype=torch.complex64)), TypeError),
        ("residual on another device", state(), dict(residual=torch.randn(2, c, 3, 3, device="meta")), RuntimeError),
        ("residual a string", state(), dict(residual="x"), TypeError),
        ("eps 0", state(eps=0.0), {}, ValueError),
        ("momentum nan", state(momentum=float("nan")), {}, ValueError),
        ("unknown activation", state(activation="tanh"), {}, ValueError),
        ("running_var of stride 0", state(running_var=torch.ones(1).expand(c)), {}, ValueError),
        ("running_var that requires grad", state(running_var=torch.ones(c, requires_grad=True)), {}, ValueError),
    ]


MODULE_KINDS = ["BatchNorm2d", "BatchNorm2d+relu", "BatchNormAct2d", "SyncBatchNorm"]


def _module(kind):
    if kind == "BatchNorm2d":
        return triton_bn.BatchNorm2d(4)
    if kind == "BatchNorm2d+relu":
        return triton_bn.BatchNorm2d(4, activation="relu")
    if kind == "BatchNormAct2d":
        return triton_bn.BatchNormAct2d(4, activation="silu")
    return triton_bn.SyncBatchNorm(4, activation="relu")  # world size 1: the local path


@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("case", range(12))
@hypothesis.settings(max_examples=3)
@given(layout=st.sampled_from(LAYOUTS), with_residual=st.booleans(), training=st.booleans())
def test_every_bad_module_call_raises_before_any_write(case, kind, layout, with_residual, training):
    module = _module(kind).train(training)
    x = make_input((2, 4, 3, 3), torch.float32, "cpu", layout)
    name, breaks, call, error = _module_bad_calls(module, x)[case]
    valid = (not training and name in ("eps 0", "momentum nan", "running_var of stride 0")  # eval writes nothing
             # SyncBatchNorm takes any [N, C, *] (then a 4-D residual does not broadcast: a ValueError)
             or kind == "SyncBatchNorm" and name == "3-D input to BatchNorm2d" and not with_residual)
    breaks(module)
    kwargs = dict(input=x, residual=torch.randn_like(x) if with_residual else None)
    kwargs.update(call)
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) + list(kwargs.values())
               if isinstance(t, torch.Tensor)]
    if valid:  # a call that is fine in this mode: it runs (and in eval leaves the buffers as they were)
        before = snapshot(list(module.buffers()))
        assert module(**kwargs).shape == kwargs["input"].shape
        assert training or snapshot(list(module.buffers())) == before
    else:
        _raises_before_any_write(lambda: module(**kwargs), tensors, error)


def test_a_residual_added_after_the_normalization_follows_pytorchs_add():
    """A residual the kernels do not add (one that broadcasts, another dtype, a number) is added after the
    normalization as the original model's ``bn(x) + shortcut`` adds it: the broadcast shape, the promoted dtype,
    then the activation."""
    torch.manual_seed(0)
    bn = triton_bn.BatchNorm2d(4, activation="relu")
    ref = torch.nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 3, 3)
    for residual in (torch.randn(4, 1, 1, dtype=torch.float64), torch.randn(1, 4, 3, 3), 0.5,
                     torch.tensor(2.0), torch.ones(2, 4, 3, 3, dtype=torch.int64)):
        y = bn(x, residual=residual)
        expected = torch.relu(ref(x) + residual)
        assert y.dtype == expected.dtype and y.shape == expected.shape
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5


def test_frozen_batch_norm_errors_have_the_documented_types():
    frozen = triton_bn.fold_batch_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(4)).eval())[0]
    assert isinstance(frozen, triton_bn.FrozenBatchNorm)
    x = torch.randn(2, 4, 3, 3)
    for residual, error in ((torch.randn(2, 4, 3, 1), ValueError), (x.double(), TypeError),
                            (torch.randn(2, 4, 3, 3, device="meta"), RuntimeError), ("r", TypeError)):
        _raises_before_any_write(lambda: frozen(x, residual), [x] + list(frozen.buffers()), error)
    _raises_before_any_write(lambda: frozen(torch.randn(2, 5, 3, 3)), list(frozen.buffers()), ValueError)


# -- the custom ops (what torch.compile calls) ------------------------------------------------------------------
def test_the_custom_ops_check_before_any_write():
    x = torch.randn(4, 3, 5, 5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    stats = torch.ops.triton_bn.batch_stats
    for args, error in (((x, rm, torch.ones(4), None, 0.1, False, 1e-5), ValueError),
                        ((x, rm, torch.ones(1).expand(3), None, 0.1, False, 1e-5), ValueError),
                        ((x, rm, rv, None, 0.1, True, 1e-5), ValueError),  # cumulative without a count
                        ((x, rm, rv, nbt, 0.1, False, 0.0), ValueError),
                        ((x.int(), rm, rv, nbt, 0.1, False, 1e-5), TypeError)):
        _raises_before_any_write(lambda: stats(*args), [x, rm, rv, nbt], error)
    apply = torch.ops.triton_bn.batch_norm_apply
    for args, error in (((x, rm, None, torch.ones(4), None, None, None, 1e-5, 0, 0.01), ValueError),
                        ((x, rm, None, rv, None, None, torch.randn(4, 3, 5, 1), 1e-5, 0, 0.01), ValueError),
                        ((x, rm, None, rv, None, None, None, 1e-5, 99, 0.01), ValueError),
                        ((x, rm, rv, rv, None, None, None, 1e-5, 0, 0.01), ValueError),  # both statistics
                        ((x, rm, None, None, None, None, None, 1e-5, 0, 0.01), ValueError)):  # neither
        _raises_before_any_write(lambda: apply(*args), [x, rm, rv], error)


# -- settings ---------------------------------------------------------------------------------------------------
def test_every_variable_the_package_reads_is_a_setting():
    """One place reads every TRITON_BN_* variable: no other module of the package names one to the environment."""
    root = os.path.dirname(triton_bn.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py") or name == "settings.py":
                continue
            text = open(os.path.join(folder, name)).read()
            assert "environ.get(\"TRITON_BN_" not in text and "getenv(\"TRITON_BN_" not in text, name


def test_the_settings_table_in_the_docs_is_the_code_s():
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "settings.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| `TRITON_BN_")]
    named = [row.split("`")[1] for row in rows]
    assert named == list(settings.SETTINGS), "docs/settings.md lists the settings of settings.py, in its order"
    for row, setting in zip(rows, settings.SETTINGS.values()):
        assert setting.values in row, (setting.name, setting.values)


def test_bad_settings_warn_once_naming_the_variable_and_never_stop_an_import():
    bad = {"TRITON_BN_NATIVE_CPU": "maybe", "TRITON_BN_CPP_LAUNCH": "2", "TRITON_BN_CUDA_DRIVER": "fake",
           "TRITON_BN_DIRECT_LAUNCH": "nah", "TRITON_BN_AUTOTUNE": "sure", "TRITON_BN_TUNE_MAX_CANDIDATES": "abc",
           "TRITON_BN_BUILD_WAIT": "soon", "TRITON_BN_BUILD_JOBS": "-3"}
    env = dict({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **bad)
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import triton_bn\n"
            "from triton_bn import settings, build\n"
            "from triton_bn.backends import native_cpu, cpp_launch, triton_launch\n"
            "from triton_bn.autotune import tuner\n"
            "for name in settings.SETTINGS: settings.get(name); settings.get(name)\n"
            "print('VALUES', native_cpu.ENABLED, cpp_launch.ENABLED, repr(cpp_launch.STAND_IN),"
            " triton_launch.DIRECT_LAUNCH, tuner.autotune,"
            " tuner.max_candidates, settings.get('TRITON_BN_BUILD_WAIT'), settings.get('TRITON_BN_BUILD_JOBS'))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "VALUES True False '' True True None 900.0 0" in done.stdout
    for name, value in bad.items():
        said = [line for line in done.stderr.splitlines() if f"{name}={value!r} is not valid" in line]
        assert len(said) == 1, (name, done.stderr)
        assert "using the default" in said[0]


@pytest.mark.parametrize("text, expected", [("0", False), ("off", False), ("FALSE", False), ("no", False),
                                            ("1", True), ("on", True), ("Yes", True), ("true", True), ("", True)])
def test_flags_take_the_usual_spellings(monkeypatch, text, expected):
    monkeypatch.setenv("TRITON_BN_AUTOTUNE", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid spelling never warns
        assert settings.flag("TRITON_BN_AUTOTUNE") is expected


def test_native_cpu_off_is_honoured_in_every_spelling():
    """``TRITON_BN_NATIVE_CPU=off`` (or ``false``) used to leave the native kernels on, silently."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for text in ("off", "false", "0"):
        code = "from triton_bn.backends import native_cpu; print(native_cpu.ENABLED)"
        done = subprocess.run([sys.executable, "-c", code],
                              env=dict(env, TRITON_BN_NATIVE_CPU=text), capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == "False", (text, done.stderr)


# -- the tuning cache ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    '{"k1": {"block_a": 64, "block_b": 32, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "flat": false, '
    '"extra": 1}}',
    '{"k1": [64, 32]}', '{"k1": 7}', "[1, 2, 3]", "42", "not json at all",
    '{"k1": {"block_a": 63, "block_b": 32, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "flat": false}}',
    '{"k1": {"block_a": "64", "block_b": 32, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "flat": false}}',
])
def test_a_tuning_cache_of_another_shape_costs_a_retune_never_a_crash(content):
    """Valid JSON that is not what this version wrote (an extra field, a list, a number, a tile that is no power
    of two) is left out with a warning; the first call runs."""
    device = torch.device("cpu")
    path = tuner.cache_file(device)
    assert f"triton_bn{triton_bn.__version__}" in path.name  # another version of triton_bn keeps its own file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    tuner.reset()
    with pytest.warns(RuntimeWarning, match="tuning cache"):
        tuner._load_disk(device)
    assert "k1" not in tuner.memory
    y = triton_bn.batch_norm(torch.randn(4, 3, 5, 5), None, None, training=True)
    assert y.shape == (4, 3, 5, 5)


def test_a_valid_tuning_cache_entry_is_read_and_bad_ones_beside_it_are_counted():
    device = torch.device("cpu")
    good = {"block_a": 64, "block_b": 32, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "flat": False}
    path = tuner.cache_file(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"good": good, "bad": dict(good, num_warps=3)}))
    tuner.reset()
    with pytest.warns(RuntimeWarning, match="ignored 1 of 2 entries"):
        tuner._load_disk(device)
    assert tuner.memory["good"].block_a == 64 and "bad" not in tuner.memory
