"""The text of an answer as its tokens are committed: streaming detokenization.

Owns: how a leader turns committed ids into the pieces of text it streams (the first
token's leading space in a completion, what a detokenizer still holds at the end). Used
by every id leader and by the tools that reproduce its stream. Does no I/O.
"""

from __future__ import annotations

from typing import Any


def held_text(detok: Any) -> str:
    """What a streaming detokenizer still holds when the answer ends: it waits for the
    rest of a character, and after a lone space for the next token, so without this the
    last word before an unfinished character (or invalid bytes) would never be sent. An
    unfinished character at the very end is dropped (it has no text yet)."""
    detok.finalize()
    return detok.last_segment.rstrip("\ufffd")


def answer_detokenizer(detok: Any, *, chat: bool) -> Any:
    """mlx-lm's streaming detokenizer for an answer. It drops the first token's leading
    space (right for a chat reply's first word); a completion continues its prompt, where
    that space is text (`def f():\n` + `    return ...` keeps its indentation)."""
    if chat:
        return detok
    if hasattr(detok, "trim_space"):                        # SentencePiece-style
        detok.trim_space = False
    elif hasattr(detok, "_maybe_trim_space"):               # byte-level BPE
        detok._maybe_trim_space = lambda text: text
    return detok
