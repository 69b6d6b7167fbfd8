"""Which bytes of which text files the bench scores.

A *document* is a prompt followed by a scored slice, both cut from one file at line
boundaries. The prompt plays the part of a user's prompt in the mesh: it is context, and
the members' NLL on it gives the perplexity weights (and the online weights' prior), but
it is never scored. So no weight is ever chosen by looking at the text that is reported.

Documents are spread over the files: with fewer documents than files, one document from
each of evenly spaced files (in name order; a file too short for a prompt and a slice
passes to the next); with more, round robin through the files, consecutive slices of
each. Everything is deterministic; the JSON records every range.
`dev_documents` cuts dev text (for choosing constants) from the files the bench does not
score. This module reads files and does nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")


@dataclass(frozen=True)
class Document:
    """One prompt + scored slice of `file`; ranges are byte offsets [start, end) in it."""

    file: str
    prompt: str
    text: str
    prompt_range: tuple[int, int]
    scored_range: tuple[int, int]

    @property
    def scored_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def describe(self) -> dict:
        return {"file": self.file, "prompt_bytes": list(self.prompt_range),
                "scored_bytes": list(self.scored_range)}


def default_text_files(root: Path = FORTUNES_DIR) -> list[Path]:
    """Debian's fortunes: every regular file except the `.dat` indexes and `.u8` links."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install Debian's `fortunes` package "
                                "(scripts/setup does) or pass --text FILE")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def _cut(data: bytes, start: int, want: int) -> int:
    """End of a slice of about `want` bytes from `start`, at a line end when there is one."""
    end = min(start + want, len(data))
    if end == len(data):
        return end
    nl = data.rfind(b"\n", start, end)
    if nl >= start + want // 4:
        return nl + 1
    while end > start and (data[end] & 0xC0) == 0x80:     # not inside a UTF-8 sequence
        end -= 1
    return end


def make_documents(files: list[Path], *, max_bytes: int, doc_bytes: int,
                   prompt_bytes: int) -> list[Document]:
    """About `max_bytes` scored bytes in documents of about `doc_bytes` each (see module doc)."""
    if not files:
        raise ValueError("no text files")
    n_docs = max(1, -(-max_bytes // doc_bytes))
    if n_docs <= len(files):
        picks = [int((i + 0.5) * len(files) / n_docs) for i in range(n_docs)]
    else:
        picks = [i % len(files) for i in range(n_docs)]
    data: dict[Path, bytes] = {}
    offset: dict[Path, int] = {}
    docs: list[Document] = []
    left = max_bytes
    for pick in picks:
        # A file too short for a prompt and a slice (or used up) passes to the next one.
        for j in range(len(files)):
            if left <= 0:
                break
            f = files[(pick + j) % len(files)]
            if f not in data:
                data[f] = f.read_bytes()
            raw = data[f]
            p0 = offset.get(f, 0)
            p1 = _cut(raw, p0, prompt_bytes)
            s1 = _cut(raw, p1, min(doc_bytes, left))
            prompt = raw[p0:p1].decode("utf-8", errors="replace")
            text = raw[p1:s1].decode("utf-8", errors="replace")
            if prompt.strip() and text.strip():
                offset[f] = s1
                docs.append(Document(str(f), prompt, text, (p0, p1), (p1, s1)))
                left -= docs[-1].scored_bytes
                break
    if not docs:
        raise ValueError("the text files gave no document (each needs a prompt and a slice)")
    return docs


def dev_documents(files: list[Path], scored: list[Document], *, max_bytes: int,
                  doc_bytes: int, prompt_bytes: int) -> list[Document]:
    """Dev text: documents cut as `make_documents` does, from the files that `scored` (the
    bench's documents) do not touch. Constants may be chosen on these, never on `scored`."""
    used = {d.file for d in scored}
    rest = [f for f in files if str(f) not in used]
    if not rest:
        raise ValueError("every text file is scored by the bench: none is left for dev text")
    return make_documents(rest, max_bytes=max_bytes, doc_bytes=doc_bytes,
                          prompt_bytes=prompt_bytes)
