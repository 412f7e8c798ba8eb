"""An evaluation's output folder: its identity, its lock and its predictions, so a resumed run never mixes
settings, two runs never share a folder, and a cut line never stops a resume.

``out/run.json`` holds the run's identity (model and a digest of its weights, method with every hyperparameter,
budget, data with a digest of its records, generation settings, vtc and transformers versions). Resuming into a
folder whose identity differs is refused with the differing fields named, unless ``overwrite`` discards it.
``out/.lock`` is held (an OS file lock: released when the process dies, so a stale lock is recovered) for the
whole run; a second run into the same folder is refused. ``out/predictions.jsonl`` gets one JSON line per
prediction; a torn last line (a kill during a write) is dropped with a warning and generated again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

IDENTITY_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOCK_FILE = ".lock"


class RunError(RuntimeError):
    """A run cannot use its output folder (other settings, another run writing, corrupt predictions)."""


def weights_digest(model: torch.nn.Module, samples: int = 64) -> str:
    """sha256 over every parameter and buffer's name, shape, dtype and ``samples`` evenly strided values: cheap
    on a 7B model, and any retrained or differently loaded weights change it."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            n = flat.numel()
            idx = torch.linspace(0, max(n - 1, 0), steps=min(samples, n), device=flat.device).long()
            vals = flat[idx].float().cpu().numpy().tobytes() if n else b""
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + vals)
    return h.hexdigest()[:16]


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Where the model came from (path or hub id, revision when known), its class and a digest of its weights."""
    cfg = getattr(model, "config", None)
    return {"path": str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "")),
            "revision": getattr(cfg, "_commit_hash", None), "class": type(model).__name__,
            "weights": weights_digest(model)}


def records_digest(fingerprints: Iterable[str]) -> str:
    """sha256 of the records' fingerprints, in order (questions, answers, image/video content or size)."""
    h = hashlib.sha256()
    n = 0
    for fp in fingerprints:
        h.update(fp.encode() + b"\n")
        n += 1
    return f"{n}:{h.hexdigest()[:16]}"


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"vtc": __version__, "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def identity_diff(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"field: <stored> there, <current> here"`` for every field that differs (dotted into dicts on both sides)."""
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} here")
    return out


def normalize(value: Any) -> Any:
    """JSON round trip (tuples become lists), so stored and current identities compare equal."""
    return json.loads(json.dumps(value, default=str))


class RunStore:
    """``with RunStore(out, identity) as store:`` holds the folder's lock; ``store.done`` maps the keys of stored
    predictions to their rows, ``store.append(rows)`` adds a batch of rows.

    Under ``accelerate launch`` each process opens the store with its ``rank`` (of ``world``): rank 0 holds
    ``.lock``, checks and writes ``run.json`` and appends to ``predictions.jsonl``; rank r > 0 holds ``.lock.rank<r>``
    and appends to ``predictions.rank<r>.jsonl``. Every rank reads every file, so a restarted run (any process
    killed) skips what any process finished; :meth:`merge` (rank 0, after all ranks finished) writes one
    ``predictions.jsonl`` in record order, the same file a single process writes, and removes the shards."""

    def __init__(self, out: str | Path, identity: dict[str, Any], overwrite: bool = False, rank: int = 0):
        self.out = Path(out)
        self.identity = normalize(identity)
        self.overwrite = overwrite
        self.rank = rank
        self.done: dict[str, dict] = {}
        self._lock = None

    @property
    def predictions(self) -> Path:
        """The file this process appends to."""
        return self.out / (PREDICTIONS_FILE if self.rank == 0 else f"predictions.rank{self.rank}.jsonl")

    @property
    def _lock_file(self) -> Path:
        return self.out / (LOCK_FILE if self.rank == 0 else f"{LOCK_FILE}.rank{self.rank}")

    def _shards(self) -> list[Path]:
        return sorted(self.out.glob("predictions.rank*.jsonl"))

    def __enter__(self) -> "RunStore":
        from filelock import FileLock, Timeout

        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self._lock_file))
        owner = self._lock_file.with_name(self._lock_file.name + ".owner")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = owner.read_text().strip() if owner.exists() else "another process"
            raise RunError(f"another vtc run is writing to {self.out} ({who}); wait for it to finish or use "
                           "another --out") from None
        self._lock = lock
        self._owner = owner
        try:
            owner.write_text(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            self._open()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._owner.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _open(self) -> None:
        ident_file = self.out / IDENTITY_FILE
        main = self.out / PREDICTIONS_FILE
        if self.overwrite and self.rank == 0:
            for f in [main, ident_file, self.out / "results.json", *self._shards()]:
                f.unlink(missing_ok=True)
        files = [f for f in [main, *self._shards()] if f.exists() and f.stat().st_size > 0]
        if ident_file.exists():
            stored = json.loads(ident_file.read_text()).get("identity", {})
            diff = identity_diff(stored, self.identity)
            if diff:
                raise RunError(f"{self.out} holds a run with other settings ({'; '.join(diff)}). Resume with the "
                               "same settings, use another --out, or pass --overwrite to discard it")
        elif files:
            raise RunError(f"{files[0]} has predictions but no {IDENTITY_FILE} (an older vtc wrote it), so "
                           "its settings are unknown; use another --out, or pass --overwrite to discard it")
        if self.rank == 0:
            ident_file.write_text(json.dumps({"identity": self.identity}, indent=1) + "\n")
        for f in files:
            self.done.update(self._read(f, owner=f == self.predictions))

    def _read(self, path: Path, owner: bool) -> dict[str, dict]:
        """Rows of one predictions file. A torn last line is dropped (and cut off the file by its owner process,
        with a warning); any other corrupt line is a :class:`RunError` naming file and line."""
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        torn = not raw.endswith(b"\n")  # the last line was cut during a write
        done: dict[str, dict] = {}
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "key" not in rec:
                    raise ValueError("not a prediction record (no 'key')")
            except ValueError as e:
                if torn and i == len(lines):
                    if owner:
                        path.write_bytes(raw[: len(raw) - len(line)])
                        warnings.warn(f"{path}:{i}: dropped a cut last line ({len(line)} bytes, a run was stopped "
                                      "while writing it); its question is generated again", RuntimeWarning,
                                      stacklevel=4)
                    break
                raise RunError(f"{path}:{i}: corrupt prediction line ({e}); fix or delete that line, "
                               "or pass --overwrite to start the run again") from None
            done[rec["key"]] = rec
        else:
            if torn and raw and owner:  # a complete JSON line without its newline: end it so appends start anew
                with open(path, "ab") as f:
                    f.write(b"\n")
        return done

    def append(self, rows: list[dict]) -> None:
        with open(self.predictions, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
        for r in rows:
            self.done[r["key"]] = r

    def merge(self, keys: list[str]) -> dict[str, dict]:
        """Rank 0, once every process has finished: all rows, and ``predictions.jsonl`` rewritten in ``keys``
        order (written to a temporary file, then renamed), the per-process files removed."""
        shards = self._shards()
        if not shards:
            return self.done
        for f in shards:
            self.done.update(self._read(f, owner=False))
        tmp = self.out / (PREDICTIONS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(self.done[k]) + "\n" for k in keys if k in self.done))
        os.replace(tmp, self.out / PREDICTIONS_FILE)
        for f in shards:
            f.unlink()
        return self.done
