"""Checked reading of CSV and JSON artifacts: a file that cannot serve raises ArtifactError naming
the file (and the missing column), never a bare pandas or json exception. One module so that the
result loaders and the reports that read artifacts directly report a bad file the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lib.core.files_and_cache import ArtifactError

__all__ = ["read_csv_checked", "read_json_checked"]


def read_csv_checked(path: str | Path, required: Sequence[str] = (), what: str = "table") -> pd.DataFrame:
    """Read a CSV; ArtifactError naming the file (or the missing column) when it cannot serve."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} '{p}' does not exist")
    try:
        df = pd.read_csv(p, low_memory=False)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise ArtifactError(f"{what} '{p}' is not a readable CSV ({exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing and not df.empty:
        raise ArtifactError(f"{what} '{p}' lacks column '{missing[0]}'")
    if missing:
        df = pd.DataFrame(columns=list(df.columns) + missing)
    return df


def read_json_checked(path: str | Path, what: str = "JSON file", expect: type | None = None) -> Any:
    """Read JSON; ArtifactError naming the file when it is missing, invalid or of the wrong shape."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} '{p}' does not exist")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} '{p}' is not valid JSON ({exc})") from None
    if expect is not None and not isinstance(obj, expect):
        raise ArtifactError(f"{what} '{p}' should hold a JSON {expect.__name__}, found {type(obj).__name__}")
    return obj
