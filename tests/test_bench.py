"""bench/ensemble_vs_single.py end to end on tiny random-weight models, and the properties
its figures must have: members' BPB equal a plain forward pass, an ensemble of one model
with itself scores like that model, a top-k frame costs bits on text the model would write."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality, same_run  # noqa: E402

SCRIPT = ROOT / "bench" / "ensemble_vs_single.py"


def independent_member_bpb(model_dir: Path, texts: list[dict]) -> float:
    """Σ NLL / (ln 2 · bytes) by one plain forward over each document: no windows, no cache."""
    model, tok = load(str(model_dir))
    nll, nbytes = 0.0, 0
    for t in texts:
        raw = Path(t["file"]).read_bytes()
        prompt = raw[slice(*t["prompt_bytes"])].decode()
        text = raw[slice(*t["scored_bytes"])].decode()
        p_ids = tok.encode(prompt)
        ids = p_ids + tok.encode(text, add_special_tokens=False)
        logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        rows = np.arange(len(p_ids) - 1, len(ids) - 1)
        nll -= float(lp[rows, np.array(ids)[rows + 1]].astype(np.float64).sum())
        nbytes += len(text.encode())
    return nll / (math.log(2) * nbytes)


@pytest.mark.timeout(420)
def test_bench_runs_end_to_end_and_its_figures_hold(tiny_models, tmp_path):
    out = tmp_path / "r.json"
    text = tmp_path / "README.md"          # real prose, frozen for the run and the recheck
    text.write_bytes((ROOT / "README.md").read_bytes())
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", str(tiny_models[0]), str(tiny_models[1]),
         "--text", str(text), "--max-bytes", "1600", "--doc-bytes", "800",
         "--prompt-bytes", "200", "--k", "16", "--speed-tokens", "8",
         "--json", str(out), "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    names = ["m1", "m2"]

    cfg = r["config"]
    assert {"models", "k", "weights", "fuse", "texts", "git_commit", "online_eta",
            "online_alpha", "perplexity_tau"} <= set(cfg)
    assert list(cfg["models"]) == names and cfg["k"] == 16 and cfg["weights"] == "online"
    assert len(cfg["texts"]) == 2 and all(t["file"].endswith("README.md") for t in cfg["texts"])

    q = r["quality"]
    assert list(q["members"]) == names
    for name, path in zip(names, tiny_models):
        assert q["members"][name]["bpb"] == pytest.approx(
            independent_member_bpb(path, cfg["texts"]), rel=1e-4)
    ens = q["ensemble"]
    assert {"bpb", "bpb_topk", "variants", "vs_best_member", "oracle_per_token_bpb"} <= set(ens)
    assert ens["bpb"] == ens["variants"]["linear"]["online"]["bpb"]
    # a linear pool is a mixture: never worse than its worst member, never better than the
    # per-token oracle
    for kind in ("online", "equal", "perplexity"):
        v = ens["variants"]["linear"][kind]["bpb"]
        assert ens["oracle_per_token_bpb"] <= v <= max(m["bpb"] for m in q["members"].values())

    sp = r["speed"]
    e = sp["ensemble"]
    assert "error" not in e and r["goals"]["ensemble_kept_every_member"]["met"]
    assert e["steps"] == 8 and sorted(e["models"].values()) == names
    assert 0 < e["frame_bytes_per_member_per_token"] <= 512
    assert e["tokens_per_s"] > 0 and e["ttft_ms"] > 0
    # the client times text pieces; random models' bytes need not form one (invalid UTF-8)
    assert e["client"]["text_pieces"] <= e["steps"]
    assert e["client"]["text_pieces"] == 0 or e["client"]["ttft_ms"] >= e["ttft_ms"]
    assert {"step_p50", "slowest_forward_p50", "fusion_p50", "overhead_p50"} <= set(e["timing_ms"])
    assert sorted(sp["single"]) == names
    for s in sp["single"].values():
        assert s["steps"] == 8 and s["wire_bytes_per_token"] == 0
    d = sp["derived"]
    assert d["mesh_overhead_ms_per_token"] > 0 and d["wire_bytes_per_node_per_token"] > 0
    # tiny models come from directories, not GGUF files: llama.cpp says why it did not run
    assert all("no GGUF" in v["error"] for v in r["llama_cpp"].values())
    assert {"ensemble_bpb_below_best_member", "mesh_overhead_share",
            "wire_bytes_per_node_per_token"} <= set(r["goals"])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ensemble linear, online weights" in (tmp_path / "r.md").read_text()
    # what bench/same_run.py compares between two commits is read from this very JSON
    f = same_run.figures(r)
    assert f["mesh_overhead_ms_per_token"] == d["mesh_overhead_ms_per_token"]
    assert f["single_node_overhead_ms_per_token"] == d["single_node_overhead_ms_per_token"]
    assert f["stream_step_p50_ms"] == sp["modes"]["stream"]["timing_ms"]["step_p50"] > 0


@pytest.mark.timeout(120)
def test_an_ensemble_of_one_model_with_itself_scores_like_that_model(tiny_models):
    engines = quality.load_engines({"m1": str(tiny_models[0]), "m1#2": str(tiny_models[0])})
    tok = engines[0].tokenizer
    doc = quality.Tokenized(engines[0].encode("The quick brown fox"),
                            list(tok.encode(" jumps over the lazy dog. 0123456789\ndef",
                                            add_special_tokens=False)), 43)
    q = quality.score(engines, [doc], k=8)
    member = q["members"]["m1"]
    assert q["members"]["m1#2"] == member
    for pool in ("linear", "loglinear"):
        for kind in ("online", "equal", "perplexity"):
            v = q["ensemble"]["variants"][pool][kind]
            assert v["bpb"] == pytest.approx(member["bpb"], rel=1e-5), (pool, kind)
            assert v["bpb_topk"] == pytest.approx(member["bpb_topk"], rel=1e-5), (pool, kind)


def sample_ids(model, prompt: list[int], n: int, seed: int) -> list[int]:
    """Ancestral sampling at temperature 1: ids drawn from the model's own distribution."""
    mx.random.seed(seed)
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(mx.random.categorical(logits)))
        logits = model(mx.array([[out[-1]]]), cache=cache)[0, -1]
    return out


@pytest.mark.timeout(120)
def test_a_top_k_frame_costs_bits_on_text_the_model_would_write(tiny_models):
    """On ids drawn from the model itself, E[NLL under the frame] − E[NLL exact] is the KL
    from the model to its floored top-k frame (Gibbs), > 0; with k = V the frame is exact.
    (On text a random model would never write, the uniform floor can beat the model.)"""
    engines = quality.load_engines({"m1": str(tiny_models[0]), "m2": str(tiny_models[1])})
    prompt = engines[0].encode("The quick brown fox")
    doc = quality.Tokenized(prompt, sample_ids(engines[0].model, prompt, 300, seed=0), 1000)
    small = quality.score(engines, [doc], k=8)["members"]["m1"]
    assert small["outside_topk_rate"] > 0
    assert small["bpb_topk"] > small["bpb"] * 1.01
    whole = quality.score(engines, [doc], k=engines[0].vocab_size)
    m1 = whole["members"]["m1"]
    assert m1["outside_topk_rate"] == 0
    assert m1["bpb_topk"] == pytest.approx(m1["bpb"], rel=1e-3)     # float16 frames only
    ens = whole["ensemble"]["variants"]["linear"]["equal"]
    assert ens["bpb_topk"] == pytest.approx(ens["bpb"], rel=1e-3)


def independent_unit_mixture(models: list[Path], texts: list[dict], eta: float,
                             alpha: float, tau: float) -> tuple[list[float], float, int]:
    """Each member's BPB and the fixed-share mixture's, computed from scratch: a cut is any
    character position where every member's encoding of the text up to it is a prefix of
    its encoding of the whole (tried at every position); a unit's log p is the sum of the
    member's token log p between cuts, from one full forward (the first unit's is relative
    to log P(ids(prompt)))."""
    from reference import Direct

    refs = [Direct(m) for m in models]
    member_nll, mix_nll, nbytes, n_units = np.zeros(len(refs)), 0.0, 0, 0
    for t in texts:
        raw = Path(t["file"]).read_bytes()
        prompt = raw[slice(*t["prompt_bytes"])].decode()
        text = raw[slice(*t["scored_bytes"])].decode()
        full = prompt + text
        nbytes += len(text.encode())
        ids = [r.tok.encode(full) for r in refs]
        cum = []
        for r, i in zip(refs, ids):
            lp = r.logprobs(i)
            cum.append(np.concatenate([[0.0], np.cumsum([lp[k - 1, i[k]]
                                                         for k in range(1, len(i))])]))
        marks = [[-r.nll(prompt) for r in refs]]
        for c in range(len(prompt) + 1, len(full) + 1):
            pre = [r.tok.encode(full[:c]) for r in refs]
            if all(i[:len(p)] == p for i, p in zip(ids, pre)):
                marks.append([cm[len(p) - 1] for cm, p in zip(cum, pre)])
        lps = np.diff(np.array(marks).T, axis=1)                   # [members, units]
        n_units += lps.shape[1]
        member_nll -= lps.sum(axis=1)
        z = np.array([-r.nll(prompt) / len(prompt.encode()) for r in refs]) / tau
        w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        for lp in lps.T:
            mix_nll -= float(np.logaddexp.reduce(np.log(w) + lp))   # random models: units
            logw = np.log(w) + eta * lp                                # of p ~ 1e-300
            w = np.exp(logw - logw.max())
            w = (1 - alpha) * w / w.sum() + alpha / len(w)
    scale = math.log(2) * nbytes
    return list(member_nll / scale), mix_nll / scale, n_units


@pytest.mark.timeout(600)
def test_bench_with_mixed_tokenizers_mixes_stable_units_exactly_and_times_both_text_modes(
        mixed_models, tmp_path):
    out = tmp_path / "r.json"
    text = tmp_path / "README.md"
    text.write_bytes((ROOT / "README.md").read_bytes())
    models = mixed_models[:2]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", *map(str, models),
         "--text", str(text), "--max-bytes", "1200", "--doc-bytes", "600",
         "--prompt-bytes", "200", "--k", "16", "--speed-tokens", "8", "--skip-llama-cpp",
         "--json", str(out), "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    cfg, q = r["config"], r["quality"]
    assert len(set(cfg["tokenizers"].values())) == 2 and q["shared_tokenizer"] is False
    names = list(cfg["models"])
    members, mix, n_units = independent_unit_mixture(
        models, cfg["texts"], cfg["text_online_eta"], cfg["text_online_alpha"],
        cfg["perplexity_tau"])
    for name, bpb in zip(names, members):
        assert q["members"][name]["bpb_text"] == pytest.approx(bpb, rel=1e-4)
        # the token path tokenizes prompt and text apart: close, not necessarily equal
        assert q["members"][name]["bpb"] == pytest.approx(bpb, rel=0.05)
    ens = q["ensemble"]
    assert ens["exact"] is True and ens["units"] == n_units and ens["improper_units"] == 0
    assert ens["bpb"] == pytest.approx(mix, rel=1e-4)
    best = min(q["members"][n]["bpb_text"] for n in names)
    assert ens["vs_best_member"] == pytest.approx((ens["bpb"] - best) / best, rel=1e-6)
    # a mixture of units is never worse than its worst member, never better than the
    # per-unit oracle (coarser units: never better than the finer units' oracle either)
    worst = max(q["members"][n]["bpb_text"] for n in names)
    for v in [*ens["variants"].values(), *ens["sensitivity"].values()]:
        assert ens["oracle_per_unit_bpb"] <= v["bpb"] <= worst + 1e-9
    assert ens["vs_best_member_per_document"]["documents"] == 2
    goal = r["goals"]["ensemble_bpb_below_best_member"]
    assert goal["met"] == (ens["vs_best_member"] <= -0.04)

    sp = r["speed"]
    assert list(sp["modes"]) == ["rank", "fuse"]
    assert sp["modes"]["rank"]["mode"] == "rank" and sp["modes"]["fuse"]["mode"] == "fuse-text"
    for mode, e in sp["modes"].items():
        assert "error" not in e, (mode, e)
        assert sorted(e["models"].values()) == sorted(names)
        assert e["committed_bytes"] > 0 and e["wire_bytes_per_byte"] > 0
    d = sp["derived"]
    for mode in ("rank", "fuse"):
        m = d["modes"][mode]
        assert m["round_ms"]["step_p50"] > 0 and m["round_ms"]["slowest_forward_p50"] > 0
        assert m["round_ms"]["propose" if mode == "rank" else "frame"] > 0
    assert d["rank_over_fuse_wire_bytes"] > 0
    assert r["goals"]["ensemble_kept_every_member/fuse"]["met"]
    assert "rank_cost_per_byte_vs_fuse" in r["goals"] or not d["modes"]["rank"][
        "client_ms_per_byte"]
    md = (tmp_path / "r.md").read_text()
    assert "mixture over units, online weights" in md and "ensemble, rank mode" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_text_weights_are_tuned_on_files_the_bench_does_not_score(mixed_models, tmp_path):
    """bench/tune_text_weights.py: dev documents come only from files the bench's documents
    do not touch, every grid cell equals the from-scratch mixture on that dev text, and the
    best cell is the grid's minimum."""
    from bench import texts, tune_text_weights

    readme = (ROOT / "README.md").read_text()
    files = []
    for i in range(4):                                   # four "files" of distinct text
        f = tmp_path / f"t{i}.txt"
        f.write_text(readme[i * 1500:(i + 1) * 1500])
        files.append(f)
    scored = texts.make_documents(files, max_bytes=600, doc_bytes=300, prompt_bytes=150)
    dev = texts.dev_documents(files, scored, max_bytes=600, doc_bytes=300, prompt_bytes=150)
    assert dev and not {d.file for d in dev} & {d.file for d in scored}
    with pytest.raises(ValueError, match="none is left"):
        texts.dev_documents(files, [*scored, *(SimpleNamespace(file=str(f)) for f in files)],
                            max_bytes=600, doc_bytes=300, prompt_bytes=150)

    models = mixed_models[:2]
    engines = quality.load_engines({f"m{i}": str(m) for i, m in enumerate(models)})
    etas, alphas = (0.25, 1.0), (0.0, 0.05)
    r = tune_text_weights.tune(engines, dev, etas=etas, alphas=alphas)
    described = [d.describe() for d in dev]
    for eta in etas:
        for alpha in alphas:
            members, mix, n_units = independent_unit_mixture(models, described, eta, alpha, 1.0)
            got = r["grid"][f"eta={eta:g},alpha={alpha:g}"]
            assert got["bpb"] == pytest.approx(mix, rel=1e-4)
    assert r["units"] == n_units
    assert list(r["members"].values()) == pytest.approx(members, rel=1e-4)
    assert r["best"]["bpb"] == min(c["bpb"] for c in r["grid"].values())

    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_text_weights.py"),
                          "--models", str(models[0])], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "at least two --models" in bad.stderr
    assert "Traceback" not in bad.stderr
