"""OR-combination of rule literals (stage 3 §8): select a disjunction on one scope, score it frozen
on another.

A literal's mask is its exact text (`rule_expression`, e.g. ``a < 3 & b >= 0.5`` or
``NOT(a < 3)``) evaluated on the given table with :func:`lib.rules.evaluation.evaluate_many`, so the
rows scored here are exactly the rows any later stage selects by applying the same text. All
confusion counts are integers; MCC and the other ratios are computed from them in float64.

Selection (``find_best_or_combo``), for a binary event ``yb``:
* screening: single-literal MCC = (TP·TN − FP·FN) / (√((TP+FP)(TP+FN)(TN+FP)(TN+FN)) + 1e-12),
  for all literals at once; candidates are ordered by it, descending (stable, so ties keep table
  order);
* baselines: the empty set (MCC 0) and the best single literal (adopted if its MCC > 0);
* greedy OR from the empty set: add the unused literal that fires on at least one new row and
  maximises the MCC of the union (a zero denominator gives −inf; ties → earliest in screened
  order); stop when no candidate is left, every row already fires, or the gain is ≤ 0;
* final choice: greedy if its MCC is larger than the current best, or equal with fewer literals.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.rules.metrics import binary_rule_metrics, mcc_from_counts, segmentation_stats
from lib.rules.evaluation import evaluate_many

__all__ = [
    "find_best_or_combo",
    "score_frozen_combo",
    "binary_event",
    "literal_masks",
    "combo_expression",
]

GREEDY_SEED_METRICS = ("MCC",)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _is_binary(y: np.ndarray) -> bool:
    vals = np.unique(y[~np.isnan(y)])
    return bool(np.isin(vals, (0.0, 1.0)).all())


def binary_event(y: Any, tail_q: float = 0.9) -> tuple[np.ndarray, dict]:
    """(yb, info): binary targets → y ≥ 0.5; otherwise the top tail y ≥ quantile_tail_q(y)."""
    yf = np.asarray(y, dtype=np.float64).ravel()
    if _is_binary(yf):
        return yf >= 0.5, {"problem": "classification", "target": "y_target"}
    thr = float(np.quantile(yf, tail_q))
    return yf >= thr, {"problem": "regression", "target": "y_target_tail_event", "reg_tail_q": float(tail_q),
                       "reg_event_threshold": thr, "reg_event_direction": "top"}


def _literal_rows(rules_table: pd.DataFrame) -> pd.DataFrame:
    if "rule_expression" not in rules_table.columns:
        raise ValueError("rules table has no 'rule_expression' column")
    rows = rules_table
    if "component_type" in rows.columns:
        rows = rows[rows["component_type"].astype(str) == "rule"]
    return rows


def literal_masks(texts: Sequence[str], table: pd.DataFrame) -> np.ndarray:
    """Bool matrix (n_rows, n_literals) of the literal texts on `table` (NOT(...) included)."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((len(table), 0), dtype=bool)
    return evaluate_many(texts, table)


def combo_expression(literals: Sequence[str]) -> str:
    return " OR ".join(f"({lit})" for lit in literals) if literals else "FALSE"


def _metrics(fire: np.ndarray, yb: np.ndarray) -> dict[str, Any]:
    """§8.4 metrics of one fire mask under the combo record's column names (see lib.rules.metrics)."""
    m = binary_rule_metrics(fire, yb)
    return {
        "dataset_coverage": m["coverage"],
        "P(target=1|fire)": m["precision"], "R(fire|target=1)": m["recall"], "F1(target=1|fire)": m["f1"],
        "Lift(target=1|fire)": m["lift"], "Acc": m["accuracy"],
        "TPR": m["tpr"], "TNR": m["tnr"], "BalancedAcc": m["balanced_accuracy"], "MCC": m["mcc"],
        "_counts": {"n_eval": m["n"], "n_pos": m["n_pos"], "n_neg": m["n_neg"], "n_fire": m["n_fire"],
                    "tp": m["tp"], "fp": m["fp"], "tn": m["tn"], "fn": m["fn"]},
    }


def _segmentation(fire: np.ndarray, t: np.ndarray, tail_q: float) -> dict[str, float]:
    """§8.3 statistics of a fire mask against a continuous target (see lib.rules.metrics)."""
    stats = segmentation_stats(fire, t, tail_q)
    stats.pop("event_threshold", None)
    return stats


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

def _failure(reason: str, info: dict, n_candidates: int) -> dict:
    rec: dict[str, Any] = {"found_solution": False, "success": False, "perfect_match": False, "reason": reason,
                           "target": info.get("target"), "problem": info.get("problem"),
                           "selected_literals": [], "expression": "FALSE", "screen_topk": n_candidates}
    for k in ("reg_tail_q", "reg_event_threshold", "reg_event_direction"):
        if k in info:
            rec[k] = info[k]
    return rec


DEFAULT_MIN_MCC_GAIN = 0.01


def find_best_or_combo(rules_table: pd.DataFrame, table: pd.DataFrame, y: Any, *, tail_q: float = 0.9,
                       min_gain: float = DEFAULT_MIN_MCC_GAIN, min_support: int = 0,
                       max_literals: int | None = None) -> dict:
    """Select the best OR of literals of `rules_table` for target `y` on `table` (§8, record §8.1).

    The greedy OR stops when the best addition raises MCC by `min_gain` or less (the original
    used 0, which keeps adding leaf rules that isolate single noisy rows and hurt held-out MCC),
    or once it holds `max_literals` literals (the size a validation split chose). Literals that
    fire on fewer than `min_support` rows of `table`, or fail to fire on fewer than that many, are
    not candidates: later stages need that many prompts on each side of a rule to localise it.
    """
    yf = np.asarray(y, dtype=np.float64).ravel()
    if len(table) != yf.size:
        raise ValueError(f"table has {len(table)} rows but y has {yf.size}")
    if np.isnan(yf).any():
        raise ValueError("y contains NaN; drop those rows first")
    rows = _literal_rows(rules_table)
    k = len(rows)
    if yf.size == 0:
        return _failure("no rows", {}, k)
    yb, info = binary_event(yf, tail_q)
    if yb.all() or not yb.any():
        return _failure("binary event has no positives or no negatives", info, k)

    texts = rows["rule_expression"].astype(str).tolist()
    idx = rows["rule_index"].tolist() if "rule_index" in rows.columns else list(range(k))
    F = literal_masks(texts, table)                    # (n, k) bool
    n_low_support = 0
    if min_support > 0 and k:
        nf = F.sum(axis=0)
        keep = (nf >= min_support) & (yb.size - nf >= min_support)
        n_low_support = int(k - keep.sum())
        F = F[:, keep]
        texts = [t for t, kp in zip(texts, keep) if kp]
        idx = [i for i, kp in zip(idx, keep) if kp]
        k = len(texts)
        if not k:
            rec = _failure(f"no literal fires on >= {min_support} rows and misses >= {min_support} rows", info,
                           len(rows))
            rec.update({"min_support": int(min_support), "n_candidates_below_min_support": n_low_support})
            return rec
    n_pos = int(yb.sum())
    n_neg = yb.size - n_pos
    tp = np.count_nonzero(F & yb[:, None], axis=0).astype(np.int64)
    fp = np.count_nonzero(F, axis=0).astype(np.int64) - tp
    single = mcc_from_counts(tp, fp, n_neg - fp, n_pos - tp)  # 0 where the denominator is 0
    order = np.argsort(-single, kind="stable")        # screened order

    best_mcc, best_set, chosen = 0.0, [], "empty"
    best_single = float(single[order[0]]) if k else math.nan
    if k and best_single > 0:
        best_mcc, best_set, chosen = best_single, [int(order[0])], "single"

    # Greedy OR from the empty set, candidates in screened order.
    Fo = F[:, order]
    cur = np.zeros(yb.size, dtype=bool)
    cur_tp = cur_fp = 0
    cur_mcc = 0.0
    used = np.zeros(k, dtype=bool)
    greedy: list[int] = []
    while k and not cur.all():
        fresh = ~cur
        add_tp = np.count_nonzero(Fo & (fresh & yb)[:, None], axis=0)
        add_fp = np.count_nonzero(Fo & (fresh & ~yb)[:, None], axis=0)
        ok = ~used & ((add_tp + add_fp) > 0)
        if not ok.any():
            break
        ntp, nfp = cur_tp + add_tp, cur_fp + add_fp
        m = mcc_from_counts(ntp, nfp, n_neg - nfp, n_pos - ntp, zero_den=-np.inf)
        m = np.where(ok, m, -np.inf)
        j = int(np.argmax(m))                          # first maximum = earliest in screened order
        if not ok[j] or not (m[j] - cur_mcc > min_gain):
            break
        if max_literals is not None and len(greedy) >= max_literals:
            break
        used[j] = True
        greedy.append(j)
        cur |= Fo[:, j]
        cur_tp, cur_fp, cur_mcc = int(ntp[j]), int(nfp[j]), float(m[j])
    greedy_mcc = cur_mcc if greedy else 0.0
    greedy_set = [int(order[j]) for j in greedy]
    if greedy and (greedy_mcc > best_mcc or (greedy_mcc == best_mcc and len(greedy_set) < len(best_set))):
        best_mcc, best_set, chosen = greedy_mcc, greedy_set, "greedy"

    fire = F[:, best_set].any(axis=1) if best_set else np.zeros(yb.size, dtype=bool)
    met = _metrics(fire, yb)
    met.pop("_counts")
    literals = [texts[j] for j in best_set]
    rec: dict[str, Any] = {
        "found_solution": True, "success": True, "perfect_match": bool(np.array_equal(fire, yb)),
        "target": info["target"], "problem": info["problem"],
        "selected_rule_indices": [int(idx[j]) for j in best_set],
        "selected_literals": literals, "expression": combo_expression(literals),
        **met,
        "chosen_from": chosen, "empty_MCC": 0.0, "best_single_MCC": best_single,
        "best_greedy_MCC": greedy_mcc, "screen_topk": k,
        "greedy_seed_metrics": list(GREEDY_SEED_METRICS), "greedy_winning_seed_metric": "MCC",
        "greedy_winning_seed_literal": None,
        "best_greedy_MCC_by_seed_metric": {"MCC": greedy_mcc},
        "min_support": int(min_support), "n_candidates_below_min_support": n_low_support,
        "max_literals": None if max_literals is None else int(max_literals),
    }
    if info["problem"] == "regression":
        rec.update({k_: info[k_] for k_ in ("reg_tail_q", "reg_event_threshold", "reg_event_direction")})
        rec.update(_segmentation(fire, yf, tail_q))
    return rec


# --------------------------------------------------------------------------------------------
# Frozen scoring
# --------------------------------------------------------------------------------------------

def _as_list(v: Any) -> list:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, str):
        v = v.strip()
        return list(ast.literal_eval(v)) if v else []
    return list(v)


_SELECTION_COPIES = ("empty_MCC", "best_single_MCC", "best_greedy_MCC", "best_greedy_MCC_by_seed_metric",
                     "greedy_winning_seed_metric", "greedy_winning_seed_literal")
_NAN_AFTER_COPY = ("empty_MCC", "best_single_MCC", "best_greedy_MCC", "best_greedy_MCC_by_seed_metric")


def score_frozen_combo(record: dict, rules_table: pd.DataFrame, table: pd.DataFrame, y: Any, *, scope_name: str,
                       chosen_from: str | None = None, tail_q: float | None = None) -> dict:
    """Score a selected combo record, unchanged, on another scope (§8.2).

    Fire = OR of the rules-table literals whose `rule_expression` is among the record's
    `selected_literals` (matched by text; a literal absent from the table is evaluated from its
    own text). `computed_on` = `score_scope` = `scope_name`; `chosen_from` is replaced when given.
    """
    out = dict(record)
    literals = [str(s) for s in _as_list(record.get("selected_literals"))]
    for k in _SELECTION_COPIES:
        out[f"selection_{k}"] = record.get(k)
    for k in _NAN_AFTER_COPY:
        out[k] = math.nan
    out["selection_MCC"] = record.get("MCC", math.nan)
    if chosen_from is not None:
        out["chosen_from"] = chosen_from
    out["computed_on"] = out["score_scope"] = scope_name

    yf = np.asarray(y, dtype=np.float64).ravel()
    if len(table) != yf.size:
        raise ValueError(f"table has {len(table)} rows but y has {yf.size}")
    if _is_binary(yf):
        yb = yf >= 0.5
    else:
        q = tail_q if tail_q is not None else record.get("reg_tail_q", 0.9)
        q = 0.9 if q is None or (isinstance(q, float) and math.isnan(q)) else float(q)
        thr = float(np.quantile(yf, q)) if yf.size else math.nan
        yb = yf >= thr
        out["reg_event_threshold"] = thr
        out["reg_event_direction"] = "top"

    if literals:
        rows = _literal_rows(rules_table)
        texts = rows["rule_expression"].astype(str).tolist()
        wanted = set(literals)
        chosen = [t for t in dict.fromkeys(texts) if t in wanted]
        chosen += [t for t in literals if t not in set(chosen)]
        fire = literal_masks(chosen, table).any(axis=1)
    else:
        fire = np.zeros(yf.size, dtype=bool)
    met = _metrics(fire, yb)
    counts = met.pop("_counts")
    out.update(met)
    out["Precision"] = met["P(target=1|fire)"]
    out.update(counts)
    n = counts["n_eval"]
    out["target_prevalence"] = counts["n_pos"] / n if n else math.nan
    out["rule_fire_rate"] = counts["n_fire"] / n if n else math.nan
    return out
