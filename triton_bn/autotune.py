"""Every tile configuration, tuning key and heuristic of the library, in one place.

One tunable per (layout family, kernel role), eight in all:

    {channels_last, channels_first} x {stats, bwd_reduce}   tile, num_warps, num_stages, programs_per_sm
    {channels_last, channels_first} x {apply, bwd_dx}       tile, num_warps

The tile is (BLOCK_R, BLOCK_C) for channels-last and (BLOCK_N, BLOCK_S) for channels-first. For the
reductions, ``programs_per_sm`` sets the split count (how many programs share a channel's rows) and
``num_stages`` the software pipelining of their loop; the elementwise kernels have no loop and no
splits.

How a configuration is picked (``Tuner.select``):
1. a configuration forced by a test (``forced_config``) wins;
2. without tuning (under the CPU interpreter, where nothing can be benchmarked, or with
   ``TRITON_BN_AUTOTUNE=0`` in the environment at import, or ``tuner.autotune = False``)
   ``heuristic_config`` decides;
3. otherwise the choice cached for this key in memory or on disk is used, and only a key never seen
   on this GPU and triton version is benchmarked, once, over ``candidate_configs``.

Safe for state by construction: every candidate writes only scratch and the call's own outputs. The
statistics kernel, whose last program also updates the running statistics, is benchmarked with scratch
copies of the running buffers, so the real ones are updated exactly once per forward
(``tests/test_autotune.py`` checks this). A reduction's timing includes its merge of the splits, which
its split count drives.

A configuration read from memory or disk is used only where it fits the problem (``TileConfig.fits``):
keys group batch sizes by power of two, and FLAT tiles index in int32.

Keys leave the batch size out where it does not change the best tile: the channel count, the
spatial size and the dtype matter; the number of rows only through its power-of-two bucket.
"""
import contextlib
import functools
import json
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton

from . import settings

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The last program of a reduction merges the splits in [BLOCK_SPLITS, BLOCK_C] tiles of at most this many
# elements (three fp32 tiles in registers at once for the statistics).
MERGE_TILE_ELEMENTS = 2048
# Under the interpreter there are no multiprocessors; pretend there are two, so that small test
# shapes still span several splits and the Chan merge across splits is exercised.
INTERPRETER_SM_COUNT = 2
# Reduction grids aim at this many programs per multiprocessor (enough to hide memory latency).
PROGRAMS_PER_SM = 4


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). (``triton.cdiv`` is a jit function in Triton 3: microseconds per host call.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of two >= n (n >= 1), without triton's jit-call overhead."""
    return 1 << (max(n, 1) - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
    block_a: int  # BLOCK_R (channels-last) or BLOCK_N (channels-first)
    block_b: int  # BLOCK_C (channels-last) or BLOCK_S (channels-first)
    num_warps: int = 4
    num_stages: int = 3  # software pipelining of a reduction's loop (no effect on loop-free kernels)
    programs_per_sm: int = PROGRAMS_PER_SM  # reductions: programs per multiprocessor, sets the split count
    flat: bool = False  # channels-first only: tile the flattened (N x S) plane (see kernels/channels_first.py)

    def launch_kwargs(self, family: str, reduction: bool = False) -> dict:
        """The kernel's tile constexprs and launch options (memoised: this is on every launch's path;
        callers unpack it with ``**``, never mutate it). Reductions also take NUM_STAGES, the depth to
        which their loop's loads are pipelined (``tl.range(..., num_stages=NUM_STAGES)``)."""
        return _launch_kwargs(self, family, reduction)

    def fits(self, family: str, geometry) -> bool:
        """Whether this configuration is valid for ``geometry``: a FLAT tile numbers a channel's elements in
        int32, so it is never used (even from a cache filled at a smaller batch) once N x S reaches 2^31."""
        return not (family == "channels_first" and self.flat and geometry.batch * geometry.spatial >= 2 ** 31)


_POWER_OF_TWO_FIELDS = ("block_a", "block_b", "num_warps")


def tile_config_from_json(entry) -> Optional[TileConfig]:
    """The TileConfig a tuning cache entry describes, or None when it is not exactly one as this version writes
    them (every field, nothing else, of the right type; tiles and warps powers of two, counts >= 1): a cache
    entry of another shape must cost a re-tune, never a crash or a kernel compiled with garbage."""
    names = [f.name for f in fields(TileConfig)]
    if not isinstance(entry, dict) or sorted(entry) != sorted(names):
        return None
    for name in names:
        value = entry[name]
        if name == "flat":
            if not isinstance(value, bool):
                return None
        elif type(value) is not int or value < 1 or (name in _POWER_OF_TWO_FIELDS and value & (value - 1)):
            return None
    return TileConfig(**entry)


@functools.lru_cache(maxsize=1024)
def _launch_kwargs(cfg: TileConfig, family: str, reduction: bool) -> dict:
    names = ("BLOCK_R", "BLOCK_C") if family == "channels_last" else ("BLOCK_N", "BLOCK_S")
    kwargs = {names[0]: cfg.block_a, names[1]: cfg.block_b}
    if family == "channels_first":
        kwargs["FLAT"] = cfg.flat
    if reduction:
        kwargs["NUM_STAGES"] = cfg.num_stages
    if not INTERPRET:
        kwargs["num_warps"] = cfg.num_warps
    return kwargs


def merge_block(family: str, cfg: TileConfig) -> int:
    """BLOCK_SPLITS of the merge: the splits merged per step by a reduction's last program. A function of
    the configuration alone, so it adds no compiled variant."""
    channels = cfg.block_b if family == "channels_last" else 1
    return max(1, min(256, MERGE_TILE_ELEMENTS // channels))


def _warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4


def _declared(family: str) -> List[TileConfig]:
    if family == "channels_last":
        shapes = [(16, 128), (32, 64), (32, 128), (64, 32), (64, 64), (128, 16), (128, 32), (256, 16)]
    else:
        shapes = [(1, 1024), (1, 2048), (1, 4096), (2, 1024), (2, 2048), (4, 256), (8, 64), (16, 64), (32, 16)]
        # flat tiles of the (N x S) plane: only the element count matters
        flat = [TileConfig(1, n, _warps(n), flat=True) for n in (1024, 2048, 4096)]
        return [TileConfig(a, b, _warps(a * b)) for a, b in shapes] + flat
    return [TileConfig(a, b, _warps(a * b)) for a, b in shapes]


LAYOUT_FAMILIES = ("channels_last", "channels_first")  # the kernels' two layout families (kernels/)
DECLARED_CONFIGS: Dict[str, List[TileConfig]] = {family: _declared(family) for family in LAYOUT_FAMILIES}
REDUCTION_ROLES = ("stats", "bwd_reduce")
ELEMENTWISE_ROLES = ("apply", "bwd_dx")
ROLES = REDUCTION_ROLES + ELEMENTWISE_ROLES
# Reductions also try other split counts and pipelining depths (a runtime argument; a recompile).
# (programs_per_sm, num_stages), besides the default (4, 3); num_stages=1 is the loop without pipelining
REDUCTION_VARIANTS = ((2, 3), (8, 3), (4, 2), (4, 1))


def problem_extent(family: str, geometry) -> Tuple[int, int]:
    """(extent of block_a, extent of block_b): the sizes a tile should not overshoot."""
    if family == "channels_last":
        return geometry.rows, geometry.channels
    return geometry.batch, geometry.spatial


def candidate_configs(family: str, role: str, geometry) -> List[TileConfig]:
    """The declared tiles, each dimension clamped to the problem (a tile much larger than the problem
    only masks lanes off), duplicates removed, never empty; for reductions, each tile also with the
    split-count and pipelining variants of ``REDUCTION_VARIANTS`` (where the loads are not 16-byte
    vectors, ``vector_aligned``, only the split-count variants, unpipelined)."""
    extent_a, extent_b = problem_extent(family, geometry)
    cap_a = next_power_of_2(max(extent_a, 1))
    cap_b = max(16, next_power_of_2(max(extent_b, 1)))
    clamped = []
    for cfg in DECLARED_CONFIGS[family]:
        if cfg.flat:
            if extent_a * extent_b >= 2 ** 31:  # the flat index is int32
                continue
            a, b = 1, min(cfg.block_b, max(16, next_power_of_2(extent_a * extent_b)))
        else:
            a, b = min(cfg.block_a, cap_a), min(cfg.block_b, cap_b)
        candidate = TileConfig(a, b, _warps(a * b), flat=cfg.flat)
        if candidate not in clamped:
            clamped.append(candidate)
    if role in REDUCTION_ROLES:
        if vector_aligned(family, geometry):
            clamped += [TileConfig(c.block_a, c.block_b, c.num_warps, stages, per_sm, c.flat)
                        for c in list(clamped) for per_sm, stages in REDUCTION_VARIANTS]
        else:  # pipelining 4-byte loads only loses (heuristic_config): one stage, every split-count variant
            clamped = [replace(c, num_stages=1, programs_per_sm=per_sm) for c in clamped
                       for per_sm in sorted({PROGRAMS_PER_SM} | {v[0] for v in REDUCTION_VARIANTS})]
    return clamped


@functools.lru_cache(maxsize=4096)
def heuristic_config(family: str, role: str, geometry, element_size: int) -> TileConfig:
    """A good tile without benchmarking: about 4096 elements (16 KiB of fp32) per tile.

    Channels-last tiles: the statistics take 32 channels x 128 rows in every dtype; the other kernels
    take wider tiles for 2-byte dtypes (so one row of the tile is still >= 128 contiguous bytes). On an
    H100 the narrow statistics tile ran 1.1-1.9x faster than 32 x 128 or 64 x 64 on every shape timed
    (perf/NOTES.md, "GPU runs 4-6").

    Reductions pipeline their loop (``num_stages=3``) only where their loads are 16-byte vectors
    (``vector_aligned``): otherwise Triton pipelines them as one 4-byte ``cp.async`` per element plus a
    shared-memory read back, which ran 1.8-6x slower than the plain loop on 7x7 and 14x14 NCHW planes."""
    extent_a, extent_b = problem_extent(family, geometry)
    if family == "channels_last":
        widest = 32 if role == "stats" else (64 if element_size >= 4 else 128)
        block_b = max(16, min(next_power_of_2(max(extent_b, 1)), widest))
    else:
        block_b = max(16, min(next_power_of_2(max(extent_b, 1)), 2048))
    block_a = max(1, min(4096 // block_b, next_power_of_2(max(extent_a, 1))))
    stages = 3 if role not in REDUCTION_ROLES or vector_aligned(family, geometry) else 1
    return TileConfig(block_a, block_b, _warps(block_a * block_b), num_stages=stages)


def vector_aligned(family: str, geometry) -> bool:
    """Whether a tile's rows can load as 16-byte vectors: Triton proves alignment from the integer
    arguments it sees divisible by 16 (the row strides, and the extent that masks the contiguous axis)."""
    if family == "channels_last":
        sizes = (geometry.row_stride, geometry.channels)
    else:
        sizes = (geometry.batch_stride, geometry.channel_stride, geometry.spatial)
    return all(size % 16 == 0 for size in sizes)


_SM_COUNTS: Dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    if device not in _SM_COUNTS:  # a property query costs microseconds, and this runs on every launch
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device]


def split_count(work_items: int, parallel_programs: int, device: torch.device,
                programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many splits the reduction dimension gets: enough programs in total to fill the GPU
    (parallel_programs already run side by side: channel blocks or channels), never more splits than
    there are work items (row blocks or tiles)."""
    target = programs_per_sm * sm_count(device)
    return max(1, min(work_items, cdiv(target, max(parallel_programs, 1))))


def tuning_key(family: str, role: str, geometry, dtype: torch.dtype) -> str:
    if family == "channels_last":
        shape = f"C={geometry.channels},rows~{next_power_of_2(max(geometry.rows, 1))}"
    else:
        shape = f"C={geometry.channels},S={geometry.spatial},N~{next_power_of_2(max(geometry.batch, 1))}"
    return f"{family}.{role}|{str(dtype).replace('torch.', '')}|{shape}"


def _default_benchmark(run: Callable[[], None]) -> float:
    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def _switch(attribute: str, doc: str) -> property:
    """A settable boolean of the tuner whose change starts a new generation (``Tuner.changed``)."""
    def set_value(self, value: bool) -> None:
        setattr(self, attribute, bool(value))
        self.changed()
    return property(lambda self: getattr(self, attribute), set_value, doc=doc)


class Tuner:
    """Chooses, caches (memory + one JSON file per GPU and triton version) and reports configurations."""

    def __init__(self):
        self.memory: Dict[str, TileConfig] = {}
        self.report: List[dict] = []  # every benchmarked candidate: kernel key, config, ms, chosen
        self.benchmark: Callable[[Callable[[], None]], float] = _default_benchmark
        # bumped whenever an earlier answer may no longer hold: launchers key their prepared launches on it
        self.generation = 0
        self._tune_on_cpu = False
        # TRITON_BN_AUTOTUNE=0 turns tuning off; read once (this is asked on every launch)
        self._autotune = settings.flag("TRITON_BN_AUTOTUNE")
        # at most this many candidates per key, the heuristic's choice first, then the tiles closest to it
        # (every candidate costs a compile the first time); None: all. TRITON_BN_TUNE_MAX_CANDIDATES sets it.
        self.max_candidates: Optional[int] = settings.get("TRITON_BN_TUNE_MAX_CANDIDATES")
        self._forced: Dict[str, TileConfig] = {}
        self._disk_loaded = False
        self._lock = threading.RLock()
        self._listeners: List[Callable[[], None]] = []

    def changed(self) -> None:
        """Every answer given so far may no longer hold (a forced configuration, a reset, tuning switched on
        or off): a new generation, which the launchers' prepared launches are keyed on, and every listener
        told (the C++ launch path forgets its plans)."""
        self.generation += 1
        for listener in self._listeners:
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` at each new generation (``changed``)."""
        self._listeners.append(listener)

    autotune = _switch("_autotune", "Whether new keys are benchmarked on a GPU (else the heuristic decides).")
    tune_on_cpu = _switch("_tune_on_cpu", "Test hook: benchmark through the interpreter with ``self.benchmark``.")

    # -- policy ---------------------------------------------------------------------------------------
    def enabled(self, device: torch.device) -> bool:
        if not self._autotune:
            return False
        return self._tune_on_cpu if device.type != "cuda" else not INTERPRET

    def select(self, family: str, role: str, geometry, x: torch.Tensor,
               run: Callable[[TileConfig], None]) -> TileConfig:
        """The configuration for this problem. ``run(config)`` launches the tuned kernel once with
        that configuration; it is called only while benchmarking. (Launchers ask once per call site and
        generation: they remember the answer in their prepared launches.)"""
        forced = self._forced.get(f"{family}.{role}") or self._forced.get(family)
        if forced is not None:
            return forced
        heuristic = heuristic_config(family, role, geometry, x.element_size())
        if not self.enabled(x.device):
            return heuristic
        key = tuning_key(family, role, geometry, x.dtype)
        with self._lock:  # one thread tunes a key; the others wait for its answer instead of re-tuning
            return self._select_tuned(family, role, geometry, x, run, key, heuristic)

    def _select_tuned(self, family, role, geometry, x, run, key, heuristic) -> TileConfig:
        self._load_disk(x.device)
        if key not in self.memory:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"triton_bn: {key} is seen for the first time inside a CUDA graph capture, where it can not "
                    "be autotuned (or compiled and loaded). Warm up first: run the same step once (forward and "
                    "backward) before capturing.")
            candidates = self._shortlist(candidate_configs(family, role, geometry), heuristic)
            self.memory[key] = self._benchmark(key, candidates, run)
            self._save_disk(x.device)
        # the key groups batch sizes by power of two: a choice made for one may not fit another
        return self.memory[key] if self.memory[key].fits(family, geometry) else heuristic

    def _shortlist(self, candidates: List[TileConfig], heuristic: TileConfig) -> List[TileConfig]:
        """The heuristic's choice first, then the candidates ordered by how far their tile size is from it
        (in powers of two), cut to ``max_candidates``."""
        size = lambda c: c.block_a * c.block_b  # noqa: E731
        ordered = [heuristic] + sorted((c for c in candidates if c != heuristic),
                                       key=lambda c: (abs(size(c).bit_length() - size(heuristic).bit_length()),
                                                      c.flat, c.programs_per_sm != heuristic.programs_per_sm))
        return ordered[:self.max_candidates] if self.max_candidates else ordered

    def _benchmark(self, key: str, candidates: Sequence[TileConfig], run) -> TileConfig:
        timings = []
        for cfg in candidates:
            try:
                ms = self.benchmark(lambda: run(cfg))
            except Exception as exc:  # a configuration that fails to compile (e.g. out of resources)
                ms = float("inf")
                self.report.append({"key": key, **asdict(cfg), "ms": ms, "chosen": False, "error": str(exc)[:200]})
                continue
            timings.append((ms, cfg))
        if not timings:
            raise RuntimeError(f"triton_bn: no configuration ran for {key}")
        best_ms, best = min(timings, key=lambda t: t[0])
        for ms, cfg in timings:
            self.report.append({"key": key, **asdict(cfg), "ms": ms, "chosen": cfg == best})
        return best

    # -- disk cache -------------------------------------------------------------------------------------
    def cache_file(self, device: torch.device) -> Path:
        root = Path(settings.folder("TRITON_BN_CACHE_DIR", str(Path.home() / ".cache" / "triton_bn")))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"
        safe = "".join(ch if ch.isalnum() else "-" for ch in name)
        from . import __version__  # the entries' form is this version's: another version keeps its own file
        return root / f"autotune-{safe}-triton{triton.__version__}-triton_bn{__version__}.json"

    def _load_disk(self, device: torch.device) -> None:
        """Read the cache file into memory. What is not this version's entry (a file edited by hand, another
        version's form, a broken write) is left out, with one warning: the keys it held are tuned again."""
        if self._disk_loaded:
            return
        self._disk_loaded = True
        path = self.cache_file(device)
        try:
            text = path.read_text()
        except OSError:
            return
        try:
            stored = json.loads(text)
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            warnings.warn(f"triton_bn: the tuning cache {path} is not a JSON object of this version's entries; "
                          "ignoring it (it is rewritten after the next tuning)", RuntimeWarning)
            return
        ignored = 0
        for key, entry in stored.items():
            cfg = tile_config_from_json(entry)
            if cfg is None:
                ignored += 1
            else:
                self.memory.setdefault(key, cfg)
        if ignored:
            warnings.warn(f"triton_bn: ignored {ignored} of {len(stored)} entries of the tuning cache {path} that "
                          "are not this version's tile configurations (those keys are tuned again)", RuntimeWarning)

    def _save_disk(self, device: torch.device) -> None:
        path = self.cache_file(device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(self.memory.items())}, indent=1))
            tmp.replace(path)  # atomic: concurrent processes never read half a file
        except OSError:
            pass  # a read-only home directory only costs a re-tune in the next process

    def reset(self) -> None:
        """Forget everything in memory (the disk cache is re-read on next use)."""
        self.memory.clear()
        self.report.clear()
        self._disk_loaded = False
        self.changed()


tuner = Tuner()


@contextlib.contextmanager
def forced_config(name: str, config: TileConfig):
    """Test hook: use ``config`` for ``name`` (a family such as "channels_last", or one kernel of a family,
    "<family>.<role>" with a role of ``ROLES``, such as "channels_first.bwd_reduce") while the block runs.
    A name that is neither raises ValueError (it would otherwise force nothing, silently)."""
    family, dot, role = name.partition(".")
    if family not in LAYOUT_FAMILIES or (dot and role not in ROLES):
        raise ValueError(f"forced_config: {name!r} names no family ({', '.join(LAYOUT_FAMILIES)}) or "
                         f"'<family>.<role>' with a role of {', '.join(ROLES)}")
    previous = tuner._forced.get(name)
    tuner._forced[name] = config
    tuner.changed()
    try:
        yield
    finally:
        if previous is None:
            tuner._forced.pop(name, None)
        else:
            tuner._forced[name] = previous
        tuner.changed()


def wall_clock_benchmark(run: Callable[[], None]) -> float:
    """A benchmark usable on the CPU (tests): one run, timed with the host clock, in ms."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3
