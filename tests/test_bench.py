"""[perf] The benchmark tool: efficiency arithmetic, report writers, CSV schema and a tiny end-to-end run."""
import csv
import math
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from triton_bn.bench import cases, heap, report

from helpers import load_script


def test_minimal_bytes_and_efficiency():
    shape = (128, 64, 112, 112)
    numel = math.prod(shape)
    assert cases.minimal_bytes("train_fwd_relu", shape, torch.float32) == 2 * 4 * numel
    assert cases.minimal_bytes("train_fwdbwd_relu", shape, torch.bfloat16) == 5 * 2 * numel
    assert cases.minimal_bytes("train_add_relu_fwdbwd", shape, torch.float16) == 7 * 2 * numel
    assert cases.minimal_bytes("eval_fwd", shape, torch.float32) == 2 * 4 * numel
    # the anchor table's first row: 0.1923 ms floor at 4274.8 GB/s means efficiency 1.0 at that time
    floor_ms = 2 * 4 * numel / 4274.8e9 * 1e3
    assert abs(floor_ms - 0.1923) < 1e-3
    assert abs(cases.efficiency("train_fwd", shape, torch.float32, floor_ms, 4274.8) - 1.0) < 1e-9
    assert abs(cases.efficiency("train_fwd", shape, torch.float32, 2 * floor_ms, 4274.8) - 0.5) < 1e-9


def _rows():
    rows = []
    for provider, ms in (("triton_bn", 1.0), ("eager_cudnn", 2.0), ("torch_compile", 1.5)):
        rows.append(dict(case="train_fwd", shape="2x3x4x4", dtype="fp32", layout="nchw", provider=provider, ms=ms,
                         ms_p20=ms, ms_p80=ms, bytes=100, gbps=1.0, efficiency=0.5 / ms, rel_err=0.0,
                         device="test", mode="gpu", noise=""))
    return rows


def test_noise_is_flagged_and_left_out_of_the_results():
    """A row faster than a copy (efficiency > 1) or with a wide p20-p80 spread is noise: flagged with its reason
    in the CSV, marked in summary.md with its speedup in brackets, left out of every geomean and worst row,
    and counted on the console."""
    clean = dict(_rows()[0], efficiency=0.5, ms=1.0, ms_p20=0.9, ms_p80=1.1)
    assert report.noise_of(clean) == ""
    assert "efficiency 1.20 > 1" in report.noise_of(dict(clean, efficiency=1.2))
    assert "p20-p80" in report.noise_of(dict(clean, ms_p20=0.5, ms_p80=1.6))
    assert report.noise_of(dict(clean, ms_p20=0.8, ms_p80=1.29)) == ""  # a spread of 49%: still a result
    rows = []
    for shape, noisy in (("2x3x4x4", False), ("8x3x4x4", True)):
        for provider, ms in (("triton_bn", 1.0), ("eager_native", 3.0 if noisy else 2.0)):
            row = dict(clean, shape=shape, provider=provider, ms=ms, ms_p20=0.95 * ms, ms_p80=1.05 * ms,
                       efficiency=0.4 / ms if not (noisy and provider == "triton_bn") else 40.6)
            rows.append(dict(row, noise=report.noise_of(row)))
    frame = pd.DataFrame(report.add_speedups(rows, ["triton_bn", "eager_native"]))
    text = report.summary_markdown(frame, "# t")
    assert "**1 of 4 rows are noise, not results**" in text
    assert "(3.00x)" in text and "*noisy*: triton_bn: efficiency 40.60 > 1" in text
    assert "geomean speedup vs best anchor: 2.00x; worst row: 2.00x (1 noisy rows left out)" in text
    assert report.headline(frame) == ["train_fwd                nchw           fp32  geomean 2.00x, worst row 2.00x "
                                      "over 1 shapes; 1 noisy left out"]
    lines = report.noise_lines(frame)
    assert lines[0].startswith("1 of 4 rows are noise") and "8x3x4x4" in lines[1]


def test_speedups_summary_and_csv_schema(tmp_path):
    rows = report.add_speedups(_rows(), ["triton_bn", "eager_cudnn", "torch_compile"])
    ours = next(r for r in rows if r["provider"] == "triton_bn")
    assert ours["speedup_vs_eager_cudnn"] == 2.0 and ours["speedup_vs_torch_compile"] == 1.5
    frame = report.write_csv(rows + rows[:1], tmp_path / "r.csv")  # a duplicate key is dropped
    back = pd.read_csv(tmp_path / "r.csv")
    assert len(back) == 3 and set(report.COLUMNS) <= set(back.columns)
    text = report.summary_markdown(frame, "# t")
    assert "1.50x" in text and "geomean speedup vs best anchor: 1.50x; worst row: 1.50x" in text
    assert report.geomean([1.0, 4.0]) == pytest.approx(2.0)


def test_each_anchor_gets_its_own_geomean_when_several_were_measured():
    """With eager and torch.compile both measured, the console and summary.md give the geomean against each one
    alone beside the best-anchor one, each over the rows where neither triton_bn nor that anchor is noise; with
    one anchor they do not repeat it."""
    clean = dict(_rows()[0], ms_p20=None, ms_p80=None)
    rows = []
    for shape, eager_ms, compile_ms, compile_noise in (("2x3x4x4", 2.0, 4.0, ""), ("8x3x4x4", 8.0, 1.0, ""),
                                                       ("16x3x4x4", 3.0, 9.0, "p20-p80 wide")):
        for provider, ms, noise in (("triton_bn", 1.0, ""), ("eager_native", eager_ms, ""),
                                    ("torch_compile", compile_ms, compile_noise)):
            rows.append(dict(clean, shape=shape, provider=provider, ms=ms, noise=noise))
    frame = pd.DataFrame(report.add_speedups(rows, ["triton_bn", "eager_native", "torch_compile"]))
    # best anchor: 2x, 1x and 3x (the noisy torch.compile row is not the fastest there, so that row counts);
    # eager alone over all three: (2 * 8 * 3)^(1/3); torch.compile alone over its two clean rows: (4 * 1)^(1/2)
    each = f"; against each: eager_native {48 ** (1 / 3):.2f}x, torch_compile 2.00x"
    assert report.headline(frame) == [f"train_fwd                nchw           fp32  geomean {6 ** (1 / 3):.2f}x, "
                                      "worst row 1.00x over 3 shapes" + each]
    assert (f"geomean speedup vs best anchor: {6 ** (1 / 3):.2f}x; worst row: 1.00x" + each
            in report.summary_markdown(frame, "# t"))
    alone = frame[frame["provider"] != "torch_compile"]
    assert "against each" not in report.headline(alone)[0]
    assert "against each" not in report.summary_markdown(alone, "# t")


def test_summary_shows_graph_replay_efficiency_when_measured():
    rows = _rows() + [dict(_rows()[0], provider="triton_bn+cudagraph", ms=0.5, efficiency=1.0)]
    frame = pd.DataFrame(report.add_speedups(rows, ["triton_bn", "eager_cudnn", "torch_compile"]))
    text = report.summary_markdown(frame, "# t")
    assert "triton_bn+cudagraph eff" in text and "| 1.00 |" in text
    assert "cudagraph" not in report.summary_markdown(pd.DataFrame(_rows()), "# t")


def test_plots_and_autotune_report(tmp_path):
    frame = pd.DataFrame(report.add_speedups(_rows(), ["triton_bn"]))
    paths = report.write_plots(frame, tmp_path)
    assert paths and all(p.stat().st_size > 1000 for p in paths)
    common = {"key": "k", "block_b": 2, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4, "flat": False}
    report.write_autotune_report([dict(common, block_a=1, ms=0.1, chosen=True),
                                  dict(common, block_a=2, ms=0.2, chosen=False)], tmp_path)
    assert "**yes**" in (tmp_path / "autotune.md").read_text()
    assert len(pd.read_csv(tmp_path / "autotune.csv")) == 2


@pytest.mark.parametrize("case", ["train_add_relu_fwdbwd", "eval_fwd_relu"])
def test_the_error_column_covers_every_result(case):
    """What the bench compares: y, and for a training forward + backward dx, dweight, dbias, d residual and
    the updated running statistics; a wrong value in any one of them shows in the error column."""
    from triton_bn.bench import cases as C
    ours = C.build(case, "triton_bn", (4, 3, 5, 5), torch.float32, "nchw", "cpu").output()
    theirs = C.build(case, C.REFERENCE, (4, 3, 5, 5), torch.float32, "nchw", "cpu").output()
    assert len(ours) == (7 if case == "train_add_relu_fwdbwd" else 1)
    assert all(part.dtype == torch.float64 for part in theirs)
    assert C.worst_relative_error(ours, theirs) < 1e-5
    for i in range(len(ours)):
        wrong = list(ours)
        wrong[i] = wrong[i] * 1.01
        assert C.worst_relative_error(wrong, theirs) > 5e-3


def test_bench_interpreter_smoke_run(tmp_path):
    """``--interpreter``: tiny shapes through the Triton interpreter, every file written, labelled as no figures."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--interpreter", "--sets", "tiny",
                           "--cases", "train_fwdbwd_relu,eval_fwd_relu", "--providers", "triton_bn,eager_native",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interpreter timings" in proc.stdout
    frame = pd.read_csv(out / "results.csv")
    assert set(frame["provider"]) == {"triton_bn", "eager_native"}
    assert set(frame["case"]) == {"train_fwdbwd_relu", "eval_fwd_relu"}
    ours = frame[frame["provider"] == "triton_bn"]
    assert (ours["rel_err"] < 1e-5).all(), "a fast wrong kernel must not hide"
    assert (frame["efficiency"] > 0).all() and (frame["ms"] > 0).all()
    assert (out / "summary.md").read_text().count("###") >= 2
    assert list(out.glob("efficiency_*.png")) and (out / "autotune.md").exists()
    assert set(frame["mode"]) == {"interpreter"} and "not figures" in (out / "summary.md").read_text()


def test_bench_on_the_cpu_measures_the_cpu_path(tmp_path):
    """Without a GPU the README's main command measures triton_bn's CPU path against PyTorch's CPU batch
    norm on real shapes (cut down here), labelled as CPU figures; cuDNN asked for is said to be skipped."""
    out = tmp_path / "bench"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--sets", "cpu_small", "--cases",
                           "train_fwdbwd_relu,eval_fwd", "--dtypes", "fp32,fp64", "--layouts", "nchw,channels_last",
                           "--providers", "triton_bn,eager_native,eager_cudnn", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eager_cudnn needs CUDA: not measured" in proc.stdout and "CPU figures" in proc.stdout
    frame = pd.read_csv(out / "results.csv")
    assert set(frame["mode"]) == {"cpu"} and set(frame["provider"]) == {"triton_bn", "eager_native"}
    assert set(frame["shape"]) == {"16x64x28x28", "32x64x56x56", "4x32x8x16x16"}
    assert set(frame["layout"]) == {"nchw", "channels_last"}
    assert (frame[frame["provider"] == "triton_bn"]["rel_err"] < 1e-5).all()
    assert "**CPU figures**" in (out / "summary.md").read_text()
    if heap.glibc() is not None:  # the rows' freed memory is kept (heap.py), and the report says so
        assert f"heap: {heap.DESCRIPTION}" in proc.stdout and heap.DESCRIPTION in (out / "summary.md").read_text()
    # against a copy of each row's own size timed beside it: a row faster than that copy (impossible: a busy
    # machine's noise) is flagged as noise, never reported as a result; no assertion on the timings themselves
    impossible = frame[frame["efficiency"] > 1.0]
    assert impossible["noise"].map(report.is_noisy).all(), impossible
    assert ("rows are noise" in proc.stdout) == frame["noise"].map(report.is_noisy).any()
    assert "triton_bn against the fastest anchor of each row" in proc.stdout
    assert "train_fwdbwd_relu" in proc.stdout.split("fastest anchor")[-1]  # the closing summary names the cases


_FAULTS_OF_FREED_BLOCKS = """
import ctypes, json, resource, sys
from triton_bn.bench import heap
if sys.argv[1] == "keep" and heap.keep_freed_memory() is None:
    print("not glibc"); sys.exit(0)
libc = ctypes.CDLL(None)  # malloc itself: no threads, no allocator of torch's in between
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults(size, count):  # minor faults of allocating count blocks, writing every byte, freeing them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(rounds=[faults(20 << 20, 3) for _ in range(6)], large=[faults(64 << 20, 1) for _ in range(3)])))
"""


@pytest.mark.parametrize("setting", ["keep", "as-is"])
def test_the_cpu_bench_heap_keeps_freed_pages(setting):
    """heap.keep_freed_memory: three 20 MiB blocks freed and asked for again come back without faulting in their
    pages; glibc's own rules give them back to the kernel each round (60 MiB freed at the heap's top is more than
    twice the threshold the first free raised), so every round faults again: the chance effect that made one row
    read 3 ms or 10 ms. A 64 MiB block is mapped afresh every call either way (the documented limit)."""
    import json
    proc = subprocess.run([sys.executable, "-c", _FAULTS_OF_FREED_BLOCKS, setting], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() == "not glibc":
        pytest.skip("this C library is not glibc: the bench leaves malloc as it is")
    measured = json.loads(proc.stdout)
    pages = 3 * (20 << 20) // 4096
    first, *again = measured["rounds"]
    assert first >= pages // 2, measured  # a first touch faults whatever the setting (pages may exceed 4 KiB)
    if setting == "keep":
        assert max(again) < pages // 16, measured
    else:
        assert min(again) >= pages // 2, measured
    assert min(measured["large"]) >= (64 << 20) // 4096 // 2, measured


def test_page_faults_flag_leaves_malloc_as_it_is(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--sets", "tiny", "--cases", "eval_fwd",
                           "--dtypes", "fp32", "--layouts", "nchw", "--page-faults", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "heap: malloc as it is" in proc.stdout and "Heap:" not in (tmp_path / "b" / "summary.md").read_text()


def test_the_row_copy_writes_a_new_tensor_as_the_providers_do():
    """A row's efficiency reference allocates its output each call, as the providers' calls do (with freed memory
    kept, that output is warm where the last one was freed); a standing buffer was colder than every provider's."""
    from triton_bn.bench.cli import row_copy
    copy, moved = row_copy(1000, torch.float16)
    first, second = copy(), copy()
    assert moved == 2 * 1000 * 2 and first.dtype == torch.float16 and torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr()  # both alive: two allocations, not one buffer written twice


def test_a_cpu_workload_times_no_cudnn_switch(monkeypatch):
    """On a CPU the cuDNN switch means nothing, and entering it costs ~10 us a call, which would be added alike to
    every provider's time and pull small rows' ratios towards 1: a CPU workload never enters it."""
    def refuse(**_):
        raise AssertionError("a CPU workload entered torch.backends.cudnn.flags")
    monkeypatch.setattr(torch.backends.cudnn, "flags", refuse)
    for provider in ("eager_native", "triton_bn", cases.REFERENCE):
        work = cases.build("train_fwdbwd_relu", provider, (2, 3, 4, 4), torch.float32, "nchw", "cpu")
        work.run()
        assert len(work.output()) == 6  # y, dx, dweight, dbias, running mean and variance


def test_results_go_to_a_new_folder_outside_the_source(tmp_path, monkeypatch):
    """Without --out a run writes to a new folder under TRITON_BN_RESULTS_DIR (default ~/triton_bn-results):
    a second run the same second gets a folder of its own."""
    from triton_bn.bench.cli import results_folder
    monkeypatch.setenv("TRITON_BN_RESULTS_DIR", str(tmp_path / "results"))
    first, second = results_folder(None, "cpu-x"), results_folder(None, "cpu-x")
    assert first != second and first.parent == second.parent == tmp_path / "results"
    monkeypatch.delenv("TRITON_BN_RESULTS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert results_folder(None, "cpu-x").parent == tmp_path / "home" / "triton_bn-results"
    assert results_folder(str(tmp_path / "mine"), "ignored") == tmp_path / "mine"


def test_version():
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"triton-bn {__import__('triton_bn').__version__}"


@pytest.mark.parametrize("shape, memory_format", [((2, 4, 3, 5), torch.channels_last),
                                                  ((2, 4, 2, 3, 5), torch.channels_last_3d)])
def test_a_channels_last_case_is_channels_last_in_4d_and_5d(shape, memory_format):
    """A row labelled channels_last measures a channels-innermost input, 5-D shapes included (the bench
    once built those as NCDHW under that label)."""
    y, = cases.build("eval_fwd", "eager_native", shape, torch.float32, "channels_last", "cpu").output()
    assert y.is_contiguous(memory_format=memory_format) and not y.is_contiguous()


@pytest.mark.parametrize("case", ["train_fwd_silu", "train_fwdbwd_silu", "eval_fwd_silu", "train_fwd_gelu",
                                  "train_fwdbwd_gelu", "eval_fwd_gelu"])
def test_the_silu_and_gelu_cases_compare_like_with_like(case):
    """The SiLU and GELU cases (asked for by name with --cases; a default run leaves them out) apply the
    same activation on both sides: PyTorch's BN then F.silu / F.gelu against the fused call."""
    ours = cases.build(case, "triton_bn", (2, 4, 3, 5), torch.float32, "nchw", "cpu").output()
    theirs = cases.build(case, "eager_native", (2, 4, 3, 5), torch.float32, "nchw", "cpu").output()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # y, the gradients, the running statistics
    plain = cases.build("train_fwd" if case.startswith("train") else "eval_fwd", "eager_native", (2, 4, 3, 5),
                        torch.float32, "nchw", "cpu").output()
    assert not torch.allclose(plain[0], theirs[0])  # the activation is applied at all
    assert case not in cases.DEFAULT_CASES


@pytest.mark.parametrize("flag,bad", [("--sets", "resnet5"), ("--cases", "train"), ("--providers", "cudnn"),
                                      ("--dtypes", "fp8"), ("--layouts", "nhwc")])
def test_bench_names_the_valid_choices(flag, bad, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", flag, bad, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"unknown" in proc.stderr and "valid:" in proc.stderr, proc.stderr[-500:]


def test_bench_help_lists_sets_cases_and_providers():
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in ("resnet50", "cpu_small", "train_fwdbwd_relu", "eager_cudnn", "torch_compile", "--interpreter"):
        assert name in text, name


def test_model_bench_end_to_end_on_cpu(tmp_path):
    """``--model tiny``: original and converted training steps side by side, same first-step loss (fp32)."""
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "tiny", "--precisions", "fp32",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(out / "model.csv")
    assert list(frame["variant"]) == ["original", "converted"]
    converted = frame[frame["variant"] == "converted"].iloc[0]
    assert converted["loss_rel_diff"] < 1e-5, "the converted model must compute the same loss"
    assert converted["fusion"] == "3 BN+act, 2 BN+add+act, 0 plain"
    assert (frame["ms_per_step"] > 0).all() and "CPU figures" in (out / "model.md").read_text()
    # on a CPU the host's time is the whole step: the same medians
    assert (frame["host_ms_per_step"] == frame["ms_per_step"]).all()
    assert "host ms / step" in (out / "model.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "tiny", "--steps", "0", "--out",
                              str(out)], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--steps must be at least 1" in refused.stderr


def test_model_bench_several_models_with_eval_and_folding(tmp_path):
    """``--model tiny,yolo_backbone --eval``: per model the training steps and the inference forwards of the
    original, the converted and the folded model, each loss the original's (fp32), and the geometric mean per
    variant over the models; an unknown name is refused before anything runs."""
    out = tmp_path / "models"
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "tiny,yolo_backbone", "--eval",
                           "--precisions", "fp32", "--steps", "1", "--batch", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(out / "model.csv")
    variants = ["original", "converted", "eval original", "eval converted", "eval folded"]
    assert list(frame["model"]) == ["tiny"] * 5 + ["yolo_backbone"] * 5 and list(frame["variant"]) == variants * 2
    assert (frame["loss_rel_diff"] < 1e-5).all(), frame[["model", "variant", "loss_rel_diff"]]
    yolo = frame[(frame["model"] == "yolo_backbone") & (frame["variant"] == "converted")].iloc[0]
    assert yolo["fusion"] == "25 BN+act, 0 BN+add+act, 0 plain"  # every BN of the Conv-BN-SiLU blocks
    text = (out / "model.md").read_text()
    for variant in ("converted", "eval converted", "eval folded"):
        assert f"| fp32 | {variant} | 2 |" in text, variant  # the summary row over both models
    refused = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "tiny,resnet5", "--out",
                              str(tmp_path / "refused")], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "unknown model resnet5" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_a_model_whose_package_does_not_import_is_refused_first(tmp_path):
    """``--model hf_...`` where transformers does not import (here: a stand-in that raises ImportError) says
    which package to install, before anything runs or is written."""
    import os
    (tmp_path / "transformers.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "yolo_backbone,hf_resnet50",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "hf_resnet50: needs transformers" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_hugging_face_models_of_the_bench_convert_exactly():
    """The bench's Hugging Face models (built from their configurations, no download), converted and folded,
    compute the original's logits in float64 (training and eval), and fuse what their traceable forwards
    allow."""
    pytest.importorskip("transformers")
    import copy
    import warnings
    import torch
    import triton_bn
    from triton_bn.bench.model import MODELS
    fused = {}
    for name in ("hf_resnet50", "hf_mobilenet_v2", "hf_efficientnet_b0", "hf_mobilevit_s"):
        torch.manual_seed(0)
        original = MODELS[name][0]().double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notes of forwards fx can not trace
            converted = triton_bn.convert_model(copy.deepcopy(original))
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        for training in (True, False):
            original.train(training), converted.train(training)
            torch.manual_seed(1)  # the same dropout masks (MobileNetV2's and EfficientNet's classifiers)
            expected = original(x)
            torch.manual_seed(1)
            torch.testing.assert_close(converted(x), expected, atol=1e-10, rtol=1e-10, msg=name)
        for folded in (triton_bn.fold_batch_norms(original.eval()), triton_bn.fold_batch_norms(converted.eval())):
            torch.testing.assert_close(folded(x), original(x), atol=1e-10, rtol=1e-10, msg=name)
        fused[name] = converted.fusion_report.activation + converted.fusion_report.residual
    assert fused["hf_resnet50"] > 0 and fused["hf_efficientnet_b0"] > 0 and fused["hf_mobilevit_s"] > 0, fused


def test_model_bench_hands_over_its_rows_after_each_precision():
    """A model run cut short by a time limit (the GPU check's) keeps the precisions it finished: the rows so
    far go to ``measured`` after each one, and the CLI writes them."""
    from triton_bn.bench.model import run_model_bench
    seen = []
    rows = run_model_bench("tiny", ["fp32", "fp32"], 2, 1, False, "cpu", progress=lambda text: None,
                           measured=lambda so_far: seen.append([r["variant"] for r in so_far]))
    assert seen == [["original", "converted"], ["original", "converted"] * 2] and len(rows) == 4


def test_host_overhead_script_runs():
    """perf/host_overhead.py (launches stubbed, side by side with PyTorch): every row printed. A smoke run
    with few rounds; its figures are no claim (those come from a full run, in perf/NOTES.md)."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HOST_OVERHEAD_CALLS="3", HOST_OVERHEAD_ROUNDS="2")
    proc = subprocess.run([sys.executable, os.path.join(root, "perf", "host_overhead.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line.endswith("x |")]
    assert len(rows) == 14 and all("training forward + backward" in r for r in rows[2::3][:4])
    assert "empty autograd.Function" in rows[12] and "training forward + backward" in rows[12]


def test_cold_calls_script_runs():
    """perf/cold_calls.py (eval calls with the caches cold, off the interpreter, on the native path): a row for
    each of the five calls. A smoke run with three rounds; its figures are no claim."""
    import os
    from triton_bn.backends import native_cpu
    if not native_cpu.ENABLED:
        pytest.skip("TRITON_BN_NATIVE_CPU=0: the script times the native op")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(root, "perf", "cold_calls.py"), "2x4x2x2", "channels_last",
                           "3"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if " us   median " in line]
    assert [row.split(" p20 ")[0].strip() for row in rows] == [
        "nn.BatchNorm2d", "F.batch_norm", "triton_bn.BatchNorm2d", "triton_bn.batch_norm", "the native op alone"]


def test_latency_bench_runs_every_variant(tmp_path):
    """``--latency`` on one model at batch 1 (off the interpreter, as a user runs it): every variant timed, each
    output the original's (rel. 1e-5), the ONNX export of the folded model the original export's operators,
    the table and the plot written; the BN-free bound timed beside them."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "latency"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--latency", "--batches", "1", "--models",
                           "mobilenet_like", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = pd.read_csv(out / "latency.csv")
    assert list(frame["variant"]) == ["original", "converted", "folded", "no BN (bound)", "folded, compiled",
                                      "onnxruntime", "onnxruntime, original"]
    same_function = frame["variant"] != "no BN (bound)"
    assert (frame["ms"] > 0).all() and (frame[same_function]["rel_err"] < 1e-5).all()
    assert frame["speedup_paired"].iloc[0] == 1.0 and (frame["speedup_paired"] > 0).all()
    # the bound really left the BNs out: a different function, so its output is not the original's
    assert (frame[~same_function]["rel_err"] > 1e-3).all()
    assert "the same operators as the original's export" in frame["note"].iloc[5]
    assert (out / "latency.md").read_text().count("| mobilenet_like |") == 7
    assert (out / "latency.png").stat().st_size > 0
    # the progress counts its steps (one here: one model at one batch), and the exporter's log stays quiet
    assert "[0/1] mobilenet_like batch 1" in proc.stderr and "[1/1] mobilenet_like batch 1: timed" in proc.stderr
    assert "Skipping torchvision" not in proc.stderr + proc.stdout


def test_cpp_launch_variant_switches_the_path_on_for_its_steps_only(monkeypatch):
    """The model bench's ``converted, C++ launch`` variant (GPU only) runs each of its steps with the C++
    launch path on, and leaves the switch as it found it, also when a step raises."""
    from triton_bn.backends import cpp_launch
    from triton_bn.bench.model import with_cpp_launch
    monkeypatch.setattr(cpp_launch, "ACTIVE", False)
    seen = []
    with_cpp_launch(lambda: seen.append(cpp_launch.ACTIVE))()
    assert seen == [True] and cpp_launch.ACTIVE is False
    with pytest.raises(ZeroDivisionError):
        with_cpp_launch(lambda: 1 / 0)()
    assert cpp_launch.ACTIVE is False


def test_model_graphs_refuse_on_a_cpu_before_measuring_anything(tmp_path):
    """``--model --graphs`` (the whole step captured in a CUDA graph) needs a GPU: on a CPU it says so and
    measures nothing, from the command line and from the function alike."""
    from triton_bn.bench.model import graphed_step, run_model_bench
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "triton_bn", "bench", "--model", "tiny", "--graphs", "--out",
                           str(tmp_path / "m")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "CUDA graphs need a CUDA GPU" in proc.stderr
    assert not (tmp_path / "m" / "model.csv").exists()
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        run_model_bench("tiny", ["fp32"], 2, 1, False, "cpu", progress=lambda text: None, graphs=True)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        graphed_step(model, torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graphed_training_step_replays_the_step_of_the_eager_model():
    """The CUDA-graph regime of the model bench: the tiny model's whole step captured and replayed gives the
    eager step's losses (same weights, same batch, same SGD)."""
    import copy
    from triton_bn.bench.model import TinyResNet, _step_fn, graphed_step
    torch.manual_seed(0)
    base = triton_bn_convert(TinyResNet().cuda())
    images, labels = torch.randn(4, 3, 16, 16, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    eager_step = _step_fn(eager, images, labels, torch.float32)
    for _ in range(3):  # what graphed_step's warm-up does
        eager_step()
    replay = graphed_step(graphed, images, labels, torch.float32, warmup=3)
    for _ in range(3):
        expected, got = float(eager_step()), float(replay())
        assert abs(expected - got) <= 1e-4 * max(1.0, abs(expected)), (expected, got)


def triton_bn_convert(model):
    import triton_bn
    return triton_bn.convert_model(model)


def test_compare_runs_names_the_cells_below_earlier_readings(tmp_path, capsys):
    """perf/compare_runs.py (the docs' account of a run against earlier days): a cell below every earlier reading
    of it and one below only the best are named as such, and a cell at or above the best is not named."""
    compare_runs = load_script("perf/compare_runs.py")

    def summary(path, speedups):
        rows = []
        for case, speedup in speedups.items():
            for provider, ms in (("triton_bn", 1.0), ("eager_native", speedup)):
                rows.append(dict(_rows()[0], case=case, provider=provider, ms=ms, noise=""))
        frame = pd.DataFrame(report.add_speedups(rows, ["triton_bn", "eager_native"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.summary_markdown(frame, "# t"))

    summary(tmp_path / "old" / "a" / "summary.md", {"eval_fwd": 1.2, "train_fwd": 1.5, "train_fwdbwd": 1.0})
    summary(tmp_path / "old" / "b" / "summary.md", {"eval_fwd": 1.4, "train_fwd": 1.6, "train_fwdbwd": 1.1})
    summary(tmp_path / "new.md", {"eval_fwd": 1.3, "train_fwd": 1.4, "train_fwdbwd": 1.2})
    assert compare_runs.main([str(tmp_path / "new.md"), str(tmp_path / "old" / "**" / "summary.md")]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 cells have earlier readings (2 summaries)" in out
    lowest, best = out.split("below the best earlier reading")
    assert "below the lowest earlier reading: 1" in lowest and "train_fwd nchw fp32: 1.40x against 1.50x" in lowest
    assert ": 2" in best.splitlines()[0] and "eval_fwd nchw fp32: 1.30x against 1.40x" in best
    assert "train_fwdbwd" not in out
    assert compare_runs.main([str(tmp_path / "new.md"), str(tmp_path / "nothing-*.md")]) == 1


def test_ab_pairs_reports_each_pairs_after_over_before(tmp_path, capsys):
    """perf/ab_pairs.py's table (the kernel changes' alternating pairs): per cell, each pair's geomean of PyTorch's
    time over ours before and after, their ratio, our own time after / before (best of the pairs), rows flagged as
    noise in any run left out; and it refuses a bench --out and an OUT already holding a comparison."""
    ab_pairs = load_script("perf/ab_pairs.py")

    def run(name, ours, eager, noisy=()):
        folder = tmp_path / "out" / name
        folder.mkdir(parents=True)
        with open(folder / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["case", "dtype", "layout", "shape", "provider", "ms", "noise"])
            writer.writeheader()
            for shape in ours:
                for provider, ms in (("triton_bn", ours[shape]), ("eager_native", eager[shape])):
                    writer.writerow(dict(case="train_fwd", dtype="fp16", layout="channels_last", shape=shape,
                                         provider=provider, ms=ms, noise="spread" if shape in noisy else ""))

    # pair 1: 2.0x -> 2.2x; pair 2: 2.0x -> 1.8x (disagree in sign); shape c noisy in one run: left out everywhere
    run("before-1", {"a": 1.0, "b": 2.0, "c": 1.0}, {"a": 2.0, "b": 4.0, "c": 9.0})
    run("after-1", {"a": 1.0, "b": 2.0, "c": 1.0}, {"a": 2.2, "b": 4.4, "c": 9.0}, noisy=("c",))
    run("before-2", {"a": 1.1, "b": 2.2, "c": 1.0}, {"a": 2.2, "b": 4.4, "c": 9.0})
    run("after-2", {"a": 0.5, "b": 1.0, "c": 1.0}, {"a": 0.9, "b": 1.8, "c": 9.0})
    (row,) = ab_pairs.cell_ratios(str(tmp_path / "out"))
    assert row["cell"] == ("train_fwd", "fp16", "channels_last") and row["shapes"] == 2
    assert row["before"] == pytest.approx([2.0, 2.0]) and row["after"] == pytest.approx([2.2, 1.8])
    assert row["ratios"] == pytest.approx([1.1, 0.9])
    assert row["own_after_over_before"] == pytest.approx(0.5)  # best after (0.5, 1.0) over best before (1.0, 2.0)
    assert ab_pairs.main(["--report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "ratio 1.100 0.900" in out and "0 of 1 cells agree in sign in every pair" in out
    assert ab_pairs.main(["HEAD", str(tmp_path / "out"), "--", "--device", "cpu"]) == 2  # never overwritten
    assert ab_pairs.main(["HEAD", str(tmp_path / "new"), "--", "--out", "x"]) == 2
    assert not (tmp_path / "new").exists()


def test_kernel_ab_tells_a_changed_kernel_from_the_same_one(tmp_path, capsys):
    """perf/kernel_ab.py builds HEAD's kernels and a new version into one program and alternates them: with the
    normalization's arithmetic changed in the new version (a copy of the sources, one line edited), the
    normalization rows say DIFFERENT and the statistics rows, untouched, equal; each row has both times and their
    ratio. One float64 build (about 20 s on two cores)."""
    from triton_bn.backends import native_cpu
    if native_cpu.ops() is None:
        pytest.skip("the native CPU kernels do not build on this machine (the session's first lines say why)")
    kernel_ab = load_script("perf/kernel_ab.py")
    new = tmp_path / "csrc"
    shutil.copytree(os.path.join(kernel_ab.ROOT, kernel_ab.CSRC), new)
    header = new / "kernels.h"
    line = "load(in, i) * sc[column<PLANES>(i)] + sh[column<PLANES>(i)], slope"
    source = header.read_text()
    assert source.count(line) == 1, "the edited line moved: update this test"
    header.write_text(source.replace(line, line.replace(", slope", " + 1e-9, slope")))
    assert kernel_ab.main(["HEAD", "--new", str(new), "--dtypes", "fp64", "--passes", "statistics,normalize",
                           "--activations", "0", "--layouts", "nchw,channels_last", "--shapes", "2x8x3x3",
                           "--steps", "5", "--out", str(tmp_path / "out")]) == 0
    rows = [row for row in capsys.readouterr().out.splitlines() if " base " in row]
    assert len(rows) == 4, rows
    for row in rows:
        assert re.search(r"base [\d.]+ us new [\d.]+ us ratio [\d.]+ bitwise ", row), row
        assert row.endswith("DIFFERENT" if row.startswith("normalize") else "equal"), row
    assert (tmp_path / "out" / "kernel_ab.txt").read_text().count(" base ") == 4
    with pytest.raises(SystemExit):
        kernel_ab.main(["HEAD", "--dtypes", "fp8"])
