"""The command line: bad input is one line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
from meshutil import ROOT, free_port, node_env

pytestmark = pytest.mark.timeout(120)


def run(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "dwarfmesh", *args], capture_output=True,
                          text=True, timeout=60, env=node_env(tmp_path), cwd=ROOT)


@pytest.mark.parametrize("args", [
    ["node", "--model", "/no/such/model/dir"],
    ["node", "--model", "no-such-short-name-xyz"],
    ["node", "--model", "x", "--port", "70000"],
    ["node", "--model", "x", "--weight", "0"],          # NaN weights with --weights static
    ["node", "--model", "x", "--weight", "nan"],
    ["node", "--model", "x", "--weight", "-1"],
    ["generate", "--connect", "127.0.0.1:5757", "--prompt", "x", "--max-tokens", "9000"],
    ["generate", "--connect", "nonsense", "--prompt", "x"],
    ["generate", "--connect", "127.0.0.1:5757", "--prompt", "x", "--temperature", "-1"],
    ["generate", "--connect", "127.0.0.1:5757", "--prompt", "x", "--top-k", "0"],
    ["peers", "--connect", "host:notaport"],
    ["generate", "--connect", "127.0.0.1:5757", "--prompt", "x", "--drafter", "member"],
    ["generate", "--connect", "127.0.0.1:5757", "--prompt", "x", "--speculate", "2",
     "--drafter", "everyone"],
    ["frobnicate"],
])
def test_bad_arguments_give_one_line_and_exit_2(args, tmp_path):
    out = run(*args, tmp_path=tmp_path)
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_node_is_a_clear_error(tmp_path):
    port = free_port()        # nothing listens there
    out = run("generate", "--connect", f"127.0.0.1:{port}", "--prompt", "x", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "no answer from" in out.stderr and "Traceback" not in out.stderr


def test_help_explains_every_command(tmp_path):
    for cmd in ("node", "peers", "generate", "pull"):
        out = run(cmd, "--help", tmp_path=tmp_path)
        assert out.returncode == 0 and "usage: dwarfmesh " + cmd in out.stdout
    out = run("--help", tmp_path=tmp_path)
    assert "examples:" in out.stdout
