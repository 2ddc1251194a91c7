"""The table stages 4–7 read: TRAIN rows only, NaN filling, regimes, primary rules, prompt identity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.pipeline.feature_table import (load_analysis_table, load_primary_rules, prompts_sha256, regime_mask,
                                rule_mask)
from lib.core.files_and_cache import ArtifactError
from lib.tasks.arithmetic_task import TASK_SPEC


def _table(tmp_path):
    df = pd.DataFrame({"prompt": [f"{i}+1=" for i in range(6)],
                       "is_correct": [True, False, True, True, False, False],
                       "is_test": [False, False, True, False, False, True],
                       "feat": [1.0, np.nan, 3.0, 4.0, 0.5, 2.0],
                       "flag": [True, None, False, True, False, True]})
    df.to_csv(tmp_path / "scores.csv", index=False)
    return df


def test_train_rows_regimes_and_nan_filling(tmp_path):
    _table(tmp_path)
    t = load_analysis_table(tmp_path, TASK_SPEC)
    assert t.df["original_idx"].tolist() == [0, 1, 3, 4]
    assert t.df["feat"].tolist() == [1.0, 0.0, 4.0, 0.5]
    assert t.df["flag"].tolist() == [True, False, True, False]
    pos = load_analysis_table(tmp_path, TASK_SPEC, "positive")
    assert pos.df["original_idx"].tolist() == [0, 3] and pos.target.all()
    assert len(pos.train_df) == 4  # the mean-ablation pool keeps both classes
    neg = load_analysis_table(tmp_path / "scores.csv", TASK_SPEC, "negative")
    assert neg.df["original_idx"].tolist() == [1, 4]
    with pytest.raises(ValueError, match="baseline_subset"):
        regime_mask(np.array([True]), "both")


def test_rule_masks_and_errors(tmp_path):
    _table(tmp_path)
    t = load_analysis_table(tmp_path, TASK_SPEC)
    assert rule_mask(t.df, "feat >= 1").tolist() == [True, False, True, False]
    assert rule_mask(t.df, "feat >= 1", "negative").tolist() == [False, True, False, True]
    with pytest.raises(ArtifactError, match="cannot be evaluated"):
        rule_mask(t.df, "missing_column >= 1")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_analysis_table(tmp_path / "nope", TASK_SPEC)
    with pytest.raises(ArtifactError, match="no prompt column 'text'"):
        load_analysis_table(tmp_path, TASK_SPEC, prompt_col="text")


def test_primary_rules_and_prompt_identity(tmp_path):
    pd.DataFrame({"rule_index": [4], "is_negated": [False], "rule_expression": ["feat >= 1"],
                  "component_type": ["rule"], "coefficient_sign": ["positive"]}).to_csv(
        tmp_path / "optimal_rule_set_is_correct.csv", index=False)
    rules = load_primary_rules(tmp_path, "optimal_rule_set", "is_correct")
    assert rules["rule"].tolist() == ["feat >= 1"] and rules["rule_id"].tolist() == [0]
    with pytest.raises(ArtifactError, match="optimal_rule_set_is_correct_fake.csv"):
        load_primary_rules(tmp_path, "optimal_rule_set", "is_correct", fake_targets=True)
    assert prompts_sha256(["ab", "c"]) != prompts_sha256(["a", "bc"])
    assert prompts_sha256(["x"]) == prompts_sha256(["x"])
