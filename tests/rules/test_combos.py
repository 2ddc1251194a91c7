"""OR-combo selection and frozen scoring (stage 3 §8) on hand-built rules tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.rules.combos import combo_expression, find_best_or_combo, score_frozen_combo
from lib.rules.metrics import mcc_from_counts


def rules(*texts: str, negated: tuple[bool, ...] | None = None) -> pd.DataFrame:
    return pd.DataFrame({
        "rule_index": list(range(len(texts))),
        "is_negated": list(negated or [t.startswith("NOT(") for t in texts]),
        "rule_expression": list(texts),
        "component_type": ["rule"] * len(texts),
    })


def hand_mcc(tp: int, fp: int, tn: int, fn: int) -> float:
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


# 10 rows; y = 1 on rows 0-3. Literal a fires on rows 0,1 ; b on rows 2,3 ; c on rows 0,1,2,4,5.
TABLE = pd.DataFrame({"a": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                      "b": [0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
                      "c": [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]})
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=float)


def test_mcc_from_counts_matches_hand_values():
    assert mcc_from_counts(2, 0, 6, 2) == pytest.approx(hand_mcc(2, 0, 6, 2), abs=1e-9)
    assert mcc_from_counts(3, 2, 4, 1) == pytest.approx(hand_mcc(3, 2, 4, 1), abs=1e-9)
    assert mcc_from_counts(0, 0, 6, 4) == 0.0                       # nothing fires → 0
    assert mcc_from_counts(0, 0, 6, 4, zero_den=-np.inf) == -np.inf


def test_greedy_picks_union_of_two_complementary_literals():
    rt = rules("a >= 0.5", "b >= 0.5", "c >= 0.5")
    rec = find_best_or_combo(rt, TABLE, Y)
    # singles: a → tp2 fp0 tn6 fn2 ; b same ; c → tp3 fp2 tn4 fn1
    assert rec["best_single_MCC"] == pytest.approx(hand_mcc(2, 0, 6, 2), abs=1e-9)
    assert rec["found_solution"] and rec["success"] and rec["perfect_match"]
    assert rec["chosen_from"] == "greedy"
    assert rec["selected_literals"] == ["a >= 0.5", "b >= 0.5"]
    assert rec["selected_rule_indices"] == [0, 1]
    assert rec["expression"] == "(a >= 0.5) OR (b >= 0.5)"
    assert rec["MCC"] == pytest.approx(1.0, abs=1e-9)
    assert rec["best_greedy_MCC"] == pytest.approx(1.0, abs=1e-9)
    assert rec["empty_MCC"] == 0.0 and rec["screen_topk"] == 3
    assert rec["dataset_coverage"] == pytest.approx(0.4)
    assert rec["problem"] == "classification" and rec["target"] == "y_target"
    assert rec["best_greedy_MCC_by_seed_metric"] == {"MCC": rec["best_greedy_MCC"]}
    for key in ("P(target=1|fire)", "R(fire|target=1)", "F1(target=1|fire)", "Lift(target=1|fire)", "Acc",
                "TPR", "TNR", "BalancedAcc", "greedy_seed_metrics", "greedy_winning_seed_metric",
                "greedy_winning_seed_literal"):
        assert key in rec


def test_negated_literal_text_is_evaluated_as_complement():
    # NOT(c < 0.5) fires exactly where c >= 0.5 → same MCC as c alone: tp3 fp2 tn4 fn1.
    rt = rules("NOT(c < 0.5)")
    rec = find_best_or_combo(rt, TABLE, Y)
    assert rec["best_single_MCC"] == pytest.approx(hand_mcc(3, 2, 4, 1), abs=1e-9)
    assert rec["selected_literals"] == ["NOT(c < 0.5)"]
    assert rec["chosen_from"] == "single"          # greedy reaches the same MCC with as many literals


def test_tie_goes_to_earliest_literal():
    # Two literals with identical masks: the first in table order wins, alone.
    rt = rules("a >= 0.5", "a > 0.5")
    rec = find_best_or_combo(rt, TABLE, Y)
    assert rec["selected_literals"] == ["a >= 0.5"]
    assert rec["chosen_from"] == "single"
    assert rec["MCC"] == pytest.approx(hand_mcc(2, 0, 6, 2), abs=1e-9)


def test_screened_order_not_table_order_breaks_greedy_ties():
    # b-like literal listed after a weaker one: greedy first picks the best single, then completes.
    rt = rules("c >= 0.5", "a >= 0.5", "b >= 0.5")
    rec = find_best_or_combo(rt, TABLE, Y)
    assert rec["selected_literals"] == ["a >= 0.5", "b >= 0.5"]


def test_only_negative_literals_choose_empty():
    rt = rules("a < 0.5 & b < 0.5")                    # fires exactly on negatives → MCC −1
    rec = find_best_or_combo(rt, TABLE, Y)
    assert rec["found_solution"] and rec["chosen_from"] == "empty"
    assert rec["selected_literals"] == [] and rec["expression"] == "FALSE"
    assert rec["MCC"] == 0.0


@pytest.mark.parametrize("y", [np.ones(10), np.zeros(10)])
def test_one_class_target_gives_failure_record(y):
    rec = find_best_or_combo(rules("a >= 0.5"), TABLE, y)
    assert rec["found_solution"] is False and rec["success"] is False
    assert rec["reason"]
    assert "selected_rule_indices" not in rec
    assert rec["expression"] == "FALSE"


def test_regression_target_uses_top_tail_event():
    t = np.arange(10, dtype=float)[::-1]               # rows 0 has the largest value
    tab = pd.DataFrame({"x": np.arange(10, dtype=float)})
    rec = find_best_or_combo(rules("x < 1", "x < 5"), tab, t, tail_q=0.9)
    assert rec["problem"] == "regression" and rec["target"] == "y_target_tail_event"
    assert rec["reg_event_threshold"] == pytest.approx(np.quantile(t, 0.9))
    assert rec["selected_literals"] == ["x < 1"] and rec["perfect_match"]
    for key in ("reg_tail_q", "reg_event_direction", "r_pb", "cohen_d", "mean_shift", "r2_seg",
                "prec_tail", "rec_tail", "f1_tail", "lift_tail"):
        assert key in rec


def test_frozen_scoring_fields_and_counts():
    rt = rules("a >= 0.5", "b >= 0.5", "c >= 0.5")
    rec = find_best_or_combo(rt, TABLE, Y)
    # Another scope: 6 rows; the combo fires on rows 0 and 3; y positive on rows 0, 1.
    other = pd.DataFrame({"a": [1, 0, 0, 0, 0, 0], "b": [0, 0, 0, 1, 0, 0], "c": [0, 0, 0, 0, 1, 1]})
    y2 = np.array([1, 1, 0, 0, 0, 0], dtype=float)
    out = score_frozen_combo(rec, rt, other, y2, scope_name="test", chosen_from="frozen_train_combo_scored_on_test")
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (1, 1, 3, 1)
    assert (out["n_eval"], out["n_pos"], out["n_neg"], out["n_fire"]) == (6, 2, 4, 2)
    assert out["MCC"] == pytest.approx(hand_mcc(1, 1, 3, 1), abs=1e-9)
    assert out["Precision"] == out["P(target=1|fire)"] == pytest.approx(0.5)
    assert out["target_prevalence"] == pytest.approx(2 / 6)
    assert out["rule_fire_rate"] == out["dataset_coverage"] == pytest.approx(2 / 6)
    assert out["computed_on"] == out["score_scope"] == "test"
    assert out["chosen_from"] == "frozen_train_combo_scored_on_test"
    assert out["selection_MCC"] == pytest.approx(rec["MCC"])
    assert out["selection_best_single_MCC"] == rec["best_single_MCC"]
    assert out["selection_best_greedy_MCC_by_seed_metric"] == rec["best_greedy_MCC_by_seed_metric"]
    for key in ("empty_MCC", "best_single_MCC", "best_greedy_MCC", "best_greedy_MCC_by_seed_metric"):
        assert isinstance(out[key], float) and math.isnan(out[key])
    for key in ("selection_empty_MCC", "selection_best_greedy_MCC", "selection_greedy_winning_seed_metric",
                "selection_greedy_winning_seed_literal"):
        assert key in out
    assert out["expression"] == rec["expression"]


def test_frozen_scoring_reads_list_strings_from_csv():
    rt = rules("a >= 0.5", "b >= 0.5")
    rec = find_best_or_combo(rt, TABLE, Y)
    row = pd.read_csv(pd.io.common.StringIO(pd.DataFrame([rec]).to_csv(index=False))).iloc[0].to_dict()
    out = score_frozen_combo(row, rt, TABLE, Y, scope_name="train_again")
    assert out["MCC"] == pytest.approx(1.0, abs=1e-9) and out["chosen_from"] == "greedy"


def test_frozen_scoring_of_failure_record_fires_nowhere():
    rec = find_best_or_combo(rules("a >= 0.5"), TABLE, np.ones(10))
    out = score_frozen_combo(rec, rules("a >= 0.5"), TABLE, Y, scope_name="test")
    assert out["n_fire"] == 0 and out["MCC"] == 0.0 and out["found_solution"] is False


def test_combo_expression():
    assert combo_expression([]) == "FALSE"
    assert combo_expression(["NOT(a < 1)", "b >= 2"]) == "(NOT(a < 1)) OR (b >= 2)"


def test_min_support_drops_literals_with_too_few_rows_on_either_side():
    # a fires on 2 rows, b on 2, c on 5 (and misses 5): with a minimum support of 3 only c is a candidate
    rt = rules("a >= 0.5", "b >= 0.5", "c >= 0.5")
    rec = find_best_or_combo(rt, TABLE, Y, min_support=3)
    assert rec["selected_literals"] == ["c >= 0.5"]
    assert rec["n_candidates_below_min_support"] == 2 and rec["min_support"] == 3
    none = find_best_or_combo(rt, TABLE, Y, min_support=6)  # c misses only 5 rows
    assert not none["found_solution"] and none["n_candidates_below_min_support"] == 3


def test_max_literals_cuts_the_greedy_path():
    rt = rules("a >= 0.5", "b >= 0.5", "c >= 0.5")
    assert find_best_or_combo(rt, TABLE, Y)["selected_literals"] == ["a >= 0.5", "b >= 0.5"]
    one = find_best_or_combo(rt, TABLE, Y, max_literals=1)
    assert len(one["selected_literals"]) == 1 and one["max_literals"] == 1
