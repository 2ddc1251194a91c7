"""Script 9 (`9_compare_models.py`): compare the models of one task, run by run.

Per model × run: rule quality, flip unions and stage-6 τ-agonist selectivity and CHA cost; then run
aggregates over models and the cross-model figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError, write_csv_atomic
from lib.reporting.formatting import display_model, sort_key_task_model
from lib.reporting.plots import bar_plot, ecdf_plot
from lib.runs.discovery import find_model_dirs, find_run_dirs, resolve_bag_dir
from lib.runs.results import DEFAULT_MIN_COVERAGE, BaselineResults, RunResults
from lib.runs.layout import role_label

__all__ = ["compare_models"]


def compare_models(task_dir: Path, out_dir: Path, tau: float = 0.2, eps: float = 0.2,
                   min_cov: float = DEFAULT_MIN_COVERAGE, score_scope: str = "test_selected",
                   runs: str = "all", drop_incomplete_models: bool = False) -> pd.DataFrame:
    """Script 9: per model × run rule quality, flip unions and stage-6 agonist/cost figures."""
    task_dir = Path(task_dir)
    models = find_model_dirs(task_dir.parent, [task_dir.name])
    if not models:
        raise ArtifactError(f"no model folders under task folder '{task_dir}'")
    wanted = None if runs.strip() == "all" else [r.strip() for r in runs.split(",") if r.strip()]
    rows, raw_vals = [], []
    for md in sorted(models, key=lambda d: sort_key_task_model(d.task, d.model)):
        layout = md.layout(task_dir.parent)
        run_dirs = find_run_dirs(layout.stats_root, canonical_only=wanted is None)
        if wanted is not None:
            run_dirs = [p for p in run_dirs if p.name in wanted]
        for run_dir in run_dirs:
            rr = RunResults(run_dir, md.task, md.model)
            best = rr.best(score_scope, "MCC", min_cov)
            thr = rr.hq_threshold(score_scope)
            mcc = pd.to_numeric(best["MCC"], errors="coerce") if best is not None and len(best) else pd.Series(dtype=float)
            glob = rr.flip_stats_global or {}
            cov = rr.hq_coverage or {}
            scoped = (cov.get("score_scopes") or {}).get(score_scope) or {}
            row = {"model": md.model, "run": rr.run_name, "run_label": role_label(rr.run_name, "compare"),
                   "scope_available": best is not None, "n_rules": int(len(mcc)),
                   "rule_mcc_median": float(mcc.median()) if len(mcc) else np.nan,
                   "rule_mcc_mean": float(mcc.mean()) if len(mcc) else np.nan,
                   "hq_threshold": thr, "share_rules_ge_hq": float((mcc >= thr).mean()) if len(mcc) else np.nan,
                   "union_flip_any_rate": glob.get("union_any_unique_rate"),
                   "union_c2i_rate": glob.get("union_c2i_unique_rate"),
                   "union_i2c_rate": glob.get("union_i2c_unique_rate"),
                   "hq_fraction_coverage_json": scoped.get("frac_neurons_high_quality", cov.get("frac_neurons_high_quality")),
                   "hq_union_share_coverage_json": (cov.get("flip_any") or {}).get("union_share_of_all")}
            bag = resolve_bag_dir(layout, rr.run_name)
            base = BaselineResults(bag / "positive_baseline") if bag is not None else None
            ag = base.agonists(tau) if base is not None and base.buckets is not None else None
            gaps = pd.to_numeric(ag["accuracy_gap"], errors="coerce").abs() if ag is not None else pd.Series(dtype=float)
            row.update({"n_tau_agonists": len(ag) if ag is not None else np.nan,
                        "median_abs_acc_gap": float(gaps.median()) if len(gaps) else np.nan,
                        "frac_eps_selective": float((gaps >= eps).mean()) if len(gaps) else np.nan})
            ev = list(base.evaluations_by_circuit().values()) if base is not None and base.knockout is not None else []
            row.update({"median_n_ablation_groups": float(np.median(ev)) if ev else np.nan,
                        "mean_n_ablation_groups": float(np.mean(ev)) if ev else np.nan, "n_circuits": len(ev)})
            rows.append(row)
            raw_vals.append((md.model, rr.run_name, mcc.to_numpy(float), rr, gaps.to_numpy(float)))
    df = pd.DataFrame(rows)
    out = Path(out_dir)
    if df.empty:
        raise ArtifactError(f"no stage-7 run folders found under '{task_dir}'")
    all_runs = sorted(df["run"].unique())
    cov_tab = df.pivot_table(index="model", columns="run", values="n_rules", aggfunc="size", fill_value=0)
    cov_tab = (cov_tab > 0).astype(int).reindex(columns=all_runs, fill_value=0).reset_index()
    write_csv_atomic(cov_tab, out / "model_run_coverage.csv")
    if drop_incomplete_models:
        complete = cov_tab.loc[cov_tab[all_runs].sum(axis=1) == len(all_runs), "model"]
        df = df[df["model"].isin(set(complete))]
    order = {m: i for i, m in enumerate(sorted(df["model"].unique(), key=lambda m: sort_key_task_model("", m)))}
    df = df.assign(_order=df["model"].map(order)).sort_values(["_order", "run"]).drop(columns="_order")
    write_csv_atomic(df, out / "run_summary_by_model.csv")
    num = [c for c in df.columns if c not in ("model", "run", "run_label", "scope_available") and
           pd.api.types.is_numeric_dtype(pd.to_numeric(df[c], errors="coerce"))]
    agg = df.assign(**{c: pd.to_numeric(df[c], errors="coerce") for c in num}).groupby(["run", "run_label"])[num]
    agg_df = agg.agg(["mean", "std"])
    agg_df.columns = [f"{a}_{b}" for a, b in agg_df.columns]
    agg_df = agg_df.reset_index().assign(n_models=agg.size().to_numpy())
    write_csv_atomic(agg_df, out / "agg_summary_by_run.csv")
    _compare_models_plots(df, agg_df, raw_vals, out / "plots")
    return df


def _compare_models_plots(df: pd.DataFrame, agg_df: pd.DataFrame, raw: list, plots: Path) -> None:
    """Script-9 figures: per-model bars, run aggregates, ECDFs per run."""
    for col in ("n_tau_agonists", "rule_mcc_median", "median_n_ablation_groups"):
        labels = [f"{display_model(m)} | {role_label(r, 'compare')}" for m, r in zip(df["model"], df["run"])]
        bar_plot(labels, pd.to_numeric(df[col], errors="coerce").tolist(), plots / f"cross_model_{col}.pdf", col)
    for col in ("n_tau_agonists", "rule_mcc_median", "median_abs_acc_gap", "frac_eps_selective"):
        bar_plot(agg_df["run_label"].tolist(), agg_df[f"{col}_mean"].tolist(), plots / f"agg_{col}.pdf", col,
                 np.nan_to_num(agg_df[f"{col}_std"].to_numpy(float)).tolist())
    for run in sorted({r for _, r, _, _, _ in raw}):
        mcc = {display_model(m): v for m, r, v, _, _ in raw if r == run}
        ecdf_plot(mcc, plots / f"ecdf_mcc_{run}.pdf", "best MCC per neuron")
        flips = {}
        for m, r, _, rr, _ in raw:
            fsn = rr.flip_stats_by_neuron if r == run else None
            if fsn is not None and "flip_any_rate" in fsn.columns:
                flips[display_model(m)] = pd.to_numeric(fsn["flip_any_rate"], errors="coerce").to_numpy(float)
        ecdf_plot(flips, plots / f"ecdf_flipany_{run}.pdf", "flip-any rate per neuron")
        ecdf_plot({display_model(m): g for m, r, _, _, g in raw if r == run},
                  plots / f"ecdf_selectivity_{run}.pdf", "|accuracy gap| of τ-agonists")
