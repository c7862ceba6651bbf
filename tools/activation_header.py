"""Write triton_bn/csrc/cpu/activation_ids.h from the activation table (triton_bn/activations.py): the ids the
C++ kernels' templates take, under the table's constant names (kIdentity, kRelu, ...). The header is
committed; tests/test_activation_table.py checks that it is what this script writes.

    python tools/activation_header.py            # rewrites the header
    python tools/activation_header.py --check    # exit 1 if the committed header is not the table's
"""
import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "triton_bn", "csrc", "cpu", "activation_ids.h")


def _table():
    """The table, read from activations.py alone (no package import: no triton, no build)."""
    spec = importlib.util.spec_from_file_location("triton_bn_activations", os.path.join(ROOT, "triton_bn",
                                                                                         "activations.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TABLE


def cpp_name(constant: str) -> str:
    """RELU6 -> kRelu6, GELU_TANH -> kGeluTanh."""
    return "k" + "".join(part.capitalize() for part in constant.split("_"))


def header_text() -> str:
    table = _table()
    lines = ["// Written by tools/activation_header.py from the activation table (triton_bn/activations.py): edit the",
             "// table, then run the script (tests/test_activation_table.py fails while this file is not the table's).",
             "#pragma once", "", "#include <cstdint>", "", "namespace triton_bn_cpu {", ""]
    for a in table:
        lines.append(f"constexpr int {cpp_name(a.constant)} = {a.id};  // {a.name!r}")
    lines += ["constexpr int kActivationCount = %d;  // ids are 0 .. kActivationCount - 1" % len(table), ""]
    in_vectors = " || ".join(f"activation == {cpp_name(a.constant)}" for a in table if a.vector_math) or "false"
    lines += ["// The table's vector_math: the activations kernels.h computes in vector registers",
              "// (at::vec::Vectorized, activate_vec). Their lines read each vector of x before they write the same",
              "// positions of y, and nothing else, so y may be x (ops.cpp's activate_).",
              "constexpr bool computed_in_vectors(int64_t activation) {", f"  return {in_vectors};", "}", "",
              "}  // namespace triton_bn_cpu", ""]
    return "\n".join(lines)


def write_or_check(path: str, text: str, source: str, script: str, description: str) -> int:
    """A generated header's command line (this script's and tools/plan_header.py's): rewrite ``path`` with
    ``text``, or with ``--check`` exit 1 if the committed file is not ``source``'s."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        with open(path) as f:
            same = f.read() == text
        print(f"the header is the {source}'s" if same else f"{path} is not the {source}'s: run python {script}")
        return 0 if same else 1
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


def main() -> int:
    return write_or_check(HEADER, header_text(), "table", "tools/activation_header.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
