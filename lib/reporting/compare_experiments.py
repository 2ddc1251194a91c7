"""Script 8 (`8_compare_experiments.py`): compare the stage-7 runs of one or several stats folders.

Per stats folder: HQ-count / union-flip threshold sweeps, rule-metric distributions, ECDFs and
Mann-Whitney tests (Holm-adjusted); across LLMs of a task: pooled summaries and Fisher-combined tests.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError, write_csv_atomic
from lib.reporting.formatting import sort_key_task_model
from lib.reporting.plots import draw_ecdf, label_ecdf_axes, line_plot, pyplot, save_figure
from lib.reporting.statistics import distribution_summary, fisher_combined_p, holm, mann_whitney, significance_stars
from lib.runs.discovery import find_run_dirs, find_stats_dirs, open_stats_source, task_model_from_path
from lib.runs.results import DEFAULT_MIN_COVERAGE, RunResults, flip_columns_by_unit, union_flip
from lib.runs.layout import role_label

__all__ = [
    "METRIC_COLUMNS",
    "metric_column",
    "DIST_METRICS",
    "CompareOptions",
    "compare_leaf",
    "find_run_dirs_canonical",
    "compare_experiments",
]

METRIC_COLUMNS = {"mcc": "MCC", "f1": "F1(target=1|fire)", "balanced_accuracy": "BalancedAcc", "tpr": "TPR",
                  "tnr": "TNR"}


def metric_column(name: str, columns: Iterable[str] = ()) -> str:
    """Rule-metric column of a `--rule_quality_metric` value (F1 falls back to a bare `F1` column)."""
    col = METRIC_COLUMNS[name]
    cols = set(columns)
    if col not in cols and name == "f1" and "F1" in cols:
        return "F1"
    return col


DIST_METRICS = ("MCC", "F1", "BalancedAcc", "balanced_accuracy_x_dataset_coverage")


@dataclass
class CompareOptions:
    """Inputs of `8_compare_experiments.py`."""

    stats_path: Path
    out_dir: Path
    rule_quality_metric: str = "mcc"
    thresholds: list[float] = field(default_factory=lambda: [round(0.70 + 0.01 * i, 2) for i in range(30)])
    best_mode: str = "tail@0.9"
    rule_length_cap: int = 30
    min_rule_dataset_coverage: float = DEFAULT_MIN_COVERAGE
    run_name_regex: str | None = None
    score_scope: str = "test_selected"


def _dist_values(best: pd.DataFrame, metric: str) -> np.ndarray:
    """Values of one distribution metric from best rows (F1 accepts either column name)."""
    if metric == "balanced_accuracy_x_dataset_coverage":
        if "BalancedAcc" not in best.columns or "dataset_coverage" not in best.columns:
            return np.array([])
        cov = pd.to_numeric(best["dataset_coverage"], errors="coerce")
        return (pd.to_numeric(best["BalancedAcc"], errors="coerce") * np.maximum(cov, 1 - cov)).to_numpy(float)
    col = metric if metric in best.columns else ("F1(target=1|fire)" if metric == "F1" else metric)
    if col not in best.columns:
        return np.array([])
    return pd.to_numeric(best[col], errors="coerce").to_numpy(float)


def _best_mode_score(vals: np.ndarray, mode: str) -> float:
    """Score of a run under `--best_mode` (mean, median, tail@x = mean of values ≥ x)."""
    v = vals[~np.isnan(vals)]
    if v.size == 0:
        return float("-inf")
    if mode == "mean":
        return float(v.mean())
    if mode == "median":
        return float(np.median(v))
    x = float(mode.split("@", 1)[1])
    tail = v[v >= x]
    return float(tail.mean()) if tail.size else float("-inf")


def _sweep_rows(rr: RunResults, best: pd.DataFrame, metric_col: str, opts: CompareOptions) -> list[dict]:
    """Threshold sweep of one run: HQ count and union c2i/i2c flip % over the run's scores.csv."""
    rows = []
    df = rr.flip_scores
    cols = {k: flip_columns_by_unit(df.columns, k) for k in ("c2i", "i2c")} if df is not None else {}
    vals = pd.to_numeric(best[metric_col], errors="coerce") if metric_col in best.columns else pd.Series(dtype=float)
    for t in opts.thresholds:
        hq_units = best.loc[vals >= t - 1e-12, "neuron_key"].tolist() if len(best) else []
        row = {"stats_dirname": rr.run_name, "stats_label": role_label(rr.run_name, "compare"), "threshold": t,
               "rule_quality_metric": opts.rule_quality_metric, "metric_col": metric_col,
               "n_high_quality_neurons": len(hq_units), "scores_rows": len(df) if df is not None else 0}
        for kind in ("c2i", "i2c"):
            if df is None:
                u, e = 0, 0
            else:
                u, e = union_flip(df, [cols[kind][k] for k in hq_units if k in cols[kind]])
            row[f"union_{kind}_count"], row[f"eval_{kind}_rows"] = u, e
            row[f"union_{kind}_pct"] = 100.0 * u / e if e else 0.0
        rows.append(row)
    return rows


def _ecdf_figure(per_run: dict[str, pd.DataFrame], opts: CompareOptions, path: Path) -> pd.DataFrame:
    """2×2 ECDFs of the distribution metrics; best run (by best_mode) vs each other run, one-sided MWU + Holm."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    rows = []
    for ax, metric in zip(axes.ravel(), DIST_METRICS):
        vals = {r: _dist_values(b, metric) for r, b in per_run.items()}
        if not vals:
            continue
        best_run = max(sorted(vals), key=lambda r: _best_mode_score(vals[r], opts.best_mode))
        ps = []
        for r in sorted(vals):
            draw_ecdf(ax, vals[r], role_label(r, "compare"))
            if r != best_run:
                _, p = mann_whitney(vals[best_run], vals[r], "greater")
                ps.append((r, p))
        adj = holm([p for _, p in ps])
        for (r, p), pa in zip(ps, adj):
            rows.append({"metric": metric, "best_run": best_run, "other_run": r, "p": p, "p_holm": pa,
                         "sig": significance_stars(pa)})
        ax.set_title(f"{metric} (best: {role_label(best_run, 'compare')})", fontsize=8)
        label_ecdf_axes(ax, metric, legend_fontsize=6)
    save_figure(fig, path)
    return pd.DataFrame(rows, columns=["metric", "best_run", "other_run", "p", "p_holm", "sig"])


def _pairwise_tests(per_run: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All run pairs, two-sided MWU per metric, Holm within metric."""
    cols = ["metric", "test", "A", "B", "n_A", "n_B", "stat", "p", "median_A", "median_B", "median_diff",
            "p_holm_within_metric", "sig"]
    rows = []
    for metric in DIST_METRICS:
        block = []
        for a, b in itertools.combinations(sorted(per_run), 2):
            va, vb = _dist_values(per_run[a], metric), _dist_values(per_run[b], metric)
            va, vb = va[~np.isnan(va)], vb[~np.isnan(vb)]
            stat, p = mann_whitney(va, vb, "two-sided")
            ma = float(np.median(va)) if va.size else np.nan
            mb = float(np.median(vb)) if vb.size else np.nan
            block.append({"metric": metric, "test": "mannwhitneyu_two_sided", "A": a, "B": b, "n_A": int(va.size),
                          "n_B": int(vb.size), "stat": stat, "p": p, "median_A": ma, "median_B": mb,
                          "median_diff": ma - mb})
        for r, pa in zip(block, holm([r["p"] for r in block])):
            r["p_holm_within_metric"], r["sig"] = pa, significance_stars(pa)
        rows += block
    return pd.DataFrame(rows, columns=cols)


def compare_leaf(stats_dir: Path, out: Path, opts: CompareOptions, task: str, llm: str) -> dict[str, pd.DataFrame]:
    """Script-8 outputs for one `stats/` folder; returns its sweep, summary, tests and best rows."""
    runs = find_run_dirs_canonical(stats_dir, opts.run_name_regex)
    sweep, summ, best_all = [], [], []
    per_run: dict[str, pd.DataFrame] = {}
    for run_dir in runs:
        rr = RunResults(run_dir, task, llm)
        rows = rr.rule_rows(opts.score_scope)
        if rows is None:
            continue
        mcol = metric_column(opts.rule_quality_metric, rows.columns)
        best = rr.best(opts.score_scope, mcol, opts.min_rule_dataset_coverage)
        if "rule_len_atoms" in best.columns:
            best["rule_len_atoms_capped"] = pd.to_numeric(best["rule_len_atoms"], errors="coerce").clip(
                upper=opts.rule_length_cap)
        per_run[rr.run_name] = best
        best_all.append(best.assign(task=task, llm=llm, stats_dirname=rr.run_name))
        sweep += _sweep_rows(rr, best, mcol, opts)
        for metric in DIST_METRICS:
            summ.append({"stats_dirname": rr.run_name, "stats_label": role_label(rr.run_name, "compare"),
                         "metric": metric, **distribution_summary(_dist_values(best, metric))})
    sweep_df = pd.DataFrame(sweep)
    summ_df = pd.DataFrame(summ)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(sweep_df, out / "threshold_sweep_summary.csv")
    write_csv_atomic(summ_df, out / "compare_rule_metrics_distributions_summary.csv")
    tests = _pairwise_tests(per_run)
    write_csv_atomic(tests, out / "compare_rule_metrics_distributions_tests.csv")
    ecdf_tests = _ecdf_figure(per_run, opts, out / "compare_rule_metrics_distributions_ecdf.pdf")
    write_csv_atomic(ecdf_tests, out / "compare_rule_metrics_distributions_ecdf_tests.csv")
    if not sweep_df.empty:
        for y, name, lab in (("n_high_quality_neurons", "plot_high_quality_neurons.pdf", "# HQ neurons"),
                             ("union_c2i_pct", "plot_union_flip_c2i_pct.pdf", "union c→i flips (%)"),
                             ("union_i2c_pct", "plot_union_flip_i2c_pct.pdf", "union i→c flips (%)")):
            line_plot(sweep_df, "threshold", y, "stats_label", out / name, lab)
    best_df = pd.concat(best_all, ignore_index=True) if best_all else pd.DataFrame()
    return {"sweep": sweep_df, "summary": summ_df, "tests": tests, "best": best_df}


def find_run_dirs_canonical(stats_dir: Path, regex: str | None) -> list[Path]:
    """Canonical run folders of a stats dir, filtered by an optional name regex."""
    runs = find_run_dirs(stats_dir, canonical_only=True)
    if regex:
        pat = re.compile(regex)
        runs = [r for r in runs if pat.search(r.name)]
    return runs


def compare_experiments(opts: CompareOptions) -> dict:
    """Script 8: per-stats-folder sweeps/distributions, and cross-LLM aggregates when several exist."""
    with open_stats_source(opts.stats_path) as root:
        leaves = [(sd, *task_model_from_path(sd)) for sd in find_stats_dirs(root)]
        leaves = [lf for lf in leaves if find_run_dirs_canonical(lf[0], opts.run_name_regex)]
        if not leaves:
            raise ArtifactError(f"no stats folder with canonical run folders under '{opts.stats_path}'")
        out = Path(opts.out_dir)
        if len(leaves) == 1:
            res = compare_leaf(leaves[0][0], out, opts, leaves[0][1], leaves[0][2])
            return {"n_leaves": 1, "sweep": res["sweep"]}
        results = {}
        for sd, task, llm in sorted(leaves, key=lambda x: sort_key_task_model(x[1], x[2])):
            results[(task, llm)] = compare_leaf(sd, out / task / llm / "leaf_stats_dir_outputs", opts, task, llm)
    counts = {k: r["sweep"]["stats_dirname"].nunique() if len(r["sweep"]) else 0 for k, r in results.items()}
    max_by_task: dict[str, int] = {}
    for (task, _), n in counts.items():
        max_by_task[task] = max(max_by_task.get(task, 0), n)
    cov_rows = [{"task": t, "llm": l, "n_runs": n, "max_runs_for_task": max_by_task[t],
                 "kept": n == max_by_task[t]} for (t, l), n in sorted(counts.items())]
    write_csv_atomic(pd.DataFrame(cov_rows), out / "threshold_sweep_coverage.csv")
    write_csv_atomic(pd.DataFrame(cov_rows), out / "rule_metrics_coverage.csv")
    kept = [k for k in results if counts[k] == max_by_task[k[0]]]
    agg = out / "aggregated_by_task"
    sweep = pd.concat([results[k]["sweep"].assign(task=k[0], llm=k[1]) for k in kept], ignore_index=True)
    sweep["net_acc_pp"] = sweep["union_i2c_pct"] - sweep["union_c2i_pct"]
    write_csv_atomic(sweep, agg / "threshold_sweep_all_tasks_all_llms.csv")
    best = pd.concat([results[k]["best"] for k in kept if len(results[k]["best"])], ignore_index=True) \
        if any(len(results[k]["best"]) for k in kept) else pd.DataFrame()
    write_csv_atomic(best, agg / "rule_metrics_best_per_neuron_all_tasks_all_llms.csv")
    combined = []
    for task in sorted({k[0] for k in kept}):
        st = sweep[sweep["task"] == task]
        write_csv_atomic(st, agg / f"threshold_sweep_{task}.csv")
        g = st.groupby(["stats_label", "threshold"])
        stat = g[["n_high_quality_neurons", "union_c2i_pct", "union_i2c_pct", "net_acc_pp"]].agg(["mean", "sem"])
        stat.columns = [f"{a}_{b}" for a, b in stat.columns]
        stat = stat.reset_index().fillna(0.0)
        for y, lab in (("n_high_quality_neurons", "# HQ neurons"), ("union_c2i_pct", "c→i %"),
                       ("union_i2c_pct", "i→c %"), ("net_acc_pp", "net change (pp)")):
            stat[f"{y}_ci"] = 1.96 * stat[f"{y}_sem"]
            line_plot(stat, "threshold", f"{y}_mean", "stats_label", agg / f"{task}_{y}_mean_ci.pdf", lab, f"{y}_ci")
        per_run = {r: best[(best["task"] == task) & (best["stats_dirname"] == r)]
                   for r in sorted(best[best["task"] == task]["stats_dirname"].unique())} if len(best) else {}
        summ = [{"task": task, "stats_dirname": r, "metric": m, **distribution_summary(_dist_values(b, m))}
                for r, b in per_run.items() for m in DIST_METRICS]
        write_csv_atomic(pd.DataFrame(summ), agg / f"compare_rule_metrics_distributions_summary_{task}.csv")
        if per_run:
            _ecdf_figure(per_run, opts, agg / f"compare_rule_metrics_distributions_ecdf_{task}.pdf")
        tests = pd.concat([results[k]["tests"].assign(llm=k[1]) for k in kept if k[0] == task], ignore_index=True)
        block = []
        for (metric, a, b), grp in tests.groupby(["metric", "A", "B"]) if len(tests) else []:
            pooled_a = _dist_values(per_run.get(a, pd.DataFrame()), metric)
            pooled_b = _dist_values(per_run.get(b, pd.DataFrame()), metric)
            ma = float(np.nanmedian(pooled_a)) if pooled_a.size else np.nan
            mb = float(np.nanmedian(pooled_b)) if pooled_b.size else np.nan
            block.append({"task": task, "metric": metric, "A": a, "B": b, "n_llm": int(grp["p"].notna().sum()),
                          "p_fisher": fisher_combined_p(grp["p"].tolist()), "median_A_pooled": ma,
                          "median_B_pooled": mb, "median_diff_pooled": ma - mb})
        for metric in DIST_METRICS:
            sub = [r for r in block if r["metric"] == metric]
            for r, pa in zip(sub, holm([r["p_fisher"] for r in sub])):
                r["p_holm_within_task_metric"], r["sig"] = pa, significance_stars(pa)
        combined += block
    write_csv_atomic(pd.DataFrame(combined, columns=["task", "metric", "A", "B", "n_llm", "p_fisher",
                                                     "median_A_pooled", "median_B_pooled", "median_diff_pooled",
                                                     "p_holm_within_task_metric", "sig"]),
                     agg / "compare_rule_metrics_distributions_tests_combined_by_task.csv")
    return {"n_leaves": len(results), "sweep": sweep}
