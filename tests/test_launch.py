"""[launch] The C++ launch path (``cpp_launch.py``, ``csrc/cuda/``) without a GPU.

Under the recording stand-in driver (``TRITON_BN_CUDA_DRIVER=record``) CPU tensors take the C++ path and every
launch is recorded; ``tests/launch_child.py`` (a child process: the driver is chosen before import, and the
interpreter must be off) compares each call path's recorded launches with what the Python launchers launch
for the same call: kernels, grids, blocks, shared memory, every parameter value, pointers naming the same
tensors. Each kernel variant is compiled for sm_90 on this CPU with Triton's compiler, and a plan is only
written when the parameters it packs are those the PTX ``.entry`` declares (count, order, widths): every
check that passes has passed that ABI check for each of its kernels."""
import os
import subprocess
import sys

import pytest

from triton_bn.backends import cpp_launch

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "launch_child.py")


def _child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_BN_CPP_LAUNCH")}
    env["TRITON_BN_CUDA_DRIVER"] = "record"
    return env


def _checks():
    done = subprocess.run([sys.executable, CHILD, "--list"], env=_child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line and not line.startswith("{")]


GROUPS = ("training-channels_last", "training-nchw", "training-bn1d", "training-bn3d", "eval", "sync-local", "node",
          "plan-per-kind", "plan-per-device", "errors", "entries", "threads", "plans-current")


@pytest.mark.parametrize("group", GROUPS)
def test_cpp_path_launches_what_python_launches(group):
    names = [name for name in _checks() if name.startswith(group)]
    assert names, f"no check named {group}*"
    done = subprocess.run([sys.executable, CHILD, *names], env=_child_env(), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert all(f"ok {name}" in done.stdout for name in names)


def test_the_abi_check_refuses_a_parameter_list_the_ptx_does_not_declare():
    """A plan whose packed parameters differ from the PTX declaration in count, order or width is refused
    (the call then stays on the Python path): on a GPU such a launch reads garbage or faults."""
    ptx = """
.visible .entry probe(
	.param .u64 .ptr .global .align 1 probe_param_0,
	.param .u32 probe_param_1,
	.param .f32 probe_param_2,
	.param .u64 .ptr .global .align 1 probe_param_3,
	.param .u64 .ptr .global .align 1 probe_param_4
)
{ ret; }
"""
    declared = cpp_launch.ptx_entry_params(ptx, "probe")
    assert declared == [".u64", ".u32", ".f32", ".u64", ".u64"]
    compiled = cpp_launch.Compiled("probe", 0, {"x_ptr": "*fp32", "n": "i32", "eps": "fp32"}, 4, 0, 2, declared)
    pointer, i32, i64, f32, null = (cpp_launch.POINTER, cpp_launch.I32, cpp_launch.I64, cpp_launch.F32,
                                    cpp_launch.NULL_POINTER)
    cpp_launch.check_abi(compiled, [pointer, i32, f32, null, null])
    for wrong in ([pointer, i64, f32, null, null],  # a width
                  [pointer, f32, i32, null, null],  # the order
                  [pointer, i32, f32, null]):  # the count
        with pytest.raises(cpp_launch.PlanUnsupported, match="the PTX declares"):
            cpp_launch.check_abi(compiled, wrong)


def test_the_cpp_path_is_off_unless_asked_for():
    """Opt-in until the CUDA tests have passed through it on a GPU: without TRITON_BN_CPP_LAUNCH=1 (or a
    stand-in driver) no call takes it."""
    import torch
    assert not cpp_launch.ENABLED and not cpp_launch.STAND_IN
    assert not cpp_launch.serves(torch.empty(2, 3))


def test_an_entry_that_does_not_import_leaves_the_torch_ops_entry():
    """A library without the direct Python entry (here torch's own libc10) gives None and a warning, never an
    error: cpp_launch.py then calls the torch.ops entry of the same library."""
    import torch
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    assert os.path.exists(library)
    with pytest.warns(UserWarning, match="Python entry did not import"):
        assert cpp_launch._import_entry(library) is None


def test_the_entry_is_built_where_python_headers_are(monkeypatch, tmp_path):
    """The binding's build flags follow Python.h: present, the entry is compiled in; absent, the library is
    built without it."""
    import sysconfig
    include = sysconfig.get_paths()["include"]
    expected = (["-DTRITON_BN_PYTHON_ENTRY"], ["-ltorch_python"], [include]) if os.path.isfile(
        os.path.join(include, "Python.h")) else ([], [], [])
    assert cpp_launch.python_entry_flags() == expected
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert cpp_launch.python_entry_flags() == ([], [], [])


def test_the_plan_header_is_the_numbering_s():
    """csrc/cuda/plan_ids.h is what tools/plan_header.py writes from backends/plan_numbering.py, the numbering
    cpp_launch.py packs plans with (its static_asserts tie the dtype numbers to c10's when the library builds)."""
    tools = os.path.join(os.path.dirname(HERE), "tools")
    sys.path.insert(0, tools)
    try:
        import plan_header
    finally:
        sys.path.remove(tools)
    with open(plan_header.HEADER) as f:
        assert f.read() == plan_header.header_text(), "run python tools/plan_header.py"
    from triton_bn.backends import plan_numbering
    assert cpp_launch.X is plan_numbering.X and cpp_launch.CALL_SCALARS is plan_numbering.CALL_SCALARS
    done = subprocess.run([sys.executable, os.path.join(tools, "plan_header.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

