"""Per-target rule extraction shared by stage 3 (behaviour targets) and stage 7 (neuron flip
targets): SHAP weights → RuleSHAP fit on TRAIN → rules table → OR-combo selected on TRAIN →
scored frozen on the held-out eval frame, plus the descriptive test-selected and ALL-FIT scopes.

Scopes (DESIGN 4.4, "TEST scope is held out"):
* `rule_combo_train_<t>.csv`       combo selected on train rows (raw §8.1 record);
* `rule_combo_<t>.csv`             that frozen combo scored on the eval rows (`score_scope=test`).
  Unlike the original stage 3 (which passed the train frame as eval), stage 3 passes the real
  `is_test` rows. Without an eval frame the row is the train record with
  `score_scope=train_selection` and no held-out claim is made;
* `rule_combo_test_selected_<t>.csv` a combo re-selected on eval from the train-emitted rules
  (`heldout_valid=False`: selection saw the eval rows);
* `*_all_fit_<t>.csv`               a refit on train+eval rows, selected and scored there
  (`heldout_valid=False`, descriptive only).

Also: `make_fake_targets` (§4 incorrect-rules control).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lib.caching_and_prompting import atomic_path, atomic_write_pickle, ensure_writable_dir, load_pickle
from lib.rule_combos import DEFAULT_MIN_MCC_GAIN, find_best_or_combo, score_frozen_combo

__all__ = [
    "TEST_SELECTED_SIGNATURE",
    "ALL_FIT_SIGNATURE",
    "run_rule_extraction",
    "make_fake_targets",
    "write_csv_atomic",
]

log = logging.getLogger(__name__)

TEST_SELECTED_SIGNATURE = "test_selected_from_train_rules_v1"
ALL_FIT_SIGNATURE = "all_fit_selected_scored_on_train_plus_eval_v2"


def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _read_first_row(path: Path) -> dict | None:
    try:
        df = pd.read_csv(path, nrows=1)
    except Exception:  # a torn/corrupt cache file simply means "recompute"
        return None
    return df.iloc[0].to_dict() if len(df) else {}


# --------------------------------------------------------------------------------------------
# Fake targets (§4)
# --------------------------------------------------------------------------------------------

def make_fake_targets(df: pd.DataFrame, targets: Sequence[str], seed: int, max_abs_corr: float = 0.05,
                      max_tries: int = 500) -> tuple[pd.DataFrame, dict]:
    """Add a random `<t>_fake` column per target, nearly uncorrelated with `t`; return (df, report)."""
    rng = np.random.default_rng(seed)
    out = df.copy()
    report: dict[str, dict] = {}
    for t in targets:
        real = pd.to_numeric(out[t], errors="coerce").astype(np.float64).to_numpy()
        mask = ~np.isnan(real)
        if mask.sum() < 2:
            raise ValueError(f"target '{t}' has fewer than 2 non-missing values; cannot build a fake target")
        vals = real[mask]
        is_binary = bool(np.isin(np.unique(vals), (0.0, 1.0)).all())
        best, best_abs, best_r, tries = None, math.inf, math.nan, 0
        for attempt in range(1, max(1, int(max_tries)) + 1):
            tries = attempt
            if is_binary:
                p = float(vals.mean())
                u = rng.random(len(real))
                fake = np.where(u < p, 1.0, 0.0)
                fake[~mask] = np.nan
            else:
                fake = np.full(len(real), np.nan)
                fake[mask] = rng.choice(vals, size=int(mask.sum()), replace=True)
            a, b = real[mask], fake[mask]
            with np.errstate(invalid="ignore", divide="ignore"):
                r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan
            if math.isnan(r):
                best, best_r, best_abs = fake, math.nan, math.nan
                break
            if abs(r) < best_abs:
                best, best_r, best_abs = fake, r, abs(r)
            if abs(r) <= max_abs_corr:
                break
        name = f"{t}_fake"
        out[name] = best
        entry: dict[str, Any] = {
            "fake_column": name, "is_binary": is_binary,
            "pearson_corr_true_vs_fake": None if math.isnan(best_r) else best_r,
            "abs_pearson_corr_true_vs_fake": None if math.isnan(best_r) else abs(best_r),
            "tries": tries,
        }
        if is_binary:
            entry["agreement_rate"] = float(np.mean(best[mask] == real[mask]))
        entry["seed"] = int(seed)
        entry["max_abs_corr_target"] = float(max_abs_corr)
        report[t] = entry
    return out, report


# --------------------------------------------------------------------------------------------
# Orchestration (§9)
# --------------------------------------------------------------------------------------------

def _arg(args: Any, name: str, default: Any) -> Any:
    return getattr(args, name, default)


def _xy(frame: pd.DataFrame, features: Sequence[str], target: str, dedup: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with a non-missing target; features as float64 with NaN → 0; optional (X‖y) dedup."""
    y = pd.to_numeric(frame[target], errors="coerce").astype(np.float64)
    keep = y.notna().to_numpy()
    X = frame.loc[keep, list(features)].apply(pd.to_numeric, errors="coerce").astype(np.float64).fillna(0.0)
    X = X.reset_index(drop=True)
    yv = y[keep].to_numpy()
    if dedup and len(X):
        both = X.copy()
        both["__y__"] = yv
        both = both.drop_duplicates().reset_index(drop=True)
        yv = both.pop("__y__").to_numpy()
        X = both
    return X, yv


def _shap_stats(train_df: pd.DataFrame, features: Sequence[str], target: str, args: Any, rules_dir: Path,
                has_eval: bool, echo: Callable[[str], None]) -> dict:
    """Global SHAP stats of `target` on train rows (cached per target in the pickle of §5)."""
    from lib.data_model_for_shap import compute_global_shap_stats

    pkl = rules_dir / ("global_shap_stats_train.pkl" if has_eval else "global_shap_stats.pkl")
    cache: dict = load_pickle(pkl, "SHAP cache") if pkl.is_file() else {}
    if not isinstance(cache, dict):
        cache = {}
    if target in cache and not _arg(args, "force_rule_recompute", False):
        return cache[target]
    # SHAP data: ALL NaNs → 0 (target included), as the original.
    X = train_df[list(features)].apply(pd.to_numeric, errors="coerce").astype(np.float64).fillna(0.0).to_numpy()
    y = pd.to_numeric(train_df[target], errors="coerce").astype(np.float64).fillna(0.0).to_numpy()
    plots = ensure_writable_dir(rules_dir / "shap_plots", "SHAP plot folder")
    try:
        stats = compute_global_shap_stats(
            pd.DataFrame(X, columns=list(features)), y, seed=int(_arg(args, "random_seed", 42)),
            npermutations=int(_arg(args, "npermutations", 10)), epsilon=float(_arg(args, "epsilon", 0.1)),
            only_unique=bool(_arg(args, "only_unique_datapoints_in_shap", False)),
            plot_path=str(plots / f"shap_summary_plot_{target}.png"))
    except Exception as exc:  # SHAP is advisory: fall back to unweighted trees, never crash
        echo(f"[stage3] warning: SHAP failed for '{target}' ({type(exc).__name__}: {exc}); "
             "continuing without SHAP weights")
        stats = {}
    cache[target] = stats
    atomic_write_pickle(pkl, cache)
    return stats


def _fit_rules(X: pd.DataFrame, y: np.ndarray, args: Any, weights: np.ndarray | None) -> pd.DataFrame:
    from lib.ruleshap import RuleSHAP

    model = RuleSHAP(random_state=int(_arg(args, "random_seed", 42)),
                     n_estimators=int(_arg(args, "n_estimators", 500)),
                     use_lasso=bool(_arg(args, "use_shap_in_lasso", False)))
    model.fit(X, y, feature_weights=weights)
    return model.get_rules(X, y)


def _optimal_rule_set(rules: pd.DataFrame, record: dict) -> pd.DataFrame:
    """Rows of the rules table whose literal text is selected (fallback: by rule_index)."""
    lits = record.get("selected_literals") or []
    if not isinstance(lits, list):
        lits = list(lits)
    sel = rules[rules["rule_expression"].astype(str).isin([str(x) for x in lits])] if lits else rules.iloc[0:0]
    if lits and sel.empty and "rule_index" in rules.columns:
        sel = rules[rules["rule_index"].isin(record.get("selected_rule_indices") or [])]
    return sel


def _row(record: dict) -> pd.DataFrame:
    return pd.DataFrame([record])


def _cache_ok(path: Path, column: str | None = None, value: str | None = None) -> bool:
    if not path.is_file():
        return False
    if column is None:
        return True
    row = _read_first_row(path)
    return bool(row) and str(row.get(column)) == value


def run_rule_extraction(train_df: pd.DataFrame, input_features: Sequence[str], targets: Sequence[str],
                        args: Any, eval_df: pd.DataFrame | None = None, *,
                        rules_dir: str | Path | None = None, eval_scope_name: str = "test",
                        echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Extract rules per target (§9) into `rules_dir` (default `args.rules_dir`).

    Fits only on `train_df`; `eval_df` (held-out rows, e.g. stage 2's `is_test` rows) is used for
    frozen scoring and the descriptive test-selected / ALL-FIT scopes. Returns, per target, a
    summary dict (status and the train/eval combo records) for the caller to print.
    """
    rules_dir = ensure_writable_dir(rules_dir or _arg(args, "rules_dir", "xai_analyses_results"), "--rules_dir")
    features = list(input_features)
    if not features:
        raise ValueError("no input features")
    dedup_fit = bool(_arg(args, "only_unique_datapoints_in_rule_extraction", False))
    emit_all_fit = bool(_arg(args, "emit_all_fit_rules", True))
    min_gain = float(_arg(args, "min_combo_mcc_gain", DEFAULT_MIN_MCC_GAIN))
    force = bool(_arg(args, "force_rule_recompute", False))
    force_all_fit = bool(_arg(args, "force_all_fit_recompute", False))
    has_eval = eval_df is not None
    results: dict[str, dict] = {}

    for t in targets:
        f_assoc = rules_dir / f"association_rules_{t}.csv"
        f_train = rules_dir / f"rule_combo_train_{t}.csv"
        f_combo = rules_dir / f"rule_combo_{t}.csv"
        f_tsel = rules_dir / f"rule_combo_test_selected_{t}.csv"
        f_opt_tsel = rules_dir / f"optimal_rule_set_test_selected_{t}.csv"
        f_opt = rules_dir / f"optimal_rule_set_{t}.csv"
        f_assoc_all = rules_dir / f"association_rules_all_fit_{t}.csv"
        f_all = rules_dir / f"rule_combo_all_fit_{t}.csv"
        f_opt_all = rules_dir / f"optimal_rule_set_all_fit_{t}.csv"

        stale = rules_dir / f"rule_combo_train_test_{t}.csv"
        if stale.exists():
            stale.unlink()

        main_ok = (not force and f_assoc.is_file() and _cache_ok(f_train) and _cache_ok(f_combo) and f_opt.is_file()
                   and (not has_eval or _cache_ok(f_tsel, "test_selected_cache_signature", TEST_SELECTED_SIGNATURE)))
        all_ok = (not emit_all_fit) or (not force and not force_all_fit
                                        and _cache_ok(f_all, "all_fit_cache_signature", ALL_FIT_SIGNATURE))
        if main_ok and all_ok:
            echo(f"[stage3] {t}: outputs present, skipping (force_rule_recompute to redo)")
            results[t] = {"status": "skipped"}
            continue

        X_tr, y_tr = _xy(train_df, features, t, dedup_fit)
        if len(X_tr) == 0:
            raise ValueError(f"target '{t}' has no non-missing values on the train rows")
        if has_eval:
            X_ev, y_ev = _xy(eval_df, features, t, False)
        stats = _shap_stats(train_df, features, t, args, rules_dir, has_eval, echo)
        weights = None
        if _arg(args, "use_shap_in_xgb", False):
            if stats:
                from lib.data_model_for_shap import shap_feature_weights
                weights = np.asarray(shap_feature_weights(stats, features), dtype=np.float64)
            else:
                echo(f"[stage3] warning: no SHAP stats for '{t}'; trees use uniform column sampling")

        summary: dict[str, Any] = {"status": "done"}
        if not main_ok:
            rules = _fit_rules(X_tr, y_tr, args, weights)
            write_csv_atomic(rules, f_assoc)
            rec_train = find_best_or_combo(rules, X_tr, y_tr, min_gain=min_gain)
            write_csv_atomic(_row(rec_train), f_train)
            if has_eval:
                rec_eval = score_frozen_combo(rec_train, rules, X_ev, y_ev, scope_name=eval_scope_name,
                                              chosen_from=f"frozen_train_combo_scored_on_{eval_scope_name}")
                rec_eval["heldout_valid"] = bool(rec_train.get("found_solution", False))
            else:
                rec_eval = dict(rec_train)
                rec_eval["computed_on"] = rec_eval["score_scope"] = "train_selection"
                rec_eval["heldout_valid"] = False
            write_csv_atomic(_row(rec_eval), f_combo)
            if has_eval:
                sel = find_best_or_combo(rules, X_ev, y_ev, min_gain=min_gain)
                rec_ts = score_frozen_combo(sel, rules, X_ev, y_ev, scope_name="test_selected",
                                            chosen_from="test_selected_from_train_emitted_rules")
                rec_ts.update({"selection_scope": "test_selected", "heldout_valid": False,
                               "test_selected_cache_signature": TEST_SELECTED_SIGNATURE,
                               "test_selected_source_rules": "train_emitted_rules",
                               "test_selected_n_eval_rows": int(len(X_ev))})
                write_csv_atomic(_row(rec_ts), f_tsel)
                write_csv_atomic(_optimal_rule_set(rules, sel) if sel.get("found_solution") else rules.iloc[0:0],
                                 f_opt_tsel)
                summary["test_selected"] = rec_ts
            write_csv_atomic(_optimal_rule_set(rules, rec_train) if rec_train.get("found_solution")
                             else rules.iloc[0:0], f_opt)
            summary.update({"train": rec_train, "eval": rec_eval, "n_rules": int(len(rules))})
            echo(f"[stage3] {t}: {len(rules)} literals; train combo MCC={rec_train.get('MCC', float('nan')):.3f} "
                 f"({rec_train.get('expression', 'FALSE')})"
                 + (f"; held-out {eval_scope_name} MCC={rec_eval.get('MCC', float('nan')):.3f} "
                    f"on {rec_eval.get('n_eval')} rows" if has_eval else "; no held-out scope"))

        if emit_all_fit and not all_ok:
            if has_eval:
                both = pd.concat([train_df, eval_df], ignore_index=True)
                src = "train_plus_eval"
            else:
                both, src = train_df, "train_only_no_eval"
            X_all, y_all = _xy(both, features, t, dedup_fit)
            rules_all = _fit_rules(X_all, y_all, args, weights)
            write_csv_atomic(rules_all, f_assoc_all)
            sel_all = find_best_or_combo(rules_all, X_all, y_all, min_gain=min_gain)
            rec_all = score_frozen_combo(sel_all, rules_all, X_all, y_all, scope_name="all_fit",
                                         chosen_from="all_fit_selected_and_scored_on_all_rows")
            rec_all.update({"selection_scope": "all_fit", "heldout_valid": False,
                            "all_fit_cache_signature": ALL_FIT_SIGNATURE, "all_fit_source_scope": src,
                            "all_fit_n_train_rows": int(len(train_df)),
                            "all_fit_n_eval_rows": int(len(eval_df)) if has_eval else 0})
            write_csv_atomic(_row(rec_all), f_all)
            write_csv_atomic(_optimal_rule_set(rules_all, sel_all) if sel_all.get("found_solution")
                             else rules_all.iloc[0:0], f_opt_all)
            summary["all_fit"] = rec_all
        results[t] = summary
    return results


# --------------------------------------------------------------------------------------------
# Stage 3 entry point (the script stays thin)
# --------------------------------------------------------------------------------------------

def _to_float_target(s: pd.Series) -> pd.Series:
    if s.dtype == object:
        s = s.map(lambda v: {"true": 1.0, "false": 0.0}.get(v.strip().lower(), v) if isinstance(v, str) else v)
    return pd.to_numeric(s.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v), errors="coerce")


def _parse_bool_column(s: pd.Series, name: str, where: str) -> np.ndarray:
    if s.dtype == bool:
        return s.to_numpy()
    mapped = s.map(lambda v: {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
                   .get(str(v).strip().lower()))
    if mapped.isna().any():
        bad = s[mapped.isna()].iloc[0]
        from lib.caching_and_prompting import ArtifactError
        raise ArtifactError(f"{where}: column '{name}' must be boolean, found {bad!r}")
    return mapped.astype(bool).to_numpy()


def resolve_feature_columns(columns: Sequence[str], labels: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Columns of scores.csv (file order) that are stage-2 feature columns for `labels`, minus targets.

    Stage 2 names features with `sanitize_column_names(labels, reserved=<table columns>)`, so a
    repeated label or one clashing with a table column carries a `_1`, `_2`… suffix. The
    non-feature columns are reconstructed as every column that is no (suffixed) form of a label,
    plus, per label base, the lowest-numbered surplus forms (a table column that clashed).
    """
    import re

    from lib.feature_filters import sanitize_column_names

    bases = [re.sub(r"[^0-9a-zA-Z]+", "_", str(lb)).strip("_").lower() or "feature" for lb in labels]
    n_labels: dict[str, int] = {}
    for b in bases:
        n_labels[b] = n_labels.get(b, 0) + 1
    groups: dict[str, list[tuple[int, str]]] = {}
    reserved: list[str] = []
    for c in columns:
        m = re.fullmatch(r"(.+?)(?:_(\d+))?", str(c))
        hit = None
        for b in (str(c), m.group(1) if m else None):
            if b in n_labels:
                hit = b
                break
        if hit is None:
            reserved.append(str(c))
            continue
        k = 0 if str(c) == hit else int(str(c)[len(hit) + 1:])
        groups.setdefault(hit, []).append((k, str(c)))
    for b, forms in groups.items():
        forms.sort()
        surplus = len(forms) - n_labels[b]
        reserved += [c for _, c in forms[:max(0, surplus)]]
    names = set(sanitize_column_names(labels, reserved=reserved))
    tset = set(targets)
    return [c for c in columns if c in names and c not in tset]


def run_stage3(args: argparse.Namespace, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Stage 3 (§3): read stage-2 outputs, validate, build (fake) targets, split, extract rules."""
    from lib.caching_and_prompting import ArtifactError, atomic_write_json, set_deterministic
    from lib.task_spec import load_task

    set_deterministic(args.random_seed)
    task = load_task(args.task_module)
    targets = list(task.DEFAULT_TARGETS)
    in_dir = Path(args.features_scores_dir)
    scores_path, feats_path = in_dir / "scores.csv", in_dir / "features.json"
    for p in (scores_path, feats_path):
        if not p.is_file():
            raise ArtifactError(f"'{p}' does not exist (run stage 2 first or pass another --features_scores_dir)")
    rules_dir = ensure_writable_dir(args.rules_dir, "--rules_dir")
    try:
        df = pd.read_csv(scores_path, low_memory=False)
    except Exception as exc:
        raise ArtifactError(f"'{scores_path}' is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        feats = json.loads(feats_path.read_text(encoding="utf-8"))
        labels = [str(f["label"]) for f in feats]
    except Exception as exc:
        raise ArtifactError(f"'{feats_path}' must be a JSON list of objects with a 'label' "
                            f"({type(exc).__name__}: {exc})") from None
    for t in targets:
        if t not in df.columns:
            raise ArtifactError(f"'{scores_path}' has no target column '{t}' (task {args.task_module})")
        df[t] = _to_float_target(df[t])

    features = resolve_feature_columns(list(df.columns), labels, targets)
    if not features:
        raise ArtifactError(f"no column of '{scores_path}' matches a feature label of '{feats_path}'")
    for c in features:
        col = df[c]
        if col.dtype == bool:
            df[c] = col.astype(np.float64)
            continue
        num = pd.to_numeric(col, errors="coerce")
        bad = col.notna() & num.isna()
        if bad.any():
            if col.dtype == object and set(col[col.notna()].astype(str).str.lower()) <= {"true", "false"}:
                num = col.map(lambda v: {"true": 1.0, "false": 0.0}.get(str(v).lower(), np.nan))
            else:
                raise ArtifactError(f"feature column '{c}' of '{scores_path}' is not numeric "
                                    f"(e.g. {col[bad].iloc[0]!r})")
        df[c] = num.astype(np.float64).fillna(0.0)

    if args.fake_targets:
        try:
            df, report = make_fake_targets(df, targets, args.random_seed, args.fake_target_max_abs_corr,
                                           args.fake_target_max_tries)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        atomic_write_json(rules_dir / "fake_targets_report.json", report)
        targets = [f"{t}_fake" for t in targets]
        for t, e in report.items():
            echo(f"[stage3] fake target {e['fake_column']}: |r| = {e['abs_pearson_corr_true_vs_fake']} "
                 f"after {e['tries']} tries")

    if "is_test" in df.columns:
        is_test = _parse_bool_column(df["is_test"], "is_test", str(scores_path))
        train, test = df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)
        if train.empty or test.empty:
            raise ArtifactError(f"'{scores_path}': the is_test split leaves no {'train' if train.empty else 'test'} rows")
    else:
        echo(f"[stage3] warning: '{scores_path}' has no is_test column; every row is TRAIN and "
             "no held-out (test) scope exists")
        train, test = df, None

    constant = {t: train[t].dropna().unique() for t in targets}
    constant = {t: v for t, v in constant.items() if len(v) < 2}
    results: dict[str, dict] = {}
    for t, vals in constant.items():
        reason = (f"target '{t}' has a single class ({vals[0] if len(vals) else 'no values'}) on the train rows: "
                  "the model behaves the same on every prompt, so there is nothing to explain or localise")
        echo(f"[stage3] warning: {reason}; writing empty rule files")
        write_empty_rule_files(rules_dir, t, reason)
        results[t] = {"status": "single_class", "reason": reason}
    targets = [t for t in targets if t not in constant]
    if not targets:
        return results
    echo(f"[stage3] {len(features)} features, {len(train)} train rows"
         + (f", {len(test)} held-out test rows" if test is not None else "") + f"; targets {targets}")
    results.update(run_rule_extraction(train, features, targets, args, eval_df=test, rules_dir=rules_dir, echo=echo))
    return results


EMPTY_RULE_COLUMNS = ("rule_index", "is_negated", "rule_expression", "component_type", "dataset_coverage",
                      "coefficient_sign")


def write_empty_rule_files(rules_dir: Path, target: str, reason: str) -> None:
    """Header-only rule files and a note for a target that cannot be explained (one class):
    later stages then see zero rules instead of a missing file."""
    from lib.caching_and_prompting import atomic_write_json

    empty = pd.DataFrame(columns=list(EMPTY_RULE_COLUMNS))
    for name in (f"association_rules_{target}.csv", f"optimal_rule_set_{target}.csv"):
        write_csv_atomic(empty, rules_dir / name)
    atomic_write_json(rules_dir / f"rule_extraction_skipped_{target}.json", {"target": target, "reason": reason})
