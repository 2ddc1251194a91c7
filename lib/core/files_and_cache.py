"""Seeding, atomic file writes and content-keyed disk caches shared by every stage.

Every artifact is written to a temporary file in the destination folder and renamed into
place, so an interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = [
    "ArtifactError",
    "set_deterministic",
    "atomic_path",
    "default_file_mode",
    "default_dir_mode",
    "write_csv_atomic",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_pickle",
    "load_pickle",
    "content_key",
    "file_digest",
    "DiskCache",
    "ensure_writable_dir",
]


class ArtifactError(RuntimeError):
    """A user-facing problem with an input or output file (message names the file)."""


def set_deterministic(seed: int) -> None:
    """Seed python, numpy and torch so that a stage with the same inputs gives the same outputs."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement of the project
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` (and parents) and check it is writable; raise ArtifactError naming it otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ArtifactError(f"{what} '{p}' exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create {what} '{p}': {exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ArtifactError(f"{what} '{p}' is not writable")
    return p


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a plain `mkdir` gives a new folder: 0o777 less the process umask."""
    return default_file_mode() | ((0o111 & ~_umask()))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode a plain `open` would give (umask honoured), not mkstemp's private 0600,
    so colleagues on a shared file system can read the artifacts.
    """
    final = Path(path)
    ensure_writable_dir(final.parent if str(final.parent) else ".", "folder of " + str(final))
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def write_csv_atomic(df: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write a pandas frame as CSV to a temporary file beside `path`, then rename it into place."""
    final = Path(path)
    with atomic_path(final) as tmp:
        df.to_csv(tmp, index=kwargs.pop("index", False), **kwargs)
    return final


def atomic_write_pickle(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def load_pickle(path: str | Path, what: str = "pickle") -> Any:
    """Load a pickle, turning every failure into one ArtifactError that names the file."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} '{p}' does not exist")
    try:
        with open(p, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:  # unpickling can raise almost anything on a corrupt file
        raise ArtifactError(
            f"{what} '{p}' is unreadable ({type(exc).__name__}: {exc}); delete it or pass another path"
        ) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def content_key(*parts: Any) -> str:
    """Stable SHA-256 hex key of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (model files can be large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class DiskCache:
    """A folder of pickles, one file per content key; safe across processes (atomic writes).

    Used for model calls and other expensive pure functions: `get_or_compute(key_parts, fn)`
    returns the cached value for the same inputs, so a rerun makes no calls.
    """

    def __init__(self, folder: str | Path, namespace: str = "default") -> None:
        self.folder = Path(folder) / namespace
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pkl"

    def get(self, key: str, default: Any = None) -> Any:
        p = self._path(key)
        if not p.exists():
            return default
        try:
            with open(p, "rb") as fh:
                return pickle.load(fh)
        except Exception:
            return default  # a corrupt entry is a miss; it is rewritten on the next put

    def __contains__(self, key: str) -> bool:
        sentinel = object()
        return self.get(key, sentinel) is not sentinel

    def put(self, key: str, value: Any) -> None:
        atomic_write_pickle(self._path(key), value)

    def get_or_compute(self, key_parts: Any, fn: Callable[[], Any]) -> Any:
        key = content_key(key_parts)
        sentinel = object()
        value = self.get(key, sentinel)
        if value is sentinel:
            value = fn()
            self.put(key, value)
        return value
