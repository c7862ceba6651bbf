"""Write triton_bn/csrc/cuda/plan_ids.h from triton_bn/backends/plan_numbering.py: the enums the C++ launch path
and the Python that writes its plans share, and static_asserts that the dtype numbers Python sends are c10's.
The header is committed; tests/test_launch.py checks that it is what this script writes.

    python tools/plan_header.py            # rewrites the header
    python tools/plan_header.py --check    # exit 1 if the committed header is not the numbering's
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "triton_bn", "backends", "plan_numbering.py")
HEADER = os.path.join(ROOT, "triton_bn", "csrc", "cuda", "plan_ids.h")
sys.path.insert(0, os.path.join(ROOT, "tools"))
from activation_header import cpp_name, write_or_check  # noqa: E402


def _numbering():
    """plan_numbering.py, read alone (no package import: no torch, no triton)."""
    spec = importlib.util.spec_from_file_location("triton_bn_plan_numbering", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def header_text() -> str:
    numbering = _numbering()
    lines = ["// Written by tools/plan_header.py from triton_bn/backends/plan_numbering.py, which cpp_launch.py reads:",
             "// edit that file, then run the script (tests/test_launch.py fails while this file is not its).",
             "#pragma once", "", "#include <c10/core/ScalarType.h>", "", "#include <cstdint>", "",
             "namespace triton_bn_cuda {", ""]
    for enum, members in numbering.ENUMS.items():
        lines.append(f"enum {enum} : int64_t {{")
        lines += [f"  {cpp_name(name)} = {getattr(numbering, name)}," for name in members]
        lines.append("};")
    lines.append("")
    for dtype, (c10_name, number) in numbering.SCALAR_TYPES.items():
        lines.append(f"static_assert(static_cast<int>(c10::ScalarType::{c10_name}) == {number}, "
                     f"\"torch.{dtype}'s c10 number\");")
    lines += ["", "}  // namespace triton_bn_cuda", ""]
    return "\n".join(lines)


def main() -> int:
    return write_or_check(HEADER, header_text(), "numbering", "tools/plan_header.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
