"""Every ``TRITON_BN_*`` environment variable, read in one place.

Each setting has a name, the values it takes, a default and what it does (``SETTINGS``; docs/settings.md is
the same table for readers, and a test keeps the two equal). A value that does not parse never stops an
import or a call: it gives one warning that names the variable, the value and the default taken instead,
and the default applies. Unset or empty means the default.

Flags take ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case).

When each is read: the switches of a path (``NATIVE_CPU``, ``CPP_LAUNCH``, ``CUDA_DRIVER``, ``DIRECT_LAUNCH``,
``AUTOTUNE``, ``TUNE_MAX_CANDIDATES``) once, when triton_bn is imported (they decide a hot path, which must not
read the environment per call); the folders and the build's limits when they are used, so that a process can
point them elsewhere before its first build or tuning.
"""
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
FLAG = "1/0, true/false, yes/no, on/off"


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value
    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _driver(text: str) -> str:
    value = text.strip().lower()
    if value not in ("real", "record", "null"):
        raise ValueError(text)
    return value


def _path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


class Setting(NamedTuple):
    name: str
    values: str  # what it takes, for the docs and the warning
    default: object  # what applies when unset, empty or unparsable (None: computed where it is used)
    parse: Callable[[str], object]
    does: str


SETTINGS: Dict[str, Setting] = {s.name: s for s in [
    Setting("TRITON_BN_NATIVE_CPU", FLAG, True, _flag,
            "CPU tensors run the native C++ kernels (built on first use); off: PyTorch's CPU kernels with our "
            "epilogue. Read at import."),
    Setting("TRITON_BN_CPP_LAUNCH", FLAG, False, _flag,
            "The eager GPU path launches from C++ (docs/launch.md; opt-in until it has passed the CUDA tests on "
            "a GPU). Read at import."),
    Setting("TRITON_BN_CUDA_DRIVER", "real, record, null", "real", _driver,
            "The C++ launch path's driver: a stand-in (record: launches recorded, not made; null: nothing "
            "launched) lets CPU tensors take that path, for tests and host-cost measurements. Read at import."),
    Setting("TRITON_BN_DIRECT_LAUNCH", FLAG, True, _flag,
            "On a GPU, call each compiled kernel variant directly after its first launch (off: every launch "
            "through Triton's launcher). Read at import."),
    Setting("TRITON_BN_AUTOTUNE", FLAG, True, _flag,
            "Benchmark the tile configurations of a new kernel key on a GPU (off: the heuristic's choice). "
            "Read at import; ``triton_bn.autotune.tuner.autotune`` changes it later."),
    Setting("TRITON_BN_TUNE_MAX_CANDIDATES", "whole number >= 1", None, _whole_number(1),
            "At most this many configurations tried per key, the heuristic's first (unset: all). Read at import."),
    Setting("TRITON_BN_CACHE_DIR", "folder", None, _path,
            "Where tuning choices are kept (default ~/.cache/triton_bn). Read when tuning."),
    Setting("TRITON_BN_BUILD_DIR", "folder", None, _path,
            "Where native builds go (default $XDG_CACHE_HOME/triton_bn/build, else ~/.cache/triton_bn/build). "
            "Read when building."),
    Setting("TRITON_BN_BUILD_WAIT", "seconds >= 0", 900.0, _seconds,
            "How long a process waits for another one building the same library before it gives up with an "
            "error. Read when building."),
    Setting("TRITON_BN_BUILD_JOBS", "whole number >= 0", 0, _whole_number(0),
            "Compiler processes at once in a build (0: one per core). Read when building."),
    Setting("TRITON_BN_RESULTS_DIR", "folder", None, _path,
            "Where ``triton-bn bench`` writes a run's folder (default ~/triton_bn-results). Read by the bench."),
]}

_warned = set()


def get(name: str):
    """The value of setting ``name`` from the environment now (its default where unset, empty or bad; a bad
    value is said once per process, in a warning naming the variable, the value and the default)."""
    setting = SETTINGS[name]
    text = os.environ.get(name, "")
    if not text.strip():
        return setting.default
    try:
        return setting.parse(text)
    except ValueError:
        if (name, text) not in _warned:
            _warned.add((name, text))
            default = "unset" if setting.default is None else setting.default
            warnings.warn(f"triton_bn: {name}={text!r} is not valid (expected {setting.values}); using the "
                          f"default ({default})", RuntimeWarning, stacklevel=2)
        return setting.default


def flag(name: str) -> bool:
    return bool(get(name))


def folder(name: str, fallback: str) -> str:
    """A folder setting's value, or ``fallback`` where it is unset."""
    value: Optional[str] = get(name)
    return value if value is not None else fallback
