"""The HumanEval bench's JSON file: per-problem results saved as they finish, resumable.

One file holds any number of systems (`systems` → name → its `results`, task id →
record). Every save re-reads the file under an exclusive lock and replaces only the
records it adds, then writes atomically (temp file + rename), so runs split by system
(in turn or at the same time, on one machine) merge into one file, and a run that was
killed loses at most the problem it was on. Derived figures (pass@1, intervals, paired
tests, cost) are recomputed from the records on every save (`humaneval_report.summarise`).

A system's `protocol` (prompt format, stops, max tokens, decoding) is fixed when its first
record is saved; resuming it with another protocol is refused, since the records would
not be comparable.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreError(RuntimeError):
    """A results file that cannot be used as asked; str() is one line for the user."""


def _read(path: Path) -> dict:
    if not path.exists() or path.stat().st_size == 0:
        return {"systems": {}}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not a results JSON ({e}); use another --json") from None
    if not isinstance(data, dict) or not isinstance(data.get("systems"), dict):
        raise StoreError(f"{path} has no `systems` object: not a HumanEval results file")
    return data


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """Reads and updates one results file; `summarise` refreshes the derived figures."""

    def __init__(self, path: Path, summarise: Callable[[dict], dict]) -> None:
        self.path = path
        self._summarise = summarise

    def load(self) -> dict:
        with _locked(self.path):
            return _read(self.path)

    def done(self, system: str) -> set[str]:
        return set(self.load()["systems"].get(system, {}).get("results", {}))

    def begin(self, system: str, meta: dict, protocol: dict, header: dict) -> None:
        """Create or check `system`; refuse a protocol other than the one it was run with."""
        with _locked(self.path):
            data = _read(self.path)
            entry = data["systems"].get(system)
            if entry and entry.get("results") and entry.get("protocol") != protocol:
                diff = sorted(k for k in {*protocol, *entry.get("protocol", {})}
                              if protocol.get(k) != entry.get("protocol", {}).get(k))
                raise StoreError(f"{self.path} holds {system!r} run with another protocol "
                                 f"(differs in {', '.join(diff)}); use another --json")
            entry = entry or {"results": {}, "runs": []}
            entry.update(meta)
            entry["protocol"] = protocol
            data["systems"][system] = entry
            for k, v in header.items():
                data.setdefault(k, v)
            _write(self.path, self._summarise(data))

    def update(self, system: str, *, record: tuple[str, dict] | None = None,
               run: dict | None = None) -> dict:
        """Add one problem's record and/or replace this run's entry; return the new data."""
        with _locked(self.path):
            data = _read(self.path)
            entry = data["systems"].setdefault(system, {"results": {}, "runs": []})
            if record is not None:
                entry["results"][record[0]] = record[1]
            if run is not None:
                runs = [r for r in entry.get("runs", []) if r.get("id") != run["id"]]
                entry["runs"] = [*runs, run]
            data = self._summarise(data)
            _write(self.path, data)
            return data
