"""Script 10 (`10_compute_threshold_sweep_stats.py`): paired method comparisons on a threshold sweep.

MAIN vs each control run, paired per (task, LLM): exact sign and sign-flip tests (Holm-adjusted) at the
primary threshold and on the area under the count-vs-threshold curve, plus optional per-neuron
sample statistics with a per-unit bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError, write_csv_atomic
from lib.reporting.paper_tables import TABLE2_ROLES
from lib.reporting.formatting import to_latex
from lib.reporting.statistics import holm, sign_test_p, signflip_test
from lib.runs.checked_io import read_csv_checked
from lib.runs.discovery import find_model_dirs, resolve_run_dir
from lib.runs.results import DEFAULT_MIN_COVERAGE, RunResults, expand_score_scopes
from lib.runs.layout import CANONICAL_ROLES, canonical_run_mode, role_label

__all__ = ["COMPARISONS", "SweepStatsOptions", "load_sweep_csv", "threshold_sweep_stats"]

COMPARISONS = (("main", "spectral_split"), ("main", "random_anchor"), ("main", "fake"))


def _method_label(value: str) -> str:
    """Normalise a run name or a script-8/table label to the tables' method label."""
    v = str(value).strip()
    for _, (_, compare_label, table_label) in CANONICAL_ROLES.items():
        if v in (compare_label, table_label):
            return table_label
    return role_label(v, "tables")


def _role_table_label(role: str) -> str:
    return CANONICAL_ROLES[role][2]


@dataclass
class SweepStatsOptions:
    """Inputs of `10_compute_threshold_sweep_stats.py`."""

    csv: Path
    out_dir: Path
    metric: str = "n_high_quality_neurons"
    thresholds: list[float] = field(default_factory=lambda: [0.70, 0.75, 0.80, 0.85, 0.90])
    primary_threshold: float = 0.70
    primary_threshold_all_fit: float = 0.70
    score_scope: str = "both"
    alt: str = "greater"
    seed: int = 0
    data_root: Path | None = None
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "bon_jailbreaking", "jailbreaking"])
    metric_col: str = "MCC"
    min_rule_dataset_coverage: float = DEFAULT_MIN_COVERAGE
    sample_stat: str = "mean"
    sample_size: int = 0
    n_boot: int = 10000
    skip_sample_stats: bool = False


def load_sweep_csv(path: Path, metric: str) -> pd.DataFrame:
    """A threshold-sweep CSV (Table 2 long form or script 8's aggregate) with unit/method/threshold columns."""
    df = read_csv_checked(path, required=("threshold", metric), what="threshold sweep table")
    if "llm" not in df.columns:
        if {"org", "model"} <= set(df.columns):
            df["llm"] = [f"{o}/{m}" if isinstance(o, str) and o else str(m) for o, m in zip(df["org"], df["model"])]
        elif "model" in df.columns:
            df["llm"] = df["model"].astype(str)
        else:
            raise ArtifactError(f"threshold sweep table '{path}' lacks column 'llm' (or 'org'/'model')")
    if "task" not in df.columns:
        raise ArtifactError(f"threshold sweep table '{path}' lacks column 'task'")
    src = next((c for c in ("Method", "stats_label", "run_name", "stats_dirname") if c in df.columns), None)
    if src is None:
        raise ArtifactError(f"threshold sweep table '{path}' lacks column 'Method' (or stats_label/run_name)")
    df["Method"] = df[src].astype(str).map(_method_label)
    df["threshold"] = pd.to_numeric(df["threshold"], errors="coerce").round(6)
    df[metric] = pd.to_numeric(df[metric], errors="coerce")
    if "scope_available" in df.columns:
        df = df[df["scope_available"].astype(str).str.lower().isin(("true", "1", "1.0"))]
    return df[df[metric].notna()].reset_index(drop=True)


def _comparison_tests(pivot: pd.DataFrame, endpoint: str, opts: SweepStatsOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact sign and sign-flip tests of MAIN − other per unit, Holm across the comparisons."""
    tests, pairs = [], []
    for i, (ra, rb) in enumerate(COMPARISONS):
        a, b = _role_table_label(ra), _role_table_label(rb)
        if a not in pivot.columns or b not in pivot.columns:
            continue
        sub = pivot[[a, b]].dropna()
        d = (sub[a] - sub[b]).to_numpy(float)
        for (task, llm), va, vb in zip(sub.index, sub[a], sub[b]):
            pairs.append({"endpoint": endpoint, "A": a, "B": b, "task": task, "llm": llm, "A_value": va,
                          "B_value": vb, "diff": va - vb})
        sp, nnz, npos, nneg = sign_test_p(d, opts.alt)
        fp, mode = signflip_test(d, opts.alt, seed=opts.seed + i)
        tests.append({"endpoint": endpoint, "A": a, "B": b, "n_pairs": len(d), "n_nonzero": nnz, "n_pos": npos,
                      "n_neg": nneg, "mean_diff": float(d.mean()) if d.size else np.nan,
                      "median_diff": float(np.median(d)) if d.size else np.nan,
                      "min_diff": float(d.min()) if d.size else np.nan, "max_diff": float(d.max()) if d.size else np.nan,
                      "sign_p": sp, "signflip_p": fp, "signflip_mode": mode})
    for key in ("sign_p", "signflip_p"):
        for r, pa in zip(tests, holm([r[key] for r in tests])):
            r[f"{key}_holm"] = pa
    cols = ["endpoint", "A", "B", "n_pairs", "n_nonzero", "n_pos", "n_neg", "mean_diff", "median_diff", "min_diff",
            "max_diff", "sign_p", "sign_p_holm", "signflip_p", "signflip_p_holm", "signflip_mode"]
    return pd.DataFrame(tests, columns=cols), pd.DataFrame(pairs)


def _autc(df: pd.DataFrame, metric: str, thresholds: Sequence[float]) -> pd.DataFrame:
    """Per (task, llm) × method area under count-vs-threshold ÷ threshold range (units with all thresholds)."""
    thr = sorted(round(float(t), 6) for t in thresholds)
    sub = df[df["threshold"].isin(thr)]
    piv = sub.pivot_table(index=["task", "llm", "Method"], columns="threshold", values=metric, aggfunc="sum")
    piv = piv.reindex(columns=thr).dropna()
    span = thr[-1] - thr[0] if len(thr) > 1 else 1.0
    area = piv.apply(lambda r: float(np.trapezoid(r.to_numpy(float), thr)) / span if len(thr) > 1
                     else float(r.iloc[0]), axis=1)
    return area.rename("autc").reset_index().pivot_table(index=["task", "llm"], columns="Method", values="autc")


def _sample_stat(vals: np.ndarray, stat: str, thr: float) -> float:
    """Per-unit statistic of best MCC values."""
    if vals.size == 0:
        return float("nan")
    return {"mean": float(vals.mean()), "median": float(np.median(vals)),
            "prop_ge_threshold": float((vals >= thr).mean()), "n_ge_threshold": float((vals >= thr).sum())}[stat]


def _per_neuron_scores(opts: SweepStatsOptions, scope: str) -> pd.DataFrame:
    """Best MCC per neuron per (task, llm, method) for the four Table-2 runs under a data root."""
    rows = []
    for md in find_model_dirs(opts.data_root, opts.tasks):
        for role in TABLE2_ROLES:
            p = resolve_run_dir(md.layout(opts.data_root), canonical_run_mode(role))
            if p is None:
                continue
            best = RunResults(p, md.task, md.model).best(scope, opts.metric_col, opts.min_rule_dataset_coverage)
            for key, v in zip(best["neuron_key"], pd.to_numeric(best[opts.metric_col], errors="coerce")) \
                    if best is not None else []:
                rows.append({"task": md.task, "llm": md.model, "Method": _role_table_label(role),
                             "neuron_key": key, opts.metric_col: float(v)})
    return pd.DataFrame(rows, columns=["task", "llm", "Method", "neuron_key", opts.metric_col])


def _sample_stats(opts: SweepStatsOptions, scope: str, thr: float, out: Path) -> None:
    """Per-neuron scores, per-unit metrics, exact paired tests and the per-unit bootstrap."""
    scores = _per_neuron_scores(opts, scope)
    write_csv_atomic(scores, out / "per_neuron_scores.csv")
    units = []
    for (task, llm, method), g in scores.groupby(["task", "llm", "Method"]):
        v = g[opts.metric_col].to_numpy(float)
        units.append({"task": task, "llm": llm, "Method": method, "n": len(v), "mean": float(v.mean()),
                      "median": float(np.median(v)), "prop_ge_threshold": float((v >= thr).mean()),
                      "n_ge_threshold": int((v >= thr).sum())})
    unit_df = pd.DataFrame(units, columns=["task", "llm", "Method", "n", "mean", "median", "prop_ge_threshold",
                                           "n_ge_threshold"])
    write_csv_atomic(unit_df, out / "per_unit_metrics.csv")
    piv = unit_df.pivot_table(index=["task", "llm"], columns="Method", values=opts.sample_stat)
    tests, _ = _comparison_tests(piv, f"per_unit_{opts.sample_stat}", opts)
    write_csv_atomic(tests, out / "per_unit_paired_exact_tests.csv")
    boot = []
    for i, (ra, rb) in enumerate(COMPARISONS):
        a, b = _role_table_label(ra), _role_table_label(rb)
        rng = np.random.default_rng(opts.seed + i)
        groups = []
        for (task, llm), g in scores.groupby(["task", "llm"]):
            va = g.loc[g["Method"] == a, opts.metric_col].to_numpy(float)
            vb = g.loc[g["Method"] == b, opts.metric_col].to_numpy(float)
            if va.size and vb.size:
                groups.append((va, vb))
        if not groups:
            continue
        stats = np.empty(opts.n_boot)
        for j in range(opts.n_boot):
            pick = rng.integers(0, len(groups), size=len(groups))
            diffs = []
            for gi in pick:
                va, vb = groups[gi]
                k = opts.sample_size if opts.sample_size > 0 else min(va.size, vb.size)
                diffs.append(_sample_stat(rng.choice(va, k), opts.sample_stat, thr)
                             - _sample_stat(rng.choice(vb, k), opts.sample_stat, thr))
            stats[j] = float(np.mean(diffs))
        boot.append({"A": a, "B": b, "stat": opts.sample_stat, "n_units": len(groups), "n_boot": opts.n_boot,
                     "mean_diff": float(stats.mean()), "ci_low": float(np.quantile(stats, 0.025)),
                     "ci_high": float(np.quantile(stats, 0.975)), "seed": opts.seed + i})
    write_csv_atomic(pd.DataFrame(boot, columns=["A", "B", "stat", "n_units", "n_boot", "mean_diff", "ci_low",
                                                 "ci_high", "seed"]), out / "sampled_pairwise_comparisons.csv")


def threshold_sweep_stats(opts: SweepStatsOptions) -> dict[str, pd.DataFrame]:
    """Script 10: descriptive totals and paired method comparisons per score scope."""
    df = load_sweep_csv(opts.csv, opts.metric)
    scopes = expand_score_scopes(opts.score_scope)
    has_scope = "score_scope" in df.columns
    if not has_scope:
        scopes = scopes[:1]  # one analysis: the table has no scope column (the original analysed it twice)
    results = {}
    for scope in scopes:
        sub = df[df["score_scope"].astype(str) == scope] if has_scope else df
        out = Path(opts.out_dir) / scope if len(scopes) > 1 else Path(opts.out_dir)
        thr_set = [round(float(t), 6) for t in opts.thresholds]
        sub = sub[sub["threshold"].isin(thr_set)]
        pivot_long = sub.pivot_table(index=["task", "llm", "threshold"], columns="Method", values=opts.metric,
                                     aggfunc="sum")
        write_csv_atomic(pivot_long.reset_index(), out / "pivot_task_llm_threshold_by_method.csv")
        totals = sub.pivot_table(index="Method", columns="threshold", values=opts.metric, aggfunc="sum")
        n_runs = sub.pivot_table(index="Method", columns="threshold", values=opts.metric, aggfunc="count")
        write_csv_atomic(totals.reset_index(), out / "table2_descriptive_totals.csv")
        write_csv_atomic(n_runs.reset_index(), out / "table2_descriptive_n_runs.csv")
        print(to_latex(totals.reset_index().round(2), f"Table 2 descriptive totals ({scope})"))
        primary = opts.primary_threshold_all_fit if scope == "all_fit" else opts.primary_threshold
        prim = sub[np.isclose(sub["threshold"], primary)].pivot_table(
            index=["task", "llm"], columns="Method", values=opts.metric, aggfunc="sum")
        for name, piv in (("primary_threshold", prim), ("autc", _autc(sub, opts.metric, thr_set))):
            tests, pairs = _comparison_tests(piv, name, opts)
            write_csv_atomic(tests, out / f"method_comparison_{name}_exact_tests.csv")
            write_csv_atomic(pairs, out / f"method_comparison_{name}_pairs.csv")
            results[f"{scope}/{name}"] = tests
        if opts.data_root is not None and not opts.skip_sample_stats:
            _sample_stats(opts, scope, primary, out)
    return results
