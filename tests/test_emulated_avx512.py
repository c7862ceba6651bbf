"""The native CPU kernels built for AVX-512 on a host without it, emulated at the source level
(tools/check_avx512.py --run, docs/cpu-path.md). A file of its own so that the suite's workers can run it beside
tests/test_native_cpu.py: the emulated build takes a minute or two."""
import os
import platform
import re
import subprocess
import sys

import pytest

from triton_bn import build
from triton_bn.backends import native_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_kernels_run_on_an_emulated_avx512_cpu():
    """tools/check_avx512.py --run: the library built for AVX-512 on this host through tools/avx512_emulation.h (16
    fp32 / 8 double lanes, kernels.h's AVX-512 branches, no AVX-512 instruction in the binary), and
    tests/test_native_cpu.py's kernel tests and tests/test_dispatch.py passing against it. Needs SIMDe's headers
    (Debian's libsimde-dev): skipped, saying so, where they are missing. perf/NOTES.md has a bug in an
    AVX-512-only branch that this run catches and the AVX2 build cannot even compile."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 host")
    if native_cpu.vector_isa() == "AVX512":
        pytest.skip("this CPU runs AVX-512 itself: the suite's own build is the AVX-512 one")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_avx512
    missing = check_avx512.missing_simde(build.compiler())
    if missing:
        pytest.skip(f"needs {missing}")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_avx512.py"), "--files",
                           "kernels_double_forward.cpp", "--run", "--", "-x"], capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "activation vectors of 16 fp32 / 8 double lanes; 0 AVX-512 instructions" in done.stdout, done.stdout[-2000:]
    assert "AVX-512 Sleef functions it calls: none" in done.stdout, done.stdout[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 800 and "failed" not in done.stdout, done.stdout[-2000:]


def test_the_emulated_avx512_run_stands_down_on_an_avx512_cpu(monkeypatch, capsys):
    """On a CPU that runs AVX-512 itself, triton_bn's own build is the AVX-512 one (the suite tests it), and the
    emulating compiler would pass its flags through unchanged: --run says so and succeeds, emulating nothing."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_avx512
    monkeypatch.setattr(native_cpu, "vector_isa", lambda: "AVX512")
    monkeypatch.setattr(check_avx512.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert check_avx512.run_emulated([]) == 0
    assert "nothing to emulate" in capsys.readouterr().out
