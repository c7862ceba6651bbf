"""[compile] Custom ops under torch.library: registration, opcheck, torch.compile(fullgraph=True) with no
graph breaks; on a GPU, no host synchronisation and CUDA graph capture."""
import pytest
import torch
import torch.nn as nn

import triton_bn
from test_epilogue import TinyResNet

OPS = ("batch_stats", "batch_norm_apply", "batch_norm_backward")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new module instances of one class: without a reset, dynamo's per-code-object
    recompile limit (8) would be reached across tests, not within one."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_ops_are_registered_with_fake_implementations():
    """Every op runs on fake tensors (what torch.compile traces with), and the statistics op declares
    the running buffers as mutated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 3, 5, 5)
        stats = torch.empty(3)
        mean, invstd = torch.ops.triton_bn.batch_stats(x, stats, stats.clone(), None, 0.1, False, 1e-5)
        y = torch.ops.triton_bn.batch_norm_apply(x, mean, invstd, None, None, None, None, 1e-5, 1, 0.01)
        grads = torch.ops.triton_bn.batch_norm_backward(y, x, mean, invstd, None, stats, None, None, 1e-5, 1, 0.01,
                                                        [True, True, False, False])
    assert mean.shape == (3,) and mean.dtype == torch.float32 and y.shape == x.shape
    assert grads[0].shape == x.shape and grads[1].shape == (3,) and grads[2].numel() == 0
    schema = str(torch.ops.triton_bn.batch_stats.default._schema)
    assert "!)? running_mean" in schema and "!)? running_var" in schema, schema
    assert "!" not in str(torch.ops.triton_bn.batch_norm_apply.default._schema)


def _opcheck_cases(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    xr = x.clone().requires_grad_()
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device) + 0.5
    residual = torch.randn_like(x, requires_grad=True)
    nbt = torch.ones((), dtype=torch.long, device=device)
    return [
        (torch.ops.triton_bn.batch_stats, (x, mean.clone(), var.clone(), None, 0.1, False, 1e-5)),
        (torch.ops.triton_bn.batch_stats, (x.to(memory_format=torch.channels_last), mean.clone(), var.clone(), nbt, 0.0,
                                           True, 1e-5)),
        (torch.ops.triton_bn.batch_stats, (x, None, None, None, 0.1, False, 1e-5)),
        (torch.ops.triton_bn.batch_norm_apply, (xr, mean, None, var, w, b, residual, 1e-5, 1, 0.01)),
        (torch.ops.triton_bn.batch_norm_apply, (xr, mean, var.rsqrt(), None, None, b, None, 1e-5, 4, 0.01)),
        (torch.ops.triton_bn.batch_norm_backward, (torch.randn_like(x), x, mean, var.rsqrt(), None, w.detach(),
                                                   b.detach(), residual.detach(), 1e-5, 5, 0.01,
                                                   [True, True, True, True])),
        (torch.ops.triton_bn.batch_norm_backward, (torch.randn_like(x), x, mean, None, var, None, None, None, 1e-5, 0,
                                                   0.01, [True, False, False, False])),
    ]


def test_opcheck_every_op(device):
    seen = set()
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)
        seen.add(op._qualname if hasattr(op, "_qualname") else str(op))
    assert len(seen) == len(OPS)


def _step(model, x, residual=None):
    y = model(x) if residual is None else model(x, residual=residual)
    y.square().mean().backward()
    return y


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", (None,) + triton_bn.SUPPORTED_ACTIVATIONS)
def test_compiled_module_matches_eager(activation, training, device):
    for momentum, with_residual in ((0.1, False), (None, True)):
        torch.manual_seed(0)
        eager = triton_bn.BatchNorm2d(4, activation=activation, momentum=momentum).to(device).train(training)
        compiled_mod = triton_bn.BatchNorm2d(4, activation=activation, momentum=momentum).to(device).train(training)
        compiled_mod.load_state_dict(eager.state_dict())
        compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
        for step in range(2):
            x = torch.randn(3, 4, 5, 5, device=device) + step
            r = torch.randn_like(x) if with_residual else None
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ra = r.clone().requires_grad_() if r is not None else None
            rb = r.clone().requires_grad_() if r is not None else None
            torch.testing.assert_close(_step(compiled, xb, rb), _step(eager, xa, ra))
            torch.testing.assert_close(xb.grad, xa.grad)
            if r is not None:
                torch.testing.assert_close(rb.grad, ra.grad)
        for key, value in eager.state_dict().items():
            torch.testing.assert_close(compiled_mod.state_dict()[key], value, msg=key)
        torch.testing.assert_close(compiled_mod.weight.grad, eager.weight.grad)


def test_compiled_converted_resnet_with_inductor(device):
    """A converted model under the default (inductor) backend, fullgraph: outputs, gradients and
    running statistics equal eager."""
    torch.manual_seed(0)
    eager = triton_bn.convert_model(TinyResNet().to(device))
    other = triton_bn.convert_model(TinyResNet().to(device))
    other.load_state_dict(eager.state_dict())
    compiled = torch.compile(other, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(_step(compiled, x), _step(eager, x), atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_no_graph_breaks():
    mod = triton_bn.BatchNorm2d(4, activation="relu", momentum=None)
    explanation = torch._dynamo.explain(mod)(torch.randn(2, 4, 3, 3), residual=torch.randn(2, 4, 3, 3))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = explanation.graphs[0].code  # traced code goes through the custom ops (eager skips them)
    assert "triton_bn.batch_stats" in code and "triton_bn.batch_norm_apply" in code


def cuda_only(test):
    """GPU-only: skipped (and reported as skipped) without CUDA; marked ``gpu`` for perf/gpu_check.sh."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


class SmallNet(nn.Module):
    """conv -> BN+ReLU (momentum=None) -> BN+add+SiLU with the block's own input as the residual. With
    ``fused=False`` the same network out of PyTorch's modules, the control for the CUDA graph test; its
    first BN keeps momentum=0.1, because PyTorch's momentum=None reads num_batches_tracked on the host,
    which a CUDA graph capture refuses (triton_bn's reads it on the device)."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        if fused:
            self.bn = triton_bn.BatchNorm2d(8, activation="relu", momentum=None)
            self.bn2 = triton_bn.BatchNorm2d(8, activation="silu")
        else:
            self.bn = nn.BatchNorm2d(8)
            self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        if not self.fused:
            y = torch.relu(self.bn(self.conv(x)))
            return torch.nn.functional.silu(self.bn2(y) + y)
        y = self.bn(self.conv(x))
        return self.bn2(y, residual=y)


@cuda_only
def test_training_step_has_no_host_sync():
    net = SmallNet().cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    net(x).sum().backward()  # warm-up: compile and tune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        net(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("fused", [True, False], ids=["triton_bn", "torch_control"])
def test_cuda_graph_capture_and_replay_match_eager(fused):
    torch.manual_seed(0)
    net = SmallNet(fused).cuda()
    twin = SmallNet(fused).cuda()
    twin.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    static_x = torch.randn(4, 3, 8, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            net(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    twin.load_state_dict(net.state_dict())
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = net(static_x).sum()
        static_loss.backward()
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, device="cuda")
        static_x.copy_(x)
        # the captured backward accumulates into the existing .grad buffers (grads were zeros, not None,
        # at capture), so each replay adds to them: zero them in place, as a graphed training loop does
        opt.zero_grad(set_to_none=False)
        graph.replay()
        twin.zero_grad()
        loss = twin(x).sum()
        loss.backward()
        torch.testing.assert_close(static_loss, loss)
        torch.testing.assert_close(net.bn.weight.grad, twin.bn.weight.grad)
    torch.testing.assert_close(net.bn.running_var, twin.bn.running_var)


@cuda_only
@pytest.mark.parametrize("tuning", [True, False], ids=["tuning", "heuristic"])
def test_capture_without_warm_up_says_to_warm_up(tuning, monkeypatch):
    """A new key (tuning) or a kernel variant never launched in this process (heuristic tiles: an
    activation no other test uses, an odd channel count) inside a capture: a clear error either way."""
    from triton_bn.backends import triton_grids, triton_kernels
    from triton_bn.kernels import KERNELS
    from triton_bn.autotune import tuner
    monkeypatch.setattr(tuner, "autotune", tuning)
    tuner.reset()
    monkeypatch.setenv("TRITON_BN_CACHE_DIR", "/nonexistent-triton-bn-cache")
    for kernels in KERNELS.values():  # as in a fresh process: no variant loaded yet
        for kernel in kernels.values():
            kernel.device_caches.clear()
    triton_grids._RESIDENT.clear()
    triton_kernels._CALLS.clear()
    mod = triton_bn.BatchNorm2d(23, activation="leaky_relu", negative_slope=0.3).cuda()
    x = torch.randn(4, 23, 6, 7, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Warm up first"):
        with torch.cuda.graph(graph):
            mod(x)
