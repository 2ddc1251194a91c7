"""Benchmark: RuleSHAP candidate rules against imodels RuleFit (and skope-rules), under ONE selection.

Every method only generates candidate rules from the train rows; then all of them go through the
same stage-3 selection and scoring, so the table compares the rule generators, not the selectors:

  (a) RuleSHAP with SHAP-weighted trees: `compute_global_shap_stats` (npermutations 5,
      only_unique True) → `shap_feature_weights` → `RuleSHAP(random_state=seed).fit` → `get_rules`
  (b) RuleSHAP without SHAP weights (uniform column sampling)
  (c) imodels `RuleFitClassifier(random_state=seed)` on the same train X (numpy, feature_names
      passed); its rules with nonzero coefficient (its linear terms are dropped: they are no rules),
      each rule string parsed into our grammar (`parse_expression`) and written back with
      `format_expression`, oriented on train like RuleSHAP (NOT(rule) where mean(y|fire) <
      mean(y|~fire)), identical literal texts merged
  (d) skope-rules, when it imports (it does not on Python ≥ 3.10: it imports
      `collections.Iterable`, removed in 3.10), else a row saying so
  (s) stage 3 as it ships: `run_rule_extraction` with Stage3Config's defaults, which chooses SHAP
      weighting, tree depth and combo size on 4 stratified validation folds of the train rows and
      refits the choice on all of them (its own selection, so it is the end-to-end number)

Selection: `find_best_or_combo` on train (default min_gain, literals with at least --min_rule_support
rows on each side), the chosen OR-combo frozen and scored
on the held-out test rows with `score_frozen_combo`. How to read the table:

  * `cands` = candidate literals handed to the selector; `sel` = literals in the chosen OR-combo.
  * `train MCC` is the selection objective (optimistic); `test MCC` is the held-out number that
    matters. A generator is better if its test MCC is higher at a comparable number of selected
    literals (fewer = more readable).
  * `fit s` = wall time (time.perf_counter) to produce the candidate table (for (a) SHAP included;
    `shap s` shows that part); `x(a)` = fit s / fit s of (a): below 1 faster than (a). Library
    imports and numba's one-off compilation of the SHAP kernels happen before timing (a small
    SHAP warm-up call, its time printed at the top; --no_warmup counts it in (a) instead —
    10–17 s on a 2-CPU machine, i.e. most of a cold (a) on --planted).
  * On `--planted` the truth is (f1 > 3) & (f2 <= 0.5) with 5 % label noise: a perfect generator
    gets one literal like `f1 >= 3.5 & f2 < 0.5` (or its bounds at other midpoints) and a test MCC
    close to the ceiling that the noise allows (~0.9).

Run: .env/bin/python bench/rules_vs_rulefit.py --features_scores_dir DIR [--target is_correct]
         [--seed 42] [--n_estimators 500]
     .env/bin/python bench/rules_vs_rulefit.py --planted
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lib.rules.combos import find_best_or_combo, score_frozen_combo  # noqa: E402
from lib.rules.expressions import Combo, Literal  # noqa: E402
from lib.rules.language import format_expression, parse_expression  # noqa: E402
from lib.rules.evaluation import evaluate_many  # noqa: E402


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def planted_table(seed: int, n: int = 600) -> tuple[pd.DataFrame, list[str], str]:
    """600 rows: f1 ∈ 0..7, f2 ∈ -3..3, d1..d10 ∈ 0..2; target (f1 > 3) & (f2 <= 0.5), 5 % flipped;
    stratified 20 % is_test."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"f1": rng.integers(0, 8, n), "f2": rng.integers(-3, 4, n)})
    for k in range(1, 11):
        df[f"d{k}"] = rng.integers(0, 3, n)
    y = ((df["f1"] > 3) & (df["f2"] <= 0.5)).to_numpy()
    flip = rng.random(n) < 0.05
    df["target"] = np.where(flip, ~y, y).astype(np.float64)
    is_test = np.zeros(n, dtype=bool)
    for cls in (0.0, 1.0):
        idx = np.flatnonzero(df["target"].to_numpy() == cls)
        is_test[rng.choice(idx, size=int(round(0.2 * idx.size)), replace=False)] = True
    df["is_test"] = is_test
    feats = [c for c in df.columns if c not in ("target", "is_test")]
    return df, feats, "target"


def scores_table(directory: Path, target: str) -> tuple[pd.DataFrame, list[str], str]:
    """scores.csv + features.json of a stage-2 folder: feature columns as stage 3 resolves them."""
    from lib.pipeline.stage3_rules import _parse_bool_column, _to_float_target, resolve_feature_columns

    df = pd.read_csv(directory / "scores.csv", low_memory=False)
    labels = [str(f["label"]) for f in json.loads((directory / "features.json").read_text(encoding="utf-8"))]
    if target not in df.columns:
        raise SystemExit(f"{directory / 'scores.csv'} has no column {target!r}")
    if "is_test" not in df.columns:
        raise SystemExit(f"{directory / 'scores.csv'} has no is_test column (no held-out scope)")
    df[target] = _to_float_target(df[target])
    df["is_test"] = _parse_bool_column(df["is_test"], "is_test", str(directory))
    feats = []
    for c in resolve_feature_columns(list(df.columns), labels, [target, "is_test"]):
        col = df[c].astype(np.float64) if df[c].dtype == bool else pd.to_numeric(df[c], errors="coerce")
        if col.notna().sum() == 0 and df[c].notna().any():
            continue  # not numeric
        df[c] = col.astype(np.float64)
        feats.append(c)
    return df, feats, target


def split_xy(df: pd.DataFrame, feats: list[str], target: str, test: bool) -> tuple[pd.DataFrame, np.ndarray]:
    part = df[df["is_test"].astype(bool) == test]
    part = part[part[target].notna()]
    X = part[feats].astype(np.float64).fillna(0.0).reset_index(drop=True)
    return X, part[target].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------
# candidate generators: each returns (rules table, extra info)
# --------------------------------------------------------------------------------------------

def ruleshap_rules(X: pd.DataFrame, y: np.ndarray, seed: int, n_estimators: int, shap: bool) -> tuple[pd.DataFrame, dict]:
    from lib.rules.ruleshap import RuleSHAP

    info: dict[str, Any] = {}
    weights = None
    if shap:
        from lib.rules.shap_importance import compute_global_shap_stats, shap_feature_weights

        t0 = time.perf_counter()
        stats = compute_global_shap_stats(X, y, seed=seed, npermutations=5, only_unique=True)
        weights = shap_feature_weights(stats, list(X.columns))
        info["shap_s"] = time.perf_counter() - t0
    model = RuleSHAP(random_state=seed, n_estimators=n_estimators).fit(X, y, feature_weights=weights)
    return model.get_rules(X, y), info


def orient_table(texts: list[str], X: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """Rules table (our columns) of rule texts, each oriented to be positively associated with y."""
    yb = y >= 0.5
    Z = evaluate_many(texts, X) if texts else np.zeros((len(X), 0), dtype=bool)
    nf = Z.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mf = (Z & yb[:, None]).sum(axis=0) / np.maximum(nf, 1)
        mn = ((~Z) & yb[:, None]).sum(axis=0) / np.maximum(len(y) - nf, 1)
    rows, seen = [], set()
    for j, text in enumerate(texts):
        neg = bool(0 < nf[j] < len(y) and mf[j] < mn[j])
        lit = parse_expression(text, X.columns).literals[0]
        expr = format_expression(Literal(lit.rule, neg))
        if expr in seen:
            continue
        seen.add(expr)
        rows.append({"rule_index": j, "is_negated": neg, "rule_expression": expr, "component_type": "rule"})
    return pd.DataFrame(rows, columns=["rule_index", "is_negated", "rule_expression", "component_type"])


def rulefit_rules(X: pd.DataFrame, y: np.ndarray, seed: int) -> tuple[pd.DataFrame, dict]:
    from imodels import RuleFitClassifier

    names = list(X.columns)
    model = RuleFitClassifier(random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X.to_numpy(dtype=np.float64), y.astype(int), feature_names=names)
    # rules_[i] has the coefficient coef[n_features + i] (the first n_features are linear terms)
    n_lin = len(model.coef) - len(model.rules_)
    coef = np.asarray(model.coef, dtype=np.float64)
    texts, bad = [], 0
    for i, rule in enumerate(model.rules_):
        if coef[n_lin + i] == 0:
            continue
        expr = parse_expression(str(rule.rule), names)
        if not (isinstance(expr, Combo) and len(expr.literals) == 1):
            bad += 1
            continue
        texts.append(format_expression(expr.literals[0].rule.canonical()))
    info = {"rulefit_rules": len(model.rules_), "nonzero": len(texts) + bad, "unparsed": bad,
            "nonzero_linear": int(np.count_nonzero(coef[:n_lin]))}
    return orient_table(texts, X, y), info


def stage3_as_shipped(df: pd.DataFrame, feats: list[str], target: str, seed: int, n_estimators: int,
                      min_support: int, lasso: bool) -> tuple[pd.DataFrame, dict, dict, dict]:
    """Stage 3's own extraction (`run_rule_extraction` with Stage3Config's defaults): options and combo
    size chosen on validation folds of the train rows, then refitted on them; → (rules, train rec, test rec, info)."""
    import tempfile

    from lib.pipeline.stage3_rules import Stage3Config
    from lib.rules.extraction import run_rule_extraction

    train = df[~df["is_test"].astype(bool)].reset_index(drop=True)
    test = df[df["is_test"].astype(bool)].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Stage3Config(features_scores_dir=tmp, rules_dir=tmp, seed=seed, n_estimators=n_estimators,
                           npermutations=5, only_unique_datapoints_in_shap=True, use_shap_in_xgb=True,
                           use_shap_in_lasso=lasso, min_rule_support=min_support)
        cfg.emit_all_fit_rules = False
        out = run_rule_extraction(train, feats, [target], cfg, eval_df=test, rules_dir=tmp, echo=lambda _m: None)
        rules = pd.read_csv(Path(tmp) / f"association_rules_{target}.csv")
    res = out[target]
    sel = res["selection"]
    return rules, res["train"], res["eval"], {"chosen": sel["chosen_label"], "max_literals": sel["chosen_max_literals"],
                                              "validation_MCC": round(sel["validation_MCC"], 3)}


def skope_rules(X: pd.DataFrame, y: np.ndarray, seed: int) -> tuple[pd.DataFrame, dict]:
    from skrules import SkopeRules  # raises on Python ≥ 3.10

    model = SkopeRules(feature_names=list(X.columns), random_state=seed, n_estimators=30)
    model.fit(X.to_numpy(dtype=np.float64), y.astype(int))
    texts = []
    for rule, _perf in model.rules_:
        expr = parse_expression(str(rule), list(X.columns))
        if isinstance(expr, Combo) and len(expr.literals) == 1:
            texts.append(format_expression(expr.literals[0].rule.canonical()))
    return orient_table(texts, X, y), {}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--features_scores_dir", type=Path, help="stage-2 folder with scores.csv and features.json")
    src.add_argument("--planted", action="store_true", help="synthetic table with a planted rule, in memory")
    parser.add_argument("--target", default="is_correct")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n_estimators", type=int, default=500, help="RuleSHAP trees")
    parser.add_argument("--no_warmup", action="store_true",
                        help="do not warm up SHAP before timing (numba compilation then counts in (a))")
    parser.add_argument("--show", type=int, default=3, help="selected literals printed per method")
    parser.add_argument("--min_rule_support", type=int, default=16,
                        help="minimum rows on each side of a selected literal, for every method (the cpu "
                             "preset's stage-3 value)")
    parser.add_argument("--lasso", action="store_true", help="(s) with --use_shap_in_lasso, as the pipeline runs it")
    args = parser.parse_args(argv)

    if args.planted:
        df, feats, target = planted_table(args.seed)
        source = "planted: (f1 > 3) & (f2 <= 0.5), 5 % label noise"
    else:
        df, feats, target = scores_table(args.features_scores_dir, args.target)
        source = str(args.features_scores_dir)
    X_tr, y_tr = split_xy(df, feats, target, test=False)
    X_te, y_te = split_xy(df, feats, target, test=True)

    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        ncpu = os.cpu_count()
    print("rules_vs_rulefit: candidate-rule generators under the same OR-combo selection")
    print(f"  data        {source}")
    print(f"  target      {target}   features {len(feats)}")
    print(f"  train rows  {len(X_tr)} (positives {y_tr.mean():.3f})   test rows {len(X_te)} "
          f"(positives {y_te.mean():.3f})")
    print(f"  CPUs        {ncpu} usable ({os.cpu_count()} on the machine)   seed {args.seed}   "
          f"RuleSHAP n_estimators {args.n_estimators}")

    # Imports and numba's one-off JIT compilation of the SHAP kernels are not candidate generation:
    # do them before any timing (a 40-row SHAP call), and report how long they took.
    t0 = time.perf_counter()
    import imodels  # noqa: F401
    import xgboost  # noqa: F401

    from lib.rules.shap_importance import compute_global_shap_stats
    t_imp = time.perf_counter() - t0
    t_jit = float("nan")
    if not args.no_warmup:
        t0 = time.perf_counter()
        compute_global_shap_stats(X_tr.iloc[:40], y_tr[:40], seed=args.seed, npermutations=1, only_unique=True)
        t_jit = time.perf_counter() - t0
    print(f"  untimed     imports {t_imp:.2f} s, SHAP warm-up (numba JIT) "
          + ("skipped (--no_warmup: inside (a)'s time)" if args.no_warmup else f"{t_jit:.2f} s"))

    methods: list[tuple[str, Callable[[], tuple[pd.DataFrame, dict]]]] = [
        ("(a) RuleSHAP + SHAP weights", lambda: ruleshap_rules(X_tr, y_tr, args.seed, args.n_estimators, True)),
        ("(b) RuleSHAP, no SHAP", lambda: ruleshap_rules(X_tr, y_tr, args.seed, args.n_estimators, False)),
        ("(c) imodels RuleFit", lambda: rulefit_rules(X_tr, y_tr, args.seed)),
        ("(d) skope-rules", lambda: skope_rules(X_tr, y_tr, args.seed)),
    ]
    results = []
    for name, fn in methods:
        t0 = time.perf_counter()
        try:
            table, info = fn()
        except Exception as exc:  # e.g. skope-rules does not import
            msg = re.sub(r"\s*\(/[^)]*\)", "", str(exc).splitlines()[0] if str(exc) else "")  # drop file paths
            results.append((name, None, None, None, f"{type(exc).__name__}: {msg[:80]}"))
            continue
        fit_s = time.perf_counter() - t0
        rec = find_best_or_combo(table, X_tr, y_tr, min_support=args.min_rule_support)
        ev = score_frozen_combo(rec, table, X_te, y_te, scope_name="test")
        results.append((name, table, (rec, ev, fit_s), info, None))
    t0 = time.perf_counter()
    table, rec, ev, info = stage3_as_shipped(df, feats, target, args.seed, args.n_estimators, args.min_rule_support,
                                             args.lasso)
    results.append(("(s) stage 3 (validation folds)", table, (rec, ev, time.perf_counter() - t0), info, None))

    ref = results[0][2][2] if results[0][2] else float("nan")
    header = (f"{'method':<29} {'cands':>6} {'sel':>4} {'train MCC':>10} {'test MCC':>9} "
              f"{'fit s':>8} {'shap s':>7} {'x(a)':>7}")
    print()
    print(header)
    print("-" * len(header))
    for name, table, res, info, err in results:
        if res is None:
            why = "does not import on this Python" if "skope" in name else "failed"
            print(f"{name:<29} {'—':>6} {'—':>4} {'—':>10} {'—':>9} {'—':>8} {'—':>7} {'—':>7}   {why} ({err})")
            continue
        rec, ev, fit_s = res
        shap_s = f"{info['shap_s']:.2f}" if "shap_s" in info else "—"
        print(f"{name:<29} {len(table):>6} {len(rec.get('selected_literals', [])):>4} "
              f"{rec.get('MCC', float('nan')):>10.3f} {ev.get('MCC', float('nan')):>9.3f} "
              f"{fit_s:>8.2f} {shap_s:>7} {fit_s / ref:>6.2f}x")
    print()
    print("x(a) = fit s / fit s of (a); fit s = candidate generation only (selection excluded), for (s) the whole\n"
          "stage-3 extraction (SHAP on the whole train rows and on every fold, the option search, the final fit).")
    for name, table, res, info, err in results:
        if res is None:
            continue
        rec, ev, _ = res
        extra = {k: v for k, v in info.items() if k != "shap_s"}
        print(f"{name}: {rec.get('chosen_from')} combo, test fire rate {ev.get('rule_fire_rate', float('nan')):.3f}"
              + (f"; {extra}" if extra else ""))
        for lit in rec.get("selected_literals", [])[: args.show]:
            print(f"    {lit}")
        if len(rec.get("selected_literals", [])) > args.show:
            print(f"    … {len(rec['selected_literals']) - args.show} more")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
