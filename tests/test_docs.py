"""[docs] Every example runs (small sizes, CPU interpreter) and every python block in docs/ runs."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_BLOCKS = [(page.name, i, block) for page in sorted((ROOT / "docs").glob("*.md"))
              for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


@pytest.mark.parametrize("name,index,code", DOC_BLOCKS, ids=[f"{n}-{i}" for n, i, _ in DOC_BLOCKS])
def test_doc_code_block_runs(name, index, code):
    exec(compile(code, f"{name}[block {index}]", "exec"), {})


def test_docs_have_runnable_blocks():
    assert len(DOC_BLOCKS) >= 5


@pytest.mark.parametrize("script,args,expect", [
    ("step_through.py", [], "merged (Chan) vs torch"),
    ("step_through.py", ["--layout", "channels_last", "--shape", "40,4,3,3"], "split 1"),
    ("fused_resnet.py", ["--steps", "2"], "fusion report"),
    ("inference_folding.py", [], "BN modules left: 0"),
])
def test_example_runs(script, args, expect):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
