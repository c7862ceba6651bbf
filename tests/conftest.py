"""Test setup. TRITON_INTERPRET=1 must be set before anything imports triton: the kernels then run on
CPU tensors through the interpreter (the real kernels, not a re-implementation)."""
import os
import random
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hypothesis import settings  # noqa: E402

# CI profile: few examples (the interpreter is slow); "dev" for longer local runs: HYPOTHESIS_PROFILE=dev
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=150, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Fixed tolerances per dtype (atol, rtol) against a float64 reference; never scaled with the size.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),
}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """The native CPU kernels found or built once, before any test (and before xdist starts its workers):
    no test then waits for a build under a timeout of its own. Says which path serves CPU tensors."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller has done it
    from triton_bn.backends import native_cpu
    if not native_cpu.ENABLED:
        served = "PyTorch's kernels (TRITON_BN_NATIVE_CPU=0)"
    elif native_cpu.ops() is None:
        served = "PyTorch's kernels: the native CPU kernels could not be built (the warning above says why)"
    else:
        served = f"the native CPU kernels ({native_cpu.loaded_from()})"
    print(f"triton_bn: dense CPU tensors off the interpreter take {served}", flush=True)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws its unseeded random inputs (torch.randn without a generator, random.random) from a seed of
    its own id: different inputs for different tests, the same for one test in every run, so that a failure
    seen once is seen again."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def _fresh_tuner(tmp_path, monkeypatch):
    """Every test starts with an empty autotune cache in a private folder."""
    from triton_bn.autotune import tuner
    monkeypatch.setenv("TRITON_BN_CACHE_DIR", str(tmp_path / "autotune-cache"))
    tuner.reset()
    yield
    tuner.reset()
