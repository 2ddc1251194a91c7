"""`run_manifest.json`: what produced a run folder — the command, each stage's resolved settings, the
seed, library versions, git commit, device and dtype, and when each stage started and ended.

Every stage records itself in the folders it writes; the pipeline runner also records every stage
in the model folder. Entries are keyed by stage, so rerunning one stage replaces only its entry.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lib.core.files_and_cache import atomic_write_json

__all__ = ["MANIFEST_NAME", "TRACKED_PACKAGES", "library_versions", "git_commit", "now_iso", "read_manifest",
           "record_stage"]

MANIFEST_NAME = "run_manifest.json"
MANIFEST_VERSION = 1
TRACKED_PACKAGES = ("torch", "transformers", "transformer-lens", "xgboost", "shap", "scikit-learn", "numpy",
                    "pandas", "scipy", "gguf")
_REPO = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def library_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent); read from metadata, nothing imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path = _REPO) -> dict[str, Any] | None:
    """HEAD's commit and whether the work tree has changes, or None outside a git checkout."""
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": dirty}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest, or an empty one when it is missing or unreadable (it is then rewritten)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def record_stage(folders: Iterable[str | Path], stage: str, *, config: Mapping[str, Any],
                 argv: Sequence[str] | None = None, started: str, ended: str | None = None,
                 device: str | None = None, dtype: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
    """Write (or update) `run_manifest.json` in each folder with this stage's entry."""
    entry: dict[str, Any] = {
        "argv": list(sys.argv if argv is None else argv),
        "config": dict(config),
        "seed": config.get("seed"),
        "device": device if device is not None else config.get("device"),
        "dtype": dtype if dtype is not None else config.get("dtype"),
        "started": started,
        "ended": ended or now_iso(),
    }
    if extra:
        entry.update(extra)
    env = {"versions": library_versions(), "git": git_commit()}
    seen: set[Path] = set()
    for folder in folders:
        p = Path(folder)
        if p in seen or not p.is_dir():
            continue
        seen.add(p)
        manifest = read_manifest(p)
        manifest["manifest_version"] = MANIFEST_VERSION
        manifest.setdefault("stages", {})[str(stage)] = {**entry, **env}
        manifest["updated"] = entry["ended"]
        atomic_write_json(p / MANIFEST_NAME, manifest)
