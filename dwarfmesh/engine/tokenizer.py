"""A GGUF's tokenizer without transformers, for the llama.cpp backend.

It runs the tokenizer.json that `gguf_tokenizer` writes with the `tokenizers` library (the
Rust code transformers itself runs for a fast tokenizer), renders the chat template the
way transformers renders it (jinja2's sandbox, the same options, filters and globals), and
streams text with the same detokenizers as mlx-lm (ported below). An mlx node that loads
the same files through mlx-lm therefore gets the same ids, texts, template and
fingerprint; the tests compare the two on every registry model.

Why not mlx-lm's loader, as the mlx backend uses: it imports transformers, which costs
about 2 s of CPU at every node start (more than loading a 1.5B GGUF), and a node that
runs llama.cpp needs nothing else from it.
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

# transformers' named special tokens, in its order (all_special_tokens keeps it).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
THINK_TOKENS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"),
                ("<|think:start|>", "<|think:end|>"))


class GGUFTokenizer:
    """The subset of mlx-lm's TokenizerWrapper (over a transformers fast tokenizer) that
    the engine uses: encode, decode, vocabulary, special tokens, the chat template and a
    streaming detokenizer."""

    def __init__(self, directory: Path, eos_token_ids: list[int] | None = None) -> None:
        from tokenizers import Tokenizer

        text = (directory / "tokenizer.json").read_text(encoding="utf-8")
        self._tok = Tokenizer.from_str(text)
        spec = json.loads(text)
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.special_tokens_map = {name: config[name] for name in SPECIAL_TOKEN_NAMES
                                   if config.get(name) is not None}
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.chat_template: str | None = config.get("chat_template")
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self.eos_token_ids = set(eos_token_ids or [])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            self.eos_token_ids.add(self._tok.token_to_id(self.eos_token))
        vocab = self.get_vocab()
        self.has_thinking = any(a in vocab and b in vocab for a, b in THINK_TOKENS)
        self._detokenizer = _detokenizer_for(spec.get("decoder"), self)

    # --- the transformers calls the engine makes ------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = self._clean_up if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tok.token_to_id(t) for t in self.all_special_tokens
                if self._tok.token_to_id(t) is not None]

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | list[int]:
        """The conversation in the model's template, as transformers' apply_chat_template
        renders it (with mlx-lm's `enable_thinking`); ids without added special tokens
        when `tokenize` (the template writes its own)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compiled(self.chat_template).render(
            messages=chat, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map, enable_thinking=self.has_thinking)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def detokenizer(self) -> Any:
        """A fresh streaming detokenizer (one per answer: answers stream concurrently)."""
        out = copy.copy(self._detokenizer)
        out.reset()
        return out


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                 (" 're", "'re")):
        text = text.replace(a, b)
    return text


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled in the environment transformers gives chat templates (a
    sandbox: a GGUF's template is code from whoever made the file)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """Refuses underscore names, as transformers' does (no reaching CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = Namespace
    return env.from_string(template)


# --- streaming detokenizers, ported from mlx-lm (tokenizer_utils.py, MIT licence) --------
# The same classes mlx-lm picks for the same tokenizer.json, so an answer streams in the
# same pieces on either engine. `sessions.answer.answer_detokenizer` relies on their attributes
# (`trim_space`, `_maybe_trim_space`).


def _detokenizer_for(decoder: Any, tokenizer: GGUFTokenizer) -> Any:
    spm = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
           {"type": "ByteFallback"}, {"type": "Fuse"}]
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    if isinstance(decoder, dict) and decoder.get("type") == "Sequence":
        if decoder.get("decoders") == spm + [strip]:
            return SPMStreamingDetokenizer(tokenizer, trim_space=True)
        if decoder.get("decoders") == spm:
            return SPMStreamingDetokenizer(tokenizer, trim_space=False)
    if isinstance(decoder, dict) and decoder.get("type") == "ByteLevel":
        return BPEStreamingDetokenizer(tokenizer)
    return NaiveStreamingDetokenizer(tokenizer)


class StreamingDetokenizer:
    text: str
    tokens: list[int]
    offset: int

    @property
    def last_segment(self) -> str:
        """The text since the last time this was read."""
        text = self.text
        segment = text[self.offset:]
        self.offset = len(text)
        return segment


class NaiveStreamingDetokenizer(StreamingDetokenizer):
    """Decodes the current line again at each token (any tokenizer)."""

    def __init__(self, tokenizer: GGUFTokenizer) -> None:
        self._tokenizer = tokenizer
        probe = tokenizer.encode("a ,b", add_special_tokens=False)
        self._clean_spaces = " ," not in tokenizer.decode(probe)
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.tokens: list[int] = []
        self._text = ""
        self._current_tokens: list[int] = []
        self._current_text = ""

    def add_token(self, token: int) -> None:
        self._current_tokens.append(token)
        self.tokens.append(token)

    def finalize(self) -> None:
        self._text += self._tokenizer.decode(self._current_tokens)
        self._current_tokens = []
        self._current_text = ""

    @property
    def text(self) -> str:  # type: ignore[override]
        if self._current_tokens:
            self._current_text = self._tokenizer.decode(self._current_tokens)
            if self._current_text.endswith("\ufffd"):
                self._current_text = self._current_text.rstrip("\ufffd")
            elif self._clean_spaces and self._current_text.endswith(" "):
                self._current_text = self._current_text[:-1]
        if self._current_text.endswith("\n"):
            self._text += self._current_text
            self._current_tokens.clear()
            self._current_text = ""
        return self._text + self._current_text


class SPMStreamingDetokenizer(StreamingDetokenizer):
    """SentencePiece pieces: text is flushed whenever the bytes so far are whole
    characters."""

    _sep = "\u2581".encode()

    def __init__(self, tokenizer: GGUFTokenizer, trim_space: bool = True) -> None:
        self.trim_space = trim_space
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.tokenmap = [bytes([int(t[3:5], 16)]) if t.startswith("<0x") else t.encode()
                         for t in (t or "" for t in tokens)]
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self._unflushed = b""
        self.text = ""
        self.tokens = []

    def _try_flush(self, force: bool = False) -> None:
        text = self._unflushed.replace(self._sep, b" ").decode("utf-8", "replace")
        if not force and text.endswith("\ufffd"):
            return
        if not self.text and self.trim_space and text and text[0] == " ":
            text = text[1:]
        self.text += text
        self._unflushed = b""

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._unflushed += self.tokenmap[token]
        self._try_flush()

    def finalize(self) -> None:
        self._try_flush(force=True)
        self._unflushed = b""


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, reversed."""
    char_to_bytes = {}
    limits = [0, ord("!"), ord("~") + 1, ord("¡"), ord("¬") + 1, ord("®"), ord("ÿ") + 1]
    n = 0
    for i, (start, stop) in enumerate(zip(limits, limits[1:])):
        for b in range(start, stop):
            if i % 2 == 0:
                char_to_bytes[chr(2**8 + n)] = b
                n += 1
            else:
                char_to_bytes[chr(b)] = b
    return char_to_bytes


class BPEStreamingDetokenizer(StreamingDetokenizer):
    """Byte-level BPE: text is flushed whenever the bytes so far are whole characters
    (a lone space waits for the next token)."""

    def __init__(self, tokenizer: GGUFTokenizer) -> None:
        self.tokenmap = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self._unflushed = ""
        self.text = ""
        self.tokens = []

    @staticmethod
    def _decode_bytes(seq: str) -> str:
        byte_decoder = _byte_decoder()
        barr = bytearray()
        for c in seq:
            res = byte_decoder.get(c, False)
            if res:
                barr.append(res)
            else:
                barr.extend(bytes(c, "utf-8"))
        return barr.decode("utf-8", "replace")

    def _maybe_trim_space(self, current_text: str) -> str:
        if not current_text or current_text[0] != " ":
            return current_text
        return current_text if self.text else current_text[1:]

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        v = self.tokenmap[token] if token < len(self.tokenmap) else "!"
        v = v or ""
        self._unflushed += v
        text = self._decode_bytes(self._unflushed)
        if not text.endswith("\ufffd") and not (
                len(v) == 1 and _byte_decoder().get(v[0]) == 32):
            self.text += self._maybe_trim_space(text)
            self._unflushed = ""

    def finalize(self) -> None:
        self.text += self._maybe_trim_space(self._decode_bytes(self._unflushed))
        self._unflushed = ""
