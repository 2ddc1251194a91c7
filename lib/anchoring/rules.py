"""Stage-7 neuron-anchored rules (spec 7-11 §2.7-2.9): rule re-extraction on each unit's flip
columns with stage 3's `run_rule_extraction`, and the per-run rule-metric summaries.

Scopes (DESIGN 4.4): `rule_combo_<t>.csv` is the held-out TEST score (combo selected on TRAIN rows
only, scored on `is_test` rows only); `rule_combo_all_fit_<t>.csv` is the descriptive ALL-FIT fit
(selected and scored on all evaluated rows); `rule_combo_test_selected_<t>.csv` re-selects on the
test rows and is descriptive too. A unit's rule folder is reused only when its signature (row
counts, flip-label hashes, features, RuleSHAP knobs) matches; summaries read only this run's files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import atomic_write_json, atomic_write_text, content_key, write_csv_atomic
from lib.anchoring.units import Unit
from lib.runs.results import RULE_METRICS_SIGNATURE, SELECTION_SCOPE, best_per_neuron
from lib.rules.extraction import ALL_FIT_SIGNATURE, TEST_SELECTED_SIGNATURE, run_rule_extraction

__all__ = [
    "QUALITY_COLUMNS",
    "SUMMARY_SCOPES",
    "RULE_SIGNATURE_VERSION",
    "unit_targets",
    "split_rows",
    "extraction_signature",
    "extract_unit_rules",
    "rule_length",
    "collect_rule_rows",
    "write_rule_summaries",
]

QUALITY_COLUMNS = {"mcc": "MCC", "balanced_accuracy": "BalancedAcc", "tpr": "TPR", "tnr": "TNR",
                   "f1": "F1(target=1|fire)"}
SUMMARY_SCOPES = ("test", "test_selected", "all_fit")
RULE_SIGNATURE_VERSION = "stage7_rules_v1"
_RULE_FILE_PATTERNS = ("rule_combo_*.csv", "association_rules_*.csv", "optimal_rule_set_*.csv",
                       "global_shap_stats*.pkl")
_ATOM = re.compile(r"[A-Za-z_][\w.]*\s*(?:<=|>=|==|!=|<|>)\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_METRIC_COLS = ("P(target=1|fire)", "Precision", "R(fire|target=1)", "F1(target=1|fire)", "F1", "Lift(target=1|fire)",
                "MCC", "TPR", "TNR", "BalancedAcc", "Acc", "dataset_coverage", "n_eval", "n_pos", "n_neg", "n_fire",
                "tp", "fp", "tn", "fn", "target_prevalence", "rule_fire_rate")


def unit_targets(columns: Sequence[str], unit: Unit, wanted: Sequence[str] | None) -> list[str]:
    """The unit's flip, c2i and i2c columns present in the table (∩ `--rule_targets` when given)."""
    names = [unit.column("any"), unit.column("c2i"), unit.column("i2c")]
    names = [n for n in names if n in set(columns)]
    return [n for n in names if n in set(wanted)] if wanted else names


def _as_float(series: pd.Series) -> pd.Series:
    """Nullable bool/number column → float64 with NaN."""
    if str(series.dtype) == "boolean":
        return series.astype("Float64").astype("float64")
    if series.dtype == object:
        series = series.map(lambda v: {"true": 1.0, "false": 0.0}.get(str(v).strip().lower(), np.nan)
                            if not pd.isna(v) else np.nan)
    return pd.to_numeric(series, errors="coerce").astype("float64")


def split_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(TRAIN, EVAL) of evaluated rows by stage 2's `is_test`; without the column EVAL is None."""
    df = frame
    if "_evaluated" in df.columns:
        df = df[df["_evaluated"].astype(bool)]
    if "is_test" not in df.columns:
        return df.reset_index(drop=True), None
    test = df["is_test"].astype(bool).to_numpy()
    return df[~test].reset_index(drop=True), df[test].reset_index(drop=True)


def _sha1(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def extraction_signature(train: pd.DataFrame, eval_df: pd.DataFrame | None, features: Sequence[str],
                         targets: Sequence[str], args: argparse.Namespace, features_digest: str) -> dict:
    """Everything a unit's rule files depend on (row counts, label and feature hashes, knobs)."""
    feats = list(features)
    both = train if eval_df is None else pd.concat([train, eval_df], ignore_index=True)
    return {
        "version": RULE_SIGNATURE_VERSION, "n_train": int(len(train)),
        "n_eval": int(len(eval_df)) if eval_df is not None else 0,
        "targets": {t: _sha1(np.concatenate([_as_float(train[t]).to_numpy(),
                                             _as_float(eval_df[t]).to_numpy() if eval_df is not None else np.zeros(0)]))
                    for t in targets},
        "features_sha1": hashlib.sha1("\x1f".join(feats).encode()).hexdigest(),
        "feature_values_sha1": _sha1(both[feats].to_numpy(dtype=np.float64)),
        "features_json": features_digest,
        "knobs": {k: getattr(args, k, None) for k in ("random_seed", "npermutations", "n_estimators", "epsilon",
                                                     "only_unique_datapoints_in_shap", "use_shap_in_xgb",
                                                     "only_unique_datapoints_in_rule_extraction",
                                                     "semantic_quality_policy")},
        "emit_all_fit": bool(getattr(args, "emit_all_fit_rules", True)),
    }


def _extraction_args(args: argparse.Namespace) -> argparse.Namespace:
    """Knobs handed to stage 3's `run_rule_extraction` (no LASSO filtering in stage 7)."""
    return argparse.Namespace(
        random_seed=args.random_seed, npermutations=args.npermutations, epsilon=args.epsilon,
        n_estimators=getattr(args, "n_estimators", 500),
        only_unique_datapoints_in_shap=args.only_unique_datapoints_in_shap, use_shap_in_xgb=args.use_shap_in_xgb,
        use_shap_in_lasso=False, only_unique_datapoints_in_rule_extraction=args.only_unique_datapoints_in_rule_extraction,
        emit_all_fit_rules=args.emit_all_fit_rules, force_all_fit_recompute=args.force_all_fit_recompute,
        force_rule_recompute=False)


def extract_unit_rules(frame: pd.DataFrame, features: Sequence[str], unit: Unit, args: argparse.Namespace,
                       unit_dir: Path, features_digest: str, echo: Callable[[str], None] = print,
                       reuse_only: bool = False) -> dict:
    """Fit the unit's flip targets (≥ 2 positives and negatives on TRAIN); returns {targets, skipped, reused}.

    With `reuse_only` nothing is fitted: the targets are returned only if the unit's files are current."""
    train, eval_df = split_rows(frame)
    targets = unit_targets(frame.columns, unit, args.rule_targets_list)
    kept, skipped = [], {}
    for t in targets:
        y = _as_float(train[t])
        n_pos, n_neg = int((y >= 0.5).sum()), int((y < 0.5).sum())
        if n_pos >= 2 and n_neg >= 2:
            kept.append(t)
        else:
            skipped[t] = f"{n_pos} positive / {n_neg} negative TRAIN rows (need >= 2 each)"
    if not kept:
        return {"targets": [], "skipped": skipped, "reused": False}
    prep = {}
    for name, part in (("train", train), ("eval", eval_df)):
        if part is None:
            continue
        part = part[list(features) + kept].copy()
        for t in kept:
            part[t] = _as_float(part[t])
        prep[name] = part
    sig = extraction_signature(prep["train"], prep.get("eval"), features, kept, args, features_digest)
    sig_path = unit_dir / "_rule_extraction_signature.json"
    unit_dir.mkdir(parents=True, exist_ok=True)
    old = None
    if sig_path.is_file():
        try:
            old = json.loads(sig_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
    current = old is not None and old.get("signature") == content_key(sig)
    if reuse_only:
        present = current and all((unit_dir / f"rule_combo_{t}.csv").is_file() for t in kept)
        return {"targets": kept if present else [], "skipped": skipped, "reused": present}
    if not current:
        for pat in _RULE_FILE_PATTERNS:
            for f in unit_dir.glob(pat):
                f.unlink()
    tag = f"[stage7] {unit.key}"
    run_rule_extraction(prep["train"], list(features), kept, _extraction_args(args), eval_df=prep.get("eval"),
                        rules_dir=unit_dir, eval_scope_name="test",
                        echo=lambda m: echo(m.replace("[stage3]", tag)))
    atomic_write_json(sig_path, {"signature": content_key(sig), "details": sig})
    return {"targets": kept, "skipped": skipped, "reused": current}


def rule_length(expression: Any) -> tuple[int, int, int]:
    """(atoms, disjuncts, max atoms in one disjunct) of a combo expression (`FALSE` → zeros)."""
    text = "" if expression is None or (isinstance(expression, float) and math.isnan(expression)) else str(expression)
    if not text.strip() or text.strip().upper() == "FALSE":
        return 0, 0, 0
    parts = [p for p in re.split(r"\s+OR\s+|\|\||\|", text) if p.strip()]
    counts = [len(_ATOM.findall(p)) for p in parts]
    return int(sum(counts)), len(parts), int(max(counts) if counts else 0)


def _read_row(path: Path) -> dict | None:
    """First row of a raw rule-combo CSV, or None when absent."""
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df.iloc[0].to_dict() if len(df) else None


def collect_rule_rows(units: Sequence[Unit], extracted: dict[str, list[str]], rules_root: Path, tag: str) -> pd.DataFrame:
    """Summary rows (§2.9 step 1-2) of this run's raw rule files, one per (unit, target, scope)."""
    rank = {u.neuron_key: i for i, u in enumerate(units)}
    rows = []
    for u in units:
        for t in extracted.get(u.neuron_key, []):
            for prefix, scope in (("train_", "train"), ("", "test"), ("test_selected_", "test_selected"),
                                  ("all_fit_", "all_fit")):
                path = rules_root / tag / u.neuron_key / f"rule_combo_{prefix}{t}.csv"
                rec = _read_row(path)
                if rec is None:
                    continue
                computed = str(rec.get("computed_on", scope))
                real_scope = "train" if computed == "train_selection" else scope
                atoms, disj, mx = rule_length(rec.get("expression"))
                row = {"rule_target_dir": tag, "layer_key": u.layer_key, "neuron_id": u.neuron_id,
                       "neuron_key": u.neuron_key, "flip_target": t, "computed_on": computed,
                       "score_scope": real_scope}
                for c in _METRIC_COLS:
                    row[c] = rec.get(c, rec.get("F1(target=1|fire)") if c == "F1" else
                                     rec.get("P(target=1|fire)") if c == "Precision" else np.nan)
                if pd.isna(row.get("rule_fire_rate")):
                    row["rule_fire_rate"] = row["dataset_coverage"]
                row.update({"expression": rec.get("expression", "FALSE"), "selected_literals": rec.get("selected_literals"),
                            "chosen_from": rec.get("chosen_from"), "selection_MCC": rec.get("selection_MCC", np.nan),
                            "heldout_valid": rec.get("heldout_valid", np.nan),
                            "rule_len_atoms": atoms, "rule_len_disjuncts": disj, "rule_len_max_atoms_in_disjunct": mx,
                            "rule_combo_path": str(path), "source_filename": path.name,
                            "source_scope_from_filename": scope, "neuron_rank": rank[u.neuron_key],
                            "baseline_subset": u.baseline_subset})
                rows.append(row)
    cols = ["rule_target_dir", "layer_key", "neuron_id", "neuron_key", "flip_target", "computed_on", "score_scope",
            *_METRIC_COLS, "expression", "selected_literals", "chosen_from", "selection_MCC", "heldout_valid",
            "rule_len_atoms", "rule_len_disjuncts", "rule_len_max_atoms_in_disjunct", "rule_combo_path",
            "source_filename", "source_scope_from_filename", "neuron_rank", "baseline_subset"]
    return pd.DataFrame(rows, columns=cols)


def _block(values: pd.Series, qs: Sequence[float]) -> dict:
    """{n, mean, median, q_lo, q_med, q_hi, min, max} of a numeric column."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return {"n": 0, "mean": None, "median": None, "q_lo": None, "q_med": None, "q_hi": None, "min": None, "max": None}
    q = [float(v.quantile(x)) for x in qs]
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(v.median()), "q_lo": q[0], "q_med": q[1],
            "q_hi": q[2], "min": float(v.min()), "max": float(v.max())}


def _macro_suffix(run: str, scope: str) -> str:
    """LaTeX-safe macro suffix: the run name's letters (or `Run`) + TestSelected/AllFit."""
    base = re.sub(r"[^A-Za-z]+", "", run) or "Run"
    return base + {"test": "", "test_selected": "TestSelected", "all_fit": "AllFit"}[scope]


def _tex(summary: dict, best: pd.DataFrame, run: str, scope: str, qcol: str) -> str:
    """`rule_metrics_<scope>.tex` macros."""
    sfx = _macro_suffix(run, scope)
    lines = [f"% stage 7 rule metrics, scope {scope} ({'held-out: selected on TRAIN, scored on is_test rows' if scope == 'test' else 'descriptive'})",
             f"\\newcommand{{\\RuleQualMetric{sfx}}}{{{summary['quality_metric_label']}}}",
             f"\\newcommand{{\\RuleQualThr{sfx}}}{{{summary['quality_threshold']:.2f}}}",
             f"\\newcommand{{\\RuleNeurons{sfx}}}{{{summary['n_neurons_with_rules']}}}",
             f"\\newcommand{{\\RuleNeuronsHighQual{sfx}}}{{{summary['n_neurons_quality_ge_threshold']}}}",
             f"\\newcommand{{\\RuleNeuronsHighQualPct{sfx}}}{{{100 * (summary['frac_neurons_quality_ge_threshold'] or 0):.1f}}}"]
    for name, col in (("MCC", "MCC"), ("TPR", "TPR"), ("TNR", "TNR"), ("F1", "F1"), ("Len", "rule_len_atoms")):
        b = summary["blocks"][col]
        for part, key in (("Med", "median"), ("Qlo", "q_lo"), ("Qhi", "q_hi")):
            val = b[key]
            lines.append(f"\\newcommand{{\\Rule{name}{part}{sfx}}}{{{'--' if val is None else f'{val:.2f}'}}}")
    return "\n".join(lines) + "\n"


def _distribution_pdf(best: pd.DataFrame, path: Path, cap: int, scope: str) -> None:
    """2×3 histograms of MCC, F1, balanced accuracy, TPR, TNR and rule length (clipped at the cap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.core.files_and_cache import atomic_path

    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, (col, title) in zip(axes.ravel(), (("MCC", "MCC"), ("F1", "F1"), ("BalancedAcc", "Balanced accuracy"),
                                               ("TPR", "TPR"), ("TNR", "TNR"), ("rule_len_atoms", "Rule length (atoms)"))):
        v = pd.to_numeric(best[col], errors="coerce").dropna() if col in best.columns else pd.Series(dtype=float)
        if col == "rule_len_atoms":
            v = v.clip(upper=cap)
        if len(v):
            ax.hist(v, bins=20, color="#34495e")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Best rule per unit, scope {scope} (n={len(best)})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def write_rule_summaries(rows: pd.DataFrame, out_dir: Path, run: str, args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """§2.9 files for scopes test, test_selected, all_fit; returns the best-per-unit table of each scope."""
    qmetric = args.rule_quality_metric or args.threshold_metric
    qcol = QUALITY_COLUMNS[qmetric]
    floor = float(args.min_rule_dataset_coverage)
    qs = [float(x) for x in str(args.rule_metrics_quantiles).split(",")]
    write_csv_atomic(rows, out_dir / "rule_combo_metrics_all_scopes.csv")
    raw = sorted(set(rows["rule_combo_path"])) if len(rows) else []
    digests = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in raw if Path(p).is_file()}
    atomic_write_json(out_dir / "rule_combo_metrics_manifest.json", {
        "signature": RULE_METRICS_SIGNATURE, "generator": "7_refine_neuron_anchored_rules.py", "run": run,
        "quality_metric": qmetric, "min_rule_dataset_coverage": floor, "scopes": list(SUMMARY_SCOPES),
        "scope_semantics": {"test": "combo selected on TRAIN rows only, scored on is_test rows only (held out)",
                            "test_selected": "combo re-selected on is_test rows from TRAIN rules (descriptive)",
                            "all_fit": "rules fitted, selected and scored on all evaluated rows (descriptive)"},
        "test_selected_signature": TEST_SELECTED_SIGNATURE, "all_fit_signature": ALL_FIT_SIGNATURE,
        "raw_files_sha256": digests,
        "overall_sha256": hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(digests.items())).encode()).hexdigest()})
    best_by_scope = {}
    for scope in SUMMARY_SCOPES:
        thr = float(args.rule_quality_threshold_all_fit if scope == "all_fit" else args.rule_quality_threshold)
        srows = rows[rows["score_scope"] == scope].reset_index(drop=True)
        n_before = len(srows)
        cov = pd.to_numeric(srows["dataset_coverage"], errors="coerce")
        n_after = int((cov >= floor).sum()) if floor > 0 else n_before
        sel_scope = SELECTION_SCOPE.get(scope)
        sel_rows = rows[rows["score_scope"] == sel_scope] if sel_scope else None
        best = best_per_neuron(srows, qcol, floor,
                               selection_rows=sel_rows if sel_rows is not None and len(sel_rows) else None)
        if len(best):
            best = best.sort_values(["neuron_rank", qcol, "MCC"], ascending=[True, False, False],
                                    kind="mergesort").reset_index(drop=True)
        best_by_scope[scope] = best
        topk = int(args.rule_metrics_topk)
        top = best.sort_values([qcol, "MCC"], ascending=False, kind="mergesort").head(topk) if len(best) else best
        write_csv_atomic(srows, out_dir / f"rule_combo_metrics_{scope}_all.csv")
        write_csv_atomic(best, out_dir / f"rule_combo_metrics_{scope}_best_per_neuron.csv")
        write_csv_atomic(top, out_dir / f"rule_combo_metrics_{scope}_top_{topk}.csv")
        n_hq = int((pd.to_numeric(best[qcol], errors="coerce") >= thr - 1e-12).sum()) if len(best) else 0
        summary = {
            "scope": scope, "heldout": scope == "test", "n_rule_combo_files": n_after,
            "n_rows_before_floor": n_before, "n_rows_after_floor": n_after, "n_rows_removed_by_floor": n_before - n_after,
            "min_dataset_coverage": floor, "n_neurons_with_rules": int(len(best)), "quality_metric": qmetric,
            "quality_metric_label": qcol, "quality_threshold": thr, "n_neurons_quality_ge_threshold": n_hq,
            "frac_neurons_quality_ge_threshold": (n_hq / len(best)) if len(best) else None, "quantiles": qs,
            "blocks": {c: _block(best[c] if c in best.columns else pd.Series(dtype=float), qs)
                       for c in dict.fromkeys([qcol, "MCC", "F1", "TPR", "TNR", "BalancedAcc", "rule_len_atoms",
                                               "dataset_coverage", "n_eval", "n_pos", "n_neg", "n_fire",
                                               "target_prevalence", "rule_fire_rate"])},
        }
        atomic_write_json(out_dir / f"rule_metrics_summary_{scope}.json", summary)
        atomic_write_text(out_dir / f"rule_metrics_{scope}.tex", _tex(summary, best, run, scope, qcol))
        _distribution_pdf(best, out_dir / f"rule_metrics_distributions_{scope}.pdf", int(args.rule_length_cap), scope)
        if scope == "test":
            write_csv_atomic(srows, out_dir / "rule_combo_metrics_all.csv")
            write_csv_atomic(best, out_dir / "rule_combo_metrics_best_per_neuron.csv")
            write_csv_atomic(top, out_dir / f"rule_combo_metrics_top_{topk}.csv")
            atomic_write_json(out_dir / "rule_metrics_summary.json", summary)
            atomic_write_text(out_dir / "rule_metrics.tex", _tex(summary, best, run, scope, qcol))
            _distribution_pdf(best, out_dir / "rule_metrics_distributions.pdf", int(args.rule_length_cap), scope)
    return best_by_scope
