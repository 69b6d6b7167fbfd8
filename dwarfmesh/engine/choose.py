"""Which engine a node runs, and building it: `--engine auto|mlx|llamacpp`.

auto: mlx where it has a GPU (Metal on Apple silicon, `mlx[cuda]` on NVIDIA), llama.cpp
on a CPU-only machine when the model is a GGUF (a short name or a .gguf file) and
llama-cpp-python is installed, else mlx. Every choice comes with a one-line reason for
the log. Also owns the GGUF's tokenizer directory the llama.cpp backend loads (written
once into the model cache, by the same code the mlx import uses).

Knows nothing about sessions; it hands a loaded-on-demand `Engine` to the node.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

from dwarfmesh.engine.worker import Engine
from dwarfmesh.models import registry as models

ENGINES = ("auto", "mlx", "llamacpp")


def mlx_has_gpu() -> bool:
    """True where mlx runs on Metal or CUDA (importing mlx, not running a model)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True
    try:
        import mlx.core as mx
        return bool(mx.metal.is_available() or getattr(mx, "cuda", None)
                    and mx.cuda.is_available())
    except (ImportError, AttributeError, RuntimeError):
        return False


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a spec names (a short name's, pulled or not, or a .gguf path)."""
    if spec in models.SHORT_NAMES:
        return models.gguf_path_for(spec)
    path = Path(spec).expanduser()
    return path.resolve() if path.suffix.lower() == ".gguf" and path.is_file() else None


def choose(requested: str, spec: str) -> tuple[str, str]:
    """(engine, one-line reason) for `--engine requested` and model `spec`."""
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r} (choose from {', '.join(ENGINES)})")
    gguf = gguf_source(spec)
    if requested == "llamacpp":
        if gguf is None:
            raise ValueError(f"--engine llamacpp runs GGUF files: {spec!r} is not a .gguf "
                             "file or a known model name")
        if not llamacpp_installed():
            raise ValueError("--engine llamacpp needs llama-cpp-python: run scripts/setup")
        return "llamacpp", "asked for with --engine llamacpp"
    if requested == "mlx":
        return "mlx", "asked for with --engine mlx"
    if mlx_has_gpu():
        return "mlx", "mlx has a GPU here (Metal or CUDA)"
    if gguf is None:
        return "mlx", "no GPU, but the model is not a GGUF: mlx on the CPU (float32)"
    if not llamacpp_installed():
        return "mlx", ("no GPU and llama-cpp-python is not installed: mlx on the CPU "
                       "(float32, several times slower; run scripts/setup)")
    return "llamacpp", "CPU only: llama.cpp runs the GGUF's quantized weights as they are"


def tokenizer_dir(gguf: Path) -> tuple[Path, list[int]]:
    """A directory holding `gguf`'s tokenizer (as the mlx import writes it), made once in
    the model cache, and its end-of-generation ids."""
    from gguf import GGUFReader

    from dwarfmesh.models.gguf_import import read_metadata
    from dwarfmesh.models.gguf_tokenizer import end_of_generation_ids, write_tokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = models.cache_dir() / "tokenizers" / f"{gguf.stem}-{key}"
    done = out / "eos_ids.json"
    if done.is_file():
        return out, json.loads(done.read_text())
    try:
        meta = read_metadata(GGUFReader(gguf))
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{gguf} is not a readable GGUF file ({e})") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write_tokenizer(meta, tmp)
    eos = end_of_generation_ids(meta)
    (tmp / "eos_ids.json").write_text(json.dumps(eos))
    try:
        os.replace(tmp, out)
    except OSError:                 # another process made it first
        pass
    return out, eos


def make_engine(spec: str, requested: str = "auto", *, model_name: str | None = None,
                threads: int | None = None, pull: bool = True,
                repack: bool = True) -> tuple[Engine, str]:
    """An unloaded Engine for `spec` on the chosen backend, and the reason for the choice.
    Raises ValueError / models.ModelError with a one-line message."""
    engine, reason = choose(requested, spec)
    name = model_name or models.model_id(spec)
    if engine == "mlx":
        return Engine(models.resolve_model(spec, pull=pull), model_name=name), reason
    from dwarfmesh.engine.llamacpp_backend import LlamaCppBackend

    gguf = gguf_source(spec)
    if spec in models.SHORT_NAMES and not gguf.is_file():
        if not pull:
            raise models.ModelError(f"model '{spec}' is not pulled yet: run `dwarfmesh pull "
                                    f"{spec}`")
        gguf = models.pull_gguf(spec)
    tok_dir, eos = tokenizer_dir(gguf)
    backend = LlamaCppBackend(gguf, tok_dir, eos, threads=threads, repack=repack)
    return Engine(gguf, model_name=name, backend=backend), reason
