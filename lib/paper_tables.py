"""Table and comparison computations for `make_paper_tables.py` and scripts 8-11.

Everything reads artifacts through `lib.result_loading` and names folders through `lib.run_layout`.
Tables are written as `.csv`, `.md` and `.tex` (atomic writes, sorted rows); missing inputs give an
empty table with its headers. Statistical helpers (Holm, exact sign test, sign-flip test, Mann-Whitney,
Fisher combination) live here too so the scripts stay thin.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from lib.caching_and_prompting import atomic_write_json, atomic_write_text
from lib.result_loading import (
    DEFAULT_HQ_THRESHOLD,
    DEFAULT_MIN_COVERAGE,
    SCOPE_LABELS,
    BaselineResults,
    ModelDir,
    RunResults,
    count_at_least,
    dataset_baseline_rate,
    eap_neuron_scores,
    find_model_dirs,
    flip_columns_by_unit,
    load_discovery_manifest,
    main_metric_for_task,
    resolve_bag_dir,
    resolve_run_dir,
    union_flip,
    write_csv_atomic,
)
from lib.run_layout import (
    BASELINE_SUBSETS,
    ExperimentLayout,
    canonical_run_mode,
    parse_run_mode,
    role_label,
)

__all__ = [
    "TASK_DISPLAY",
    "MAIN_TASKS",
    "display_task",
    "display_model",
    "sort_key_task_model",
    "write_table",
    "holm",
    "sign_test_p",
    "signflip_test",
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
    "architecture_units",
]

TASK_DISPLAY = {"arithmetic": "Arithmetic", "bon_jailbreaking": "Jailbreaking", "jailbreaking": "Jailbreaking",
                "hans_nli": "HANS NLI", "hans": "HANS NLI"}
_TASK_ORDER = ["arithmetic", "bon_jailbreaking", "jailbreaking", "hans_nli", "hans"]
MAIN_TASKS = ("arithmetic", "bon_jailbreaking", "jailbreaking")
_MODEL_DISPLAY = {"qwen/qwen2-7b-instruct": "Qwen2-7B", "eleutherai/gpt-j-6b": "GPT-J",
                  "qwen/qwen2-1.5b-instruct": "Qwen2-1.5B"}
_MODEL_ORDER = ["Qwen2-7B", "GPT-J", "Qwen2-1.5B"]
# (n_layers, width of hook_mlp_out) used only when no artifact states the candidate count.
_ARCH_UNITS = {"gpt-j": (28, 4096), "qwen2-7b": (28, 3584), "qwen2-1.5b": (28, 1536),
               "smollm2-135m": (30, 576), "gemma-3-270m": (18, 640)}
SUPPORTED_TABLES = ("table1", "table2", "table3", "table9", "table10", "table11", "table12", "table13")
_MAIN = canonical_run_mode("main")
_BF = canonical_run_mode("bruteforce")


def display_task(task: str) -> str:
    return TASK_DISPLAY.get(task, task)


def display_model(model: str) -> str:
    return _MODEL_DISPLAY.get(model.lower(), model.rsplit("/", 1)[-1])


def sort_key_task_model(task: str, model: str) -> tuple:
    """Paper row order: Arithmetic, Jailbreaking, HANS × Qwen2-7B, GPT-J, Qwen2-1.5B, then others by name."""
    t = _TASK_ORDER.index(task) if task in _TASK_ORDER else len(_TASK_ORDER)
    d = display_model(model)
    m = _MODEL_ORDER.index(d) if d in _MODEL_ORDER else len(_MODEL_ORDER)
    return (t, task, m, model)


def architecture_units(model: str, cap: int) -> int | None:
    """n_layers × width of a known model, capped (the original's fallback for N)."""
    low = model.lower()
    for key, (layers, width) in _ARCH_UNITS.items():
        if key in low:
            return min(layers * width, int(cap))
    return None


# --------------------------------------------------------------------------- writing


def _md_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NA"
    return str(v).replace("|", "\\|")


_TEX_MAP = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
            "{": r"\{", "}": r"\}"}


def _tex_escape(v: Any) -> str:
    """LaTeX-safe cell text (special characters escaped, a few symbols to math)."""
    s = re.sub(r"[\\&%_#${}]", lambda m: _TEX_MAP[m.group()], _md_cell(v).replace("\\|", "|"))
    return s.replace("∩", r"$\cap$").replace("∪", r"$\cup$").replace("→", r"$\to$").replace("–", "--")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-style markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular with a caption comment."""
    cols = [_tex_escape(c) for c in df.columns]
    out = [f"% {caption}", "\\begin{tabular}{" + "l" * max(1, len(cols)) + "}", "\\toprule",
           " & ".join(cols) + " \\\\", "\\midrule"]
    out += [" & ".join(_tex_escape(v) for v in row) + " \\\\" for row in df.itertuples(index=False)]
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, caption: str) -> list[str]:
    """Write `<name>.csv/.md/.tex` atomically; returns the file names."""
    out_dir = Path(out_dir)
    write_csv_atomic(df, out_dir / f"{name}.csv")
    atomic_write_text(out_dir / f"{name}.md", f"<!-- {caption} -->\n" + to_markdown(df))
    atomic_write_text(out_dir / f"{name}.tex", to_latex(df, caption))
    return [f"{name}.csv", f"{name}.md", f"{name}.tex"]


def ratio_cell(num: int, den: int, digits: int = 1) -> str:
    """`num/den (p%)`, or `0/0 (NA)`."""
    if not den:
        return f"{int(num)}/{int(den)} (NA)"
    return f"{int(num)}/{int(den)} ({100.0 * num / den:.{digits}f}%)"


# --------------------------------------------------------------------------- statistics


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvals, dtype=float)
    out = np.full(len(p), np.nan)
    idx = [i for i in np.argsort(p, kind="mergesort") if not np.isnan(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def sign_test_p(diffs: Sequence[float], alternative: str = "greater") -> tuple[float, int, int, int]:
    """Exact binomial sign test over nonzero diffs → (p, n_nonzero, n_pos, n_neg)."""
    from scipy.stats import binomtest

    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0, 0, 0, 0
    return float(binomtest(pos, n, 0.5, alternative=alternative).pvalue), n, pos, neg


def signflip_test(diffs: Sequence[float], alternative: str = "greater", seed: int = 0,
                  exact_max: int = 22, n_random: int = 200_000) -> tuple[float, str]:
    """Sign-flip permutation test on Σ diffs: exact up to `exact_max` nonzero diffs, else Monte Carlo."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d) & (d != 0)]
    if d.size == 0:
        return 1.0, "empty"
    obs = d.sum()
    if d.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        sums = signs @ d
        mode = "exact"
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_random, d.size))
        sums = np.concatenate([signs @ d, [obs]])
        mode = "monte_carlo"
    tol = 1e-9 * max(1.0, abs(obs))
    if alternative == "greater":
        p = float(np.mean(sums >= obs - tol))
    elif alternative == "less":
        p = float(np.mean(sums <= obs + tol))
    else:
        p = float(np.mean(np.abs(sums) >= abs(obs) - tol))
    return p, mode


def significance_stars(p: float) -> str:
    """`***` < .001, `**` < .01, `*` < .05, else `ns`."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "ns"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


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
        from lib.result_loading import flip_matrix

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


def table1_main_hq(opts: TableOptions) -> tuple[pd.DataFrame, dict]:
    """Table 1: localised units, HQ-T/HQ-F counts and flip-union coverage per task × model (MAIN run)."""
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
        for scope in ("test_selected", "all_fit"):
            best = rr.best(scope, "MCC", opts.min_rule_dataset_coverage) if scope in opts.score_scopes else None
            if best is None:
                hq[scope] = pd.NA
                hq_units[scope] = []
                continue
            thr = opts.threshold_for(scope)
            hq[scope] = count_at_least(best, thr)
            hq_units[scope] = sorted(best.loc[pd.to_numeric(best["MCC"]) >= thr - 1e-12, "neuron_key"])
        cov_units = units if opts.table1_coverage_source == "all" else hq_units.get(cov_scope, [])
        c2i, i2c, src = _coverage_percent(rr, cov_units, cov_scope, main_metric_for_task(md.task))
        sources[f"{md.task}/{md.model}"] = {"run_dir": str(rr.run_dir), "coverage_source": src}
        rows.append([display_task(md.task), display_model(md.model), len(units), hq["test_selected"],
                     hq["all_fit"], hq["test_selected"], c2i, i2c])
    meta = {"run_mode": _MAIN, "coverage_source": opts.table1_coverage_source, "coverage_score_scope": cov_scope,
            "hq_thresholds": {"test_selected": opts.hq_test_threshold, "all_fit": opts.hq_all_fit_threshold},
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


# =========================================================================== shared plotting/stat helpers

METRIC_COLUMNS = {"mcc": "MCC", "f1": "F1(target=1|fire)", "balanced_accuracy": "BalancedAcc", "tpr": "TPR",
                  "tnr": "TNR"}


def metric_column(name: str, columns: Iterable[str] = ()) -> str:
    """Rule-metric column of a `--rule_quality_metric` value (F1 falls back to a bare `F1` column)."""
    col = METRIC_COLUMNS[name]
    cols = set(columns)
    if col not in cols and name == "f1" and "F1" in cols:
        return "F1"
    return col


def _plt():
    """matplotlib with the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a figure atomically and close it."""
    from lib.caching_and_prompting import atomic_path

    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "pdf", bbox_inches="tight")
    plt.close(fig)


def line_plot(df: pd.DataFrame, x: str, y: str, hue: str, path: Path, ylabel: str,
              err: str | None = None) -> None:
    """One line per `hue` value (optional ± error column)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, sub in sorted(df.groupby(hue), key=lambda kv: str(kv[0])):
        sub = sub.sort_values(x)
        ax.plot(sub[x], sub[y], marker="o", ms=3, label=str(key))
        if err and err in sub.columns:
            ax.fill_between(sub[x], sub[y] - sub[err], sub[y] + sub[err], alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _distribution_row(vals: np.ndarray) -> dict:
    """n, mean, median, quantiles and tail shares of one metric sample."""
    v = vals[~np.isnan(vals)]
    if v.size == 0:
        return {"n": 0, "mean": np.nan, "median": np.nan, "q10": np.nan, "q50": np.nan, "q90": np.nan,
                "q95": np.nan, "p_ge_0.80": np.nan, "p_ge_0.90": np.nan, "tail_mean_ge_0.90": np.nan}
    tail = v[v >= 0.9]
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "q10": float(np.quantile(v, 0.1)), "q50": float(np.quantile(v, 0.5)), "q90": float(np.quantile(v, 0.9)),
            "q95": float(np.quantile(v, 0.95)), "p_ge_0.80": float((v >= 0.8).mean()),
            "p_ge_0.90": float((v >= 0.9).mean()), "tail_mean_ge_0.90": float(tail.mean()) if tail.size else np.nan}


def _mwu(a: np.ndarray, b: np.ndarray, alternative: str) -> tuple[float, float]:
    """Mann-Whitney U (stat, p); NaN when a side is empty."""
    from scipy.stats import mannwhitneyu

    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan")
    res = mannwhitneyu(a, b, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


# =========================================================================== script 8

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
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    rows = []
    for ax, metric in zip(axes.ravel(), DIST_METRICS):
        vals = {r: _dist_values(b, metric) for r, b in per_run.items()}
        if not vals:
            continue
        best_run = max(sorted(vals), key=lambda r: _best_mode_score(vals[r], opts.best_mode))
        ps = []
        for r in sorted(vals):
            v = np.sort(vals[r][~np.isnan(vals[r])])
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=role_label(r, "compare"))
            if r != best_run:
                _, p = _mwu(vals[best_run], vals[r], "greater")
                ps.append((r, p))
        adj = holm([p for _, p in ps])
        for (r, p), pa in zip(ps, adj):
            rows.append({"metric": metric, "best_run": best_run, "other_run": r, "p": p, "p_holm": pa,
                         "sig": significance_stars(pa)})
        ax.set_title(f"{metric} (best: {role_label(best_run, 'compare')})", fontsize=8)
        ax.set_xlabel(metric)
        ax.set_ylabel("ECDF")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
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
            stat, p = _mwu(va, vb, "two-sided")
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
                         "metric": metric, **_distribution_row(_dist_values(best, metric))})
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
    import re as _re

    from lib.result_loading import find_run_dirs

    runs = find_run_dirs(stats_dir, canonical_only=True)
    if regex:
        pat = _re.compile(regex)
        runs = [r for r in runs if pat.search(r.name)]
    return runs


def _fisher(ps: Sequence[float]) -> float:
    """Fisher's combination of p-values (NaN ignored)."""
    from scipy.stats import combine_pvalues

    p = [x for x in ps if x is not None and not math.isnan(x)]
    if not p:
        return float("nan")
    return float(combine_pvalues(np.clip(p, 1e-300, 1.0), method="fisher").pvalue)


def compare_experiments(opts: CompareOptions) -> dict:
    """Script 8: per-stats-folder sweeps/distributions, and cross-LLM aggregates when several exist."""
    from lib.result_loading import find_stats_dirs, open_stats_source, task_model_from_path

    with open_stats_source(opts.stats_path) as root:
        leaves = [(sd, *task_model_from_path(sd)) for sd in find_stats_dirs(root)]
        leaves = [lf for lf in leaves if find_run_dirs_canonical(lf[0], opts.run_name_regex)]
        if not leaves:
            from lib.caching_and_prompting import ArtifactError

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
        summ = [{"task": task, "stats_dirname": r, "metric": m, **_distribution_row(_dist_values(b, m))}
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
                          "p_fisher": _fisher(grp["p"].tolist()), "median_A_pooled": ma, "median_B_pooled": mb,
                          "median_diff_pooled": ma - mb})
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


# =========================================================================== script 9


def compare_models(task_dir: Path, out_dir: Path, tau: float = 0.2, eps: float = 0.2,
                   min_cov: float = DEFAULT_MIN_COVERAGE, score_scope: str = "test_selected",
                   runs: str = "all", drop_incomplete_models: bool = False) -> pd.DataFrame:
    """Script 9: per model × run rule quality, flip unions and stage-6 agonist/cost figures."""
    from lib.caching_and_prompting import ArtifactError
    from lib.result_loading import find_run_dirs

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


def _bar_plot(labels: Sequence[str], values: Sequence[float], path: Path, ylabel: str,
              errors: Sequence[float] | None = None) -> None:
    """A simple bar chart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), np.nan_to_num(np.asarray(values, float)), yerr=errors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    save_figure(fig, path)


def _ecdf_plot(series: dict[str, np.ndarray], path: Path, xlabel: str) -> None:
    """ECDF of several samples."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, vals in sorted(series.items()):
        v = np.sort(vals[~np.isnan(vals)])
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ECDF")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _compare_models_plots(df: pd.DataFrame, agg_df: pd.DataFrame, raw: list, plots: Path) -> None:
    """Script-9 figures: per-model bars, run aggregates, ECDFs per run."""
    for col in ("n_tau_agonists", "rule_mcc_median", "median_n_ablation_groups"):
        labels = [f"{display_model(m)} | {role_label(r, 'compare')}" for m, r in zip(df["model"], df["run"])]
        _bar_plot(labels, pd.to_numeric(df[col], errors="coerce").tolist(), plots / f"cross_model_{col}.pdf", col)
    for col in ("n_tau_agonists", "rule_mcc_median", "median_abs_acc_gap", "frac_eps_selective"):
        _bar_plot(agg_df["run_label"].tolist(), agg_df[f"{col}_mean"].tolist(), plots / f"agg_{col}.pdf", col,
                  np.nan_to_num(agg_df[f"{col}_std"].to_numpy(float)).tolist())
    for run in sorted({r for _, r, _, _, _ in raw}):
        mcc = {display_model(m): v for m, r, v, _, _ in raw if r == run}
        _ecdf_plot(mcc, plots / f"ecdf_mcc_{run}.pdf", "best MCC per neuron")
        flips = {}
        for m, r, _, rr, _ in raw:
            fsn = rr.flip_stats_by_neuron if r == run else None
            if fsn is not None and "flip_any_rate" in fsn.columns:
                flips[display_model(m)] = pd.to_numeric(fsn["flip_any_rate"], errors="coerce").to_numpy(float)
        _ecdf_plot(flips, plots / f"ecdf_flipany_{run}.pdf", "flip-any rate per neuron")
        _ecdf_plot({display_model(m): g for m, r, _, _, g in raw if r == run},
                   plots / f"ecdf_selectivity_{run}.pdf", "|accuracy gap| of τ-agonists")


# =========================================================================== script 10

COMPARISONS = (("main", "spectral_split"), ("main", "random_anchor"), ("main", "fake"))


def _method_label(value: str) -> str:
    """Normalise a run name or a script-8/table label to the tables' method label."""
    v = str(value).strip()
    from lib.run_layout import CANONICAL_ROLES

    for _, (_, compare_label, table_label) in CANONICAL_ROLES.items():
        if v in (compare_label, table_label):
            return table_label
    return role_label(v, "tables")


def _role_table_label(role: str) -> str:
    from lib.run_layout import CANONICAL_ROLES

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
    from lib.caching_and_prompting import ArtifactError
    from lib.result_loading import read_csv_checked

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
    from lib.result_loading import expand_score_scopes

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


# =========================================================================== script 11


def _run_factor_values(name: str, baseline_run: str, base_m: int, base_tau: float) -> tuple[int, float]:
    """(M, τ) of a run folder name: `-M<digits>`, `-tau<x>`; the baseline run and absent parts → baseline."""
    import re as _re

    if name == baseline_run:
        return base_m, base_tau
    m = _re.search(r"-M(\d+)", name)
    t = _re.search(r"-tau(\d+(?:\.\d+)?)", name)
    return (int(m.group(1)) if m else base_m), (float(t.group(1)) if t else base_tau)


def _describe(vals: Sequence[float], prefix: str) -> dict:
    """mean/std/SEM/CI95/quartiles/min/max of a sample, keys prefixed."""
    v = np.asarray([x for x in vals if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {f"{prefix}_{k}": np.nan for k in ("n", "mean", "std", "sem", "ci95", "q25", "median", "q75", "min", "max")}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    sem = sd / math.sqrt(v.size) if v.size > 1 else 0.0
    return {f"{prefix}_n": int(v.size), f"{prefix}_mean": float(v.mean()), f"{prefix}_std": sd, f"{prefix}_sem": sem,
            f"{prefix}_ci95": 1.96 * sem, f"{prefix}_q25": float(np.quantile(v, 0.25)),
            f"{prefix}_median": float(np.median(v)), f"{prefix}_q75": float(np.quantile(v, 0.75)),
            f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}


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
        out.update(_describe(ns, f"cha_groups_{subset}"))
        out.update(_describe(pcts, f"cha_budget_pct_{subset}"))
        all_n += ns
        all_pct += pcts
    out.update(_describe(all_n, "cha_groups"))
    out.update(_describe(all_pct, "cha_budget_pct"))
    return out


@dataclass
class SensitivityOptions:
    """Inputs of `11_summarize_sensitivity_analysis.py`."""

    stats_root: Path
    out_dir: Path
    baseline_M: int = 43008
    baseline_tau: float = 0.2
    baseline_run_name: str = _MAIN
    quality_thresholds: list[float] = field(default_factory=lambda: [0.50, 0.60, 0.70, 0.75, 0.80, 0.85])
    min_rule_dataset_coverage: float = DEFAULT_MIN_COVERAGE
    score_scopes: list[str] = field(default_factory=lambda: ["all_fit"])
    paper_fig_dir: Path | None = None


def _heatmap(piv: pd.DataFrame, path: Path, title: str) -> None:
    """Annotated heatmap of counts (rows = factor values, columns = thresholds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.9 * max(1, piv.shape[1]), 1 + 0.6 * max(1, piv.shape[0])))
    data = piv.to_numpy(float) if piv.size else np.zeros((1, 1))
    ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(piv.shape[1]))
    ax.set_xticklabels([f"{c:.2f}" for c in piv.columns], fontsize=7)
    ax.set_yticks(range(piv.shape[0]))
    ax.set_yticklabels([str(i) for i in piv.index], fontsize=7)
    for (i, j), v in np.ndenumerate(data if piv.size else np.zeros((0, 0))):
        ax.text(j, i, "NA" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def summarize_sensitivity(opts: SensitivityOptions) -> pd.DataFrame:
    """Script 11: HQ counts and CHA budget per sensitivity run (M and τ varied one at a time)."""
    from lib.caching_and_prompting import ArtifactError
    from lib.result_loading import find_run_dirs, layout_for_stats_root, task_model_from_path

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
            _heatmap(counts, plots / f"quality_threshold_sensitivity_heatmap_{factor}{sfx}.pdf", f"{scope}: {factor}")
    compact_df = pd.DataFrame(compact)
    write_csv_atomic(compact_df, plots / "quality_threshold_sensitivity_compact.csv")
    tau_rows = df[np.isclose(df["M"].astype(float), float(opts.baseline_M))].drop_duplicates("run").sort_values("tau")
    bud = tau_rows[["run", "tau", "cha_groups_mean", "cha_groups_sem", "cha_budget_pct_mean", "cha_budget_pct_sem"]]
    write_csv_atomic(bud, plots / "cha_budget_vs_tau.csv")
    plt = _plt()
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
        import shutil

        Path(opts.paper_fig_dir).mkdir(parents=True, exist_ok=True)
        for pdf in sorted(plots.glob("*.pdf")):
            shutil.copyfile(pdf, Path(opts.paper_fig_dir) / pdf.name)
    return df


# =========================================================================== artifact check


@dataclass(frozen=True)
class Requirement:
    """One artifact the tables need: any of `paths` must exist."""

    label: str
    paths: tuple[Path, ...]
    needed_by: tuple[str, ...]

    def present(self) -> bool:
        return any(p.exists() for p in self.paths)


DEFAULT_CHECK_ROLES = ("main", "spectral_split", "random_anchor", "fake")


def _run_alternatives(layout: ExperimentLayout, role: str) -> list[str]:
    return [canonical_run_mode(role), canonical_run_mode(role, decode_only=False)]


def artifact_requirements(layout: ExperimentLayout, roles: Sequence[str], bruteforce: bool,
                          check_cache: bool = True) -> list[Requirement]:
    """What scripts 8-11 and the paper tables read for one (task, model)."""
    reqs = [Requirement("model folder", (layout.model_dir,), ("all tables",))]
    if check_cache:
        reqs.append(Requirement("stage-1 answers", (layout.cache_dir / "llm_io_data.pkl",), ("pipeline reruns",)))
    fr = layout.feature_report_dir
    reqs.append(Requirement("baseline performance", (fr / "dataset_stats.json", fr / "scores.csv"), ("table9",)))
    for role in roles:
        names = _run_alternatives(layout, role)
        stats = tuple(layout.stats_dir(n) for n in names)
        by = ("table1", "table2", "script8", "script9", "script10") if role == "main" else ("table2", "script8", "script10")
        reqs.append(Requirement(f"{role} stage-7 stats folder", stats, by))
        reqs.append(Requirement(f"{role} rule metrics", tuple(s / f for s in stats for f in (
            "rule_combo_metrics_all_scopes.csv", "rule_combo_metrics_test_selected_all.csv")), by))
        reqs.append(Requirement(f"{role} rule metrics manifest (HQ-T/HQ-F)",
                                tuple(s / "rule_combo_metrics_manifest.json" for s in stats), by))
        if role == "main":
            reqs.append(Requirement("main flip table", tuple(s / f for s in stats for f in (
                "scores.csv", "flip_stats_global.json")), ("table1", "script8")))
            reqs.append(Requirement("main flip stats by neuron", tuple(s / "flip_stats_by_neuron.csv" for s in stats),
                                    ("table1", "table10", "table11")))
            opts = [parse_run_mode(n) for n in names]
            reqs.append(Requirement("main discovery manifest", tuple(layout.circuits_dir(o) / "manifest.json"
                                                                     for o in opts), ("table10", "table11")))
            for subset in BASELINE_SUBSETS:
                dirs = tuple(layout.baseline_dir(o, subset) for o in opts)
                reqs.append(Requirement(f"main stage-6 {subset} buckets", tuple(d / "neuron_buckets.json" for d in dirs),
                                        ("table3", "table13", "script9")))
                reqs.append(Requirement(f"main stage-6 {subset} knockout summary",
                                        tuple(d / "rule_knockout.json" for d in dirs), ("table3", "table12", "script9")))
    if bruteforce:
        opts = [parse_run_mode(n) for n in _run_alternatives(layout, "bruteforce")]
        for subset in BASELINE_SUBSETS:
            dirs = tuple(layout.baseline_dir(o, subset) for o in opts)
            reqs.append(Requirement(f"brute-force stage-6 {subset} buckets",
                                    tuple(d / "neuron_buckets.json" for d in dirs), ("table3",)))
    return reqs


def check_artifacts(data_root: Path, cache_root: Path, pairs: Sequence[tuple[str, str]] | None,
                    roles: Sequence[str] = DEFAULT_CHECK_ROLES,
                    bruteforce_pairs: Sequence[tuple[str, str]] = (("arithmetic", "Qwen/Qwen2-7B-Instruct"),),
                    check_cache: bool = True) -> tuple[list[Requirement], list[Requirement]]:
    """(all requirements, missing ones) for the given (task, model) pairs, or every model folder found."""
    if pairs is None:
        pairs = [(md.task, md.model) for md in find_model_dirs(data_root)] if Path(data_root).is_dir() else []
    reqs: list[Requirement] = []
    for task, model in sorted(pairs, key=lambda p: sort_key_task_model(*p)):
        layout = ExperimentLayout(Path(data_root), task, model, Path(cache_root))
        reqs += artifact_requirements(layout, roles, (task, model) in set(bruteforce_pairs), check_cache)
    return reqs, [r for r in reqs if not r.present()]


# =========================================================================== export cleaning

_STATS_FILES = (
    r"flip_stats_by_neuron\.csv", r"flip_stats_global\.json", r"flip_stats_top\d+\.pdf",
    r"flip_semantic_wrong_top\d+\.pdf", r"final_stats_exclusion\.json", r"semantic_runtime_config\.json",
    r"rule_combo_metrics_[a-z_0-9]+\.csv", r"rule_combo_metrics_manifest\.json", r"rule_metrics_summary[a-z_]*\.json",
    r"rule_metrics[a-z_]*\.tex", r"rule_metrics_distributions[a-z_]*\.pdf",
    r"high_quality_neuron_flip_coverage[a-z_]*\.(?:json|tex|pdf)", r"agonist_metric_[a-z_]+\.(?:csv|json|pdf|png)",
)
_STAGE6_FILES = (r"neuron_buckets\.json", r"neuron_bucket_stats\.json", r"rule_knockout\.json", r"cost_summary\.json")
EXPORT_ALLOW = tuple(
    [r"<MODEL>/feature_report/(?:dataset_stats|features)\.json"]
    + [r"<MODEL>/rule_extraction_results/neuron_flip_rules/stats/<RUN>/" + f for f in _STATS_FILES]
    + [r"<MODEL>/neural_circuit_discovery_results(?:_fake_targets)?/eap_ig_inputs/<LABEL>/<LABEL>/"
       r"(?:positive|negative)_baseline/" + f for f in _STAGE6_FILES]
    + [r"<MODEL>/neural_circuit_discovery_results(?:_fake_targets)?/eap_ig_inputs/<LABEL>/neural_circuits/"
       r"(?:manifest|dataset_info)\.json"])


def _always_dropped(rel: Path) -> bool:
    """Pickles, cache folders, policy-tag (`is_correct_*`) folders and macOS junk."""
    parts = rel.parts
    if rel.suffix == ".pkl" or rel.name == ".DS_Store" or rel.name.startswith("._"):
        return True
    return any(p == "cache" or p.endswith("_cache") or p.startswith("is_correct_") or p == "__MACOSX"
               for p in parts[:-1])


_MODEL_MARKERS = ("feature_report", "rule_extraction_results", "neural_circuit_discovery_results",
                  "neural_circuit_discovery_results_fake_targets")


def generalise_path(rel: str) -> str:
    """Replace the task/model prefix, run folder and circuit/bag labels of a relative path by placeholders."""
    parts = rel.replace("\\", "/").strip("/").split("/")
    cut = next((i for i, part in enumerate(parts) if part in _MODEL_MARKERS), None)
    if cut is None:
        return "/".join(parts)
    text = "/".join(["<MODEL>"] + parts[cut:])
    text = re.sub(r"(/stats/)[^/]+/", r"\1<RUN>/", text)
    text = re.sub(r"(/eap_ig_inputs/)[^/]+/neural_circuits/", r"\1<LABEL>/neural_circuits/", text)
    return re.sub(r"(/eap_ig_inputs/)(?!<LABEL>/neural_circuits/)[^/]+/[^/]+/", r"\1<LABEL>/<LABEL>/", text)


def plan_export(data_dir: Path, reference_zip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(files to copy, files dropped) relative to `data_dir`, by the allow-list or a reference zip's shapes."""
    import zipfile

    data_dir = Path(data_dir)
    if reference_zip is not None:
        with zipfile.ZipFile(reference_zip) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
        shapes = {generalise_path(n) for n in names if not _always_dropped(Path(n))}
        allowed = shapes.__contains__
    else:
        pats = [re.compile(p + "$") for p in EXPORT_ALLOW]
        allowed = lambda g: any(p.match(g) for p in pats)  # noqa: E731
    keep, drop = [], []
    for p in sorted(x for x in data_dir.rglob("*") if x.is_file()):
        rel = p.relative_to(data_dir)
        if not _always_dropped(rel) and allowed(generalise_path(str(rel))):
            keep.append(rel)
        else:
            drop.append(rel)
    return keep, drop
