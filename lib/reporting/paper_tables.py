"""The generated paper tables (1, 2, 3, 9, 10, 11, 12, 13) of `make_paper_tables.py`, and their driver.

Everything reads artifacts through `lib.runs.results` and names folders through `lib.runs.layout`.
Tables are written as `.csv`, `.md` and `.tex` (atomic writes, sorted rows); missing inputs give an
empty table with its headers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import atomic_write_json, atomic_write_text, write_csv_atomic
from lib.reporting.formatting import MAIN_TASKS, display_model, display_task, ratio_cell, sort_key_task_model, write_table
from lib.runs.discovery import ModelDir, find_model_dirs, resolve_bag_dir, resolve_run_dir
from lib.runs.results import (
    DEFAULT_HQ_THRESHOLD,
    DEFAULT_MIN_COVERAGE,
    SCOPE_LABELS,
    BaselineResults,
    RunResults,
    count_at_least,
    dataset_baseline_rate,
    eap_neuron_scores,
    flip_columns_by_unit,
    flip_matrix,
    load_discovery_manifest,
    main_metric_for_task,
    union_flip,
)
from lib.runs.layout import (
    BASELINE_SUBSETS,
    ExperimentLayout,
    canonical_run_mode,
    parse_run_mode,
    role_label,
)

__all__ = [
    "TableOptions",
    "table1_main_hq",
    "table2_threshold_sweep",
    "table3_bf_vs_cha",
    "table9_baseline_performance",
    "table10_11_eap_vs_cha",
    "table12_cha_budget",
    "table13_overlap",
    "make_tables",
    "SUPPORTED_TABLES",
    "TABLE2_ROLES",
    "architecture_units",
]

# (n_layers, width of hook_mlp_out) used only when no artifact states the candidate count.
_ARCH_UNITS = {"gpt-j": (28, 4096), "qwen2-7b": (28, 3584), "qwen2-1.5b": (28, 1536),
               "smollm2-135m": (30, 576), "gemma-3-270m": (18, 640)}
SUPPORTED_TABLES = ("table1", "table2", "table3", "table9", "table10", "table11", "table12", "table13")
_MAIN = canonical_run_mode("main")
_BF = canonical_run_mode("bruteforce")


def architecture_units(model: str, cap: int) -> int | None:
    """n_layers × width of a known model, capped (the original's fallback for N)."""
    low = model.lower()
    for key, (layers, width) in _ARCH_UNITS.items():
        if key in low:
            return min(layers * width, int(cap))
    return None


# --------------------------------------------------------------------------- options


@dataclass
class TableOptions:
    """Inputs of `make_paper_tables.py` (flag names mirrored)."""

    data_root: Path
    out_dir: Path
    which: list[str] = field(default_factory=lambda: list(SUPPORTED_TABLES))
    tau: float = 0.2
    table3_bins: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.5, 1.0])
    thresholds: list[float] = field(default_factory=lambda: [0.7, 0.75, 0.8, 0.85, 0.9])
    table3_task: str = "arithmetic"
    table3_model: str = "Qwen/Qwen2-7B-Instruct"
    table10_task: str = "arithmetic"
    table10_model: str = "Qwen/Qwen2-7B-Instruct"
    table11_task: str = "arithmetic"
    table11_model: str = "Qwen/Qwen2-7B-Instruct"
    table10_topn: int = 50
    table11_topn: int = 10
    table13_task_a: str = "arithmetic"
    table13_task_b: str = "bon_jailbreaking"
    table13_model: str = "Qwen/Qwen2-7B-Instruct"
    table13_baseline_scope: str = "both"
    baseline_subset: str = "positive_baseline"
    table1_coverage_source: str = "all"
    table1_coverage_score_scope: str = "all_fit"
    hq_test_threshold: float = DEFAULT_HQ_THRESHOLD
    hq_all_fit_threshold: float = DEFAULT_HQ_THRESHOLD
    score_scopes: list[str] = field(default_factory=lambda: ["test_selected", "all_fit"])
    min_rule_dataset_coverage: float = DEFAULT_MIN_COVERAGE
    include_hans_in_main_tables: bool = False
    table3_scope: str = "all"
    bruteforce_candidate_cap: int = 100000
    cha_rank_metric: str = "c2i"

    def threshold_for(self, scope: str) -> float:
        return self.hq_all_fit_threshold if scope == "all_fit" else self.hq_test_threshold

    def main_tasks(self) -> tuple[str, ...]:
        return MAIN_TASKS + (("hans_nli", "hans") if self.include_hans_in_main_tables else ())


def _main_model_dirs(opts: TableOptions) -> list[ModelDir]:
    """Model folders of the main tables' tasks, in paper order."""
    dirs = find_model_dirs(opts.data_root, opts.main_tasks())
    return sorted(dirs, key=lambda d: sort_key_task_model(d.task, d.model))


def _run(md: ModelDir, opts: TableOptions, run_name: str) -> RunResults | None:
    """RunResults of a run mode for a model folder (decode-only fallback), or None."""
    p = resolve_run_dir(md.layout(opts.data_root), run_name)
    return RunResults(p, md.task, md.model) if p is not None else None


def _baseline(md: ModelDir, opts: TableOptions, run_name: str, subset: str) -> BaselineResults | None:
    """Stage-6 regime folder of a run mode, or None when absent."""
    bag = resolve_bag_dir(md.layout(opts.data_root), run_name)
    if bag is None:
        return None
    b = BaselineResults(bag / f"{subset.removesuffix('_baseline')}_baseline")
    return b if b.exists else None


# --------------------------------------------------------------------------- Table 1


def _coverage_percent(rr: RunResults, units: Sequence[str], scope: str, metric: str) -> tuple[float, float, str]:
    """(∪ c2i %, ∪ i2c %) of `units` over eligible baseline-correct/incorrect rows of a row scope."""
    df = rr.flip_scores
    if df is not None:
        base = rr.baseline_labels(metric)
        mask = rr.row_scope_mask(scope)
        any_cols = flip_columns_by_unit(df.columns, "any")
        u_cols = [any_cols[u] for u in rr.units() if u in any_cols]
        evaluated = ~np.all(np.isnan(flip_matrix(df, u_cols)), axis=1) if u_cols else np.zeros(len(df), bool)
        out = []
        for kind, want in (("c2i", 1.0), ("i2c", 0.0)):
            cols_by = flip_columns_by_unit(df.columns, kind)
            cols = [cols_by[u] for u in units if u in cols_by]
            eligible = mask & evaluated & (base == want)
            union, _ = union_flip(df, cols, eligible)
            out.append(round(100.0 * union / eligible.sum(), 1) if eligible.sum() else float("nan"))
        return out[0], out[1], "scores.csv"
    glob = rr.flip_stats_global or {}
    vals = []
    for kind in ("c2i", "i2c"):
        rate = glob.get(f"union_{kind}_unique_rate")
        vals.append(round(100.0 * float(rate), 1) if rate is not None else float("nan"))
    return vals[0], vals[1], "flip_stats_global.json" if glob else "missing"


TABLE1_HELD_OUT_SCOPE = "test"
"""Table 1's HQ-T (and HQ) column: the frozen TRAIN combo scored on the `is_test` rows, whatever
`--score_scopes` names: `test_selected` re-selects its combo on the test labels, so it is not held out."""


def table1_main_hq(opts: TableOptions) -> tuple[pd.DataFrame, dict]:
    """Table 1: localised units, HQ-T (held out) / HQ-F counts and flip-union coverage per task × model (MAIN run)."""
    cols = ["Task", "Model", "# Loc.", "HQ-T", "HQ-F", "HQ", "∪(1→0) (elig. %)", "∪(0→1) (elig. %)"]
    rows, sources = [], {}
    cov_scope = opts.table1_coverage_score_scope
    for md in _main_model_dirs(opts):
        rr = _run(md, opts, _MAIN)
        if rr is None:
            continue
        units = rr.units()
        hq: dict[str, Any] = {}
        hq_units: dict[str, list[str]] = {}
        for scope in (TABLE1_HELD_OUT_SCOPE, "test_selected", "all_fit"):
            best = rr.best(scope, "MCC", opts.min_rule_dataset_coverage)
            if best is None:
                hq[scope] = pd.NA
                hq_units[scope] = []
                continue
            thr = opts.threshold_for(scope)
            hq[scope] = count_at_least(best, thr)
            hq_units[scope] = sorted(best.loc[pd.to_numeric(best["MCC"]) >= thr - 1e-12, "neuron_key"])
        cov_units = units if opts.table1_coverage_source == "all" else hq_units.get(cov_scope, [])
        c2i, i2c, src = _coverage_percent(rr, cov_units, cov_scope, main_metric_for_task(md.task))
        sources[f"{md.task}/{md.model}"] = {"run_dir": str(rr.run_dir), "coverage_source": src,
                                            "hq_test_selected_descriptive": hq["test_selected"]}
        held = hq[TABLE1_HELD_OUT_SCOPE]
        rows.append([display_task(md.task), display_model(md.model), len(units), held, hq["all_fit"], held, c2i, i2c])
    meta = {"run_mode": _MAIN, "coverage_source": opts.table1_coverage_source, "coverage_score_scope": cov_scope,
            "column_scopes": {"HQ-T": TABLE1_HELD_OUT_SCOPE, "HQ": TABLE1_HELD_OUT_SCOPE, "HQ-F": "all_fit"},
            "hq_thresholds": {TABLE1_HELD_OUT_SCOPE: opts.hq_test_threshold, "all_fit": opts.hq_all_fit_threshold},
            "min_rule_dataset_coverage": opts.min_rule_dataset_coverage, "inputs": sources}
    return pd.DataFrame(rows, columns=cols), meta


# --------------------------------------------------------------------------- Table 2

TABLE2_ROLES = ("main", "spectral_split", "random_anchor", "fake")


def table2_threshold_sweep(opts: TableOptions) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Table 2: rule-bearing and HQ counts per run × scope × threshold → (long, totals, yield totals)."""
    long_rows = []
    for md in _main_model_dirs(opts):
        org, _, name = md.model.rpartition("/")
        for role in TABLE2_ROLES:
            run_name = canonical_run_mode(role)
            rr = _run(md, opts, run_name)
            if rr is None:
                continue
            n_loc = len(rr.units())
            for scope in opts.score_scopes:
                best = rr.best(scope, "MCC", opts.min_rule_dataset_coverage)
                for thr in opts.thresholds:
                    long_rows.append({
                        "task": md.task, "org": org, "model": name, "run_name": rr.run_name,
                        "Method": role_label(run_name, "tables"), "score_scope": scope,
                        "score_label": SCOPE_LABELS.get(scope, scope), "scope_available": best is not None,
                        "threshold": float(thr), "n_localized_neurons": n_loc,
                        "n_rule_bearing_neurons": len(best) if best is not None else pd.NA,
                        "min_dataset_coverage": opts.min_rule_dataset_coverage,
                        "n_high_quality_neurons": count_at_least(best, thr) if best is not None else pd.NA})
    long_cols = ["task", "org", "model", "run_name", "Method", "score_scope", "score_label", "scope_available",
                 "threshold", "n_localized_neurons", "n_rule_bearing_neurons", "min_dataset_coverage",
                 "n_high_quality_neurons"]
    long = pd.DataFrame(long_rows, columns=long_cols)
    thr_cols = [f"t = {t:.2f}" for t in opts.thresholds]
    method_order = [role_label(canonical_run_mode(r), "tables") for r in TABLE2_ROLES]
    tot_rows, yield_rows = [], []
    for method in method_order:
        for scope in opts.score_scopes:
            sub = long[(long["Method"] == method) & (long["score_scope"] == scope) & long["scope_available"]]
            if sub.empty:
                continue
            per_unit = sub.drop_duplicates(["task", "org", "model"])
            row = {"Method": method, "Score scope": SCOPE_LABELS.get(scope, scope),
                   "All": int(pd.to_numeric(per_unit["n_rule_bearing_neurons"]).sum())}
            for t, c in zip(opts.thresholds, thr_cols):
                row[c] = int(pd.to_numeric(sub.loc[np.isclose(sub["threshold"], t), "n_high_quality_neurons"]).sum())
            tot_rows.append(row)
            n_loc = int(per_unit["n_localized_neurons"].sum())
            n_rb = row["All"]
            yield_rows.append({"Method": method, "Score scope": row["Score scope"], "# Loc.": n_loc,
                               "Rule-bearing": n_rb, "Rule-bearing (% of # Loc.)":
                               round(100.0 * n_rb / n_loc, 1) if n_loc else float("nan")})
    totals = pd.DataFrame(tot_rows, columns=["Method", "Score scope", "All"] + thr_cols)
    yields = pd.DataFrame(yield_rows, columns=["Method", "Score scope", "# Loc.", "Rule-bearing",
                                               "Rule-bearing (% of # Loc.)"])
    return long, totals, yields


# --------------------------------------------------------------------------- Table 3


def _bin_labels(bins: Sequence[float]) -> list[str]:
    labels = []
    for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
        labels.append(f"[{lo:g},{hi:g}]" if i == len(bins) - 2 else f"[{lo:g},{hi:g})")
    return labels


def _bin_index(v: float, bins: Sequence[float]) -> int | None:
    """Bin of a value: [b_i, b_{i+1}) with the last bin closed (values above it fall into it)."""
    if v < bins[0] - 1e-12:
        return None
    for i in range(len(bins) - 1):
        if v < bins[i + 1] - 1e-12:
            return i
    return len(bins) - 2


def _table3_record(md: ModelDir, opts: TableOptions, subset: str) -> dict | None:
    """Recall and like-for-like cost of CHA vs brute force for one model × regime, or None."""
    bf = _baseline(md, opts, _BF, subset)
    cha = _baseline(md, opts, _MAIN, subset)
    if bf is None or cha is None or bf.buckets is None or cha.buckets is None:
        return None
    bins = opts.table3_bins
    bf_ag = bf.agonists(bins[0])
    circuits = {str(c) for c in bf_ag["circuit_id"].dropna()} | set(bf.evaluations_by_circuit())
    cha_ag = cha.agonists(bins[0])
    cha_keys = set(cha_ag.loc[cha_ag["circuit_id"].astype(str).isin(circuits), "key"])
    rec: dict[str, Any] = {"task": md.task, "model": md.model, "baseline": subset,
                           "circuits": sorted(circuits), "n_bf": len(bf_ag),
                           "n_hit": int(bf_ag["key"].isin(cha_keys).sum())}
    for i in range(len(bins) - 1):
        in_bin = bf_ag[[_bin_index(abs(v), bins) == i for v in bf_ag["max_effect"]]]
        rec[f"n_bf_bin{i}"] = len(in_bin)
        rec[f"n_hit_bin{i}"] = int(in_bin["key"].isin(cha_keys).sum())
    cha_evals = cha.evaluations_by_circuit(circuits)
    rec["cha_evaluations"] = int(sum(cha_evals.values()))
    bf_evals = bf.evaluations_by_circuit(circuits)
    cand = bf.candidates_by_circuit(circuits) or cha.candidates_by_circuit(circuits)
    arch_n = architecture_units(md.model, opts.bruteforce_candidate_cap)
    if bf_evals:
        rec["reference_evaluations"], rec["reference_source"] = int(sum(bf_evals.values())), "bruteforce_evaluations"
    elif cand:
        rec["reference_evaluations"], rec["reference_source"] = int(sum(cand.values())), "n_candidates"
    elif arch_n:
        rec["reference_evaluations"], rec["reference_source"] = 2 * arch_n - 1, "architecture_2N_minus_1"
    else:
        rec["reference_evaluations"], rec["reference_source"] = 0, "missing"
    n_orig = sum(cand.values()) if cand else arch_n
    all_cha = sum(cha.evaluations_by_circuit().values())
    rec["original_style_cha_evaluations"] = int(all_cha)
    rec["original_style_denominator"] = 2 * int(n_orig) - 1 if n_orig else None
    return rec


def _table3_cells(recs: list[dict], n_bins: int) -> dict[str, Any]:
    """Summed recall/budget cells over a group of records."""
    s = lambda k: int(sum(r[k] for r in recs))  # noqa: E731
    out = {"Recall": ratio_cell(s("n_hit"), s("n_bf"))}
    for i in range(n_bins):
        out[f"bin{i}"] = ratio_cell(s(f"n_hit_bin{i}"), s(f"n_bf_bin{i}"))
    out["Budget"] = ratio_cell(s("cha_evaluations"), s("reference_evaluations"), 2)
    return out


def table3_bf_vs_cha(opts: TableOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Table 3: recall of brute-force agonists by CHA (overall and per effect bin) and its relative cost."""
    labels = _bin_labels(opts.table3_bins)
    nb = len(labels)
    dirs = [md for md in find_model_dirs(opts.data_root)
            if opts.table3_scope == "all" or (md.task == opts.table3_task and md.model == opts.table3_model)]
    dirs.sort(key=lambda d: sort_key_task_model(d.task, d.model))
    recs = [r for md in dirs for subset in BASELINE_SUBSETS if (r := _table3_record(md, opts, subset))]
    cols = ["Level", "Task", "Model", "Baseline", "Recall"] + [f"Recall {b}" for b in labels] + ["Budget"]
    rows = []

    def add(level: str, task: str, model: str, base: str, group: list[dict]) -> None:
        c = _table3_cells(group, nb)
        rows.append([level, task, model, base, c["Recall"]] + [c[f"bin{i}"] for i in range(nb)] + [c["Budget"]])

    for r in recs:
        add("model+baseline", display_task(r["task"]), display_model(r["model"]), r["baseline"], [r])
    for (task, model), grp in itertools.groupby(recs, key=lambda r: (r["task"], r["model"])):
        add("model", display_task(task), display_model(model), "both", list(grp))
    for task, grp in itertools.groupby(sorted(recs, key=lambda r: sort_key_task_model(r["task"], "")),
                                       key=lambda r: r["task"]):
        add("task", display_task(task), "all", "both", list(grp))
    if recs:
        add("overall", "all", "all", "both", recs)
    long_cols = (["task", "model", "baseline", "n_bf", "n_hit"] + [f"n_bf_bin{i}" for i in range(nb)]
                 + [f"n_hit_bin{i}" for i in range(nb)]
                 + ["cha_evaluations", "reference_evaluations", "reference_source",
                    "original_style_cha_evaluations", "original_style_denominator"])
    long = pd.DataFrame([{k: r.get(k) for k in long_cols} for r in recs], columns=long_cols)
    if not long.empty:
        long["recall"] = long["n_hit"] / long["n_bf"].replace(0, np.nan)
        long["budget_pct"] = 100.0 * long["cha_evaluations"] / long["reference_evaluations"].replace(0, np.nan)
        den = pd.to_numeric(long["original_style_denominator"], errors="coerce")
        long["original_style_budget_pct"] = 100.0 * long["original_style_cha_evaluations"] / den
    meta = {"bins": opts.table3_bins, "bin_labels": labels, "bf_run_mode": _BF, "cha_run_mode": _MAIN,
            "min_effect": opts.table3_bins[0], "scope": opts.table3_scope,
            "circuits_by_record": {f"{r['task']}/{r['model']}/{r['baseline']}": r["circuits"] for r in recs},
            "budget_definition": "CHA group evaluations on the circuits of the brute-force run divided by the "
                                 "brute-force run's evaluation count (else the candidate count N, else the "
                                 "original's 2N-1 with N from the architecture)",
            "reference_sources": sorted({r["reference_source"] for r in recs})}
    return pd.DataFrame(rows, columns=cols), long, meta


# --------------------------------------------------------------------------- Table 9


def table9_baseline_performance(opts: TableOptions) -> pd.DataFrame:
    """Table 9: baseline accuracy (or jailbreak rate) of each model on each task, in %."""
    rows = []
    for md in _main_model_dirs(opts):
        rate = dataset_baseline_rate(md.path / "feature_report", md.task)
        metric = "Jailbreak rate" if main_metric_for_task(md.task) == "is_jailbroken" else "Accuracy"
        rows.append([display_task(md.task), display_model(md.model), metric,
                     round(100.0 * rate, 1) if rate is not None else float("nan")])
    return pd.DataFrame(rows, columns=["Task", "Model", "Metric", "Value (%)"])


# --------------------------------------------------------------------------- Tables 10 and 11


def _layer_num(label: str) -> int:
    digits = "".join(ch if ch.isdigit() else " " for ch in str(label)).split()
    return int(digits[0]) if digits else -1


def _cha_ranking(fsn: pd.DataFrame, metric: str) -> pd.DataFrame:
    """MLP units of `flip_stats_by_neuron.csv` ranked by the chosen flip rate/count, then flip-any."""
    df = fsn[fsn["layer_key"].astype(str).str.match(r"^m\d+$")].copy()
    primary = {"c2i": ["c2i_rate", "c2i_count"], "i2c": ["i2c_rate", "i2c_count"],
               "flip_any": ["flip_any_rate", "flip_any_count"]}[metric]
    secondary = ["flip_any_rate", "flip_any_count"] if metric != "flip_any" else ["c2i_rate", "c2i_count"]
    keys = [c for c in primary + secondary if c in df.columns]
    for c in keys:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0.0)
    df["unit"] = df["layer_key"].astype(str) + ":" + pd.to_numeric(df["neuron_id"]).astype(int).astype(str)
    return df.sort_values(keys + ["unit"], ascending=[False] * len(keys) + [True], kind="mergesort")


def table10_11_eap_vs_cha(opts: TableOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables 10-11: layer distribution and ranked lists of top EAP-IG vs top CHA MLP units."""
    t10_cols = ["Layer", f"EAP-IG top-{opts.table10_topn}", f"CHA top-{opts.table10_topn}"]
    t11_cols = ["Rank", "EAP-IG neuron", "|IG|", "CHA neuron"]

    def sides(task: str, model: str, topn: int) -> tuple[list[tuple[str, float]], list[str]]:
        layout = ExperimentLayout(Path(opts.data_root), task, model)
        eap: list[tuple[str, float]] = []
        main_opts = parse_run_mode(_MAIN)
        for cdir in (layout.circuits_dir(main_opts),
                     layout.circuits_dir(parse_run_mode(_MAIN.replace("-decode_only", "")))):
            if (cdir / "manifest.json").is_file():
                scores = eap_neuron_scores(load_discovery_manifest(cdir), cdir)
                ranked = sorted(((f"{k[0]}:{k[1]}", v) for k, v in scores.items() if k[0].startswith("m")),
                                key=lambda kv: (-kv[1], kv[0]))
                eap = ranked[:topn]
                break
        cha: list[str] = []
        run_dir = resolve_run_dir(layout, _MAIN)
        if run_dir is not None:
            fsn = RunResults(run_dir, task, model).flip_stats_by_neuron
            if fsn is not None and not fsn.empty:
                cha = _cha_ranking(fsn, opts.cha_rank_metric)["unit"].head(topn).tolist()
        return eap, cha

    eap10, cha10 = sides(opts.table10_task, opts.table10_model, opts.table10_topn)
    layers = sorted({u.split(":")[0] for u, _ in eap10} | {u.split(":")[0] for u in cha10}, key=_layer_num)
    t10 = []
    for layer in layers:
        ne = sum(1 for u, _ in eap10 if u.split(":")[0] == layer)
        nc = sum(1 for u in cha10 if u.split(":")[0] == layer)
        t10.append([layer, f"{ne} ({100.0 * ne / len(eap10):.0f}%)" if eap10 else "0 (NA)",
                    f"{nc} ({100.0 * nc / len(cha10):.0f}%)" if cha10 else "0 (NA)"])
    eap11, cha11 = sides(opts.table11_task, opts.table11_model, opts.table11_topn)
    t11 = []
    for i in range(max(len(eap11), len(cha11))):
        e = eap11[i] if i < len(eap11) else ("", float("nan"))
        t11.append([i + 1, e[0], f"{e[1]:.4g}" if not math.isnan(e[1]) else "", cha11[i] if i < len(cha11) else ""])
    return pd.DataFrame(t10, columns=t10_cols), pd.DataFrame(t11, columns=t11_cols)


# --------------------------------------------------------------------------- Table 12


def table12_cha_budget(opts: TableOptions) -> pd.DataFrame:
    """Table 12: CHA group evaluations per circuit of the MAIN run, per task × model × regime."""
    cols = ["Task", "Model", "Baseline", "#rules", "n ablation_groups (by circuit id)", "Mean", "Median", "Min–Max"]
    rows = []
    for md in _main_model_dirs(opts):
        for subset in BASELINE_SUBSETS:
            b = _baseline(md, opts, _MAIN, subset)
            if b is None or b.knockout is None:
                continue
            ev = b.evaluations_by_circuit()
            vals = np.array(list(ev.values()), dtype=float)
            by_id = "; ".join(f"{k}: {v}" for k, v in sorted(ev.items(), key=lambda kv: _sort_id(kv[0])))
            rows.append([display_task(md.task), display_model(md.model), subset, len(ev), by_id,
                         round(float(vals.mean()), 1) if vals.size else float("nan"),
                         float(np.median(vals)) if vals.size else float("nan"),
                         f"{int(vals.min())}–{int(vals.max())}" if vals.size else "NA"])
    return pd.DataFrame(rows, columns=cols)


def _sort_id(cid: str) -> tuple:
    return (0, int(cid), "") if str(cid).lstrip("-").isdigit() else (1, 0, str(cid))


# --------------------------------------------------------------------------- Table 13


def _agonist_set(md_path: ModelDir, opts: TableOptions, scope: str) -> set[str] | None:
    """MAIN τ-agonist keys of the selected regimes (None when no bucket file exists)."""
    subsets = {"both": BASELINE_SUBSETS, "positive": ("positive",), "negative": ("negative",),
               "selected": (opts.baseline_subset.removesuffix("_baseline"),)}[scope]
    keys: set[str] | None = None
    for subset in subsets:
        b = _baseline(md_path, opts, _MAIN, subset)
        if b is None or b.buckets is None:
            continue
        keys = (keys or set()) | set(b.agonists(opts.tau)["key"])
    return keys


def table13_overlap(opts: TableOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Table 13: overlap of MAIN τ-agonist sets between two tasks for one model."""
    cols = ["Model", "|A|", "|J|", "|A ∩ J|", "Jaccard"]
    sets = {}
    for task in (opts.table13_task_a, opts.table13_task_b):
        md = ModelDir(task, opts.table13_model, ExperimentLayout(Path(opts.data_root), task, opts.table13_model).model_dir)
        sets[task] = _agonist_set(md, opts, opts.table13_baseline_scope) if md.path.is_dir() else None
    a, j = sets[opts.table13_task_a], sets[opts.table13_task_b]
    rows, inter = [], []
    if a is not None and j is not None:
        inter = sorted(a & j, key=lambda k: (_layer_num(k), int(k.rsplit(":", 1)[-1]) if k.rsplit(":", 1)[-1].isdigit() else 0, k))
        union = a | j
        rows.append([display_model(opts.table13_model), len(a), len(j), len(inter),
                     round(len(inter) / len(union), 3) if union else float("nan")])
    meta = {"task_a": opts.table13_task_a, "task_b": opts.table13_task_b, "model": opts.table13_model,
            "baseline_scope": opts.table13_baseline_scope, "tau": opts.tau, "run_mode": _MAIN,
            "available": a is not None and j is not None}
    return pd.DataFrame(rows, columns=cols), pd.DataFrame({"key": inter}), meta


# --------------------------------------------------------------------------- driver

UNSUPPORTED_NOTE = (
    "Tables 4-8 of the paper are not generated: they are hand-written (qualitative rule examples, prompt\n"
    "templates and hyper-parameter listings). Tables 1, 2, 3, 9, 10, 11, 12 and 13 are generated by\n"
    "make_paper_tables.py from data/ (see paper_tables_manifest.json for the inputs of each run).\n")


def make_tables(opts: TableOptions, notes_only: bool = False) -> dict:
    """Compute and write the requested tables; returns the manifest that is also written."""
    out = Path(opts.out_dir)
    atomic_write_text(out / "unsupported_tables_note.txt", UNSUPPORTED_NOTE)
    manifest: dict[str, Any] = {"data_root": str(opts.data_root), "which": opts.which, "tables": {},
                                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}}
    if notes_only:
        atomic_write_json(out / "paper_tables_manifest.json", manifest)
        return manifest

    def record(key: str, files: list[str], df: pd.DataFrame, meta: dict | None = None) -> None:
        manifest["tables"][key] = {"files": files, "n_rows": int(len(df)), **({"meta": meta} if meta else {})}

    if "table1" in opts.which:
        t1, m1 = table1_main_hq(opts)
        record("table1", write_table(t1, out, "table1_main_high_quality_neurons",
                                     "Table 1: localised units and high-quality neuron-anchored rules (MAIN run)"), t1, m1)
    if "table2" in opts.which:
        long, totals, yields = table2_threshold_sweep(opts)
        write_csv_atomic(long, out / "table2_threshold_sweep_per_run_long.csv")
        files = ["table2_threshold_sweep_per_run_long.csv"]
        files += write_table(totals, out, "table2_threshold_sweep_totals",
                             "Table 2: high-quality neurons per method and threshold (summed over models)")
        for scope in opts.score_scopes:
            sub = totals[totals["Score scope"] == SCOPE_LABELS.get(scope, scope)]
            files += write_table(sub, out, f"table2_threshold_sweep_totals_{scope}",
                                 f"Table 2 ({SCOPE_LABELS.get(scope, scope)})")
        files += write_table(yields, out, "table2_rule_bearing_yield_totals",
                             "Table 2 (companion): rule-bearing units among localised units")
        record("table2", files, totals)
    if "table3" in opts.which:
        t3, e2, m3 = table3_bf_vs_cha(opts)
        files = write_table(t3, out, "table3_compact_bf_vs_cha", "Table 3: CHA recall of brute-force agonists and cost")
        files += write_table(e2, out, "table3_e2_recall_budget", "Table 3 / E2: recall and budget per model and regime")
        atomic_write_json(out / "table3_compact_metadata.json", m3)
        record("table3", files + ["table3_compact_metadata.json"], t3, m3)
    if "table9" in opts.which:
        t9 = table9_baseline_performance(opts)
        record("table9", write_table(t9, out, "table9_baseline_performance", "Table 9: baseline performance"), t9)
    if "table10" in opts.which or "table11" in opts.which:
        t10, t11 = table10_11_eap_vs_cha(opts)
        if "table10" in opts.which:
            record("table10", write_table(t10, out, "table10_layer_distribution_eap_vs_cha",
                                          "Table 10: layers of the top EAP-IG and top CHA units"), t10)
        if "table11" in opts.which:
            record("table11", write_table(t11, out, "table11_top_units_eap_vs_cha",
                                          "Table 11: top EAP-IG units vs top CHA units"), t11)
    if "table12" in opts.which:
        t12 = table12_cha_budget(opts)
        record("table12", write_table(t12, out, "table12_cha_budget", "Table 12: CHA group evaluations per circuit"), t12)
    if "table13" in opts.which:
        t13, inter, m13 = table13_overlap(opts)
        files = write_table(t13, out, "table13_agonist_overlap", "Table 13: overlap of tau-agonists between tasks")
        write_csv_atomic(inter, out / "table13_agonist_overlap_intersection.csv")
        atomic_write_json(out / "table13_agonist_overlap_metadata.json", m13)
        record("table13", files + ["table13_agonist_overlap_intersection.csv",
                                   "table13_agonist_overlap_metadata.json"], t13, m13)
    atomic_write_json(out / "paper_tables_manifest.json", manifest)
    return manifest
