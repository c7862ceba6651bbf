"""How many programs of a compiled kernel fit on one multiprocessor at once.

A reduction's split count aims at a few programs per multiprocessor so that enough loads are in flight;
asking for more programs than can be resident only adds waves. What fits follows from the compiled
kernel's registers per thread and shared memory (the pipelined loops stage their loads there):

    by registers  = registers per SM / (registers per warp, rounded to the allocation unit) / warps
    by shared     = shared memory per SM / (shared per program + the per-program reservation)
    by warps      = warps per SM / warps per program

``perf/resource_report.py`` prints this for every declared tile from ``ptxas -v`` without a GPU; on a GPU
the launcher reads the same numbers off the compiled kernel (``resident_per_sm``)."""
from dataclasses import dataclass
from typing import Dict

import torch

from . import triton_internals


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536  # 32-bit registers per multiprocessor
    register_unit: int = 256  # registers are granted to a warp in multiples of this
    shared: int = 233472  # bytes of shared memory per multiprocessor (228 KB on sm_90)
    shared_reserved: int = 1024  # bytes the runtime keeps per resident program
    warps: int = 64
    programs: int = 32


H100_LIMITS = SMLimits()  # also the H200's: the same sm_90 multiprocessor


def resident_programs(registers_per_thread: int, shared_bytes: int, num_warps: int, limits: SMLimits) -> int:
    """Programs of this kernel resident per multiprocessor (at least 1: one always runs)."""
    per_warp = -(-max(registers_per_thread, 1) * 32 // limits.register_unit) * limits.register_unit
    by_registers = (limits.registers // per_warp) // num_warps
    by_shared = limits.shared // (shared_bytes + limits.shared_reserved)
    by_warps = limits.warps // num_warps
    return max(1, min(by_registers, by_shared, by_warps, limits.programs))


_LIMITS: Dict[torch.device, SMLimits] = {}


def device_limits(device: torch.device) -> SMLimits:
    """The multiprocessor limits of ``device``, from its properties where torch reports them."""
    if device not in _LIMITS:
        props = torch.cuda.get_device_properties(device)
        default = SMLimits()
        _LIMITS[device] = SMLimits(
            registers=getattr(props, "regs_per_multiprocessor", default.registers),
            shared=getattr(props, "shared_memory_per_multiprocessor", default.shared),
            warps=getattr(props, "max_threads_per_multi_processor", default.warps * 32) // 32)
    return _LIMITS[device]


def resident_per_sm(compiled, device: torch.device) -> int:
    """What fits of a compiled Triton kernel (``JITFunction.warmup``'s result) on ``device``."""
    return resident_programs(triton_internals.register_count(compiled), compiled.metadata.shared,
                             compiled.metadata.num_warps, device_limits(device))
