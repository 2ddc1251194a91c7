"""Script 11 (`11_summarize_sensitivity_analysis.py`): how HQ counts and CHA cost change with M and τ.

Reads the sensitivity runs of one stats root (M and τ varied one at a time around a baseline run) and
writes the summary table, per-factor count tables, figures and a README.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError, atomic_write_text, write_csv_atomic
from lib.reporting.plots import count_heatmap, line_plot, pyplot, save_figure
from lib.reporting.statistics import describe_sample
from lib.runs.discovery import find_run_dirs, layout_for_stats_root, resolve_bag_dir, task_model_from_path
from lib.runs.results import DEFAULT_MIN_COVERAGE, BaselineResults, RunResults, count_at_least
from lib.runs.layout import BASELINE_SUBSETS, ExperimentLayout, canonical_run_mode

__all__ = ["SensitivityOptions", "summarize_sensitivity"]


def _run_factor_values(name: str, baseline_run: str, base_m: int, base_tau: float) -> tuple[int, float]:
    """(M, τ) of a run folder name: `-M<digits>`, `-tau<x>`; the baseline run and absent parts → baseline."""
    if name == baseline_run:
        return base_m, base_tau
    m = re.search(r"-M(\d+)", name)
    t = re.search(r"-tau(\d+(?:\.\d+)?)", name)
    return (int(m.group(1)) if m else base_m), (float(t.group(1)) if t else base_tau)


def _cha_budget(layout: ExperimentLayout | None, run_name: str) -> dict:
    """CHA evaluations per ok circuit and their % of the circuit's tree budget Σ(2N_l − 1), per regime."""
    out: dict[str, Any] = {}
    bag = resolve_bag_dir(layout, run_name) if layout is not None else None
    all_n, all_pct = [], []
    for subset in BASELINE_SUBSETS:
        b = BaselineResults(bag / f"{subset}_baseline") if bag is not None else None
        ns, pcts = [], []
        if b is not None and b.knockout is not None:
            for cid, n in b.evaluations_by_circuit().items():
                ns.append(n)
                budget = b.tree_budget(cid)
                pcts.append(100.0 * n / budget if budget else np.nan)
        out.update(describe_sample(ns, f"cha_groups_{subset}"))
        out.update(describe_sample(pcts, f"cha_budget_pct_{subset}"))
        all_n += ns
        all_pct += pcts
    out.update(describe_sample(all_n, "cha_groups"))
    out.update(describe_sample(all_pct, "cha_budget_pct"))
    return out


@dataclass
class SensitivityOptions:
    """Inputs of `11_summarize_sensitivity_analysis.py`."""

    stats_root: Path
    out_dir: Path
    baseline_M: int = 43008
    baseline_tau: float = 0.2
    baseline_run_name: str = canonical_run_mode("main")
    quality_thresholds: list[float] = field(default_factory=lambda: [0.50, 0.60, 0.70, 0.75, 0.80, 0.85])
    min_rule_dataset_coverage: float = DEFAULT_MIN_COVERAGE
    score_scopes: list[str] = field(default_factory=lambda: ["all_fit"])
    paper_fig_dir: Path | None = None
def summarize_sensitivity(opts: SensitivityOptions) -> pd.DataFrame:
    """Script 11: HQ counts and CHA budget per sensitivity run (M and τ varied one at a time)."""
    root = Path(opts.stats_root)
    runs = [p for p in find_run_dirs(root) if any(p.glob("rule_metrics_summary*.json"))
            or (p / "flip_stats_global.json").is_file()]
    if not runs:
        raise ArtifactError(f"no run folders with rule_metrics_summary*.json or flip_stats_global.json in '{root}'")
    task, model = task_model_from_path(root)
    layout = layout_for_stats_root(root)
    rows = []
    for run_dir in runs:
        rr = RunResults(run_dir, task, model)
        m_val, tau_val = _run_factor_values(rr.run_name, opts.baseline_run_name, opts.baseline_M, opts.baseline_tau)
        base = {"run": rr.run_name, "M": m_val, "tau": tau_val,
                "is_baseline": rr.run_name == opts.baseline_run_name}
        budget = _cha_budget(layout, rr.run_name)
        for scope in opts.score_scopes:
            summ = rr.rule_metrics_summary(scope) or {}
            best = rr.best(scope, "MCC", opts.min_rule_dataset_coverage)
            row = {**base, "score_scope": scope, "scope_available": best is not None,
                   "n_neurons_with_rules": len(best) if best is not None else np.nan,
                   **{f"summary_{k}": v for k, v in summ.items() if isinstance(v, (int, float, str, bool))}}
            for t in opts.quality_thresholds:
                row[f"n_quality_ge_{t:.2f}"] = count_at_least(best, t) if best is not None else np.nan
            rows.append({**row, **budget})
    df = pd.DataFrame(rows).sort_values(["score_scope", "M", "tau", "run"]).reset_index(drop=True)
    out = Path(opts.out_dir)
    write_csv_atomic(df, out / "sensitivity_summary.csv")
    if len(opts.score_scopes) > 1:
        write_csv_atomic(df, out / "sensitivity_summary_all_scopes.csv")
    plots = out / "plots"
    compact = []
    for scope in opts.score_scopes:
        sd = df[df["score_scope"] == scope]
        sfx = "" if len(opts.score_scopes) == 1 else f"_{scope}"
        for factor, other, other_base in (("tau", "M", opts.baseline_M), ("M", "tau", opts.baseline_tau)):
            fd = sd[np.isclose(sd[other].astype(float), float(other_base))].sort_values(factor)
            counts = pd.DataFrame({f"{t:.2f}": fd[f"n_quality_ge_{t:.2f}"].to_numpy() for t in opts.quality_thresholds},
                                  index=fd[factor].to_numpy())
            for t in opts.quality_thresholds:
                write_csv_atomic(fd[[factor, "run", f"n_quality_ge_{t:.2f}"]],
                                 plots / f"count_ge_{t:.2f}_vs_{factor}{sfx}.csv")
                base_row = fd[fd["is_baseline"]]
                base_count = float(base_row[f"n_quality_ge_{t:.2f}"].iloc[0]) if len(base_row) else np.nan
                changes = (fd[f"n_quality_ge_{t:.2f}"].astype(float) - base_count).abs()
                compact.append({"score_scope": scope, "factor": factor, "threshold": t, "baseline_count": base_count,
                                "median_abs_change": float(changes.median()) if len(changes) else np.nan,
                                "max_abs_change": float(changes.max()) if len(changes) else np.nan})
            long = fd.melt(id_vars=[factor], value_vars=[f"n_quality_ge_{t:.2f}" for t in opts.quality_thresholds],
                           var_name="threshold", value_name="count")
            long["threshold"] = long["threshold"].str.replace("n_quality_ge_", "")
            line_plot(long, factor, "count", "threshold", plots / f"quality_threshold_sensitivity_vs_{factor}{sfx}.pdf",
                      "# units with best MCC ≥ t")
            counts.columns = [float(c) for c in counts.columns]
            count_heatmap(counts, plots / f"quality_threshold_sensitivity_heatmap_{factor}{sfx}.pdf", f"{scope}: {factor}")
    compact_df = pd.DataFrame(compact)
    write_csv_atomic(compact_df, plots / "quality_threshold_sensitivity_compact.csv")
    tau_rows = df[np.isclose(df["M"].astype(float), float(opts.baseline_M))].drop_duplicates("run").sort_values("tau")
    bud = tau_rows[["run", "tau", "cha_groups_mean", "cha_groups_sem", "cha_budget_pct_mean", "cha_budget_pct_sem"]]
    write_csv_atomic(bud, plots / "cha_budget_vs_tau.csv")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(bud["tau"], bud["cha_groups_mean"], yerr=bud["cha_groups_sem"].fillna(0.0), marker="o", capsize=3)
    for x, y, p in zip(bud["tau"], bud["cha_groups_mean"], bud["cha_budget_pct_mean"]):
        if not (isinstance(y, float) and math.isnan(y)):
            ax.annotate("NA" if math.isnan(p) else f"{p:.2f}%", (x, y), fontsize=7)
    ax.set_xlabel("τ")
    ax.set_ylabel("CHA group evaluations per circuit (mean ± SEM)")
    save_figure(fig, plots / "cha_budget_vs_tau.pdf")
    atomic_write_text(out / "README.md", (
        f"# Sensitivity summary\n\nStats root: `{root}` (task `{task}`, model `{model}`).\n"
        f"Baseline run `{opts.baseline_run_name}` (M = {opts.baseline_M}, τ = {opts.baseline_tau}).\n"
        f"Score scopes: {', '.join(opts.score_scopes)}; coverage floor {opts.min_rule_dataset_coverage}.\n\n"
        "- `sensitivity_summary.csv`: one row per run × scope: HQ counts `n_quality_ge_<t>` (best row per unit, "
        "floor applied) and CHA evaluations per circuit (`cha_groups_*`) with their % of the circuit's "
        "tree budget Σ(2N_l − 1) (`cha_budget_pct_*`), overall and per regime.\n"
        "- `plots/count_ge_<t>_vs_{tau,M}.csv` and PDFs: counts when one factor varies and the other is at baseline.\n"
        "- `plots/cha_budget_vs_tau.{csv,pdf}`: CHA cost vs τ.\n"
        "- `plots/quality_threshold_sensitivity_compact.csv`: baseline count and median/max |change| per factor.\n"))
    if opts.paper_fig_dir is not None:
        Path(opts.paper_fig_dir).mkdir(parents=True, exist_ok=True)
        for pdf in sorted(plots.glob("*.pdf")):
            shutil.copyfile(pdf, Path(opts.paper_fig_dir) / pdf.name)
    return df
