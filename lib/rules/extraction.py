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

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import (atomic_write_json, atomic_write_pickle, ensure_writable_dir, load_pickle,
                                     write_csv_atomic)
from lib.rules.combos import DEFAULT_MIN_MCC_GAIN, find_best_or_combo, score_frozen_combo

__all__ = [
    "TEST_SELECTED_SIGNATURE",
    "ALL_FIT_SIGNATURE",
    "run_rule_extraction",
    "make_fake_targets",
]

log = logging.getLogger(__name__)

TEST_SELECTED_SIGNATURE = "test_selected_from_train_rules_v1"
ALL_FIT_SIGNATURE = "all_fit_selected_scored_on_train_plus_eval_v2"


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
                has_eval: bool, echo: Callable[[str], None], cache_key: str | None = None) -> dict:
    """Global SHAP stats of `target` on train rows (cached per target in the pickle of §5; the
    validation search's fitting part under its own `cache_key`, without a plot)."""
    from lib.rules.shap_importance import compute_global_shap_stats

    key = cache_key or target
    pkl = rules_dir / ("global_shap_stats_train.pkl" if has_eval else "global_shap_stats.pkl")
    cache: dict = load_pickle(pkl, "SHAP cache") if pkl.is_file() else {}
    if not isinstance(cache, dict):
        cache = {}
    if key in cache and not _arg(args, "force_rule_recompute", False):
        return cache[key]
    # SHAP data: ALL NaNs → 0 (target included), as the original.
    X = train_df[list(features)].apply(pd.to_numeric, errors="coerce").astype(np.float64).fillna(0.0).to_numpy()
    y = pd.to_numeric(train_df[target], errors="coerce").astype(np.float64).fillna(0.0).to_numpy()
    plots = ensure_writable_dir(rules_dir / "shap_plots", "SHAP plot folder")
    try:
        stats = compute_global_shap_stats(
            pd.DataFrame(X, columns=list(features)), y, seed=int(_arg(args, "random_seed", 42)),
            npermutations=int(_arg(args, "npermutations", 10)), epsilon=float(_arg(args, "epsilon", 0.1)),
            only_unique=bool(_arg(args, "only_unique_datapoints_in_shap", False)),
            plot_path=None if cache_key else str(plots / f"shap_summary_plot_{target}.png"))
    except Exception as exc:  # SHAP is advisory: fall back to unweighted trees, never crash
        echo(f"[stage3] warning: SHAP failed for '{target}' ({type(exc).__name__}: {exc}); "
             "continuing without SHAP weights")
        stats = {}
    cache[key] = stats
    atomic_write_pickle(pkl, cache)
    return stats


def _weights(stats: dict, features: Sequence[str]) -> np.ndarray | None:
    """SHAP feature weights for the trees, or None without stats."""
    if not stats:
        return None
    from lib.rules.shap_importance import shap_feature_weights

    return np.asarray(shap_feature_weights(stats, features), dtype=np.float64)


def _validation_search(train_df: pd.DataFrame, features: Sequence[str], t: str, args: Any, rules_dir: Path,
                       has_eval: bool, echo: Callable[[str], None], dedup_fit: bool, min_gain: float,
                       min_support: int) -> dict[str, Any]:
    """Split TRAIN into validation folds and choose the rule options on them (lib.rules.validation)."""
    from lib.rules.validation import (Fold, candidate_options, carve_validation_folds, choose_rule_options,
                                      parse_int_list, parse_validation_grid, scaled_min_support)

    n_folds = int(_arg(args, "validation_folds", 0))
    seed = int(_arg(args, "random_seed", 42))
    grid = parse_validation_grid(_arg(args, "validation_grid", ""))
    depths = parse_int_list(_arg(args, "validation_max_depths", "3"), "--validation_max_depths")
    y_all = pd.to_numeric(train_df[t], errors="coerce").to_numpy(dtype=np.float64)
    fold_of = carve_validation_folds(y_all, n_folds, seed)
    folds, fit_frames, supports = [], [], []
    for i in range(n_folds):
        fit_df = train_df[fold_of != i].reset_index(drop=True)
        val_df = train_df[fold_of == i].reset_index(drop=True)
        X_fit, y_fit = _xy(fit_df, features, t, dedup_fit)
        X_val, y_val = _xy(val_df, features, t, False)
        folds.append(Fold(X_fit, y_fit, X_val, y_val))
        fit_frames.append(fit_df)
        supports.append(scaled_min_support(min_support, len(fit_df), len(train_df)))
    candidates = candidate_options(grid, bool(_arg(args, "use_shap_in_xgb", False)),
                                   int(_arg(args, "max_depth", 10)), depths)
    weights: dict[int, np.ndarray | None] = {}

    def fit(opt: Any, i: int) -> pd.DataFrame:
        w = None
        if opt.use_shap_in_xgb:
            if i not in weights:
                weights[i] = _weights(_shap_stats(fit_frames[i], features, t, args, rules_dir, has_eval, echo,
                                                  cache_key=f"{t}@validation_fold{i}of{n_folds}"), features)
            w = weights[i]
        return _fit_rules(folds[i].X_fit, folds[i].y_fit, args, w, max_depth=opt.max_depth)

    out = choose_rule_options(candidates, fit, folds, min_gain=min_gain, min_supports=supports,
                              choose_size="combo_size" in grid)
    out.update({"target": t, "validation_folds": n_folds, "seed": seed, "grid": list(grid),
                "n_train_rows": int(len(train_df)), "min_support": int(min_support), "fold_min_support": supports,
                "validation_rows": "fold id of each TRAIN row (scores.csv rows with is_test false, in file order)",
                "fold_of_train_row": [int(f) for f in fold_of]})
    return out


def _fit_rules(X: pd.DataFrame, y: np.ndarray, args: Any, weights: np.ndarray | None,
               max_depth: int | None = None) -> pd.DataFrame:
    from lib.rules.ruleshap import RuleSHAP

    model = RuleSHAP(random_state=int(_arg(args, "random_seed", 42)),
                     n_estimators=int(_arg(args, "n_estimators", 500)),
                     max_depth=int(max_depth if max_depth is not None else _arg(args, "max_depth", 10)),
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
    n_folds = int(_arg(args, "validation_folds", 0))
    min_support = int(_arg(args, "min_rule_support", 0))
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
        f_selection = rules_dir / f"rule_selection_{t}.json"

        stale = rules_dir / f"rule_combo_train_test_{t}.csv"
        if stale.exists():
            stale.unlink()

        main_ok = (not force and f_assoc.is_file() and _cache_ok(f_train) and _cache_ok(f_combo) and f_opt.is_file()
                   and (n_folds <= 0 or f_selection.is_file())
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
        summary: dict[str, Any] = {"status": "done"}
        use_shap = bool(_arg(args, "use_shap_in_xgb", False))
        max_literals = None
        selection = None
        max_depth = int(_arg(args, "max_depth", 10))
        if not main_ok and n_folds > 0:
            selection = _validation_search(train_df, features, t, args, rules_dir, has_eval, echo, dedup_fit,
                                           min_gain, min_support)
            use_shap = bool(selection["chosen_options"]["use_shap_in_xgb"])
            max_depth = int(selection["chosen_options"]["max_depth"])
            max_literals = selection["chosen_max_literals"]
            echo(f"[stage3] {t}: {n_folds} validation folds of the {len(train_df)} TRAIN rows chose "
                 f"{selection['chosen_label']}"
                 + (f", at most {max_literals} literal(s)" if max_literals else "")
                 + f" (mean validation MCC {selection['validation_MCC']:.3f})")
        weights = None
        if use_shap:
            weights = _weights(stats, features)
            if weights is None:
                echo(f"[stage3] warning: no SHAP stats for '{t}'; trees use uniform column sampling")

        if not main_ok:
            rules = _fit_rules(X_tr, y_tr, args, weights, max_depth=max_depth)
            write_csv_atomic(rules, f_assoc)
            rec_train = find_best_or_combo(rules, X_tr, y_tr, min_gain=min_gain, min_support=min_support,
                                           max_literals=max_literals)
            rec_train.update({"use_shap_in_xgb": bool(weights is not None), "max_depth": max_depth})
            if selection is not None:
                rec_train["validation_MCC"] = selection["validation_MCC"]
                selection["final"] = {"use_shap_in_xgb": bool(weights is not None), "max_depth": max_depth,
                                      "max_literals": max_literals,
                                      "train_MCC": rec_train.get("MCC"), "expression": rec_train.get("expression"),
                                      "n_literals": len(rec_train.get("selected_literals") or [])}
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
            if selection is not None:
                atomic_write_json(f_selection, selection)
                summary["selection"] = selection
            summary.update({"train": rec_train, "eval": rec_eval, "n_rules": int(len(rules))})
            val_txt = f"validation MCC={selection['validation_MCC']:.3f} (mean of folds); " if selection is not None else ""
            echo(f"[stage3] {t}: {len(rules)} literals; train combo MCC={rec_train.get('MCC', float('nan')):.3f}; "
                 + val_txt
                 + (f"held-out {eval_scope_name} MCC={rec_eval.get('MCC', float('nan')):.3f} "
                    f"on {rec_eval.get('n_eval')} rows" if has_eval else "no held-out scope")
                 + f" ({rec_train.get('expression', 'FALSE')})")

        if emit_all_fit and not all_ok:
            if has_eval:
                both = pd.concat([train_df, eval_df], ignore_index=True)
                src = "train_plus_eval"
            else:
                both, src = train_df, "train_only_no_eval"
            X_all, y_all = _xy(both, features, t, dedup_fit)
            rules_all = _fit_rules(X_all, y_all, args, weights, max_depth=max_depth)
            write_csv_atomic(rules_all, f_assoc_all)
            sel_all = find_best_or_combo(rules_all, X_all, y_all, min_gain=min_gain, min_support=min_support,
                                         max_literals=max_literals)
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
