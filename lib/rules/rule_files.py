"""Reading rule files (the original loader API, without pandas.query): find a stage's rule files,
guess a file's type, load its rules into one schema, and find a table's prompt column. File reading
for stages 4-7, apart from the language: it hands rule text on, never parses or evaluates it."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError

__all__ = ["RULE_TEXT_COLUMNS", "PROMPT_COLUMNS", "find_rule_files", "guess_filetype", "load_rules", "detect_prompt_col"]

RULE_TEXT_COLUMNS: tuple[str, ...] = ("string_rule", "rule_string", "expr", "rule_expression", "expression")
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "input", "text", "question", "query")


def find_rule_files(directory: str | Path, prefix: str) -> list[tuple[str, Path]]:
    """(target_name, path) for every `<prefix>_*.csv` in `directory`, sorted by file name.

    The target name is what follows `<prefix>_`, so `optimal_rule_set` also yields the pseudo
    targets `test_selected_<t>` and `all_fit_<t>`; callers keep the exact target they want.
    A missing folder gives an empty list (as the original's glob did)."""
    d = Path(directory)
    pattern = str(d / (glob.escape(prefix) + "_*.csv"))
    out = []
    for p in sorted(glob.glob(pattern), key=lambda s: Path(s).name):
        name = Path(p).name
        out.append((name[len(prefix) + 1 : -len(".csv")], Path(p)))
    return out


def guess_filetype(path: str | Path) -> str:
    """'csv', 'tsv', 'json', 'jsonl', 'parquet' or 'pickle' from the extension; unknown
    extensions are sniffed ('json' if the file starts with '{' or '[', else 'csv')."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".gz", ".bz2", ".xz", ".zip") and len(suffixes) > 1:
        ext = suffixes[-2]
    by_ext = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".tab": "tsv",
        ".json": "json",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".pkl": "pickle",
        ".pickle": "pickle",
    }
    if ext in by_ext:
        return by_ext[ext]
    try:
        with open(p, "rb") as fh:
            head = fh.read(256).lstrip()
    except OSError:
        return "csv"
    return "json" if head[:1] in (b"{", b"[") else "csv"


def _read_rule_table(p: Path) -> pd.DataFrame:
    kind = guess_filetype(p)
    try:
        if kind == "csv":
            return pd.read_csv(p)
        if kind == "tsv":
            return pd.read_csv(p, sep="\t")
        if kind == "jsonl":
            return pd.read_json(p, lines=True)
        if kind == "json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "rules" in data:
                data = data["rules"]
            if isinstance(data, list):
                if all(isinstance(x, str) for x in data):
                    return pd.DataFrame({"rule": data})
                if all(isinstance(x, dict) for x in data):
                    return pd.DataFrame.from_records(data)
                raise ArtifactError(f"rules file '{p}': 'rules' must be a list of strings or objects")
            if isinstance(data, dict):
                return pd.DataFrame(data)
            raise ArtifactError(f"rules file '{p}' holds {type(data).__name__}, not rules")
        if kind == "parquet":
            return pd.read_parquet(p)
        return pd.read_pickle(p)
    except ArtifactError:
        raise
    except pd.errors.EmptyDataError:
        raise ArtifactError(f"rules file '{p}' is empty (not even a header)") from None
    except (ValueError, OSError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read rules file '{p}': {exc}") from None


def load_rules(path: str | Path) -> pd.DataFrame:
    """Rules of a CSV/JSON file as columns `rule_id`, `rule`, `coefficient_sign`, `component_type`.

    Rule text comes from `rule`, else the first of `RULE_TEXT_COLUMNS` (then every row is a
    positive rule). Missing `rule_id` → row position 0..k−1; missing sign/type → positive/rule.
    A header-only file gives zero rows (an empty selection)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"rules file '{p}' does not exist")
    df = _read_rule_table(p)
    out = pd.DataFrame(index=range(len(df)))
    if "rule" in df.columns:
        out["rule"] = df["rule"].to_numpy()
        sign = df["coefficient_sign"].to_numpy() if "coefficient_sign" in df.columns else "positive"
        ctype = df["component_type"].to_numpy() if "component_type" in df.columns else "rule"
    else:
        src = next((c for c in RULE_TEXT_COLUMNS if c in df.columns), None)
        if src is None:
            raise ArtifactError(
                f"rules file '{p}' has no rule column (looked for 'rule', "
                f"{', '.join(repr(c) for c in RULE_TEXT_COLUMNS)}); it has: "
                f"{', '.join(repr(str(c)) for c in df.columns) or 'no columns'}"
            )
        out["rule"] = df[src].to_numpy()
        sign, ctype = "positive", "rule"
    bad = [i for i, r in enumerate(out["rule"]) if not isinstance(r, str) or not r.strip()]
    if bad:
        raise ArtifactError(f"rules file '{p}': empty rule text in row(s) {', '.join(map(str, bad[:10]))}")
    out["rule_id"] = df["rule_id"].to_numpy() if "rule_id" in df.columns else np.arange(len(df))
    out["coefficient_sign"] = sign
    out["component_type"] = ctype
    return out[["rule_id", "rule", "coefficient_sign", "component_type"]]


def detect_prompt_col(df: pd.DataFrame) -> str | None:
    """The first of prompt/input/text/question/query present (exact name, then any case)."""
    cols = [str(c) for c in df.columns]
    for name in PROMPT_COLUMNS:
        if name in cols:
            return name
    lower = {c.lower(): c for c in reversed(cols)}
    for name in PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    return None
