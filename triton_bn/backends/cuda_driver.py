"""The driver behind the C++ launch path (``cpp_launch.py``, ``csrc/cuda/``), and its stand-ins.

``TRITON_BN_CUDA_DRIVER`` (read at import): unset or ``real``, the CUDA driver (launches on the GPU);
``record``, CPU tensors take the C++ path and every launch is recorded instead of made; ``null``, nothing is
launched or recorded (host-cost measurements: ``perf/host_overhead.py --cpp-null``). Under a stand-in nothing
is computed: outputs hold whatever their memory held.

    from triton_bn import cuda_driver
    cuda_driver.clear()
    y = module(x)                      # under TRITON_BN_CUDA_DRIVER=record
    for launch in cuda_driver.recorded():
        print(launch.kernel, launch.grid, launch.block, launch.shared, launch.params)
"""
import json
from typing import List, NamedTuple, Tuple, Union

from . import cpp_launch


class Launch(NamedTuple):
    kernel: str  # the Triton kernel's name
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]  # threads: num_warps x 32
    shared: int  # bytes of dynamic shared memory
    params: Tuple[Union[int, float], ...]  # the packed values: pointers (addresses) and ints as int, fp32 as float


def mode() -> str:
    """"real", "record" or "null"."""
    return cpp_launch.STAND_IN or "real"


def _ops():
    ops = cpp_launch.ops()
    if ops is None:
        raise RuntimeError("triton_bn: the C++ launch path is not built here (see the warning)")
    return ops


def recorded(raw: bool = False) -> List[Launch]:
    """The launches recorded since the last ``clear()`` (``raw``: as the C++ side writes them, each parameter a
    {"ptr" | "int" | "f32": value} dict)."""
    launches = json.loads(_ops().recorded())
    if raw:
        return launches
    return [Launch(r["kernel"], tuple(r["grid"]), (r["block"], 1, 1), r["shared"],
                   tuple(next(iter(p.values())) for p in r["params"])) for r in launches]


def clear() -> None:
    _ops().clear_recorded()
