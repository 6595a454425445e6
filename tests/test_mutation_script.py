"""scripts/mutate.py stays true to the code: every mutant's snippet occurs exactly once in the file it names and
changes it into valid Python, every test it names exists, and the harness really runs the mutated copy (one cheap
mutant end to end: caught; the same run without the mutation would not be)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import mutate  # noqa: E402


def test_at_least_fifteen_mutants_with_distinct_names():
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) >= 15 and len(set(names)) == len(names)


@pytest.mark.parametrize("mutant", mutate.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_once_and_names_existing_tests(mutant):
    text = mutate.mutated_text(mutant)  # the snippet occurs exactly once
    assert mutant.new != mutant.old
    ast.parse(text, filename=mutant.path)  # a syntax error would be "caught" by any test: not a real bug
    assert mutant.tests
    for node in mutant.tests:
        path, _, name = node.partition("::")
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{mutant.name}: no test {node}"


def test_list_names_every_mutant(capsys):
    assert mutate.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [m.name for m in mutate.MUTANTS]


@pytest.mark.slow
def test_a_mutant_is_caught_in_the_copy():
    """keep_checkpoints_ignored end to end (the fastest): the baseline passes, the mutant's test fails."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "mutate.py"), "--only", "keep_checkpoints_ignored"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "baseline passed" in result.stdout and "keep_checkpoints_ignored: caught" in result.stdout


def test_a_stale_snippet_is_an_error(tmp_path):
    (tmp_path / "f.py").write_text("x = 1\n")
    stale = mutate.Mutant("stale", "f.py", "x = 2", "x = 3", ("tests",), "nothing")
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutate.mutated_text(stale, str(tmp_path))
