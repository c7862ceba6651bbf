"""The CPU bench's heap: memory a row frees stays in the process, so that a row times its kernels, not page faults.

Why. glibc's malloc serves a large block (above its mmap threshold: 128 KiB at first, rising with the blocks the
process frees, at most 32 MiB) with pages fresh from the kernel and gives them back when the block is freed; the
first write to each 4 KiB page of the next such block then faults. Whether a row's output lands on kept pages or
fresh ones depends on what the process freed before it, that is, on the row's neighbours in the rounds: a fp32
BN training forward of 32x64x56x56 (a 25 MB output) measured 3 ms in one process and 10 ms in another, its
eager anchor 10 ms and 21 ms, the difference ~6,200 minor faults a call (perf/NOTES.md). Every provider pays the
same faults for the same output, so they add equal time to both sides of a ratio and pull it towards 1, by chance.
Blocks above 32 MiB (a float64 tensor of that shape) fault on every call whatever happened before.

What. ``keep_freed_memory`` fixes glibc's mmap threshold at 32 MiB, the ceiling its own dynamic threshold climbs
to in a long-running process, and keeps what is freed on the heap (``M_TRIM_THRESHOLD`` 1 GiB): a block below
32 MiB then comes from the heap and, after the warm-up, reuses pages already touched; a block above it is mapped
afresh and faults on every call, every provider's alike, every call alike (what any glibc process pays for such
a tensor). Taking every block from the heap instead (``M_MMAP_MAX`` 0, tried) let the heap creep: blocks of
PyTorch's 64-byte aligned allocations do not fit the holes that blocks of the same size leave, so a row of
float64 32x64x56x56 tensors grew the heap by 49 MB every few calls, each growth a ~400 ms spike of first
touches on this VM (perf/NOTES.md). ``--page-faults`` leaves malloc as it is. The model bench (``--model``) leaves
it as it is too: a whole step's allocations are part of what a user's training loop pays, original and converted
alike.
"""
import ctypes
import sys
from typing import Optional

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAPPED_FROM_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
KEEP_UP_TO_BYTES = 1 << 30

DESCRIPTION = ("glibc's malloc keeps freed memory below 32 MiB (M_MMAP_THRESHOLD 32 MiB fixed, M_TRIM_THRESHOLD "
               "1 GiB): such outputs reuse touched pages, larger ones fault on every call, no row's faults depend on "
               "its neighbours (--page-faults: malloc as it is)")


def glibc() -> Optional[ctypes.CDLL]:
    """This process's C library where it is glibc (whose mallopt these settings are for), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the symbols this process has loaded: its C library's among them
    # not glibc: musl's mallopt, for one, sets nothing
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> Optional[str]:
    """Set this process's malloc to keep freed memory; returns what was set, for the report, or None where the C
    library is not glibc (macOS, musl) or refuses: rows then allocate as they would have."""
    libc = glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # each returns 1 when set; a fixed mmap threshold no longer follows what the process frees
    if mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO_BYTES) != 1 or mallopt(M_MMAP_THRESHOLD, MAPPED_FROM_BYTES) != 1:
        return None
    return DESCRIPTION
