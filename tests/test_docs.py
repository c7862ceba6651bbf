"""[docs] Every example runs (small sizes, CPU interpreter) and every python block in docs/ runs."""
import linecache
import os
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
    filename = f"docs/{name}[block {index}]"
    # triton.jit reads a kernel's source through inspect, which finds exec'd code only in linecache
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        exec(compile(code, filename, "exec"), {"__name__": f"doc_block_{index}"})
    finally:
        linecache.cache.pop(filename, None)


# Excerpts of the library's code in docs/ are ```py blocks whose first line names the file ("# triton_bn/...").
DOC_EXCERPTS = [(page.name, block) for page in sorted((ROOT / "docs").glob("*.md"))
                for block in re.findall(r"```py\n(# [\w/.]+\.py\n.*?)```", page.read_text(), re.S)]


@pytest.mark.parametrize("name,excerpt", DOC_EXCERPTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DOC_EXCERPTS)])
def test_doc_excerpt_is_the_code(name, excerpt):
    """Every line of an excerpt is in the named file, in the same order (indentation aside): a kernel changed
    without its docs fails here."""
    path_line, *lines = excerpt.splitlines()
    source = [line.strip() for line in (ROOT / path_line[2:].strip()).read_text().splitlines()]
    position = 0
    for line in filter(None, (line.strip() for line in lines)):
        assert line in source[position:], f"{name}: {line!r} is not in {path_line[2:]} (after line {position})"
        position = source.index(line, position) + 1


def test_docs_have_excerpts_and_figures():
    assert len(DOC_EXCERPTS) >= 6
    kernels = (ROOT / "docs" / "kernels.md").read_text()
    figures = re.findall(r"\]\((figures/[\w.]+)\)", kernels)
    assert len(figures) >= 3
    for figure in figures:
        assert (ROOT / "docs" / figure).is_file(), figure


def test_figures_script_draws_every_figure(tmp_path):
    """tools/figures.py redraws what docs/kernels.md shows (the committed SVGs are its output)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "figures.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = sorted(path.name for path in tmp_path.iterdir())
    committed = sorted(path.name for path in (ROOT / "docs" / "figures").iterdir())
    assert drawn == committed
    for name in drawn:
        assert (tmp_path / name).read_text().lstrip().startswith("<?xml"), name


def test_docs_have_runnable_blocks():
    assert len(DOC_BLOCKS) >= 5


README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_code_block_runs_as_a_new_user_runs_it(index, tmp_path):
    """Each python block of the README, as written, in a fresh process of what the install brings: without the
    Triton interpreter (the native CPU path a user gets), from a folder outside the checkout."""
    script = tmp_path / "readme_block.py"
    script.write_text(README_BLOCKS[index])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_readme_is_a_front_door():
    """Short (the rest is in docs/), with a python block, a picture that exists, and links that resolve."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150 and README_BLOCKS
    for target in re.findall(r"\]\(([\w./-]+)\)", text):
        if not target.startswith("http") and target != "...":
            assert (ROOT / target).exists(), target
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([\w./-]+)\)", page.read_text()):
            if not target.startswith("http") and target != "...":  # "f(...)" in a formula
                assert (page.parent / target).exists(), (page.name, target)


def test_the_headline_picture_is_drawn_from_committed_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "headline.py"), "--out", str(tmp_path / "h.png")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "h.png").stat().st_size > 10000 and (ROOT / "docs" / "headline.png").is_file()


@pytest.mark.parametrize("script,args,expect", [
    ("step_through.py", [], "splits merged by the last program"),
    ("step_through.py", ["--layout", "channels_last", "--shape", "40,4,3,3"], "split 1"),
    ("fused_resnet.py", ["--steps", "2"], "the native C++ CPU kernels"),
    ("fused_resnet.py", [], "fusion report"),
    ("inference_folding.py", [], "BN modules left: 0"),
])
def test_example_runs(script, args, expect):
    """As a user runs them: without the Triton interpreter (step_through sets it itself: the kernels are its
    subject), so the others take the path users get, the native CPU kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
