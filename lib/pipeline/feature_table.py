"""The stage-2 feature table as stages 4–7 read it, the primary rule file, and rule masks.

One loader for every later stage (the original copy-pasted it): numeric NaN → 0, boolean NaN →
False (target columns untouched), TRAIN rows only (`is_test` false) re-indexed 0..N−1 with the
stage-2 row number kept in `original_idx`, then an optional regime filter. Every row index in a
sampling plan or a stage-6 record is a position in this table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError
from lib.tasks.base import TaskSpec
from lib.rules.evaluation import apply_rule_to_features
from lib.rules.rule_files import find_rule_files, load_rules

__all__ = [
    "REGIMES",
    "AnalysisTable",
    "scores_csv_path",
    "read_scores_table",
    "load_analysis_table",
    "regime_mask",
    "load_primary_rules",
    "rule_mask",
    "prompts_sha256",
]

REGIMES = ("all", "positive", "negative")


@dataclass
class AnalysisTable:
    """TRAIN rows (regime-filtered) plus the names later stages need."""

    df: pd.DataFrame
    scores_path: Path
    prompt_col: str
    target_col: str
    baseline_subset: str
    train_df: pd.DataFrame  # TRAIN rows before the regime filter (mean-ablation pools)

    @property
    def prompts(self) -> list[str]:
        return self.df[self.prompt_col].astype(str).tolist()

    @property
    def target(self) -> np.ndarray:
        return self.df[self.target_col].astype(bool).to_numpy()


def scores_csv_path(features_scores_dir: str | Path) -> Path:
    """`<dir>/scores.csv`, or the path itself when a table file is given."""
    p = Path(features_scores_dir)
    return p if p.suffix.lower() in (".csv", ".parquet") else p / "scores.csv"


def _as_bool_target(s: pd.Series, name: str, path: Path) -> pd.Series:
    if s.dtype == bool:
        return s
    mapping = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    out = s.map(lambda v: mapping.get(str(v).strip().lower()) if not pd.isna(v) else None)
    if out.isna().any():
        bad = s[out.isna()].head(3).tolist()
        raise ArtifactError(f"'{path}': target column '{name}' has non-boolean values such as {bad}")
    return out.astype(bool)


def read_scores_table(path: str | Path, targets: Sequence[str] = ()) -> pd.DataFrame:
    """Whole stage-2 table with NaNs filled as the original does (targets excluded)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"scores table '{p}' does not exist (run stage 2 first)")
    try:
        df = pd.read_parquet(p) if p.suffix.lower() == ".parquet" else pd.read_csv(p)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read scores table '{p}': {exc}") from None
    keep = set(targets)
    for col in df.columns:
        if col in keep:
            continue
        s = df[col]
        if s.dtype == bool or s.dtype == object and s.dropna().map(type).eq(bool).all() and s.notna().any():
            df[col] = s.fillna(False).astype(bool)
        elif pd.api.types.is_numeric_dtype(s):
            df[col] = s.fillna(0)
    return df


def regime_mask(target: np.ndarray, baseline_subset: str) -> np.ndarray:
    """Rows kept by a regime: `positive` target True, `negative` False, `all` everything."""
    if baseline_subset not in REGIMES:
        raise ValueError(f"--baseline_subset must be one of {', '.join(REGIMES)}, not '{baseline_subset}'")
    t = np.asarray(target, dtype=bool)
    if baseline_subset == "positive":
        return t
    if baseline_subset == "negative":
        return ~t
    return np.ones(len(t), dtype=bool)


def load_analysis_table(features_scores: str | Path, task: TaskSpec, baseline_subset: str = "all",
                        prompt_col: str | None = None, target_col: str | None = None) -> AnalysisTable:
    """TRAIN rows of `scores.csv`, regime-filtered and re-indexed; `original_idx` = stage-2 row."""
    path = scores_csv_path(features_scores)
    prompt_col = prompt_col or task.DEFAULT_INPUT
    target_col = target_col or task.DEFAULT_TARGETS[0]
    df = read_scores_table(path, [target_col])
    for name, what in ((prompt_col, "prompt"), (target_col, "target")):
        if name not in df.columns:
            raise ArtifactError(f"scores table '{path}' has no {what} column '{name}'")
    if df[target_col].isna().any():
        raise ArtifactError(f"scores table '{path}': target column '{target_col}' has missing values")
    df[target_col] = _as_bool_target(df[target_col], target_col, path)
    df.insert(0, "original_idx", np.arange(len(df)))
    if "is_test" in df.columns:
        df = df[~_as_bool_target(df["is_test"].fillna(False), "is_test", path)].reset_index(drop=True)
    train = df.copy()
    keep = regime_mask(df[target_col].to_numpy(), baseline_subset)
    df = df[keep].reset_index(drop=True)
    return AnalysisTable(df, path, prompt_col, target_col, baseline_subset, train)


def load_primary_rules(rules_dir: str | Path, rules_glob: str, target: str, fake_targets: bool = False) -> pd.DataFrame:
    """Rules of `<rules_glob>_<target>[_fake].csv` (the primary target only), via `load_rules`."""
    wanted = f"{target}_fake" if fake_targets else target
    files = dict(find_rule_files(rules_dir, rules_glob))
    if wanted not in files:
        found = ", ".join(sorted(files)) or "none"
        raise ArtifactError(
            f"no rules file '{rules_glob}_{wanted}.csv' in '{rules_dir}' (targets found with prefix "
            f"'{rules_glob}': {found}); the pipeline passes --rules_glob optimal_rule_set")
    return load_rules(files[wanted])


def rule_mask(df: pd.DataFrame, rule: str, direction: str = "positive") -> np.ndarray:
    """Rows a rule covers (complemented unless `direction` is positive), with a clear error."""
    try:
        return apply_rule_to_features(rule, df, direction)
    except (ValueError, LookupError) as exc:
        raise ArtifactError(f"rule '{rule}' cannot be evaluated on the scores table: {exc}") from None


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Identity of an ordered prompt list (plans and caches check it, not just the row count)."""
    h = hashlib.sha256()
    for p in prompts:
        b = str(p).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
