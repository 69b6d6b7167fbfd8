"""`scripts/demo`, exactly as a new user runs it (the README's first command), prints a
correct answer: its quicksort is executed against tests in the bench's sandbox.

Real bundled models (Qwen2.5-Coder-0.5B and SmolLM2-135M) in two node processes; the
demo's own set-up step finds them pulled by `scripts/test` (it would pull them itself).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from meshutil import free_port

from bench.sandbox import run_program
from dwarfmesh.models.registry import gguf_path_for

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import random
assert quicksort([]) == []
assert quicksort([1]) == [1]
assert quicksort([3, 1, 2]) == [1, 2, 3]
assert quicksort([5, 5, -1, 0, 5]) == [-1, 0, 5, 5, 5]
xs = [random.randint(-50, 50) for _ in range(200)]
assert quicksort(list(xs)) == sorted(xs)
"""

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]   # two real model processes


@pytest.mark.timeout(900)
def test_the_demo_prints_a_quicksort_that_sorts(tmp_path):
    for model in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        if not gguf_path_for(model).is_file():
            pytest.skip(f"{model} is not pulled (scripts/test pulls it)")
    out = tmp_path / "demo.json"
    env = dict(os.environ, DEMO_JSON=str(out), PORT=str(free_port()))
    run = subprocess.run(["scripts/demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=880)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    answer = json.loads(out.read_text())
    program = "def quicksort(xs):" + answer["text"]
    assert program in run.stdout                     # what the user saw
    assert "demo: voted:" in run.stdout
    assert answer["mode"] == "select" and answer["voted"]
    verdict = run_program(program + "\n" + CHECK)
    assert verdict.passed, (program, verdict)
