"""A short, human-readable summary of one `_run_pipeline.sh` experiment, read from its artifacts.

`python -m lib.reporting.summary --task arithmetic --model smollm2-135m-instruct-q4_1` prints, per
stage: prompts and accuracy (stage 1), features (2), the rule set (3), circuits (5), units localised
and CHA evaluations vs exhaustive ablation per regime (6), high-quality neuron-anchored rules per
score scope (7), the per-stage wall times the driver recorded, and where the files are. Missing
stages are reported as missing; nothing is written. Exit status: 0, or 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lib.core.choices import DEFAULT_SEED
from lib.core.files_and_cache import ArtifactError
from lib.runs.checked_io import read_json_checked
from lib.runs.results import (DEFAULT_HQ_THRESHOLD, DEFAULT_MIN_COVERAGE, SCOPE_LABELS, BaselineResults,
                              RunResults, agonist_table, count_at_least, main_metric_for_task)
from lib.runs.layout import DEFAULT_TAU, ExperimentLayout, canonical_run_mode, parse_run_mode

__all__ = ["summarize", "main"]

_SCOPES_SHOWN = ("test", "test_selected", "all_fit")


def _short(text: Any, width: int = 90) -> str:
    """One-line text cut to `width` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def _json_or_none(path: Path) -> Any:
    """Parsed JSON file, or None when it does not exist."""
    return read_json_checked(path, path.name) if path.is_file() else None


def _stage1_2(layout: ExperimentLayout, metric: str) -> list[str]:
    """Prompts, accuracy and features."""
    out = ["Stage 1-2  prompts, answers, features"]
    stats = _json_or_none(layout.feature_report_dir / "dataset_stats.json")
    if stats is None:
        out.append("  (no dataset_stats.json: stage 1 has not run)")
    else:
        n = stats.get("n_examples", stats.get("n_labeled"))
        rate = stats.get(f"pct_{metric}", stats.get("accuracy"))
        rate_txt = f"{100 * float(rate):.1f} %" if rate is not None else "n/a"
        out.append(f"  {n} prompts; {metric} rate {rate_txt}")
    feats = _json_or_none(layout.feature_report_dir / "features.json")
    scores = layout.feature_report_dir / "scores.csv"
    if feats is None or not scores.is_file():
        out.append("  (no features.json/scores.csv: stage 2 has not run)")
    else:
        n_rows = len(pd.read_csv(scores, usecols=[0]))
        origins = pd.Series([f.get("origin", "?") for f in feats]).value_counts().to_dict()
        out.append(f"  {len(feats)} features kept ({', '.join(f'{v} {k}' for k, v in origins.items())}); "
                   f"{n_rows} rows in scores.csv")
    return out


def _stage3(rules_dir: Path, target: str) -> tuple[list[str], list[str]]:
    """The optimal rule set of the main target; returns (lines, rule ids)."""
    out = [f"Stage 3  rules for {target}"]
    path = rules_dir / f"optimal_rule_set_{target}.csv"
    if not path.is_file():
        return out + [f"  (no {path.name}: stage 3 has not run)"], []
    rules = pd.read_csv(path)
    ids = [str(i) for i in range(len(rules))]
    metrics = []
    sel = _json_or_none(rules_dir / f"rule_selection_{target}.json")
    for scope, name in (("TRAIN", f"rule_combo_train_{target}.csv"), ("TEST", f"rule_combo_{target}.csv")):
        p = rules_dir / name
        if p.is_file():
            row = pd.read_csv(p)
            if not row.empty and "MCC" in row.columns:
                metrics.append(f"{scope} MCC {float(row['MCC'].iloc[0]):.2f}")
        if scope == "TRAIN" and sel and sel.get("validation_MCC") is not None:
            metrics.append(f"validation MCC {float(sel['validation_MCC']):.2f} "
                           f"(mean of {sel.get('validation_folds')} folds of TRAIN)")
    out.append(f"  {len(rules)} rule(s) in the OR-combination" + (f" ({', '.join(metrics)})" if metrics else ""))
    if sel:
        out.append(f"  chosen on the validation folds: {sel.get('chosen_label')}"
                   + (f", at most {sel['chosen_max_literals']} literal(s)" if sel.get("chosen_max_literals") else ""))
    col = "rule_expression" if "rule_expression" in rules.columns else rules.columns[0]
    for i, expr in enumerate(rules[col].head(5)):
        out.append(f"  rule {i}: {_short(expr)}")
    if len(rules) > 5:
        out.append(f"  … {len(rules) - 5} more")
    return out, ids


def _stage5(circuits_dir: Path) -> list[str]:
    """Stage-5 manifest: circuits by status."""
    out = ["Stage 5  candidate units (EAP-IG-inputs)"]
    manifest = _json_or_none(circuits_dir / "manifest.json")
    if manifest is None:
        return out + ["  (no manifest.json: stage 5 has not run)"]
    status = pd.Series([str(e.get("status")) for e in manifest]).value_counts().to_dict()
    out.append(f"  {len(manifest)} rule(s): " + ", ".join(f"{v} {k}" for k, v in status.items()))
    return out


def _stage6(layout: ExperimentLayout, run: str, tau: float) -> list[str]:
    """Per regime: units localised and CHA evaluations vs exhaustive ablation."""
    opts = parse_run_mode(run)
    out = ["Stage 6  units localised (non-catastrophic agonists, |max_effect| ≥ τ = " f"{tau:g})"]
    if opts is None:
        return out + [f"  (run mode {run!r} is not one the pipeline composes)"]
    union: set[str] = set()
    for regime in ("positive", "negative"):
        base = BaselineResults(layout.baseline_dir(opts, regime))
        if not base.exists or base.buckets is None:
            out.append(f"  {regime:8s} (no results: stage 6 has not run for this regime)")
            continue
        n_all = len(agonist_table(base.buckets, 0.0))
        localised = agonist_table(base.buckets, tau)
        union |= set(localised["key"])
        n_tau = len(localised)
        cost = base.cost_summary or {}
        line = f"  {regime:8s} {n_tau} unit(s) localised ({n_all} agonist record(s))"
        if cost:
            n_eval, n_exh = cost.get("n_evaluations"), cost.get("exhaustive_evaluations")
            ratio = f" = {100 * n_eval / n_exh:.1f} % of exhaustive" if n_eval is not None and n_exh else ""
            line += (f"; {cost.get('search', 'cha').upper()} {n_eval} group tests vs {n_exh} single-unit "
                     f"ablations{ratio}; N = {cost.get('n_candidates')} candidates over {cost.get('n_ok')} "
                     f"circuit(s), bound k·log2(N/k)+k = {cost.get('bound_k_log2_N_over_k_plus_k')}")
        out.append(line)
        out += _stage6_search_lines(cost)
    out.append(f"  both regimes: {len(union)} distinct unit(s) go to stage 7")
    return out


def _pct(x: Any) -> str:
    return f"{100 * float(x):.1f} %" if isinstance(x, (int, float)) else "n/a"


def _stage6_search_lines(cost: dict) -> list[str]:
    """Statistic, scope and forward-row cost of the search, and the knockout against random sets."""
    out = []
    if cost.get("forward_rows") is not None:
        out.append(f"           statistic {cost.get('statistic', 'flip_ucb')}, scope {cost.get('scope', 'candidates')}: "
                   f"{cost['forward_rows']} forward rows = {_pct(cost.get('forward_rows_over_exhaustive'))} of "
                   f"exhaustive ablation's {cost.get('exhaustive_forward_rows')}")
    ko = cost.get("knockout") or {}
    if ko.get("n_circuits_with_agonists"):
        out.append(f"           knockout of each rule's agonists together: {_pct(ko.get('removal_associated'))} of "
                   f"associated prompts leave the regime (random same-size sets: "
                   f"{_pct(ko.get('random_removal_associated_mean'))}; margin drop "
                   f"{_pct(ko.get('margin_drop_associated'))} vs {_pct(ko.get('random_margin_drop_associated_mean'))}) "
                   f"over {ko['n_circuits_with_agonists']} rule(s)")
    elif "knockout" in cost:
        out.append("           knockout: no rule has an agonist to knock out")
    return out


def _stage7(layout: ExperimentLayout, run: str, hq: float, min_cov: float) -> list[str]:
    """Localised units evaluated by stage 7 and HQ neuron-anchored rules per scope."""
    out = [f"Stage 7  neuron-anchored rules (HQ = best MCC ≥ {hq:.2f}, coverage ≥ {min_cov:g})"]
    run_dir = layout.stats_dir(run)
    if not run_dir.is_dir():
        return out + [f"  (no {run_dir}: stage 7 has not run)"]
    res = RunResults(run_dir, layout.task, layout.model)
    units = res.units()
    glob = res.flip_stats_global or {}
    flip_txt = ""
    if glob.get("union_any_unique_count") is not None:
        flip_txt = (f"; {glob['union_any_unique_count']} of {glob.get('n_evaluated_rows', '?')} evaluated rows "
                    f"flip under at least one unit")
    out.append(f"  {len(units)} unit(s) ablated one at a time{flip_txt}")
    for scope in _SCOPES_SHOWN:
        best = res.best(scope, min_coverage=min_cov)
        if best is None:
            out.append(f"  {SCOPE_LABELS[scope]:26s} (not available)")
            continue
        n_hq = count_at_least(best, res.hq_threshold(scope, hq) if scope != "test" else hq)
        out.append(f"  {SCOPE_LABELS[scope]:26s} {n_hq} HQ unit(s) of {len(best)} with a rule")
    best = res.best("test", min_coverage=min_cov)
    if best is not None and not best.empty:
        top = best.assign(MCC=pd.to_numeric(best["MCC"], errors="coerce")).nlargest(3, "MCC")
        for _, row in top.iterrows():
            out.append(f"  e.g. {row['neuron_key']} [{row.get('flip_target', '')}] TEST MCC {row['MCC']:.2f}: "
                       f"{_short(row.get('expression', ''), 70)}")
    return out


def _timings(model_dir: Path) -> list[str]:
    """The driver's `pipeline_timings.tsv`, if any."""
    path = model_dir / "pipeline_timings.tsv"
    if not path.is_file():
        return []
    df = pd.read_csv(path, sep="\t", dtype=str)
    out = ["Wall time of the last driver run (skipped stages omitted)"]
    for _, r in df.iterrows():
        if r["wall"] in ("skipped", "dry-run"):
            continue
        cpu = r.get("cpu")
        cpu_txt = f" ({cpu} CPU)" if isinstance(cpu, str) and cpu else ""
        label = f"stage {r['stage']} {r['name']}" if r["stage"] != "total" else "total"
        out.append(f"  {label:42s} {r['wall']}{cpu_txt}")
    return out


def summarize(layout: ExperimentLayout, run: str, tau: float | None = None, hq: float = DEFAULT_HQ_THRESHOLD,
              min_cov: float = DEFAULT_MIN_COVERAGE) -> list[str]:
    """Summary lines of one (task, model, run mode) experiment (τ: the run mode's unless given)."""
    metric = main_metric_for_task(layout.task)
    opts = parse_run_mode(run)
    if tau is None:
        tau = float(opts.tau) if opts is not None else DEFAULT_TAU
    fake = bool(opts and opts.fake_targets)
    rules_dir = layout.rules_dir
    lines = [f"MechaRule summary: task {layout.task}, model {layout.model}", f"run mode {run}", ""]
    lines += _stage1_2(layout, metric)
    rule_lines, _ = _stage3(rules_dir, f"{metric}_fake" if fake else metric)
    lines += rule_lines
    if opts is not None:
        lines += _stage5(layout.circuits_dir(opts))
    lines += _stage6(layout, run, tau)
    lines += _stage7(layout, run, hq, min_cov)
    lines += _timings(layout.model_dir)
    lines += ["", "Files",
              f"  features      {layout.feature_report_dir}",
              f"  rules         {rules_dir}"]
    if opts is not None:
        lines += [f"  circuits      {layout.circuits_dir(opts)}",
                  f"  localisation  {layout.bag_dir(opts)}/{{positive,negative}}_baseline"]
    lines += [f"  stage 7       {layout.stats_dir(run)}",
              f"  stage-1 cache {layout.cache_dir / 'llm_io_data.pkl'}"]
    return lines


def _runs_to_show(layout: ExperimentLayout, run_mode: str | None) -> list[str]:
    """The run mode given, else every stage-7 run folder, else the canonical MAIN run."""
    if run_mode:
        return [run_mode]
    found = sorted(p.name for p in layout.stats_root.glob("*") if p.is_dir()) if layout.stats_root.is_dir() else []
    return [r for r in found if parse_run_mode(r) is not None] or [canonical_run_mode("main")]


def _build_cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.reporting.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--model", required=True, help="model id or embedded alias (its folder under data/<task>/)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--cache_root", default="cache")
    p.add_argument("--run_mode", default=None, help="stage-7 run folder name (default: every run found)")
    p.add_argument("--tau", type=float, default=None,
                   help="agonist threshold on |max_effect| (default: the run mode's τ, 0.2 unless -tau<x>)")
    p.add_argument("--hq_threshold", type=float, default=DEFAULT_HQ_THRESHOLD)
    p.add_argument("--min_rule_dataset_coverage", type=float, default=DEFAULT_MIN_COVERAGE)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the run's seed (stages 2-3 folders of another seed carry it)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of every requested run; 2 on bad options or unreadable artifacts."""
    args = _build_cli().parse_args(argv)
    layout = ExperimentLayout(Path(args.data_root), args.task, args.model, Path(args.cache_root), args.seed)
    if not layout.model_dir.is_dir():
        print(f"pipeline_summary: error: no experiment folder {layout.model_dir}", file=sys.stderr)
        return 2
    if args.run_mode and parse_run_mode(args.run_mode) is None:
        print(f"pipeline_summary: error: '{args.run_mode}' is not a run-mode name", file=sys.stderr)
        return 2
    try:
        for i, run in enumerate(_runs_to_show(layout, args.run_mode)):
            if i:
                print()
            print("\n".join(summarize(layout, run, args.tau, args.hq_threshold, args.min_rule_dataset_coverage)))
    except (ArtifactError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        print(f"pipeline_summary: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
