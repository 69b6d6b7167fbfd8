"""Where a proposed continuation of text ends, where an answer stops, and byte counts of
text: pure functions.

Shared by the engine (a rank member cuts its proposal with `proposal_cut`), by
`fusion.text` (the leader counts bytes and aligns candidates) and by every leader (`stop_at`:
one stop-string rule for id and text sessions). No I/O, no model, no fusion.
"""

from __future__ import annotations


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def complete_text(text: str) -> str:
    """`text` without a trailing incomplete character (a decoder's U+FFFD placeholders)."""
    return text.rstrip("\ufffd")


def proposal_cut(text: str, *, done: bool) -> int | None:
    """Where a proposed continuation ends, as an index into `text`, or None (go on).

    Leading whitespace belongs to the proposal. After the first non-space character:
    a newline ends it (before the newline: the next proposal starts the line); when
    generation is `done` (token budget spent) it ends at the last word boundary (before
    a whitespace that follows a non-space), or takes everything when there is none. So a
    proposal never ends inside a word unless a single word outlasts the budget, and the
    next proposal starts with the whitespace that separates them.
    """
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return len(text) if done and text else None
    newline = text.find("\n", start)
    if newline >= 0:
        return newline
    if not done:
        return None
    for i in range(len(text) - 1, start, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return len(text)


def stop_at(text: str, added: int, stops: list[str]) -> int | None:
    """Where the answer `text` ends at a stop string: the earliest start of any of
    `stops` (whichever is listed first), or None. Only the last `added` characters are
    new, so only a match that reaches into them is looked for (earlier text was checked
    when it came, and the per-step loop must not rescan the whole answer)."""
    best = None
    for s in stops:
        if s:
            start = max(len(text) - added - len(s) + 1, 0)
            at = text.find(s, start)
            if at >= 0 and (best is None or at < best):
                best = at
    return best
