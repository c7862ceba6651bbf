"""[house] One activation table (triton_bn/activations.py): the Triton kernels, the C++ kernels and the
converter take their ids and names from it, and every place that must know each activation does."""
import os
import re
import subprocess
import sys

from triton_bn import activations, convert
from triton_bn.kernels import activations as kernel_activations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_H = os.path.join(ROOT, "triton_bn", "csrc", "cpu", "kernels.h")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import activation_header  # noqa: E402


def test_the_cpp_header_is_the_table_s():
    """csrc/cpu/activation_ids.h is what tools/activation_header.py writes from the table."""
    with open(activation_header.HEADER) as f:
        assert f.read() == activation_header.header_text(), "run python tools/activation_header.py"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "activation_header.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_triton_constants_are_the_table_s_and_every_one_has_its_branches():
    source = open(kernel_activations.__file__).read()
    assert not re.search(r"ACTIVATION == \d", source), "branch on the table's names, never on a number"
    for entry in activations.TABLE:
        value = getattr(kernel_activations, entry.constant)
        assert getattr(value, "value", value) == entry.id, entry.name
        if entry.name is not None:  # one branch in apply_activation, one in activation_grad
            assert source.count(f"ACTIVATION == {entry.constant}:") == 2, entry.constant


def test_every_activation_has_its_cpp_branches_and_dispatch_case():
    source = open(KERNELS_H).read()
    assert not re.search(r"ACT [!=]= \d", source), "compare ACT with the header's names, never with a number"
    for entry in activations.TABLE:
        name = activation_header.cpp_name(entry.constant)
        assert f"case {name}: body(std::integral_constant<int, {name}>{{}})" in source, name
        if entry.name is not None:  # a branch in activate() and one in activation_backward()
            assert source.count(f"if constexpr (ACT == {name})") >= 2, name
    assert f"kActivationCount == {len(activations.TABLE)}" in source


def test_no_cpp_source_bounds_the_ids_with_a_number():
    """A check such as ``activation <= 8`` would refuse a new activation at run time ("unknown activation
    id") after everything else was done: the bound is kActivationCount."""
    folder = os.path.join(ROOT, "triton_bn", "csrc")
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".h", ".cpp")):
                source = open(os.path.join(dirpath, name)).read()
                for bound in re.finditer(r"activation\s*(<=?|>|>=)\s*\d+", source):
                    assert bound.group(0).replace(" ", "") == "activation>=0", (name, bound.group(0))


def test_the_converter_s_maps_come_from_the_table():
    for entry in activations.TABLE:
        for cls in entry.modules:
            assert convert._MODULES[cls] == entry.name
        for fn in entry.functions:
            assert convert._FUNCTIONS[fn] == entry.name
    assert set(convert._MODULES.values()) | set(convert._FUNCTIONS.values()) <= set(activations.SUPPORTED_ACTIVATIONS)
