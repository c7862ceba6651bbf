"""[kernels] and [host] on the CPU: the merge of many splits, grids within the hardware's axis limits,
FLAT tiles never used past int32, the CUDA-graph capture guard, occupancy arithmetic, reproducibility
across processes, and launchers called from several threads at once. (The compiled code itself, its
pipelining and its atomics, is checked in tests/test_compile_sm90.py.)"""
import contextlib
import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import triton
import triton.language as tl

import triton_bn
from triton_bn.backends import triton_grids, triton_kernels, triton_launch
from triton_bn.autotune import TileConfig, forced_config, heuristic_config, merge_block, tuner, tuning_key
from triton_bn.kernels.merge import merge_split_moments
from triton_bn.backends.layout import ChannelsFirstGeometry, ChannelsLastGeometry
from triton_bn.backends.occupancy import H100_LIMITS, resident_programs


@triton.jit
def _merge_probe(count_ptr, mean_ptr, m2_ptr, out_ptr, C, num_splits, BLOCK_SPLITS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    count, mean, m2, tiles = merge_split_moments(count_ptr, mean_ptr, m2_ptr, cols, cmask, C, num_splits,
                                                 BLOCK_SPLITS, BLOCK_C)
    tl.store(out_ptr + cols, count, mask=cmask)
    tl.store(out_ptr + C + cols, mean, mask=cmask)
    tl.store(out_ptr + 2 * C + cols, m2, mask=cmask)
    tl.store(out_ptr + 3 * C, tiles.to(tl.float32))


def test_merge_of_523_splits_is_exact_and_tiled():
    """523 splits (bf16 channels_last 64x112x112 at batch 128 gets that many): the merge takes
    ceil(523 / BLOCK_SPLITS) steps and matches float64 statistics of the whole data."""
    splits, channels, per_split = 523, 3, 7
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(splits, per_split, channels, generator=gen, dtype=torch.float64) * 3 + 100
    data[::5] += 10.0  # splits that differ
    count = torch.full((splits, channels), float(per_split))
    mean = data.mean(1).float()
    m2 = ((data - data.mean(1, keepdim=True)) ** 2).sum(1).float()
    out = torch.empty(3 * channels + 1)
    block = merge_block("channels_last", TileConfig(1, 16))
    _merge_probe[(1,)](count, mean, m2, out, channels, splits, BLOCK_SPLITS=block, BLOCK_C=4)
    flat = data.reshape(-1, channels)
    assert out[3 * channels].item() == math.ceil(splits / block) == 5
    torch.testing.assert_close(out[:channels].double(), torch.full((channels,), float(flat.shape[0]), dtype=torch.float64))
    torch.testing.assert_close(out[channels:2 * channels].double(), flat.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[2 * channels:3 * channels].double(), ((flat - flat.mean(0)) ** 2).sum(0),
                               rtol=1e-5, atol=0)


def test_batch_norm_with_523_splits_matches_float64():
    """The same through the real kernels: a forced configuration that splits 523 rows into 523 splits."""
    x = torch.randn(523, 16, generator=torch.Generator().manual_seed(1)) * 2 + 5
    rm, rv = torch.zeros(16), torch.ones(16)
    with forced_config("channels_last", TileConfig(1, 16, programs_per_sm=1000)):
        assert triton_grids.reduction_grid(ChannelsLastGeometry(523, 16, 16), TileConfig(1, 16), torch.device("cpu"),
                                      1000)[0] == 523
        y = triton_bn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    ref_rm, ref_rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
    ref = torch.nn.functional.batch_norm(x.double(), ref_rm, ref_rv, training=True, momentum=1.0)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((rm.double(), rv.double()), (ref_rm, ref_rv), atol=1e-5, rtol=1e-5)


def test_grids_stay_within_axis_limits_for_huge_channel_counts():
    """Millions of channels: channel blocks never land on an axis limited to 65535."""
    cpu = torch.device("cpu")
    for channels in (2 ** 22, 3 * 2 ** 20 + 5):
        geometry = ChannelsLastGeometry(rows=8, channels=channels, row_stride=channels)
        for role in ("stats", "apply"):
            cfg = heuristic_config("channels_last", role, geometry, 2)
            grid = (triton_grids.reduction_grid(geometry, cfg, cpu, cfg.programs_per_sm)[1] if role == "stats"
                    else triton_grids.elementwise_grid(geometry, cfg)[0])
            assert grid[0] < 2 ** 31 and all(axis <= triton_grids.GRID_AXIS_LIMIT for axis in grid[1:]), grid
        first = ChannelsFirstGeometry(batch=2, channels=channels, spatial=3, batch_stride=3 * channels,
                                      channel_stride=3)
        cfg = heuristic_config("channels_first", "stats", first, 2)
        assert len(triton_grids.reduction_grid(first, cfg, cpu, cfg.programs_per_sm)[1]) == 1


def test_flat_tile_from_a_cache_is_never_used_past_int32(monkeypatch):
    """Keys group N by power of two: a FLAT choice cached at N = 600 must not be reused at N = 1000 when
    N x S passes 2^31 (its int32 index would wrap and store out of bounds)."""
    monkeypatch.setattr(tuner, "tune_on_cpu", True)
    small = ChannelsFirstGeometry(batch=600, channels=4, spatial=2 ** 21, batch_stride=4 * 2 ** 21,
                                  channel_stride=2 ** 21)
    large = ChannelsFirstGeometry(batch=1024, channels=4, spatial=2 ** 21, batch_stride=4 * 2 ** 21,
                                  channel_stride=2 ** 21)
    assert small.batch * small.spatial < 2 ** 31 <= large.batch * large.spatial
    flat = TileConfig(1, 4096, 8, flat=True)
    x = torch.empty(1)
    key = tuning_key("channels_first", "apply", large, x.dtype)
    assert key == tuning_key("channels_first", "apply", small, x.dtype)  # the same key
    tuner.memory[key] = flat
    tuner._disk_loaded = True
    assert tuner.select("channels_first", "apply", small, x, lambda cfg: None) == flat
    chosen = tuner.select("channels_first", "apply", large, x, lambda cfg: None)
    assert not chosen.flat and chosen == heuristic_config("channels_first", "apply", large, 4)


class _FakeCompiled:
    def __init__(self, loaded):
        self.module = object() if loaded else None


class _FakeKernel:
    __name__ = "_bn_fake_kernel"

    def __init__(self, loaded):
        self.loaded, self.launched = loaded, 0

    def warmup(self, *args, grid, **kwargs):
        return _FakeCompiled(self.loaded)

    def __getitem__(self, grid):
        def launch_it(*args, **kwargs):
            self.launched += 1
        return launch_it


def test_capture_guard_refuses_a_first_launch_whatever_the_tuning(monkeypatch):
    """Inside a capture, a kernel variant whose module was never loaded must not launch (with tuning on
    or off, a cached key or a new flag alike): a clear error, nothing launched."""
    monkeypatch.setattr(triton_launch, "capturing", lambda device: True)
    fresh, known = _FakeKernel(loaded=False), _FakeKernel(loaded=True)
    with pytest.raises(RuntimeError, match="Warm up first") as error:
        triton_launch.launch_through_triton(fresh, (1,), (), {}, torch.device("cpu"))
    assert "TRITON_BN_AUTOTUNE" not in str(error.value) and fresh.launched == 0
    triton_launch.launch_through_triton(known, (1,), (), {}, torch.device("cpu"))
    assert known.launched == 1
    monkeypatch.setattr(triton_launch, "capturing", lambda device: False)
    # outside a capture a first launch is fine
    triton_launch.launch_through_triton(fresh, (1,), (), {}, torch.device("cpu"))
    assert fresh.launched == 1


def _fake_jit_kernel(calls):
    """A stand-in for a JITFunction: its launch path returns a 'compiled kernel' whose ``[grid]`` runner
    records what a direct launch passes. ``calls`` collects ("triton", args) and ("direct", grid, args,
    stream)."""
    def fn(x_ptr, out_ptr, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr = 64):
        pass

    class Compiled:
        def __getitem__(self, grid):
            def runner(*args, stream=None):
                calls.append(("direct", grid, args, stream))
            return runner

    class Kernel:
        pre_run_hooks = []

        def __getitem__(self, grid):
            def launch_it(*args, **kwargs):
                calls.append(("triton", args))
                return Compiled()
            return launch_it

    Kernel.fn = staticmethod(fn)
    return Kernel()


def test_a_planned_launch_calls_each_compiled_variant_directly_after_its_first_launch(monkeypatch):
    """[host]: the first launch of each argument signature takes Triton's path (which compiles or finds
    the variant); later ones call that variant directly, with the constexprs appended in parameter order
    (defaults included), the grid padded to 3 axes and the current stream. A new alignment, dtype or int
    value is a new signature; a new float is not."""
    monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(triton_launch, "capturing", lambda device: False)
    monkeypatch.setattr(triton_launch, "current_stream", lambda index: 1234)
    calls = []
    prepared = triton_launch.PreparedLaunch(_fake_jit_kernel(calls), (6,), dict(FLAG=True, num_warps=4))
    cuda = torch.device("cuda", 0)  # only the device's type and index are read
    buffer = torch.empty(64)
    x, out, misaligned = buffer[:16], buffer[16:32], buffer[1:17]
    prepared((x, out, 16, 0.5), cuda)
    prepared((x, out, 16, float("nan")), cuda)
    assert [c[0] for c in calls] == ["triton", "direct"]
    assert calls[1][1:] == ((6, 1, 1), (x, out, 16, calls[1][2][3], True, 64), 1234)
    for changed in ((misaligned, out, 16, 0.5), (x.half(), out, 16, 0.5), (x, out, 1, 0.5)):
        calls.clear()
        prepared(changed, cuda)
        prepared(changed, cuda)
        assert [c[0] for c in calls] == ["triton", "direct"], changed
    calls.clear()
    prepared((x, out, 16, 0.5), torch.device("cpu"))  # the interpreter: always Triton's path
    monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", False)
    prepared((x, out, 16, 0.5), cuda)
    assert [c[0] for c in calls] == ["triton", "triton"]


def test_a_planned_launch_of_a_wrapped_kernel_always_takes_tritons_path(monkeypatch):
    """A kernel that is not a plain JITFunction (no ``fn``, as the tests' launch counters) or has pre-run
    hooks never launches directly: whatever wraps it sees every launch."""
    monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(triton_launch, "capturing", lambda device: False)
    monkeypatch.setattr(triton_launch, "current_stream", lambda index: 0)
    calls = []
    hooked = _fake_jit_kernel(calls)
    hooked.pre_run_hooks = [lambda *args, **kwargs: None]
    wrapped = _fake_jit_kernel(calls)
    type(wrapped).fn = None
    args = (torch.empty(16), torch.empty(16), 16, 0.5)
    for kernel in (hooked, wrapped):
        prepared = triton_launch.PreparedLaunch(kernel, (2, 3), dict(FLAG=False))
        for _ in range(3):
            prepared(args, torch.device("cuda", 0))
    assert [c[0] for c in calls] == ["triton"] * 6


def test_argument_signature_tells_apart_whatever_triton_specializes_differently():
    """The direct-launch key must be at least as fine as Triton's own specialization: two argument lists
    with one signature must get one compiled variant. Checked against Triton's specializer over tensors
    of several dtypes and alignments, ints around 1, 16 and 2**31, floats and bools."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def specialization(args):
        return [native_specialize_impl(BaseBackend, a, False, True, True)[:2] for a in args]

    buffer = torch.empty(64)
    tensors = [buffer[:8], buffer[4:12], buffer[1:9], buffer[2:10], buffer[:8].half(), buffer[:8].bfloat16(),
               torch.empty(8, dtype=torch.int32)]
    scalars = [0, 1, 2, 15, 16, 17, 32, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 16, -1, -16, 0.0, 1.0, 0.5, float("nan"),
               True, False]
    signatures = {}
    for args in [(a, b) for a in tensors + scalars for b in scalars]:
        signatures.setdefault(triton_launch.argument_signature(args), []).append(args)
    checked = 0
    for group in signatures.values():
        first = specialization(group[0])
        for args in group[1:]:
            assert specialization(args) == first, (group[0], args)
            checked += 1
    assert checked >= 100  # aligned views share one signature, and so do the four floats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_launches_on_cuda_are_bitwise_tritons_and_skip_its_launch_path(monkeypatch):
    """[host] on a GPU: from the second training step on, a module's four launches skip
    ``JITFunction.run`` (counted), and every output, gradient and running statistic is bitwise what
    Triton's own path gives (``DIRECT_LAUNCH`` off) - for an aligned input, then for a misaligned view of
    the same shape, a new signature that must not reuse the variant compiled for 16-byte alignment."""
    import copy

    import triton.runtime.jit as jit
    runs = []
    original_run = jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(jit.JITFunction, "run", counting_run)
    torch.manual_seed(0)
    template = triton_bn.BatchNorm2d(8, activation="relu").cuda()
    base = torch.randn(2 * 8 * 5 * 5 + 1, device="cuda")
    aligned, misaligned = base[:-1].view(2, 8, 5, 5), base[1:].view(2, 8, 5, 5)
    assert aligned.data_ptr() % 16 == 0 and misaligned.data_ptr() % 16 != 0
    grad = torch.randn(2, 8, 5, 5, device="cuda")
    results, launches_through_triton = {}, {}
    for direct in (True, False):
        monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH", direct)
        tuner.reset()  # fresh prepared launches, so the direct variants are learned again
        module = copy.deepcopy(template)
        outputs, counts = [], []
        for x in (aligned, aligned, misaligned, misaligned):
            runs.clear()
            x = x.detach().requires_grad_()
            y = module(x)
            y.backward(grad)
            torch.cuda.synchronize()
            counts.append(len(runs))
            outputs += [y, x.grad, module.weight.grad.clone(), module.bias.grad.clone(), module.running_mean.clone(),
                        module.running_var.clone()]
        results[direct], launches_through_triton[direct] = outputs, counts
    assert launches_through_triton[True][1] == 0 and launches_through_triton[True][3] == 0
    assert launches_through_triton[False][1] == 4 and launches_through_triton[False][3] == 4
    for direct_out, triton_out in zip(results[True], results[False]):
        assert torch.equal(direct_out, triton_out)


def test_occupancy_arithmetic():
    """Registers, shared memory and warps each cap the programs per SM (sm_90: 64K registers in units of
    256 per warp, 228 KB of shared memory less 1 KB per program, 64 warps, 32 programs)."""
    assert resident_programs(32, 0, 4, H100_LIMITS) == 16  # warps: 64 / 4
    assert resident_programs(128, 0, 8, H100_LIMITS) == 2  # registers: 65536 / (128 * 32) / 8
    assert resident_programs(141, 0, 8, H100_LIMITS) == 1  # 141 -> 4608 per warp: 14 warps, one 8-warp program
    assert resident_programs(40, 100_000, 4, H100_LIMITS) == 2  # shared: 233472 / 101024
    assert resident_programs(255, 200_000, 16, H100_LIMITS) == 1  # never below one


REPRO_SCRIPT = r"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
import triton_bn
gen = torch.Generator().manual_seed(0)
x = (torch.randn(6, 5, 7, 3, generator=gen) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
bn = triton_bn.BatchNorm2d(5, activation="silu")
y = bn(x)
y.backward(torch.randn(y.shape, generator=gen))
torch.save({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "rv": bn.running_var}, sys.argv[1])
"""


def test_two_processes_sharing_a_cache_agree_bitwise(tmp_path):
    """Same device, triton version and tuning cache: bitwise the same results in another process."""
    env = dict(os.environ, TRITON_BN_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    outputs = []
    for run in range(2):
        path = tmp_path / f"run{run}.pt"
        proc = subprocess.run([sys.executable, "-c", REPRO_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(torch.load(path))
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


def _one_module_from_several_threads(device: str, own_streams: bool):
    """Eight threads share one module, each on its own shape and layout (and with ``own_streams`` its own
    CUDA stream), calling it several times in eval and in training; every result is checked against
    PyTorch's. Returns the errors, with each thread's input."""
    torch.manual_seed(0)
    module = triton_bn.BatchNorm2d(4, activation="relu").eval().to(device)
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    shapes = [(2, 4, 3, 3), (3, 4, 5, 2), (1, 4, 7, 7), (4, 4, 2, 6)]
    inputs = [torch.randn(s, device=device) for s in shapes] + [
        torch.randn(s, device=device).contiguous(memory_format=torch.channels_last) for s in shapes]
    if own_streams:
        torch.cuda.synchronize()  # the module and the inputs were written on the default stream
    errors = []

    def work(x):
        stream = torch.cuda.Stream() if own_streams else None
        try:
            with torch.cuda.stream(stream) if own_streams else contextlib.nullcontext():
                for _ in range(3):
                    with torch.no_grad():
                        y = module(x)
                    ref = torch.relu(torch.nn.functional.batch_norm(x, module.running_mean, module.running_var,
                                                                    module.weight, module.bias, False))
                    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
                    train = triton_bn.batch_norm(x, None, None, training=True, activation="relu")
                    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
                    torch.testing.assert_close(train, expected, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # noqa: BLE001 - reported below with the thread's input
            errors.append((tuple(x.shape), exc))

    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_one_module_from_several_threads(monkeypatch):
    """nn.DataParallel runs replicas in threads and servers call models from thread pools: every cache on
    the call path (geometries, tuner answers, arrival counters) must hold when threads share a module.
    The Triton *interpreter* is not thread-safe itself (it patches triton.language while a kernel runs),
    so here only the kernel executions are serialised; everything triton_bn does around them interleaves."""
    interpreter = threading.Lock()
    original_launch = triton_launch.launch_through_triton

    def serialised_launch(*args, **kwargs):
        with interpreter:
            return original_launch(*args, **kwargs)

    monkeypatch.setattr(triton_launch, "launch_through_triton", serialised_launch)
    errors = _one_module_from_several_threads("cpu", own_streams=False)
    assert not errors, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("own_streams", [False, True], ids=["one stream", "a stream per thread"])
def test_one_module_from_several_threads_on_cuda(own_streams):
    """The same on a GPU, nothing serialised: the prepared launches' compiled variants (direct launches, each on
    its caller's current stream) and the arrival counters (one buffer per stream) shared by threads."""
    errors = _one_module_from_several_threads("cuda", own_streams)
    torch.cuda.synchronize()
    assert not errors, errors


# -- the kernels' gradients against finite differences of their own forward --------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", (None,) + triton_bn.SUPPORTED_ACTIVATIONS)
def test_kernel_gradients_against_finite_differences(activation, layout, with_residual, training):
    """The Triton kernels' backward (float64 never reaches them, so no gradcheck) against central differences
    of their own forward in fp32: directional derivatives of L = sum(c * y) along random directions of x,
    weight, bias and the residual. With a step of 1e-3 the truncation error is ~1e-6 of the derivative and
    fp32 rounding of L ~5e-4; the few elements that cross an activation's kink within the step add ~1e-3; a
    wrong derivative term is off by far more than the tolerance of 1%."""
    assert triton_kernels.uses_kernels(torch.empty(1)), "CPU tensors must run the Triton kernels here"
    gen = torch.Generator().manual_seed(11)
    shape = (5, 4, 3, 3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 2).contiguous(memory_format=fmt)
    residual = torch.randn(shape, generator=gen) if with_residual else None
    weight, bias = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    running_mean, running_var = torch.randn(4, generator=gen) * 0.1, torch.rand(4, generator=gen) + 0.5
    cotangent = torch.randn(shape, generator=gen)

    def loss(x, weight, bias, residual):
        y = triton_bn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5,
                                 activation=activation, negative_slope=0.2, residual=residual)
        return (y * cotangent).sum()

    inputs = [x, weight, bias] + ([residual] if with_residual else [None])
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    loss(*leaves).backward()
    step = 1e-3
    for index, name in enumerate(("x", "weight", "bias", "residual")):
        if inputs[index] is None:
            continue
        for _ in range(2):
            direction = torch.randn(inputs[index].shape, generator=gen)
            moved = [list(inputs), list(inputs)]
            moved[0][index] = inputs[index] + step * direction
            moved[1][index] = inputs[index] - step * direction
            numeric = (loss(*moved[0]) - loss(*moved[1])).item() / (2 * step)
            analytic = (leaves[index].grad * direction).sum().item()
            scale = leaves[index].grad.norm().item() * direction.norm().item()
            assert abs(numeric - analytic) <= 1e-2 * scale, (name, numeric, analytic)
