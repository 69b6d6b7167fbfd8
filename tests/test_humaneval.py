"""bench/humaneval.py: the sandbox against real problems and hostile completions, the
statistics on cases with known answers, the results file's resume and merge, the CLI's
errors, and the whole path on 2 problems with the real SmolLM2 through node processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import humaneval as he  # noqa: E402
from bench import humaneval_report as report  # noqa: E402
from bench import sandbox  # noqa: E402
from bench.humaneval_stats import mcnemar_exact, paired, wilson_interval  # noqa: E402
from bench.humaneval_store import ResultStore, StoreError  # noqa: E402

SCRIPT = ROOT / "bench" / "humaneval.py"
ISOLATED = sandbox.isolation()["isolated"]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="the sandbox is not isolated here "
                                     f"({sandbox.isolation()['network']})")


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def body(*lines: str) -> str:
    """A completion: the function body, as a model would continue the prompt."""
    return "".join(f"    {line}\n" for line in lines)


# --- the sandbox on a real problem ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_known_correct_and_known_wrong_completions_of_a_real_problem(problems):
    p = problems["HumanEval/0"]
    right = he.execute(p, p["canonical_solution"])
    assert right["passed"] and right["status"] == "passed"
    wrong = he.execute(p, body("return False"))       # the tests need True somewhere
    assert not wrong["passed"] and wrong["status"] == "failed"
    assert wrong["detail"].startswith("AssertionError")
    broken = he.execute(p, body("return (((", ""))
    assert not broken["passed"] and "SyntaxError" in broken["detail"]


@pytest.mark.timeout(60)
def test_an_infinite_loop_fails_at_the_wall_clock_limit(problems):
    limits = sandbox.Limits(wall_s=2.0, cpu_s=30)
    t0 = time.monotonic()
    r = he.execute(problems["HumanEval/0"], body("while True:", "    pass"), limits)
    assert not r["passed"] and r["status"] == "timed out"
    assert time.monotonic() - t0 < 2.0 + 8.0


@pytest.mark.timeout(60)
def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock(problems):
    limits = sandbox.Limits(wall_s=30.0, cpu_s=1)
    r = he.execute(problems["HumanEval/0"], body("while True:", "    pass"), limits)
    assert not r["passed"] and r["status"].startswith("killed") and r["exec_s"] < 25


def _sandbox_processes() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and d.stat().st_uid == sandbox.SANDBOX_UID:
                out.append(int(d.name))
        except OSError:
            pass
    return out


@pytest.mark.timeout(90)
def test_a_fork_bomb_is_bounded_and_leaves_no_process(problems):
    limits = sandbox.Limits(wall_s=5.0)
    fork_bomb = body("import os", "while True:", "    try:", "        os.fork()",
                     "    except OSError:", "        pass")
    t0 = time.monotonic()
    r = he.execute(problems["HumanEval/0"], fork_bomb, limits)
    assert not r["passed"]
    assert time.monotonic() - t0 < 5.0 + 10.0
    if ISOLATED:          # its own uid and PID namespace: every fork died with the sandbox
        time.sleep(0.5)
        assert _sandbox_processes() == []
    # and the machine can still run the next problem
    p = problems["HumanEval/0"]
    assert he.execute(p, p["canonical_solution"])["passed"]


@pytest.mark.timeout(60)
def test_a_child_that_leaves_its_process_group_is_killed_too(problems, tmp_path):
    if not ISOLATED:
        pytest.skip("needs the PID namespace")
    p = problems["HumanEval/0"]
    escape = body("import os, time", "if os.fork() == 0:", "    os.setsid()",
                  "    time.sleep(120)", "    os._exit(0)") + p["canonical_solution"]
    r = he.execute(p, escape)
    assert r["passed"]               # the program itself is right
    time.sleep(0.5)
    assert _sandbox_processes() == []


@pytest.mark.timeout(60)
def test_writes_outside_the_temp_dir_never_reach_the_machine(problems, tmp_path):
    p = problems["HumanEval/0"]
    targets = [ROOT / f"pwned-{uuid.uuid4().hex}", tmp_path / "pwned",
               Path.home() / f"pwned-{uuid.uuid4().hex}", Path("/") / f"pwned-{uuid.uuid4().hex}"]
    for target in targets:
        r = he.execute(p, body(f"open({str(target)!r}, 'w').write('x')")
                       + p["canonical_solution"])
        assert not r["passed"], target     # the write raised: nowhere to write it
        assert not target.exists(), target
    # its own working directory is writable, and a program may use it
    r = he.execute(p, body("open('scratch.txt', 'w').write('ok')",
                           "assert open('scratch.txt').read() == 'ok'")
                   + p["canonical_solution"])
    assert r["passed"], r


@needs_isolation
@pytest.mark.timeout(60)
def test_no_project_files_no_home_no_network(problems):
    p = problems["HumanEval/0"]
    for probe in (f"open({str(ROOT / 'README.md')!r}).read()",
                  f"__import__('os').listdir({str(Path.home())!r}) and 1/0",
                  "__import__('socket').create_connection(('127.0.0.1', 22), timeout=2)",
                  "__import__('socket').create_connection(('1.1.1.1', 53), timeout=2)"):
        r = he.execute(p, body(probe) + p["canonical_solution"])
        assert not r["passed"], (probe, r)


@pytest.mark.timeout(60)
def test_huge_output_and_huge_memory_fail_the_problem_only(problems):
    p = problems["HumanEval/0"]
    for flood in (body("print('x' * 100_000_000)"),
                  body("import os", "os.write(1, b'x' * 100_000_000)"),
                  body("x = bytearray(4 << 30)")):
        r = he.execute(p, flood + p["canonical_solution"])
        assert not r["passed"], (flood, r)
    assert he.execute(p, p["canonical_solution"])["passed"]


@pytest.mark.timeout(60)
def test_exiting_early_with_status_zero_is_not_a_pass(problems):
    p = problems["HumanEval/0"]
    for exit_early in (body("import os", "os._exit(0)"), body("raise SystemExit(0)"),
                       body("import sys", "sys.exit()")):
        r = he.execute(p, exit_early)
        assert not r["passed"], (exit_early, r)


# --- statistics -------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_wilson_interval_known_values_and_symmetry():
    z2 = 1.959963984540054 ** 2
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2))      # closed form at 0 successes
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):      # exact at the ends: the estimate is never outside
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    for k, n in ((3, 10), (41, 164), (1, 2)):
        lo, hi = wilson_interval(k, n)
        lo2, hi2 = wilson_interval(n - k, n)
        assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
        assert lo < k / n < hi
    assert wilson_interval(82, 164)[1] - wilson_interval(82, 164)[0] < \
        wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0]


@pytest.mark.timeout(10)
def test_exact_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(5, 0) == mcnemar_exact(0, 5)
    assert mcnemar_exact(1, 5) == pytest.approx(2 * 7 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 20) < 1e-5


@pytest.mark.timeout(10)
def test_paired_counts_only_the_problems_both_ran():
    a = {"t1": True, "t2": True, "t3": False, "t4": False, "t5": True}
    b = {"t1": True, "t2": False, "t3": True, "t4": False, "t6": True}
    d = paired(a, b)
    assert d["problems"] == 4 and d["both"] == 1 and d["neither"] == 1
    assert d["only_a"] == ["t2"] and d["only_b"] == ["t3"] and d["p_value"] == 1.0


def _rec(passed: bool, wall: float, completion: str = "x") -> dict:
    return {"passed": passed, "status": "passed" if passed else "failed", "wall_s": wall,
            "tokens": 10, "bytes": 20, "wire_bytes": 4000.0, "completion": completion,
            "members_kept": 2}


@pytest.mark.timeout(10)
def test_summary_of_an_ensemble_shows_where_it_loses_and_its_time_ratio():
    data = {"systems": {
        "a": {"models": ["a"], "results": {"t1": _rec(True, 2), "t2": _rec(True, 2),
                                           "t3": _rec(False, 2)}},
        "b": {"models": ["b"], "results": {"t1": _rec(False, 1), "t2": _rec(True, 1),
                                           "t3": _rec(False, 1)}},
        "a+b@rank": {"models": ["a", "b"], "results": {
            "t1": _rec(False, 5, "bad"), "t2": _rec(True, 5), "t3": _rec(True, 5)}},
    }}
    s = report.summarise(data)
    e = s["systems"]["a+b@rank"]
    assert e["pass_at_1"] == pytest.approx(2 / 3) and e["per_problem"]["t1"] is False
    assert e["partial"] and s["partial"]
    ens = s["ensembles"]["a+b@rank"]
    assert ens["best_member"] == "a" and ens["common_problems"] == 3
    assert ens["vs_best_member"]["only_a"] == ["t3"] and ens["vs_best_member"]["only_b"] == ["t1"]
    assert ens["losses_total"] == 1 and ens["losses"][0]["task_id"] == "t1"
    assert ens["losses"][0]["ensemble"]["completion"] == "bad" and "a" in ens["losses"][0]
    assert ens["time_over_slowest_member"] == pytest.approx(15 / 6)
    assert e["cost"]["wire_bytes_per_token"] == pytest.approx(400.0)
    assert set(s["comparisons"]) == {"a vs a+b@rank", "a vs b", "a+b@rank vs b"}
    md = report.markdown(s)
    assert "| `a+b@rank` | 3 | 2 | 66.7 |" in md and "| a vs b | 3 | 1 | 1 | 1 | 0 |" in md


# --- the runner's pieces ------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_systems_subset_and_stops(problems):
    s = he.parse_system("qwen2.5-coder-0.5b+smollm2-135m@rank")
    assert s.models == ("qwen2.5-coder-0.5b", "smollm2-135m") and s.mode == "rank"
    s = he.parse_system("qwen2.5-coder-0.5b+qwen2.5-coder-1.5b@equal")
    assert s.weights == "equal" and s.mode == "auto"
    assert he.parse_system("smollm2-135m@") == he.System("smollm2-135m@", ("smollm2-135m",))
    for bad in ("nosuch", "smollm2-135m+", "smollm2-135m+gemma-3-270m@sideways"):
        with pytest.raises(ValueError):
            he.parse_system(bad)
    order = he.subset(problems, None)
    assert len(order) == 164 == len(set(order)) and he.subset(problems, 7) == order[:7]
    assert he.subset(problems, 7) == he.subset(dict(reversed(list(problems.items()))), 7)
    assert he.cut_at_stops("    return x\n\n\ndef g():\n") == "    return x\n\n"
    assert he.cut_at_stops("    return x\n# tests\nprint(1)") == "    return x"
    assert he.cut_at_stops("    return x  # fine\n") == "    return x  # fine\n"


@pytest.mark.timeout(10)
def test_pending_problems_are_the_unrecorded_and_optionally_the_degraded():
    order = ["t1", "t2", "t3", "t4"]
    results = {"t1": {"members_kept": 2}, "t2": {"members_kept": 1}, "t4": {}}
    assert he.pending(order, results, 2) == ["t3"]
    assert he.pending(order, results, 2, redo_degraded=True) == ["t2", "t3"]
    assert he.pending(order, {}, 1) == order


@pytest.mark.timeout(30)
def test_results_file_resumes_merges_and_refuses_another_protocol(tmp_path):
    path = tmp_path / "r.json"
    one, two = ResultStore(path, report.summarise), ResultStore(path, report.summarise)
    proto = {"max_tokens": 64}
    one.begin("x", {"models": ["x"]}, proto, {"benchmark": "test"})
    two.begin("y", {"models": ["y"]}, proto, {})
    one.update("x", record=("HumanEval/1", _rec(True, 1)))
    two.update("y", record=("HumanEval/1", _rec(False, 1)))        # interleaved writers
    one.update("x", record=("HumanEval/2", _rec(False, 1)), run={"id": "r1", "n": 2})
    data = json.loads(path.read_text())
    assert data["systems"]["x"]["per_problem"] == {"HumanEval/1": True, "HumanEval/2": False}
    assert data["systems"]["y"]["passed"] == 0 and data["benchmark"] == "test"
    assert ResultStore(path, report.summarise).done("x") == {"HumanEval/1", "HumanEval/2"}
    with pytest.raises(StoreError, match="max_tokens"):
        ResultStore(path, report.summarise).begin("x", {}, {"max_tokens": 128}, {})
    one.begin("x", {"models": ["x"]}, proto, {})                    # the same protocol resumes
    assert ResultStore(path, report.summarise).done("x") == {"HumanEval/1", "HumanEval/2"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.timeout(120)
def test_bad_arguments_get_one_line_not_a_traceback(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2]")
    for args in (["--systems", "nosuch-model"], ["--systems", "smollm2-135m", "--limit", "0"],
                 ["--systems", "smollm2-135m@rank"], ["--score", str(tmp_path / "none.jsonl")],
                 ["--systems", "smollm2-135m", "smollm2-135m"], []):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
            "bench/humaneval.py: error:"), (args, r.stderr)
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
    r = _cli("--score", str(samples), "--json", str(bad_json))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a HumanEval" in r.stderr
    samples.write_text('{"task_id": "HumanEval/9999", "completion": ""}\n')
    r = _cli("--score", str(samples), "--json", str(tmp_path / "ok.json"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "unknown task_id" in r.stderr
    help_text = " ".join(_cli("--help").stdout.split())
    assert "--limit" in help_text and "Resumable" in help_text and "@options" in help_text


@pytest.mark.timeout(120)
def test_score_someone_elses_completions_as_one_system(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    lines = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]
              ["canonical_solution"]},
             {"task_id": "HumanEval/2", "completion": problems["HumanEval/2"]
              ["canonical_solution"]},
             {"task_id": "HumanEval/3", "completion": body("while True:", "    pass")}]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "r.json"
    r = _cli("--score", str(samples), "--json", str(out), "--timeout", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(out.read_text())["systems"][str(samples)]
    assert s["problems"] == 3 and s["passed"] == 2 and s["pass_at_1"] == pytest.approx(2 / 3)
    assert s["per_problem"] == {"HumanEval/0": True, "HumanEval/2": True, "HumanEval/3": False}
    assert s["results"]["HumanEval/3"]["status"] == "timed out"
    assert "HumanEval pass@1" in r.stderr


# --- end to end: the real SmolLM2 through real node processes ---------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_problems_with_the_real_smollm2_through_node_processes_and_resume(
        problems, tmp_path):
    from dwarfmesh.models.registry import ModelError, resolve_model
    try:
        model = resolve_model("smollm2-135m", pull=False, progress=False)
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled (scripts/setup smollm2-135m): {e}")
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    common = ["--systems", "smollm2-135m", "--json", str(out), "--max-tokens", "48"]
    first = _cli(*common, "--limit", "1", timeout=560)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = json.loads(out.read_text())["systems"]["smollm2-135m"]["results"]
    second = _cli(*common, "--limit", "2", "--plot", str(plot), timeout=560)
    assert second.returncode == 0, second.stderr[-3000:]
    data = json.loads(out.read_text())
    s = data["systems"]["smollm2-135m"]
    order = he.subset(problems, 2)
    assert sorted(s["per_problem"]) == sorted(order) and s["problems"] == 2
    # resumed: the second run did only the problem the first had not, and kept its record
    assert [r["problems_run"] for r in s["runs"]] == [1, 1]
    assert s["results"][order[0]] == kept[order[0]]
    assert s["protocol"]["stop"] == he.STOPS
    from dwarfmesh.engine.choose import choose  # the nodes' engine, as they chose it
    default = choose("auto", "smollm2-135m")[0]
    assert s["engine"].startswith({"llamacpp": "llama.cpp", "mlx": "mlx"}[default])
    assert s["protocol"]["max_tokens"] == 48 and s["protocol"]["decoding"].startswith("greedy")
    for task in order:
        r = s["results"][task]
        assert r["mode"] == "fuse-ids" and r["members_kept"] == 1     # a one-node mesh
        assert 1 <= r["tokens"] <= 48 and r["wall_s"] > 0 and r["wire_bytes"] == 0
        # the completion is the tokens' text; the streamed text lacks the first token's
        # leading space at most (mlx-lm's streaming detokenizer), never anything else
        decoded = he.TokenText(str(model))(problems[task]["prompt"], r["token_ids"])
        assert r["completion"] == he.cut_at_stops(decoded)
        assert r["completion_from"] == "token ids decoded after the prompt"
        streamed = he.cut_at_stops(r["streamed_text"])
        assert r["completion"] in (streamed, " " + streamed)
        # the verdict recorded is the sandbox's verdict on that completion
        assert he.execute(problems[task], r["completion"])["passed"] == r["passed"]
    assert s["pass_at_1"] == sum(s["per_problem"].values()) / 2
    assert s["cost"]["tokens_generated"] == sum(s["results"][t]["tokens"] for t in order)
    assert data["sandbox"]["isolated"] == ISOLATED
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 0 and "smollm2-135m" in second.stderr
