"""[perf] Autotuning: every declared configuration is correct, tuning is safe for running statistics,
and choices are cached on disk."""
import json

import pytest
import torch

import triton_bn
from triton_bn import autotune
from triton_bn.autotune import DECLARED_CONFIGS, TileConfig, forced_config, tuner, wall_clock_benchmark
from test_core import run_case

# shapes that no tile divides evenly; the channels-first one has 1260 elements per channel, so flat tiles
# of 1024 span two tiles (and two splits) and every flat tile crosses image boundaries (S = 63)
FAMILY_CASES = {"channels_last": ((33, 20, 3, 3), "channels_last"), "channels_first": ((20, 3, 7, 9), "contiguous")}


@pytest.mark.parametrize("family,config", [(f, c) for f, cs in DECLARED_CONFIGS.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else f"{v.block_a}x{v.block_b}{'-flat' if v.flat else ''}")
def test_every_declared_configuration_is_correct(family, config):
    """Each tile shape's masking, on shapes that no tile divides evenly, forward and backward."""
    shape, layout = FAMILY_CASES[family]
    with forced_config(family, config):
        run_case(shape, torch.float32, "cpu", layout, training=True, activation="relu", with_residual=True)


@pytest.fixture
def cpu_tuning(monkeypatch):
    monkeypatch.setattr(tuner, "tune_on_cpu", True)
    monkeypatch.setattr(tuner, "benchmark", wall_clock_benchmark)


def _fresh_module():
    torch.manual_seed(0)
    mod = triton_bn.BatchNorm2d(6, activation="relu")
    ref = torch.nn.BatchNorm2d(6)
    ref.load_state_dict(mod.state_dict())
    return mod, ref


def test_tuning_updates_running_statistics_once_and_never_writes_the_input(cpu_tuning):
    mod, ref = _fresh_module()
    x = torch.randn(8, 6, 5, 5).requires_grad_()
    x_before = x.detach().clone()
    y = mod(x)
    y.sum().backward()
    assert len(tuner.report) > 2, "tuning should have benchmarked several configurations"
    keys = {row["key"] for row in tuner.report}
    assert {k.split("|")[0] for k in keys} == {f"channels_first.{role}" for role in autotune.ROLES}
    # 5x5 planes are not 16-byte aligned: the reductions try every split count, unpipelined
    reductions = {(row["programs_per_sm"], row["num_stages"]) for row in tuner.report
                  if row["key"].split("|")[0].split(".")[1] in autotune.REDUCTION_ROLES}
    assert reductions == {(2, 1), (4, 1), (8, 1)}
    assert {row["flat"] for row in tuner.report} == {False, True}  # both channels-first tilings measured
    assert torch.equal(x.detach(), x_before)
    ref(x_before)
    torch.testing.assert_close(mod.running_mean, ref.running_mean)  # one update, not one per candidate
    torch.testing.assert_close(mod.running_var, ref.running_var)
    assert mod.num_batches_tracked.item() == 1
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(
        x_before, None, None, mod.weight, mod.bias, True)), atol=1e-5, rtol=1e-5)


def test_choices_are_cached_on_disk_and_reused(cpu_tuning):
    mod, _ = _fresh_module()
    mod(torch.randn(8, 6, 5, 5))
    path = tuner.cache_file(torch.device("cpu"))
    stored = json.loads(path.read_text())
    assert stored and all(set(cfg) == {"block_a", "block_b", "num_warps", "num_stages", "programs_per_sm", "flat"}
                          for cfg in stored.values())
    assert "interpreter" in path.name and "triton" in path.name
    tuner.reset()  # what a new process sees: an empty memory, the file on disk
    mod(torch.randn(8, 6, 5, 5))
    assert tuner.report == [], "a second process must not tune again"
    mod(torch.randn(7, 6, 5, 5))  # another batch size in the same bucket: no new tune either
    assert tuner.report == []


def test_candidate_limit_keeps_the_heuristic_first(cpu_tuning, monkeypatch):
    monkeypatch.setattr(tuner, "max_candidates", 3)
    mod, _ = _fresh_module()
    mod(torch.randn(8, 6, 5, 5))
    by_key = {}
    for row in tuner.report:
        by_key.setdefault(row["key"], []).append(row)
    assert by_key and all(len(rows) == 3 for rows in by_key.values())
    from triton_bn.backends.layout import dense_geometry
    _, geometry = dense_geometry(torch.empty(8, 6, 5, 5))
    first = tuner.report[0]
    heuristic = autotune.heuristic_config("channels_first", "stats", geometry, 4)
    assert (first["block_a"], first["block_b"], first["flat"]) == (heuristic.block_a, heuristic.block_b, False)


def test_autotune_off_uses_the_heuristic(cpu_tuning, monkeypatch):
    monkeypatch.setattr(tuner, "autotune", False)  # what TRITON_BN_AUTOTUNE=0 sets at import
    mod, _ = _fresh_module()
    mod(torch.randn(8, 6, 5, 5))
    assert tuner.report == []
    assert not tuner.cache_file(torch.device("cpu")).exists()


def test_keys_ignore_the_exact_batch_size():
    from triton_bn.backends.layout import dense_geometry
    _, a = dense_geometry(torch.empty(128, 64, 7, 7))
    _, b = dense_geometry(torch.empty(100, 64, 7, 7))
    _, c = dense_geometry(torch.empty(128, 64, 14, 14))
    key = lambda p: autotune.tuning_key("channels_first", "stats", p, torch.float32)  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)


def test_heuristic_tiles_are_powers_of_two_and_bounded():
    from triton_bn.backends.layout import ChannelsLastGeometry, dense_geometry
    for shape, fmt in [((4, 3, 5, 5), torch.contiguous_format), ((4, 300, 5, 5), torch.channels_last),
                       ((2, 7), torch.contiguous_format), ((3, 5, 4000), torch.contiguous_format)]:
        _, geometry = dense_geometry(torch.empty(shape).contiguous(memory_format=fmt))
        family = "channels_last" if isinstance(geometry, ChannelsLastGeometry) else "channels_first"
        for element_size in (2, 4):
            cfg = autotune.heuristic_config(family, "stats", geometry, element_size)
            for v in (cfg.block_a, cfg.block_b):
                assert v >= 1 and v & (v - 1) == 0
            assert cfg.block_a * cfg.block_b <= 4096


@pytest.mark.parametrize("shape, fmt, aligned", [
    ((128, 64, 7, 7), torch.contiguous_format, False),  # rows of 49 elements: 4-byte aligned only
    ((8, 32, 14, 14), torch.contiguous_format, False),  # 196: divisible by 4, not by 16
    ((8, 32, 28, 28), torch.contiguous_format, True),  # 784 = 16 x 49
    ((8, 24, 7, 7), torch.channels_last, False),  # 24 channels: row stride not divisible by 16
    ((8, 64, 7, 7), torch.channels_last, True),
    ((16, 1024), torch.contiguous_format, True),  # (N, C): channels-last family
])
def test_reductions_pipeline_only_vector_aligned_loads(shape, fmt, aligned):
    """The heuristic software-pipelines a reduction's loop only where Triton can prove 16-byte vector
    loads: pipelining 4-byte loads (one cp.async per element) ran 1.8-6x slower on an H100 (NOTES, GPU
    runs 5-6). Elementwise kernels have no loop: their stage count is left at the default."""
    from triton_bn.backends.layout import ChannelsLastGeometry, dense_geometry
    _, geometry = dense_geometry(torch.empty(shape).contiguous(memory_format=fmt))
    family = "channels_last" if isinstance(geometry, ChannelsLastGeometry) else "channels_first"
    assert autotune.vector_aligned(family, geometry) == aligned
    for element_size in (2, 4):
        for role in autotune.REDUCTION_ROLES:
            assert autotune.heuristic_config(family, role, geometry, element_size).num_stages == (3 if aligned else 1)
        for role in autotune.ELEMENTWISE_ROLES:
            assert autotune.heuristic_config(family, role, geometry, element_size).num_stages == 3


def test_channels_last_statistics_tile_is_narrow_in_every_dtype():
    """The channels-last statistics take 32-channel tiles (128 rows) whatever the dtype; the other
    channels-last kernels keep rows of >= 128 contiguous bytes (64 fp32 or 128 bf16 channels)."""
    from triton_bn.backends.layout import dense_geometry
    _, geometry = dense_geometry(torch.empty(64, 256, 14, 14).contiguous(memory_format=torch.channels_last))
    for element_size in (2, 4):
        stats = autotune.heuristic_config("channels_last", "stats", geometry, element_size)
        assert (stats.block_a, stats.block_b) == (128, 32)
        for role in ("apply", "bwd_reduce", "bwd_dx"):
            cfg = autotune.heuristic_config("channels_last", role, geometry, element_size)
            assert cfg.block_b * element_size >= 128 and cfg.block_a * cfg.block_b == 4096


def test_candidates_pipeline_only_vector_aligned_reductions():
    """Aligned planes: every tile with every split count and pipelining depth; unaligned planes (where
    pipelining only loses): the same tiles and split counts, one stage."""
    from triton_bn.backends.layout import dense_geometry
    _, aligned = dense_geometry(torch.empty(8, 32, 28, 28))
    _, unaligned = dense_geometry(torch.empty(8, 32, 7, 7))
    for role in autotune.REDUCTION_ROLES:
        wide = autotune.candidate_configs("channels_first", role, aligned)
        assert {(c.programs_per_sm, c.num_stages) for c in wide} == {(4, 3)} | set(autotune.REDUCTION_VARIANTS)
        narrow = autotune.candidate_configs("channels_first", role, unaligned)
        assert {(c.programs_per_sm, c.num_stages) for c in narrow} == {(2, 1), (4, 1), (8, 1)}
        tiles = lambda configs: {(c.block_a, c.block_b, c.flat) for c in configs}  # noqa: E731
        assert tiles(narrow) == tiles(autotune.candidate_configs("channels_first", "apply", unaligned))
    assert all(c.num_stages == 3 for c in autotune.candidate_configs("channels_first", "apply", unaligned))


def test_tuning_copies_the_running_buffers_once_per_key(cpu_tuning, monkeypatch):
    """The statistics candidates update scratch copies of the running buffers, made once per tuned key
    (not inside every timed candidate run, where their copy kernels would be timed too)."""
    mod, _ = _fresh_module()
    buffers = {id(mod.running_mean), id(mod.running_var)}
    clones = []
    real_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        if id(self) in buffers:
            clones.append(id(self))
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    with torch.no_grad():
        mod(torch.randn(8, 6, 5, 5))
    candidates = [row for row in tuner.report if row["key"].startswith("channels_first.stats")]
    assert len(candidates) > 2 and sorted(clones) == sorted(buffers)


@pytest.mark.parametrize("name", ["channels_first.reduce", "channels_lst", "channels_last.", "channels_last.stats.x"])
def test_forced_config_refuses_a_name_that_forces_nothing(name):
    """A name that is no family and no '<family>.<role>' raises, instead of forcing nothing (the docstring's
    own example, "channels_first.reduce", was such a name); the names it takes force the kernel they name."""
    with pytest.raises(ValueError, match="names no family"):
        with forced_config(name, TileConfig(1, 16)):
            pass
    assert not tuner._forced
    with forced_config("channels_first.bwd_reduce", TileConfig(1, 16)):
        assert "channels_first.bwd_reduce" in tuner._forced
    assert not tuner._forced
