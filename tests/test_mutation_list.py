"""The mutation audit's list (tools/mutate.py) still names code that exists: each mutation's text appears
exactly once in its file (a refactor that moves the code must retarget the mutation, or the audit would report
an error, not a result)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import mutate  # noqa: E402


@pytest.mark.parametrize("mutation", mutate.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_names_code_that_exists_once(mutation):
    with open(os.path.join(ROOT, mutation.path)) as f:
        assert f.read().count(mutation.old) == 1
    for test in mutation.tests:
        assert os.path.isfile(os.path.join(ROOT, test)), test
