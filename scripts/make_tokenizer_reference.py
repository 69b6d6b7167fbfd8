"""Write tests/data/tokenizer_reference.json: llama.cpp's token ids for a few fixed texts.

Needs llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp for
several minutes) and Debian's `fortunes` package for the texts. The fixture stores the
texts themselves, so tests need neither. For each short name whose GGUF is pulled
(`dwarfmesh pull NAME`), or for NAME=PATH.gguf pairs given on the command line, it records
`Llama(vocab_only=True).tokenize(text, add_bos=False, special=False)`; entries for models
not available now are kept from the existing fixture.

    python scripts/make_tokenizer_reference.py [NAME=PATH.gguf ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import llama_cpp

from dwarfmesh.models.registry import SHORT_NAMES, gguf_path_for

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_reference.json"
FORTUNES = Path("/usr/share/games/fortunes")

CODE = '''def quicksort(xs):
    """Sort xs; O(n log n) on average."""
    if len(xs) <= 1:
        return xs
\tpivot, *rest = xs  # tab-indented on purpose
    return quicksort([x for x in rest if x < pivot]) + [pivot] + \\
        quicksort([x for x in rest if x >= pivot])


print(quicksort([3, 1, 4, 1, 5, 9, 2, 6, 535897]), 0x1F, 1e-3, 12_000)
'''
EDGES = (
    "\n\n 1\n\n\n  2  3   \r\n\r\nend 1234567 12.50 $3,000 x=42;y==-7\n"
    "Unicode: café naïve Ünïcödé — “quotes” ‘single’ … ½ ① 日本語の文章 한국어 Привет "
    "مرحبا 🙂👍🏽 \u00a0nbsp\u200bzw\ttab   trailing spaces   \n"
    "I'm you're we've they'll he'd IT'S DON'T"
)


def texts() -> dict[str, str]:
    fortunes = (FORTUNES / "fortunes").read_text(encoding="utf-8")[:3000]
    computers = (FORTUNES / "computers").read_text(encoding="utf-8")
    start = computers.index("We were a bit ahead of our time")
    return {
        "fortunes": fortunes,
        "computers-unicode": computers[start - 1500 : start + 1500],
        "code": CODE,
        "edges": EDGES,
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    sources = {name: gguf_path_for(name) for name in SHORT_NAMES if gguf_path_for(name).is_file()}
    sources.update(dict(arg.split("=", 1) for arg in argv))
    old = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    fixture = {
        "generator": "scripts/make_tokenizer_reference.py, "
        f"llama-cpp-python {llama_cpp.__version__}",
        "texts": texts(),
        "models": old.get("models", {}) if old.get("texts") == texts() else {},
    }
    for name, path in sources.items():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        fixture["models"][name] = {
            "gguf_sha256": sha256(Path(path)),
            "ids": {
                key: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                for key, text in fixture["texts"].items()
            },
        }
        sys.stderr.write(f"{name}: {path}\n")
    FIXTURE.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
