"""[deploy] What was trained with triton_bn runs where triton_bn is not installed.

A converted model (fused BN + activation, BN + add + activation, a fused forward from fx) and its
``fold_batch_norms`` result, exported with ``torch.export`` (default and strict), with ONNX (dynamo) and with
``torch.jit.trace``: the programs hold PyTorch's own operators only, load and run in a process where
``import triton_bn`` (and ``import triton``) fails, and compute what the original model computes."""
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import triton_bn
from zoo import EfficientNetLike, MobileNetV3Like, ResNeXtLike

MODELS = {"resnext": (ResNeXtLike, (2, 3, 8, 8)), "mobilenetv3": (MobileNetV3Like, (2, 3, 6, 6)),
          "efficientnet": (EfficientNetLike, (2, 3, 6, 6))}
RTOL = 1e-5  # fp32: the exported programs compute what PyTorch's eval BN computes, in another order


def _trained(name):
    """The original model after a few training steps (running statistics away from 0 and 1), in eval."""
    builder, shape = MODELS[name]
    torch.manual_seed(0)
    model = builder()
    for _ in range(3):
        model(torch.randn(shape) * 2 + 0.5)
    return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _deployed(model, variant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = triton_bn.convert_model(model).eval()
        return converted if variant == "converted" else triton_bn.fold_batch_norms(converted)


def _relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _namespaces(graph_module) -> set:
    return {str(node.target).split(".")[0] for node in graph_module.graph.nodes if node.op == "call_function"
            and hasattr(node.target, "namespace")} | {node.target.namespace for node in graph_module.graph.nodes
                                                       if node.op == "call_function" and hasattr(node.target,
                                                                                                 "namespace")}


# a child process in which triton_bn and triton can not be imported (as on a phone or an inference server)
WITHOUT_TRITON_BN = textwrap.dedent("""
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("triton_bn", "triton"):
                raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, Refuse())
    import torch
    try:
        import triton_bn  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("triton_bn is importable")
""")


def test_export_runs_where_triton_bn_is_not_installed(tmp_path):
    """Every model, converted and folded, exported with torch.export (non-strict and strict): ATen operators
    only; saved, loaded and run in a process without triton_bn, the original's outputs (rel. 1e-5)."""
    cases = []
    for name in MODELS:
        original, x = _trained(name)
        expected = original(x).detach()
        for variant in ("converted", "folded"):
            model = _deployed(original, variant)
            for strict in (False, True):
                program = torch.export.export(model, (x,), strict=strict)
                namespaces = _namespaces(program.graph_module)
                assert namespaces <= {"aten"}, (name, variant, strict, namespaces)
                path = tmp_path / f"{name}-{variant}-{strict}.pt2"
                torch.export.save(program, str(path))
                cases.append((str(path), name, variant, strict))
        torch.save({"x": x, "expected": expected}, tmp_path / f"{name}-io.pt")
    child = WITHOUT_TRITON_BN + textwrap.dedent(f"""
        import os
        for path, name, variant, strict in {cases!r}:
            io = torch.load(os.path.join({str(tmp_path)!r}, name + "-io.pt"))
            out = torch.export.load(path).module()(io["x"])
            error = ((out.double() - io["expected"].double()).norm() / io["expected"].double().norm()).item()
            assert error <= {RTOL}, (name, variant, strict, error)
            print("ok", name, variant, strict)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("ok ") == len(cases)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnx_runtime(name):
    """torch.onnx.export(..., dynamo=True) of the converted and the folded model runs in ONNX Runtime's CPU
    provider with the original's outputs; no BatchNormalization node is left where a BN was folded, and the
    folded model is the original's, which the exporter folds itself: the same operators, and the same size
    within 3% (weights and graph, without the per-node metadata)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    original, x = _trained(name)
    expected = original(x).detach().numpy()
    sizes, operators = {}, {}
    for variant, model in (("original", original), ("converted", _deployed(original, "converted")),
                           ("folded", _deployed(original, "folded"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        proto = program.model_proto
        ops = [node.op_type for node in proto.graph.node]
        assert not any(op.startswith("triton") for op in ops)
        if variant == "folded":
            assert "BatchNormalization" not in ops
        data = proto.SerializeToString()
        sizes[variant] = _size_without_metadata(proto)
        operators[variant] = sorted(ops)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert _relative_error(torch.from_numpy(out), torch.from_numpy(expected)) <= RTOL, variant
    assert abs(sizes["folded"] - sizes["original"]) <= 0.03 * sizes["original"], sizes
    assert operators["folded"] == operators["original"]


def _size_without_metadata(proto) -> int:
    """The bytes of an ONNX model's weights and graph, without the annotations the exporter adds: per node,
    initializer and graph metadata (the module path each came from, which differs with the module structure)
    and the optional shape annotations of intermediate values. In a small model those outweigh the weights;
    in the latency bench's models the whole files agree within 0.4% (perf/results/...-latency/)."""
    import onnx
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    graph = bare.graph
    del graph.value_info[:]
    del graph.metadata_props[:]
    for item in list(graph.node) + list(graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""
    return len(bare.SerializeToString())


def test_training_mode_export_for_fine_tuning_elsewhere():
    """A converted model in training mode exports too: batch statistics, the running statistics and the batch
    count updated as nn.BatchNorm updates them (what fine-tuning elsewhere needs)."""
    original, x = _trained("resnext")
    original.train()
    converted = _deployed(original, "converted").train()
    program = torch.export.export(converted, (x,))
    assert _namespaces(program.graph_module) <= {"aten"}
    exported = program.module()
    reference = copy.deepcopy(original)
    torch.testing.assert_close(exported(x), reference(x), atol=1e-5, rtol=1e-5)
    buffers = dict(exported.named_buffers())
    for key, value in reference.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(buffers[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_torchscript_trace_works_and_script_says_which_routes_do(tmp_path):
    """torch.jit.trace records PyTorch's operators (it runs without triton_bn); torch.jit.script refuses with an
    error that names the routes that work, never an AttributeError from inside the compiler."""
    original, x = _trained("resnext")
    converted = _deployed(original, "converted")
    traced = torch.jit.trace(converted, (x,))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not any("triton" in kind for kind in kinds)
    torch.testing.assert_close(traced(x), original(x), atol=1e-5, rtol=1e-5)
    traced.save(str(tmp_path / "traced.pt"))
    torch.save({"x": x, "expected": original(x).detach()}, tmp_path / "io.pt")
    child = WITHOUT_TRITON_BN + textwrap.dedent(f"""
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = torch.jit.load({str(tmp_path / "traced.pt")!r})(io["x"])
        torch.testing.assert_close(out, io["expected"], atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    for model in (converted, _deployed(original, "folded")):
        with pytest.raises(RuntimeError, match="torch.export.export"):
            torch.jit.script(model)
