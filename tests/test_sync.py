"""[sync] SyncBatchNorm over torch.distributed (gloo on the CPU, kernels through the interpreter):
2 and 3 processes, equal, uneven and empty per-rank batches, against one process over the whole batch."""
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import triton_bn
from conftest import TOLERANCES

CHANNELS = 5
SPATIAL = (3, 4)


def _full_batch(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, CHANNELS, *SPATIAL, generator=gen) * 2 + 1
    residual = torch.randn(total, CHANNELS, *SPATIAL, generator=gen)
    grad = torch.randn(total, CHANNELS, *SPATIAL, generator=gen)
    return x, residual, grad


def _make_module(momentum):
    torch.manual_seed(0)
    mod = triton_bn.BatchNorm2d(CHANNELS, activation="relu", momentum=momentum)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.5, 0.5)
    return mod


def _worker(rank, world_size, init_file, sizes, momentum, layout, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, residual, grad = _full_batch(sizes)
        begin = sum(sizes[:rank])
        sl = slice(begin, begin + sizes[rank])
        mod = triton_bn.convert_sync_batchnorm(_make_module(momentum))
        assert isinstance(mod, triton_bn.SyncBatchNorm) and mod.activation == "relu"
        xs = x[sl].clone()
        if layout == "channels_last":
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_()
        rs = residual[sl].clone().requires_grad_()
        for step in range(2):  # two steps: running statistics over steps, momentum=None included
            xs.grad = rs.grad = None
            mod.zero_grad()
            y = mod(xs * (step + 1), residual=rs)
            y.backward(grad[sl])
        # dweight / dbias are per-rank (as in torch.nn.SyncBatchNorm); their sum is the whole batch's
        dw, db = mod.weight.grad.clone(), mod.bias.grad.clone()
        dist.all_reduce(dw)
        dist.all_reduce(db)
        torch.save(dict(y=y.detach(), dx=xs.grad, dr=rs.grad, dw=dw, db=db, rm=mod.running_mean,
                        rv=mod.running_var, nbt=mod.num_batches_tracked), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_distributed(world_size, sizes, momentum=0.1, layout="contiguous", timeout=240):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_worker, args=(world_size, init_file, sizes, momentum, layout, tmp),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.time() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.time() > deadline:
                    raise TimeoutError(f"distributed test did not finish in {timeout} s")
        finally:
            for proc in ctx.processes:  # always clean up, also on failure or timeout
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size)]


def _single_process(sizes, momentum):
    """The reference: PyTorch's own BatchNorm2d over the whole batch in float64, then + residual, ReLU."""
    x, residual, grad = _full_batch(sizes)
    ours = _make_module(momentum)
    mod = nn.BatchNorm2d(CHANNELS, momentum=momentum).double()
    mod.load_state_dict(ours.state_dict())
    xs, rs = x.double().requires_grad_(), residual.double().requires_grad_()
    for step in range(2):
        xs.grad = rs.grad = None
        mod.zero_grad()
        y = torch.relu(mod(xs * (step + 1)) + rs)
        y.backward(grad.double())
    return dict(y=y.detach(), dx=xs.grad, dr=rs.grad, dw=mod.weight.grad, db=mod.bias.grad, rm=mod.running_mean,
                rv=mod.running_var, nbt=mod.num_batches_tracked)


@pytest.mark.parametrize("world_size,sizes,momentum,layout", [
    (2, [3, 3], 0.1, "contiguous"),
    (2, [5, 2], None, "channels_last"),
    (3, [4, 0, 3], 0.1, "contiguous"),
    (3, [1, 6, 2], None, "contiguous"),
], ids=["2-equal", "2-uneven-cumulative-cl", "3-one-empty", "3-uneven-cumulative"])
def test_sync_matches_single_process_over_the_whole_batch(world_size, sizes, momentum, layout):
    results = _run_distributed(world_size, sizes, momentum, layout)
    ref = _single_process(sizes, momentum)
    atol, rtol = TOLERANCES[torch.float32]
    for key in ("y", "dx", "dr"):
        torch.testing.assert_close(torch.cat([r[key] for r in results]).double(), ref[key], atol=atol, rtol=rtol,
                                   msg=key)
    for r in results:
        for key in ("dw", "db", "rm", "rv"):
            torch.testing.assert_close(r[key].double(), ref[key], atol=atol, rtol=rtol, msg=key)
        assert r["nbt"].item() == ref["nbt"].item() == 2


@pytest.mark.parametrize("world_size_one", [False, True], ids=["no-process-group", "world-size-1"])
def test_local_path_matches_pytorch(world_size_one, device, tmp_path):
    """No process group, or a group of one, and eval: the local kernels, no communication; against
    PyTorch's BatchNorm2d then SiLU in float64 (outputs, gradients, running statistics)."""
    import torch.distributed as dist
    if world_size_one:
        if device != "cpu":
            pytest.skip("gloo on the CPU only")
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sync = triton_bn.SyncBatchNorm(4, activation="silu").to(device)
        with torch.no_grad():
            sync.weight.uniform_(0.5, 1.5)
            sync.bias.uniform_(-0.5, 0.5)
        reference = nn.BatchNorm2d(4).double().to(device)
        reference.load_state_dict(sync.state_dict())
        assert isinstance(sync, nn.SyncBatchNorm)
        atol, rtol = TOLERANCES[torch.float32]
        for train in (True, False):
            sync.train(train)
            reference.train(train)
            x = (torch.randn(3, 4, 5, 5, device=device) * 2 + 1).requires_grad_()
            xd = x.detach().double().requires_grad_()
            y, expected = sync(x), torch.nn.functional.silu(reference(xd))
            torch.testing.assert_close(y.double(), expected, atol=atol, rtol=rtol)
            grad = torch.randn_like(y)
            y.backward(grad)
            expected.backward(grad.double())
            torch.testing.assert_close(x.grad.double(), xd.grad, atol=atol, rtol=rtol)
            torch.testing.assert_close(sync.weight.grad.double(), reference.weight.grad, atol=atol, rtol=rtol)
        torch.testing.assert_close(sync.running_var.double(), reference.running_var, atol=atol, rtol=rtol)
        torch.testing.assert_close(sync.running_mean.double(), reference.running_mean, atol=atol, rtol=rtol)
    finally:
        if world_size_one:
            dist.destroy_process_group()


def test_convert_sync_batchnorm_keeps_fusions():
    from test_epilogue import TinyResNet
    model = triton_bn.convert_model(TinyResNet())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    synced = triton_bn.convert_sync_batchnorm(model)
    syncs = [m for m in synced.modules() if isinstance(m, triton_bn.SyncBatchNorm)]
    assert len(syncs) == 8  # the seven BatchNorm2d and the head's BatchNorm1d
    assert sum(m.activation == "relu" for m in syncs) == 6
    assert not any(type(m) in (triton_bn.BatchNorm2d, nn.BatchNorm2d) for m in synced.modules())
    plain = triton_bn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    assert isinstance(plain[0], triton_bn.SyncBatchNorm) and plain[0].activation is None
    torch.testing.assert_close(synced(x), expected)


def test_on_cpu_ddp_takes_batchnorm_and_refuses_syncbatchnorm(tmp_path):
    """What the README says about CPU processes: torch's DistributedDataParallel refuses every SyncBatchNorm
    module on the CPU ("SyncBatchNorm layers only work with GPU modules"; ours subclasses torch's), and takes
    triton_bn's BatchNorm2d (per-rank statistics). The synchronized model itself runs over gloo without DDP
    (``test_sync_matches_single_process_over_the_whole_batch``). Fails if a torch release lifts the rule."""
    import gc
    import torch.distributed as dist

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), triton_bn.BatchNorm2d(4, activation="relu"))

    def train_step():  # the DDP object (its reducer holds the group) is freed when this returns
        ddp = nn.parallel.DistributedDataParallel(model())
        ddp(torch.randn(2, 3, 4, 4)).sum().backward()
        return [p.grad is not None for p in ddp.parameters()]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="only work with GPU modules"):
            nn.parallel.DistributedDataParallel(triton_bn.convert_sync_batchnorm(model()))
        grads = train_step()
    finally:
        # every reference to the group gone before it is destroyed: a DDP reducer freed after
        # destroy_process_group joined gloo's threads forever in one CI run (its destructor, pytest's teardown)
        gc.collect()
        dist.destroy_process_group()
    assert grads and all(grads)
