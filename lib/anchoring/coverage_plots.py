"""Stage-7 HQ flip coverage (spec 7-11 §2.10): how many rows the units with high-quality rules flip.

Unit sets: all localised units (U), rule-bearing units (a rule row after the coverage floor), and
HQ units per score scope — HQ(TEST) = best held-out TEST rule (selected on TRAIN, scored on
`is_test` rows) reaches the threshold; HQ(ALL-FIT) = best descriptive all-rows fit does; the
descriptive test-selected scope is reported in the JSON too. Row scope: `is_test` rows for the
test scopes, all evaluated rows for ALL-FIT; every count, share and permutation p-value of a scope
is computed on that scope's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import atomic_path, atomic_write_json, atomic_write_text
from lib.anchoring.flip_stats import flip_flags
from lib.anchoring.units import Unit

__all__ = ["SCOPE_TITLES", "scope_rows", "coverage_block", "write_hq_coverage"]

SCOPE_TITLES = {"test": "HQ(TEST)", "test_selected": "HQ(TEST-selected)", "all_fit": "HQ(ALL-FIT)"}
_KINDS = ("any", "c2i", "i2c")
_PERM_SEEDS = {"any": 10, "c2i": 11, "i2c": 12}


def scope_rows(df: pd.DataFrame, scope: str) -> np.ndarray:
    """Rows of a score scope: `is_test` rows for test scopes, all rows for all_fit; ∧ `_evaluated`."""
    mask = np.ones(len(df), dtype=bool)
    if scope in ("test", "test_selected") and "is_test" in df.columns:
        mask &= df["is_test"].astype(bool).to_numpy()
    if "_evaluated" in df.columns:
        mask &= df["_evaluated"].astype(bool).to_numpy()
    return mask


def _mats(df: pd.DataFrame, units: Sequence[Unit]) -> dict[str, np.ndarray]:
    """{kind: [rows × units] float flags}."""
    return {k: (np.column_stack([flip_flags(df, u.column(k)) for u in units]) if units else np.zeros((len(df), 0)))
            for k in _KINDS}


def _union(mat: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> int:
    if not cols.any():
        return 0
    return int((np.nan_to_num(mat[rows][:, cols]) > 0.5).any(axis=1).sum())


def _sum(mat: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> int:
    return int(np.nansum(mat[rows][:, cols])) if cols.any() else 0


def _ratio(num: float, den: float) -> dict:
    return {"numerator": num, "denominator": den, "percent": (100.0 * num / den) if den else None}


def _perm_p(mat: np.ndarray, rows: np.ndarray, k: int, observed: int, seed: int, n_draws: int = 1000) -> float | None:
    """Share of random size-k unit subsets whose row union ≥ observed, (ge+1)/(n+1)."""
    n_units = mat.shape[1]
    if k <= 0 or n_units == 0:
        return None
    rng = np.random.default_rng(seed)
    flips = np.nan_to_num(mat[rows]) > 0.5
    ge = 0
    for _ in range(n_draws):
        cols = rng.choice(n_units, size=k, replace=False)
        ge += int(flips[:, cols].any(axis=1).sum() >= observed)
    return (ge + 1) / (n_draws + 1)


def coverage_block(df: pd.DataFrame, units: Sequence[Unit], mats: dict[str, np.ndarray], base: np.ndarray,
                   scope: str, hq: set[str], rule_bearing: set[str], threshold: float) -> dict:
    """Counts, eligible denominators, ratios and p-values of one score scope."""
    rows = scope_rows(df, scope)
    keys = np.array([u.neuron_key for u in units])
    is_hq = np.isin(keys, sorted(hq)) if len(keys) else np.zeros(0, bool)
    is_rb = np.isin(keys, sorted(rule_bearing)) if len(keys) else np.zeros(0, bool)
    all_cols = np.ones(len(units), dtype=bool)
    evaluated = ~np.all(np.isnan(mats["any"]), axis=1) if units else np.zeros(len(df), bool)
    elig = {"n_eval_baseline_valid": int((rows & evaluated).sum()),
            "n_eval_baseline_correct": int((rows & evaluated & base).sum()),
            "n_eval_baseline_incorrect": int((rows & evaluated & ~base).sum())}
    den = {"any": elig["n_eval_baseline_valid"], "c2i": elig["n_eval_baseline_correct"],
           "i2c": elig["n_eval_baseline_incorrect"]}
    out: dict = {"quality_threshold": threshold, "n_neurons_high_quality": int(is_hq.sum()),
                 "n_neurons_rule_bearing": int(is_rb.sum()),
                 "frac_neurons_high_quality": (int(is_hq.sum()) / len(units)) if units else None,
                 "high_quality_neurons": sorted(hq), "scope_n_rows": int(rows.sum()), "eligible_denominators": elig,
                 "all_rule_bearing_in_scope": {"n_eval_any": int((rows & ~np.all(np.isnan(mats["any"][:, is_rb]), axis=1)).sum())
                                               if is_rb.any() else 0},
                 "ratios": {}, "p_values": {}}
    for k in _KINDS:
        m = mats[k]
        u_high, s_high, u_all = _union(m, is_hq, rows), _sum(m, is_hq, rows), _union(m, all_cols, rows)
        out[f"flip_{k}"] = {"union_high": u_high, "sum_high": s_high, "union_all_in_scope": u_all,
                            "sum_all_in_scope": _sum(m, all_cols, rows),
                            "union_rule_bearing": _union(m, is_rb, rows), "sum_rule_bearing": _sum(m, is_rb, rows)}
        out["all_rule_bearing_in_scope"][f"union_{k}"] = _union(m, is_rb, rows)
        out["all_rule_bearing_in_scope"][f"sum_{k}"] = _sum(m, is_rb, rows)
        out["ratios"][f"prevalence_{k}"] = _ratio(u_high, den[k])
        out["ratios"][f"prevalence_all_{k}"] = _ratio(u_all, den[k])
        out["ratios"][f"prevalence_rule_bearing_{k}"] = _ratio(_union(m, is_rb, rows), den[k])
        out["ratios"][f"coverage_share_{k}"] = _ratio(u_high, u_all)
        out["ratios"][f"overlap_{k}"] = _ratio(s_high, u_high)
        out["p_values"][f"perm_union_{k}"] = _perm_p(m, rows, int(is_hq.sum()), u_high, _PERM_SEEDS[k])
    out["all_rule_bearing_in_scope"].update({"union_semantic_wrong": None, "sum_semantic_wrong": None})
    return out


def _pct(block: dict, key: str) -> float:
    v = block["ratios"][key]["percent"]
    return float("nan") if v is None else float(v)


def _plot_coverage(blocks: dict, n_total: int, n_rb: int, path: Path, primary: str, secondary: str) -> None:
    """2×2: subset sizes, eligible flip prevalence, coverage share, overlap (sum/union)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    p, s = blocks[primary], blocks[secondary]
    names = ["All localised", "Rule-bearing", SCOPE_TITLES[primary], SCOPE_TITLES[secondary]]
    sizes = [n_total, n_rb, p["n_neurons_high_quality"], s["n_neurons_high_quality"]]
    ax = axes[0, 0]
    bars = ax.bar(names, sizes, color=["#7f8c8d", "#95a5a6", "#c0392b", "#2471a3"])
    for b, v in zip(bars, sizes):
        ax.annotate(f"{v} ({100 * v / n_total:.0f}%)" if n_total else str(v), (b.get_x() + b.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=8)
    ax.set_title("(A) unit subsets", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[0, 1]
    labels = ["Any", "C→I", "I→C"]
    series = [("All localised (all rows)", [_pct(s, f"prevalence_all_{k}") for k in _KINDS], "#7f8c8d"),
              ("Rule-bearing (all rows)", [_pct(s, f"prevalence_rule_bearing_{k}") for k in _KINDS], "#95a5a6"),
              (f"{SCOPE_TITLES[primary]} (test rows)", [_pct(p, f"prevalence_{k}") for k in _KINDS], "#c0392b"),
              (f"{SCOPE_TITLES[secondary]} (all rows)", [_pct(s, f"prevalence_{k}") for k in _KINDS], "#2471a3")]
    x = np.arange(3)
    w = 0.2
    for i, (name, vals, color) in enumerate(series):
        ax.bar(x + (i - 1.5) * w, vals, w, label=name, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("% of eligible rows flipped (union)")
    ax.set_title("(B) eligible flip prevalence", fontsize=10)
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[1, 0], "coverage_share", "(C) HQ union ÷ all-unit union (in scope)"),
                           (axes[1, 1], "overlap", "(D) overlap: sum ÷ union of HQ flips")):
        for i, (blk, name, color) in enumerate(((p, SCOPE_TITLES[primary], "#c0392b"), (s, SCOPE_TITLES[secondary], "#2471a3"))):
            vals = [blk["ratios"][f"{key}_{k}"]["percent"] for k in _KINDS]
            vals = [np.nan if v is None else (v / 100.0 if key == "overlap" else v) for v in vals]
            ax.bar(x + (i - 0.5) * 0.35, vals, 0.35, label=name, color=color)
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1, 1].axhline(1.0, color="black", lw=0.8, ls="--")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def _by_layer(df: pd.DataFrame, units: Sequence[Unit], mats: dict, base: np.ndarray, hq_by_scope: dict[str, set[str]],
              rule_bearing: set[str], primary: str) -> list[dict]:
    """Per-layer unit counts and union flips (all rows for U; scope rows for each HQ set)."""
    out = []
    keys = np.array([u.neuron_key for u in units])
    all_rows = scope_rows(df, "all_fit")
    for lk in sorted({u.layer_key for u in units}, key=lambda k: next(u.layer for u in units if u.layer_key == k)):
        in_layer = np.array([u.layer_key == lk for u in units])
        rec: dict = {"layer_key": lk, "layer_sort": next(u.layer for u in units if u.layer_key == lk),
                     "n_neurons_total": int(in_layer.sum()),
                     "n_neurons_rule_bearing": int((in_layer & np.isin(keys, sorted(rule_bearing))).sum()),
                     "n_rows_with_any_eval_all": int((all_rows & ~np.all(np.isnan(mats["any"][:, in_layer]), axis=1)).sum())}
        for k in _KINDS:
            rec[f"flip_{k}_union_all"] = _union(mats[k], in_layer, all_rows)
        for scope, hq in hq_by_scope.items():
            rows = scope_rows(df, scope)
            cols = in_layer & np.isin(keys, sorted(hq))
            vals = {"n_neurons_high_quality": int(cols.sum()),
                    "n_rows_with_any_eval_high": int((rows & ~np.all(np.isnan(mats["any"][:, cols]), axis=1)).sum()) if cols.any() else 0}
            for k in _KINDS:
                vals[f"flip_{k}_union_high"] = _union(mats[k], cols, rows)
            rec.update({f"{n}_{scope}": v for n, v in vals.items()})
            if scope == primary:
                rec.update(vals)
        evaluated = ~np.all(np.isnan(mats["any"]), axis=1)
        n_c, n_i = int((all_rows & evaluated & base).sum()), int((all_rows & evaluated & ~base).sum())
        rec["pct_c2i_union_all"] = 100.0 * rec["flip_c2i_union_all"] / n_c if n_c else None
        rec["pct_i2c_union_all"] = 100.0 * rec["flip_i2c_union_all"] / n_i if n_i else None
        out.append(rec)
    return out


def _plot_by_layer(layers: list[dict], path: Path, scopes: Sequence[str]) -> None:
    """Unit-count bars (all, rule-bearing, HQ per scope) and c→i / i→c union-% lines per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 3), 4.5))
    x = np.arange(len(layers))
    series = [("All localised", "n_neurons_total", "#7f8c8d"), ("Rule-bearing", "n_neurons_rule_bearing", "#95a5a6")]
    series += [(SCOPE_TITLES[s], f"n_neurons_high_quality_{s}", c) for s, c in zip(scopes, ("#c0392b", "#2471a3"))]
    w = 0.8 / len(series)
    for i, (name, key, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [r[key] for r in layers], w, label=name, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer_key"] for r in layers], fontsize=8)
    ax.set_ylabel("units")
    ax2 = ax.twinx()
    ax2.plot(x, [np.nan if r["pct_c2i_union_all"] is None else r["pct_c2i_union_all"] for r in layers], "o-",
             color="#e67e22", label="C→I union % (all units)")
    ax2.plot(x, [np.nan if r["pct_i2c_union_all"] is None else r["pct_i2c_union_all"] for r in layers], "s--",
             color="#16a085", label="I→C union % (all units)")
    ax2.set_ylabel("% of eligible rows")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title("Localised, rule-bearing and HQ units per layer")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def write_hq_coverage(df: pd.DataFrame, units: Sequence[Unit], best_by_scope: dict[str, pd.DataFrame], qcol: str,
                      thresholds: dict[str, float], floor: float, main_metric: str, base: np.ndarray, out_dir: Path,
                      run: str) -> dict:
    """Write `high_quality_neuron_flip_coverage.{json,tex,pdf}` and `..._by_layer.{json,pdf}`; returns the JSON."""
    mats = _mats(df, units)
    hq_by_scope: dict[str, set[str]] = {}
    rb_by_scope: dict[str, set[str]] = {}
    for scope, best in best_by_scope.items():
        vals = pd.to_numeric(best[qcol], errors="coerce") if len(best) else pd.Series(dtype=float)
        hq_by_scope[scope] = set(best.loc[vals >= thresholds[scope] - 1e-12, "neuron_key"].astype(str)) if len(best) else set()
        rb_by_scope[scope] = set(best["neuron_key"].astype(str)) if len(best) else set()
    rule_bearing = set().union(*rb_by_scope.values()) if rb_by_scope else set()
    blocks = {s: coverage_block(df, units, mats, base, s, hq_by_scope[s], rb_by_scope[s], thresholds[s])
              for s in best_by_scope}
    primary, secondary = "test", "all_fit"
    p = blocks[primary]
    all_rows = scope_rows(df, "all_fit")
    prim_rows = scope_rows(df, primary)
    keys = np.array([u.neuron_key for u in units])
    is_hq = np.isin(keys, sorted(hq_by_scope[primary])) if len(keys) else np.zeros(0, bool)
    u_all = _union(mats["any"], np.ones(len(units), bool), prim_rows)
    obj = {
        "quality_metric": qcol, "quality_metric_label": qcol, "quality_threshold": thresholds[primary],
        "quality_thresholds_by_scope": thresholds, "min_dataset_coverage": floor, "primary_score_scope": primary,
        "primary_scope_semantics": "held out: combo selected on TRAIN rows only, scored on is_test rows only",
        "available_score_scopes": list(best_by_scope), "n_neurons_total": len(units),
        "n_neurons_rule_bearing": len(rule_bearing), "n_neurons_high_quality": p["n_neurons_high_quality"],
        "frac_neurons_high_quality": p["frac_neurons_high_quality"], "baseline_metric_col": main_metric,
        "eligible_denominators": p["eligible_denominators"],
        "flip_any": {"union_high": p["flip_any"]["union_high"], "sum_high": p["flip_any"]["sum_high"],
                     "union_all": u_all, "sum_all": _sum(mats["any"], np.ones(len(units), bool), prim_rows),
                     "union_share_of_all": (p["flip_any"]["union_high"] / u_all) if u_all else None,
                     "rows": "is_test rows (primary scope)",
                     "n_rows_with_any_eval_all": int((prim_rows & ~np.all(np.isnan(mats["any"]), axis=1)).sum()) if units else 0,
                     "n_rows_with_any_eval_high": int((prim_rows & ~np.all(np.isnan(mats["any"][:, is_hq]), axis=1)).sum())
                     if is_hq.any() else 0},
        "score_scopes": blocks,
        "scope_pair_diagnostics": {"n_hq_both": len(hq_by_scope[primary] & hq_by_scope[secondary]),
                                   "n_hq_test_only": len(hq_by_scope[primary] - hq_by_scope[secondary]),
                                   "n_hq_all_fit_only": len(hq_by_scope[secondary] - hq_by_scope[primary]),
                                   "same_hq_neuron_set": hq_by_scope[primary] == hq_by_scope[secondary]},
        "figure_semantics": {"A": "unit subset sizes (All localised, Rule-bearing, HQ(TEST), HQ(ALL-FIT))",
                             "B": "union of flips ÷ eligible rows; All/Rule-bearing/HQ(ALL-FIT) on all evaluated rows, "
                                  "HQ(TEST) on is_test rows",
                             "C": "HQ union ÷ union of all localised units, same rows",
                             "D": "sum of per-unit flips ÷ union (1 = no overlap)"},
        "n_rows_all": int(all_rows.sum()),
    }
    atomic_write_json(out_dir / "high_quality_neuron_flip_coverage.json", obj)
    s = blocks[secondary]
    lines = [f"% stage 7 HQ flip coverage, run {run}; HQ = best rule {qcol} >= threshold with coverage >= {floor}",
             f"\\newcommand{{\\HighQualMetric}}{{{qcol}}}",
             f"\\newcommand{{\\HighQualThr}}{{{thresholds[primary]:.2f}}}",
             f"\\newcommand{{\\HighQualThrAllFit}}{{{thresholds[secondary]:.2f}}}"]
    for blk, sfx in ((p, ""), (s, "AllFit")):
        pct_all = blk["ratios"]["coverage_share_any"]["percent"]
        pv = blk["p_values"]["perm_union_any"]
        lines += [f"\\newcommand{{\\HighQualNeurons{sfx}}}{{{blk['n_neurons_high_quality']}}}",
                  f"\\newcommand{{\\HighQualNeuronsPct{sfx}}}{{{100 * (blk['frac_neurons_high_quality'] or 0):.1f}}}",
                  f"\\newcommand{{\\HighQualityUnionFlipAny{sfx}}}{{{blk['flip_any']['union_high']}}}",
                  f"\\newcommand{{\\HighQualityUnionFlipAnyPctAll{sfx}}}{{{'--' if pct_all is None else f'{pct_all:.1f}'}}}",
                  f"\\newcommand{{\\HighQualityPUnionAny{sfx}}}{{{'--' if pv is None else f'{pv:.3g}'}}}"]
    atomic_write_text(out_dir / "high_quality_neuron_flip_coverage.tex", "\n".join(lines) + "\n")
    _plot_coverage(blocks, len(units), len(rule_bearing), out_dir / "high_quality_neuron_flip_coverage.pdf", primary, secondary)
    layers = _by_layer(df, units, mats, base, {sc: hq_by_scope[sc] for sc in blocks}, rule_bearing, primary)
    atomic_write_json(out_dir / "high_quality_neuron_flip_coverage_by_layer.json",
                      {"primary_score_scope": primary, "layers": layers})
    _plot_by_layer(layers, out_dir / "high_quality_neuron_flip_coverage_by_layer.pdf", (primary, secondary))
    return obj
