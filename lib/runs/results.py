"""One loader for stage 6-7 results (folder discovery: `lib.runs.discovery`; checked reading:
`lib.runs.checked_io`), shared by scripts 8-11, the paper tables and the artifact check.

It reads the layout the original writes (so archived `data/` trees work) and ours (the same layout
plus stage 6's per-circuit `cost` blocks, `n_candidates` fields and `cost_summary.json`). It knows the
score scopes (train; HQ-T = test, the frozen TRAIN combo scored on TEST; test_selected, descriptive;
HQ-F = all_fit), the coverage floor, the best-row-per-unit rule (targets chosen on TRAIN), the HQ predicate and flip-column unions, so no script re-implements them.
Every malformed input raises ArtifactError naming the file and, where it applies, the column.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError
from lib.runs.checked_io import read_csv_checked, read_json_checked

__all__ = [
    "SCOPES",
    "SCOPE_LABELS",
    "RULE_METRICS_SIGNATURE",
    "DEFAULT_MIN_COVERAGE",
    "DEFAULT_HQ_THRESHOLD",
    "normalize_scope",
    "expand_score_scopes",
    "main_metric_for_task",
    "scope_from_rule_combo_filename",
    "best_per_neuron",
    "SELECTION_SCOPE",
    "count_at_least",
    "parse_flip_column",
    "flip_columns_by_unit",
    "flip_matrix",
    "union_flip",
    "RunResults",
    "BaselineResults",
    "agonist_table",
    "circuit_evaluations",
    "circuit_candidates",
    "eap_neuron_scores",
    "load_discovery_manifest",
    "dataset_baseline_rate",
]

SCOPES = ("train", "test", "test_selected", "all_fit")
SCOPE_LABELS = {"train": "TRAIN", "test": "HQ-T (held out: TRAIN combo on TEST)",
                "test_selected": "TEST-selected (descriptive)", "all_fit": "HQ-F"}
RULE_METRICS_SIGNATURE = "rule_combo_metrics_from_raw_v1"
DEFAULT_MIN_COVERAGE = 0.005
DEFAULT_HQ_THRESHOLD = 0.70

_SCOPE_ALIASES = {
    "train": "train", "train_selection": "train", "training": "train",
    "test": "test", "heldout": "test", "held_out": "test", "legacy": "test", "legacy_test": "test",
    "test_selected": "test_selected", "testselected": "test_selected", "selected": "test_selected",
    "hq_t": "test_selected", "hqt": "test_selected",
    "all_fit": "all_fit", "allfit": "all_fit", "all": "all_fit", "hq_f": "all_fit", "hqf": "all_fit",
}

_MAIN_METRIC_BY_TASK = {
    "arithmetic": "is_correct", "hans_nli": "is_correct", "hans": "is_correct",
    "bon_jailbreaking": "is_jailbroken", "jailbreaking": "is_jailbroken",
}


def normalize_scope(name: str) -> str:
    """Canonical scope name of an alias (`HQ-T`, `test-selected`, `allfit` …); ValueError if unknown."""
    key = re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")
    if key not in _SCOPE_ALIASES:
        raise ValueError(f"unknown score scope {name!r}; expected one of {', '.join(SCOPES)}")
    return _SCOPE_ALIASES[key]


def expand_score_scopes(spec: str) -> list[str]:
    """Scopes of a flag value: a comma list, `both` (= test_selected + all_fit) or `legacy_both` (= test + all_fit)."""
    text = str(spec).strip().lower()
    if text == "both":
        return ["test_selected", "all_fit"]
    if text == "legacy_both":
        return ["test", "all_fit"]
    out: list[str] = []
    for part in text.split(","):
        if part.strip():
            scope = normalize_scope(part)
            if scope not in out:
                out.append(scope)
    if not out:
        raise ValueError("no score scope given")
    return out


def main_metric_for_task(task: str, columns: Iterable[str] = ()) -> str:
    """Main behaviour column of a task (`is_correct` / `is_jailbroken`), else the first `is_*` column."""
    if task in _MAIN_METRIC_BY_TASK:
        return _MAIN_METRIC_BY_TASK[task]
    for col in columns:
        if str(col).startswith("is_") and col != "is_test":
            return str(col)
    return "is_correct"


# --------------------------------------------------------------------------- rule rows and scopes


def scope_from_rule_combo_filename(name: str) -> tuple[str | None, str]:
    """(scope from the prefix or None for the legacy file, flip target) of `rule_combo_*.csv`."""
    stem = Path(name).name.removesuffix(".csv").removeprefix("rule_combo_")
    for prefix, scope in (("train_", "train"), ("test_selected_", "test_selected"), ("all_fit_", "all_fit")):
        if stem.startswith(prefix):
            return scope, stem[len(prefix):]
    return None, stem


def _ensure_neuron_key(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Add `neuron_key` from `layer_key`/`neuron_id` when absent; error naming the file otherwise."""
    if "neuron_key" in df.columns:
        df["neuron_key"] = df["neuron_key"].astype(str)
        return df
    if {"layer_key", "neuron_id"} <= set(df.columns):
        df["neuron_key"] = df["layer_key"].astype(str) + "_" + df["neuron_id"].astype(int).astype(str)
        return df
    raise ArtifactError(f"rule metrics table '{path}' lacks column 'neuron_key' (and layer_key/neuron_id)")


SELECTION_SCOPE = {"test": "train", "test_selected": "train"}
"""Scope whose rows choose the best flip target per unit for a scope scored on held-out rows: the
held-out score is only reported, never used to pick (the original picked on the TEST MCC)."""

_KEY_COLS = ("rule_target_dir", "neuron_key", "flip_target")


def _sort_columns(df: pd.DataFrame, metric_col: str) -> list[str]:
    return [metric_col] + [c for c in ("MCC", "F1(target=1|fire)", "F1", "BalancedAcc")
                           if c in df.columns and c != metric_col]


def best_per_neuron(rows: pd.DataFrame, metric_col: str = "MCC",
                    min_coverage: float = DEFAULT_MIN_COVERAGE,
                    selection_rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Best rule row per unit after the coverage floor (sort metric, MCC, F1, BalancedAcc; ties by key).

    With `selection_rows` (the same units' TRAIN rows), the flip target of each unit is chosen by
    the TRAIN metrics and the chosen target's row of `rows` is returned, so the scores of `rows`
    (e.g. held-out TEST) never steer the choice; targets without a TRAIN row rank last.
    """
    if rows is None or rows.empty:
        return pd.DataFrame(columns=list(rows.columns) if rows is not None else ["neuron_key", metric_col])
    df = rows.copy()
    if "score_scope" in df.columns:
        df = df[df["score_scope"].astype(str) != "train"]
    if metric_col not in df.columns:
        raise ArtifactError(f"rule metrics rows lack column '{metric_col}'")
    df[metric_col] = pd.to_numeric(df[metric_col], errors="coerce")
    if min_coverage and min_coverage > 0 and "dataset_coverage" in df.columns:
        cov = pd.to_numeric(df["dataset_coverage"], errors="coerce")
        df = df[cov >= float(min_coverage)]
    df = df[df[metric_col].notna()]
    sort_cols = _sort_columns(df, metric_col)
    for c in sort_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    tie_cols = [c for c in _KEY_COLS if c in df.columns]
    if selection_rows is not None and set(tie_cols) >= {"neuron_key", "flip_target"}:
        sel = selection_rows.copy()
        if metric_col not in sel.columns:
            raise ArtifactError(f"selection (TRAIN) rule rows lack column '{metric_col}'")
        keys = [c for c in tie_cols if c in sel.columns]
        sel_cols = [c for c in sort_cols if c in sel.columns]
        sel = sel[keys + sel_cols].drop_duplicates(subset=keys, keep="first")
        sel = sel.rename(columns={c: f"__sel_{c}" for c in sel_cols})
        for c in sel_cols:
            sel[f"__sel_{c}"] = pd.to_numeric(sel[f"__sel_{c}"], errors="coerce")
        for c in keys:
            sel[c] = sel[c].astype(str)
            df[c] = df[c].astype(str)
        df = df.merge(sel, on=keys, how="left", validate="many_to_one")
        order = [f"__sel_{c}" for c in sel_cols]
    else:
        order = sort_cols
    df = df.sort_values(order + tie_cols, ascending=[False] * len(order) + [True] * len(tie_cols),
                        na_position="last", kind="mergesort")
    group = [c for c in ("rule_target_dir", "neuron_key") if c in df.columns]
    best = df.drop_duplicates(subset=group, keep="first")
    best = best.drop(columns=[c for c in best.columns if str(c).startswith("__sel_")])
    return best.sort_values("neuron_key", kind="mergesort").reset_index(drop=True)


def count_at_least(best: pd.DataFrame | None, threshold: float, metric_col: str = "MCC") -> int:
    """Number of best rows whose metric is ≥ threshold (the HQ predicate)."""
    if best is None or best.empty or metric_col not in best.columns:
        return 0
    vals = pd.to_numeric(best[metric_col], errors="coerce")
    return int((vals >= float(threshold) - 1e-12).sum())


# --------------------------------------------------------------------------- flip columns

_FLIP_RE = re.compile(r"^flip_(?:(?P<kind>c2i|i2c)_)?(?P<lk>m\d+|a\d+_h\d+)_(?P<id>\d+)$")


def parse_flip_column(col: str) -> tuple[str, str, int] | None:
    """(kind any|c2i|i2c, layer_key, neuron id) of a flip column name, or None."""
    m = _FLIP_RE.match(str(col))
    if m is None:
        return None
    return m.group("kind") or "any", m.group("lk"), int(m.group("id"))


def flip_columns_by_unit(columns: Iterable[str], kind: str = "any") -> dict[str, str]:
    """{neuron_key: column} of one flip kind (any, c2i, i2c)."""
    out: dict[str, str] = {}
    for col in columns:
        parsed = parse_flip_column(col)
        if parsed and parsed[0] == kind:
            out[f"{parsed[1]}_{parsed[2]}"] = str(col)
    return dict(sorted(out.items()))


def _as_float_flags(series: pd.Series) -> np.ndarray:
    """Nullable-bool column → float array (1, 0, NaN = not evaluated)."""
    if series.dtype == bool:
        return series.to_numpy(dtype=float)
    mapped = series.map(lambda v: np.nan if v is None or (isinstance(v, float) and math.isnan(v))
                        else (1.0 if str(v).strip().lower() in ("true", "1", "1.0") else
                              0.0 if str(v).strip().lower() in ("false", "0", "0.0") else np.nan))
    return mapped.to_numpy(dtype=float)


def flip_matrix(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """[rows × columns] float matrix of flip flags (NaN = not evaluated)."""
    if not columns:
        return np.zeros((len(df), 0))
    return np.column_stack([_as_float_flags(df[c]) for c in columns])


def union_flip(df: pd.DataFrame, columns: Sequence[str], row_mask: np.ndarray | None = None) -> tuple[int, int]:
    """(rows flipped by ≥1 column, rows evaluated by ≥1 column) within `row_mask`."""
    mat = flip_matrix(df, columns)
    if row_mask is not None:
        mat = mat[np.asarray(row_mask, dtype=bool)]
    if mat.shape[1] == 0:
        return 0, 0
    evaluated = ~np.all(np.isnan(mat), axis=1)
    flipped = np.nan_to_num(mat, nan=0.0).max(axis=1) > 0.5
    return int((flipped & evaluated).sum()), int(evaluated.sum())


def _bool_column(series: pd.Series) -> np.ndarray:
    """Truthy mask of a bool-like column (missing → False)."""
    return np.nan_to_num(_as_float_flags(series), nan=0.0) > 0.5


# --------------------------------------------------------------------------- stage-7 run folder


@dataclass
class RunResults:
    """One stage-7 `stats/<run mode>/` folder and everything the reports read from it."""

    run_dir: Path
    task: str = ""
    model: str = ""
    _rule_cache: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def run_name(self) -> str:
        return self.run_dir.name

    def _file(self, name: str) -> Path:
        return self.run_dir / name

    @cached_property
    def rule_metrics_signed(self) -> bool:
        """True when `rule_combo_metrics_manifest.json` carries the summary signature."""
        p = self._file("rule_combo_metrics_manifest.json")
        if not p.is_file():
            return False
        obj = read_json_checked(p, "rule metrics manifest", dict)
        return obj.get("signature") == RULE_METRICS_SIGNATURE

    def _read_rules(self, path: Path) -> pd.DataFrame:
        """One rule-metrics CSV with `neuron_key` ensured."""
        df = read_csv_checked(path, what="rule metrics table")
        if df.empty:
            return df.assign(neuron_key=pd.Series(dtype=str)) if "neuron_key" not in df.columns else df
        return _ensure_neuron_key(df, path)

    def rule_rows(self, scope: str) -> pd.DataFrame | None:
        """All rule rows of a scope (before the floor), or None when the scope's artifacts are absent/unsigned."""
        scope = normalize_scope(scope)
        if scope in self._rule_cache:
            return self._rule_cache[scope]
        rows: pd.DataFrame | None = None
        if scope in ("test_selected", "all_fit") and not self.rule_metrics_signed:
            rows = None
        else:
            for name in (f"rule_combo_metrics_{scope}_all.csv", f"rule_combo_metrics_{scope}_best_per_neuron.csv"):
                if self._file(name).is_file():
                    rows = self._read_rules(self._file(name))
                    break
            if rows is None and self._file("rule_combo_metrics_all_scopes.csv").is_file():
                allr = self._read_rules(self._file("rule_combo_metrics_all_scopes.csv"))
                if "score_scope" not in allr.columns:
                    raise ArtifactError(f"rule metrics table '{self._file('rule_combo_metrics_all_scopes.csv')}' "
                                        "lacks column 'score_scope'")
                norm = allr["score_scope"].astype(str).map(lambda s: _SCOPE_ALIASES.get(s.strip().lower(), s))
                rows = allr[norm == scope].reset_index(drop=True)
                if rows.empty and not allr.empty:
                    rows = None  # rows of other scopes only: this scope was not produced
            if rows is None and scope == "test":
                for name in ("rule_combo_metrics_all.csv", "rule_combo_metrics_best_per_neuron.csv"):
                    if self._file(name).is_file():
                        rows = self._read_rules(self._file(name))
                        break
        if rows is not None and "MCC" not in rows.columns and not rows.empty:
            raise ArtifactError(f"rule metrics of scope {scope} in '{self.run_dir}' lack column 'MCC'")
        self._rule_cache[scope] = rows
        return rows

    def scope_available(self, scope: str) -> bool:
        return self.rule_rows(scope) is not None

    def best(self, scope: str, metric_col: str = "MCC", min_coverage: float = DEFAULT_MIN_COVERAGE) -> pd.DataFrame | None:
        """Best row per unit of a scope after the floor (the target chosen on TRAIN rows for scopes
        scored on TEST rows, when the run has them), or None if the scope is unavailable."""
        scope = normalize_scope(scope)
        rows = self.rule_rows(scope)
        if rows is None:
            return None
        sel_scope = SELECTION_SCOPE.get(scope)
        selection = self.rule_rows(sel_scope) if sel_scope else None
        if selection is not None and selection.empty:
            selection = None
        return best_per_neuron(rows, metric_col, min_coverage, selection_rows=selection)

    @cached_property
    def flip_scores(self) -> pd.DataFrame | None:
        """Stage 7's `scores.csv` with flip columns, or None."""
        p = self._file("scores.csv")
        return read_csv_checked(p, what="stage-7 scores table") if p.is_file() else None

    @cached_property
    def flip_stats_by_neuron(self) -> pd.DataFrame | None:
        p = self._file("flip_stats_by_neuron.csv")
        if not p.is_file():
            return None
        df = read_csv_checked(p, required=("layer_key", "neuron_id"), what="flip statistics table")
        df["neuron_key"] = df["layer_key"].astype(str) + "_" + pd.to_numeric(df["neuron_id"]).astype(int).astype(str)
        return df

    @cached_property
    def flip_stats_global(self) -> dict | None:
        p = self._file("flip_stats_global.json")
        return read_json_checked(p, "flip statistics summary", dict) if p.is_file() else None

    @cached_property
    def hq_coverage(self) -> dict | None:
        p = self._file("high_quality_neuron_flip_coverage.json")
        return read_json_checked(p, "HQ coverage summary", dict) if p.is_file() else None

    def rule_metrics_summary(self, scope: str | None = None) -> dict | None:
        """`rule_metrics_summary[_<scope>].json` (legacy unsuffixed file for test), or None."""
        names = [f"rule_metrics_summary_{scope}.json"] if scope else []
        if scope in (None, "test"):
            names.append("rule_metrics_summary.json")
        for name in names:
            if self._file(name).is_file():
                return read_json_checked(self._file(name), "rule metrics summary", dict)
        return None

    def units(self) -> list[str]:
        """U: every localised unit of the run (flip stats table, else flip columns of scores.csv)."""
        fsn = self.flip_stats_by_neuron
        if fsn is not None and not fsn.empty:
            return sorted(set(fsn["neuron_key"]))
        if self.flip_scores is not None:
            return sorted(flip_columns_by_unit(self.flip_scores.columns, "any"))
        return []

    def hq_threshold(self, scope: str, default: float = DEFAULT_HQ_THRESHOLD) -> float:
        """HQ threshold the run used for a scope (coverage JSON), else `default`."""
        cov = self.hq_coverage or {}
        by_scope = cov.get("quality_thresholds_by_scope") or {}
        if isinstance(by_scope, dict) and by_scope.get(scope) is not None:
            return float(by_scope[scope])
        scoped = (cov.get("score_scopes") or {}).get(scope) or {}
        if scoped.get("quality_threshold") is not None:
            return float(scoped["quality_threshold"])
        if cov.get("quality_threshold") is not None:
            return float(cov["quality_threshold"])
        return default

    def row_scope_mask(self, scope: str) -> np.ndarray:
        """Rows of a scope in `scores.csv`: is_test rows for test scopes, all rows for all_fit; ∧ evaluated."""
        df = self.flip_scores
        if df is None:
            return np.zeros(0, dtype=bool)
        mask = np.ones(len(df), dtype=bool)
        if scope in ("test", "test_selected") and "is_test" in df.columns:
            mask &= _bool_column(df["is_test"])
        for col in ("_evaluated", "_sampled"):
            if col in df.columns:
                mask &= _bool_column(df[col])
                break
        return mask

    def baseline_labels(self, main_metric: str) -> np.ndarray:
        """Baseline label per row (main metric > 0.5; NaN when missing)."""
        df = self.flip_scores
        if df is None or main_metric not in df.columns:
            raise ArtifactError(f"stage-7 scores table '{self._file('scores.csv')}' lacks column '{main_metric}'")
        vals = df[main_metric]
        if vals.dtype == object:
            vals = pd.Series(_as_float_flags(vals))
        num = pd.to_numeric(vals, errors="coerce").to_numpy(dtype=float)
        return np.where(np.isnan(num), np.nan, (num > 0.5).astype(float))


# --------------------------------------------------------------------------- stage-6 baseline folder


def agonist_table(buckets: dict, tau: float = 0.0) -> pd.DataFrame:
    """Non-catastrophic agonists of a bucket file with |max_effect| ≥ τ, sorted by key."""
    rows = []
    agon = buckets.get("non_catastrophic_agonists") or {}
    if not isinstance(agon, dict):
        raise ArtifactError("neuron buckets: 'non_catastrophic_agonists' is not an object")
    for key, rec in agon.items():
        last = (rec or {}).get("last_record") or {}
        eff = last.get("max_effect", rec.get("best_abs_gap") if isinstance(rec, dict) else None)
        if eff is None:
            eff = (rec or {}).get("best_abs_gap")
        if eff is None:
            continue
        layer, _, nid = str(key).rpartition(":")
        rows.append({"key": str(key), "layer_label": last.get("layer_label", layer),
                     "neuron_id": int(last.get("neuron_id", nid)), "max_effect": float(eff),
                     "circuit_id": last.get("circuit_id"), "accuracy_gap": last.get("accuracy_gap")})
    df = pd.DataFrame(rows, columns=["key", "layer_label", "neuron_id", "max_effect", "circuit_id", "accuracy_gap"])
    df = df[df["max_effect"].abs() >= float(tau) - 1e-12]
    return df.sort_values("key", kind="mergesort").reset_index(drop=True)


def circuit_evaluations(summary: dict, detail: dict | None = None) -> int | None:
    """Group evaluations of one circuit: our `cost.n_evaluations`, else `n_ablation_groups`, else #records."""
    for src in (detail or {}, summary):
        cost = src.get("cost") if isinstance(src, dict) else None
        if isinstance(cost, dict) and cost.get("n_evaluations") is not None:
            return int(cost["n_evaluations"])
    if summary.get("n_ablation_groups") is not None:
        return int(summary["n_ablation_groups"])
    if detail and isinstance(detail.get("ablations"), list):
        return len(detail["ablations"])
    return None


def circuit_candidates(summary: dict, detail: dict | None = None) -> int | None:
    """Singleton candidates N of one circuit (our `cost`/`n_candidates` fields), else None."""
    for src in (detail or {}, summary):
        cost = src.get("cost") if isinstance(src, dict) else None
        if isinstance(cost, dict) and cost.get("n_candidates") is not None:
            return int(cost["n_candidates"])
        if isinstance(src, dict) and src.get("n_candidates") is not None:
            return int(src["n_candidates"])
    return None


def _circuit_id(obj: dict) -> str:
    """Circuit id as a string key (ids are ints in rule mode)."""
    for k in ("circuit_id", "rule_id", "cluster_index"):
        if obj.get(k) is not None:
            return str(obj[k])
    return ""


@dataclass
class BaselineResults:
    """One stage-6 `<bag>/<regime>_baseline/` folder."""

    path: Path

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @cached_property
    def buckets(self) -> dict | None:
        p = self.path / "neuron_buckets.json"
        return read_json_checked(p, "neuron buckets", dict) if p.is_file() else None

    @cached_property
    def knockout(self) -> list[dict] | None:
        p = self.path / "rule_knockout.json"
        if not p.is_file():
            return None
        obj = read_json_checked(p, "rule knockout summary", list)
        for i, entry in enumerate(obj):
            if not isinstance(entry, dict):
                raise ArtifactError(f"rule knockout summary '{p}' entry {i} is not an object")
        return obj

    @cached_property
    def cost_summary(self) -> dict | None:
        p = self.path / "cost_summary.json"
        return read_json_checked(p, "cost summary", dict) if p.is_file() else None

    @cached_property
    def details(self) -> dict[str, dict]:
        """Per-circuit JSONs (`<target>/rule_XXXX.json`, `spectral_clusters/cluster_XXXX.json`) by circuit id."""
        out: dict[str, dict] = {}
        if not self.path.is_dir():
            return out
        for p in sorted(self.path.glob("*/*.json")):
            if not re.fullmatch(r"(rule|cluster)_\d+\.json", p.name):
                continue
            obj = read_json_checked(p, "per-circuit result", dict)
            out.setdefault(_circuit_id(obj), obj)
        return out

    def ok_summaries(self) -> list[dict]:
        """`status == ok` entries of rule_knockout.json (empty when the file is absent)."""
        return [s for s in (self.knockout or []) if s.get("status") == "ok"]

    def agonists(self, tau: float = 0.0) -> pd.DataFrame:
        """τ-agonists of this regime (empty frame when no bucket file)."""
        return agonist_table(self.buckets or {}, tau)

    def _per_circuit(self, value: Callable[[dict, dict | None], int | None], circuit_ids: Iterable[str] | None,
                     add: bool) -> dict[str, int]:
        """{circuit id: value} over ok circuits (optionally restricted); repeated ids summed when `add`."""
        keep = None if circuit_ids is None else {str(c) for c in circuit_ids}
        out: dict[str, int] = {}
        for s in self.ok_summaries():
            cid = _circuit_id(s)
            if keep is not None and cid not in keep:
                continue
            n = value(s, self.details.get(cid))
            if n is not None:
                out[cid] = out.get(cid, 0) + n if add else n
        return dict(sorted(out.items()))

    def evaluations_by_circuit(self, circuit_ids: Iterable[str] | None = None) -> dict[str, int]:
        """{circuit id: group evaluations} of ok circuits, optionally restricted to `circuit_ids`."""
        return self._per_circuit(circuit_evaluations, circuit_ids, add=True)

    def candidates_by_circuit(self, circuit_ids: Iterable[str] | None = None) -> dict[str, int]:
        """{circuit id: N} of ok circuits that record their candidate count."""
        return self._per_circuit(circuit_candidates, circuit_ids, add=False)

    def tree_budget(self, circuit_id: str) -> int | None:
        """Σ_layers (2·N_l − 1) of a circuit from its depth-0 records; else 2·N − 1 from `n_candidates`."""
        detail = self.details.get(str(circuit_id)) or {}
        roots: dict[str, int] = {}
        for rec in detail.get("ablations") or []:
            if rec.get("depth") == 0:
                layers = rec.get("layers_neurons_dict") or {}
                for layer, ids in layers.items():
                    roots[layer] = roots.get(layer, 0) + len(ids)
        if roots:
            return int(sum(2 * n - 1 for n in roots.values()))
        summ = next((s for s in self.ok_summaries() if _circuit_id(s) == str(circuit_id)), {})
        n = circuit_candidates(summ, detail)
        return 2 * n - 1 if n else None


# --------------------------------------------------------------------------- stage 5 and stage 1-2 summaries

_TUPLE_KEY = re.compile(r"^\(\s*'?(?P<layer>[^',]+)'?\s*,\s*(?P<id>-?\d+)\s*\)$")


def load_discovery_manifest(circuits_dir: str | Path) -> list[dict]:
    """Entries of stage 5's `manifest.json` (a JSON list)."""
    return read_json_checked(Path(circuits_dir) / "manifest.json", "discovery manifest", list)


def eap_neuron_scores(entries: Sequence[dict], base_dir: Path | None = None) -> dict[tuple[str, int], float]:
    """Max |attribution score| per (layer label, id) over manifest entries (inline metadata or scores.json)."""
    out: dict[tuple[str, int], float] = {}
    for entry in entries:
        if entry.get("status") not in ("ok", "full_network_fallback"):
            continue
        meta = entry.get("metadata_topn")
        if not isinstance(meta, dict) and entry.get("scores_csv") and base_dir is not None:
            p = Path(entry["scores_csv"])
            p = p if p.is_absolute() else base_dir / p
            meta = read_json_checked(p, "circuit scores", dict) if p.is_file() else None
        for key, val in ((meta or {}).get("neuron_label_score") or {}).items():
            m = _TUPLE_KEY.match(str(key))
            if m is None or val is None:
                continue
            k = (m.group("layer"), int(m.group("id")))
            out[k] = max(out.get(k, 0.0), abs(float(val)))
    return out


def dataset_baseline_rate(feature_report_dir: str | Path, task: str) -> float | None:
    """Baseline accuracy / jailbreak rate: `dataset_stats.json`, else the mean of the main metric in scores.csv."""
    d = Path(feature_report_dir)
    metric = main_metric_for_task(task)
    stats_p = d / "dataset_stats.json"
    if stats_p.is_file():
        st = read_json_checked(stats_p, "dataset statistics", dict)
        keys = (["jailbreak_rate", f"pct_{metric}", "accuracy"] if metric == "is_jailbroken"
                else ["accuracy", f"pct_{metric}"])
        for k in keys:
            if isinstance(st.get(k), (int, float)):
                return float(st[k])
    scores_p = d / "scores.csv"
    if scores_p.is_file():
        df = read_csv_checked(scores_p, what="feature scores table")
        col = metric if metric in df.columns else main_metric_for_task("", df.columns)
        if col in df.columns:
            vals = pd.to_numeric(df[col].map(lambda v: {"True": 1, "False": 0}.get(str(v), v)), errors="coerce")
            return float(vals.mean()) if vals.notna().any() else None
    return None
