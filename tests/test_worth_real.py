"""The worth policy through real node processes: a mesh of a strong member (the bundled
SmolLM2-135M) and a useless one (a tiny random-weight GGUF: another tokenizer, no
knowledge) answers, in the default mode, exactly what the strong member alone answers.

`scripts/test` pulls SmolLM2-135M first; the test skips, saying so, only when it was not.
"""

from __future__ import annotations

import pytest
from meshutil import generate_cli, mesh

from dwarfmesh.models.registry import gguf_path_for

PROMPTS = [
    "def quicksort(xs):",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "def is_palindrome(s: str) -> bool:\n",
    "# Read a CSV file and print the sum of its second column\nimport csv\n",
]
TOKENS = "40"

# Real model processes on llama.cpp (two at a time at most): in process order with the
# rest of the suite, as the other one-node real-model tests.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = gguf_path_for("smollm2-135m")
    if not path.is_file():
        pytest.skip("smollm2-135m is not pulled (run scripts/setup smollm2-135m)")
    return path


@pytest.mark.timeout(600)
def test_a_useless_member_changes_nothing(smollm2_gguf, mixed_ggufs, tmp_path):
    with mesh(["smollm2-135m"], tmp_path) as (addrs, _procs):
        alone = [generate_cli(addrs[0], p, "--max-tokens", TOKENS, cache=tmp_path, mode="auto")
                 for p in PROMPTS]
    with mesh(["smollm2-135m", str(mixed_ggufs[1])], tmp_path) as (addrs, _procs):
        pair = [generate_cli(addrs[1], p, "--max-tokens", TOKENS, cache=tmp_path, mode="auto")
                for p in PROMPTS]
    for prompt, one, two in zip(PROMPTS, alone, pair):
        assert one["mode"] == "fuse-ids" and one["members"] == ["node0"]
        assert two["mode"] == "select", two
        assert two["voted"] == ["node0"] and list(two["benched"]) == ["node1"], two
        strength = two["strength_nll_per_byte"]
        assert strength["node1"] > 1.5 * strength["node0"]
        assert two["text"] == one["text"], prompt
        assert one["text"].strip()
