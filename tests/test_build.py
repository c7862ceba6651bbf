"""[build] Native builds never hang and happen once per machine (``triton_bn/build.py``).

The mechanism is checked on a probe library of one tiny C file (its build takes a second, and a compiler
wrapper on PATH stretches it so that a process can be killed in the middle of it); the native CPU
kernels themselves are checked where only they tell: a second checkout finds their build, and a broken
compiler gives a warning and correct results through PyTorch's kernels."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_PY = os.path.join(ROOT, "triton_bn", "build.py")

PROBE_SOURCE = 'extern "C" int triton_bn_build_probe() { return 42; }\n'
# a child process: build.py alone (not the package: no triton import), the probe built and called. Ctrl-C
# reaches it as it reaches a program run from a terminal: a test worker's children can inherit SIGINT ignored
# or blocked (seen in CI under pytest-xdist: the builder never saw the signal and compiled on)
CHILD = textwrap.dedent(f"""
    import ctypes, importlib.util, signal, sys
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = importlib.util.spec_from_file_location("triton_bn_build", {BUILD_PY!r})
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    path = build.load_library("probe", [sys.argv[1]], what="the probe library", loader=ctypes.CDLL)
    print("RESULT", ctypes.CDLL(path).triton_bn_build_probe(), flush=True)
""")

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@pytest.fixture
def probe(tmp_path):
    """(source, build folder, environment with a compiler wrapper first on PATH): the wrapper sleeps
    SLOW_SECONDS before each compile and appends a line to SLOW_LOG, and is otherwise the real c++ (the
    same --version, so the same build key)."""
    source = tmp_path / "probe.c"
    source.write_text(PROBE_SOURCE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "c++"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -c "*) echo compile >> "${{SLOW_LOG:-/dev/null}}"; sleep "${{SLOW_SECONDS:-0}}";; esac
        exec {shutil.which('c++')} "$@"
        """))
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TRITON_BN_BUILD_DIR=str(tmp_path / "build"),
               SLOW_LOG=str(tmp_path / "compiles.log"))
    return str(source), tmp_path / "build", env


def _start(source, env, **extra):
    return subprocess.Popen([sys.executable, "-c", CHILD, source], env={**env, **extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _compiling(folder):
    return lambda: folder.exists() and any(p.name.endswith(".tmp") for p in folder.iterdir())


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_an_interrupted_build_blocks_nothing(probe, how):
    """A build stopped in the middle of compiling leaves no library and no lock that holds: the next
    process rebuilds within seconds (and removes what a killed builder left). Ctrl-C cleans up itself."""
    source, folder, env = probe
    child = _start(source, env, SLOW_SECONDS="120")  # a compile that outlasts the wait below
    assert _wait_for(_compiling(folder)), child.communicate()
    child.send_signal(getattr(signal, how))
    try:  # prompt, not after the compile: 60 s is for a loaded machine (CI, two test workers on two cores)
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail(f"the builder was still running 60 s after {how}: {child.communicate()[1][-2000:]}")
    assert child.returncode != 0
    assert not list(folder.glob("*.so"))  # never a half-built library
    if how == "SIGINT":
        assert not list(folder.glob("*.tmp")), "an interrupted build removes its own folder"
    started = time.monotonic()
    again = subprocess.run([sys.executable, "-c", CHILD, source], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "RESULT 42" in again.stdout and "building the probe library" in again.stderr
    assert time.monotonic() - started < 60
    assert not list(folder.glob("*.tmp")) and len(list(folder.glob("*.so"))) == 1


def test_two_processes_starting_at_once_build_once(probe, tmp_path):
    source, folder, env = probe
    children = [_start(source, env, SLOW_SECONDS="3") for _ in range(2)]
    outputs = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    assert all("RESULT 42" in out for out, _ in outputs)
    assert (tmp_path / "compiles.log").read_text().count("compile") == 1
    messages = "".join(err for _, err in outputs)
    assert messages.count("triton_bn: building the probe library") == 1 and messages.count("waiting for it") == 1
    assert "pid" in messages  # the waiting one names the builder


def test_a_live_builder_is_waited_for_with_a_bound(probe):
    """A lock held by a live process (this test): the waiting process says who holds it, gives up after
    TRITON_BN_BUILD_WAIT seconds, and says what to do."""
    source, folder, env = probe
    first = _start(source, env, SLOW_SECONDS="60")
    try:
        assert _wait_for(_compiling(folder))
        waiting = subprocess.run([sys.executable, "-c", CHILD, source], env={**env, "TRITON_BN_BUILD_WAIT": "2"},
                                 capture_output=True, text=True, timeout=60)
    finally:
        first.kill()
        first.wait()
    assert waiting.returncode != 0
    assert f"pid {first.pid}" in waiting.stderr and "TRITON_BN_BUILD_WAIT" in waiting.stderr
    assert "waited 2 s" in waiting.stderr


def test_a_build_is_found_under_another_path_and_environment(probe, tmp_path):
    """The key holds what changes the binary, not where the sources or the interpreter live: the same
    source from another folder finds the build."""
    source, folder, env = probe
    first = subprocess.run([sys.executable, "-c", CHILD, source], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    elsewhere = tmp_path / "checkout-2" / "probe.c"
    elsewhere.parent.mkdir()
    shutil.copy(source, elsewhere)
    second = subprocess.run([sys.executable, "-c", CHILD, str(elsewhere)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0 and "RESULT 42" in second.stdout
    assert "building" not in second.stderr
    assert (tmp_path / "compiles.log").read_text().count("compile") == 1


@pytest.mark.parametrize("damage", ["cut short", "no fingerprint"])
def test_a_damaged_library_is_rebuilt_never_loaded(probe, tmp_path, damage):
    """A library whose bytes are not what its builder wrote (cut short by a full disk, a broken copy or a sync
    tool: loading it dies with SIGBUS in every process), or that has no size and checksum beside it to tell, is
    said, rebuilt and then loaded; the next process loads the rebuilt one without building."""
    source, folder, env = probe
    first = subprocess.run([sys.executable, "-c", CHILD, source], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    (library,) = folder.glob("*.so")
    fingerprint = library.with_suffix(".sha256")
    assert fingerprint.read_text().split()[0] == str(library.stat().st_size)
    if damage == "cut short":
        library.write_bytes(library.read_bytes()[:library.stat().st_size // 3])
    else:
        fingerprint.unlink()
    again = subprocess.run([sys.executable, "-c", CHILD, source], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "RESULT 42" in again.stdout
    assert "is not what its build wrote" in again.stderr and "building the probe library" in again.stderr
    third = subprocess.run([sys.executable, "-c", CHILD, source], env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "RESULT 42" in third.stdout and "building" not in third.stderr
    assert (tmp_path / "compiles.log").read_text().count("compile") == 2


# -- the native CPU kernels --------------------------------------------------------------------------------
NATIVE_CHILD = textwrap.dedent("""
    import warnings
    import torch, torch.nn.functional as F
    import triton_bn
    from triton_bn.backends import native_cpu
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = triton_bn.batch_norm(x.float(), None, None, w.float(), None, training=True, activation="relu")
    expected = F.relu(F.batch_norm(x.float(), None, None, w.float(), None, training=True))
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    grad = x.grad.clone(); x.grad = None
    expected.sum().backward()
    assert torch.allclose(grad, x.grad, atol=1e-5, rtol=1e-5)
    print("MODULE", triton_bn.__file__)
    print("NATIVE", native_cpu.ops() is not None)
    for w in caught:
        print("WARNING", w.message)
""")


def _native_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_BN_NATIVE_CPU")}
    env.update(extra)
    return env


def test_a_second_checkout_uses_the_same_native_build(tmp_path):
    """The package imported from a copy in another folder (another checkout, another virtual environment's
    site-packages) loads the build this process loaded: no second build."""
    from triton_bn import build
    from triton_bn.backends import native_cpu
    if native_cpu.ops() is None:
        pytest.fail("the native CPU kernels could not be built here (see the warning)")
    copy = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "triton_bn"), copy / "triton_bn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = _native_env(PYTHONPATH=str(copy), TRITON_BN_BUILD_DIR=build.build_dir())
    done = subprocess.run([sys.executable, "-c", NATIVE_CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MODULE {copy}" in done.stdout and "NATIVE True" in done.stdout
    assert "building" not in done.stderr


def test_a_broken_compiler_warns_and_pytorch_kernels_serve(tmp_path):
    """A compiler that fails (first on PATH) and no build yet: a warning that says why and where the
    compiler's output is, and correct results through PyTorch's kernels."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "c++"
    broken.write_text("#!/bin/sh\necho 'broken compiler 1.0'\n"
                      "case \" $* \" in *\" -c \"*) echo 'fatal error: this compiler is broken' >&2; exit 1;; esac\n")
    broken.chmod(0o755)
    env = _native_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TRITON_BN_BUILD_DIR=str(tmp_path / "build"))
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "-c", NATIVE_CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NATIVE False" in done.stdout
    assert "could not be built" in done.stdout and "this compiler is broken" in done.stdout
    assert "compiler output in " + str(tmp_path / "build") in done.stdout
