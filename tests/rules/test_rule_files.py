"""Rule files: loading with fallback columns and defaults, errors naming the file, finding a stage's
rule files (pseudo targets included), the prompt column and file-type guesses."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from lib.core.files_and_cache import ArtifactError
from lib.rules.rule_files import detect_prompt_col, find_rule_files, guess_filetype, load_rules


def test_load_rules_fallbacks_and_defaults(tmp_path):
    p = tmp_path / "optimal_rule_set_is_correct.csv"
    pd.DataFrame({"string_rule": ["a < 1", "NOT(b >= 2)"], "coefficient_sign": ["negative", "negative"]}).to_csv(p, index=False)
    df = load_rules(p)
    assert list(df.columns) == ["rule_id", "rule", "coefficient_sign", "component_type"]
    assert df["rule"].tolist() == ["a < 1", "NOT(b >= 2)"]
    assert df["rule_id"].tolist() == [0, 1]
    assert df["coefficient_sign"].tolist() == ["positive", "positive"]  # forced for fallback columns
    assert df["component_type"].tolist() == ["rule", "rule"]

    j = tmp_path / "rules.json"
    j.write_text(json.dumps({"rules": [{"rule_expression": "(x > 1) OR (y < 2)", "rule_id": 7}]}))
    df = load_rules(j)
    assert df.to_dict("records") == [
        {"rule_id": 7, "rule": "(x > 1) OR (y < 2)", "coefficient_sign": "positive", "component_type": "rule"}
    ]

    j2 = tmp_path / "plain.json"
    j2.write_text(json.dumps(["a < 1", "b >= 2"]))
    assert load_rules(j2)["rule"].tolist() == ["a < 1", "b >= 2"]

    r = tmp_path / "with_rule.csv"
    pd.DataFrame({"rule_id": [5], "rule": ["a < 1"], "coefficient_sign": ["negative"],
                  "component_type": ["linear"]}).to_csv(r, index=False)
    assert load_rules(r).iloc[0].to_dict() == {"rule_id": 5, "rule": "a < 1", "coefficient_sign": "negative",
                                              "component_type": "linear"}

    h = tmp_path / "header_only.csv"
    h.write_text("rule_index,is_negated,rule_expression\n")
    assert len(load_rules(h)) == 0


def test_load_rules_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ArtifactError, match=re.escape(str(missing))):
        load_rules(missing)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"something": ["a < 1"]}).to_csv(bad, index=False)
    with pytest.raises(ArtifactError, match=r"bad\.csv.*no rule column.*'something'"):
        load_rules(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ArtifactError, match="empty.csv"):
        load_rules(empty)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ArtifactError, match="broken.json"):
        load_rules(broken)


def test_find_rule_files_includes_pseudo_targets(tmp_path):
    for name in ["optimal_rule_set_is_correct.csv", "optimal_rule_set_test_selected_is_correct.csv",
                 "optimal_rule_set_all_fit_is_correct.csv", "optimal_rule_set_is_correct_fake.csv",
                 "optimal_rule_set_x.json", "association_rules_is_correct.csv", "optimal_rule_setx.csv"]:
        (tmp_path / name).write_text("rule\n")
    found = find_rule_files(tmp_path, "optimal_rule_set")
    assert [t for t, _ in found] == ["all_fit_is_correct", "is_correct", "is_correct_fake", "test_selected_is_correct"]
    assert all(p.parent == tmp_path and p.suffix == ".csv" for _, p in found)
    assert find_rule_files(tmp_path, "association_rules") == [("is_correct", tmp_path / "association_rules_is_correct.csv")]
    assert find_rule_files(tmp_path / "missing", "optimal_rule_set") == []


def test_small_helpers(tmp_path):
    assert detect_prompt_col(pd.DataFrame(columns=["x", "question", "text"])) == "text"
    assert detect_prompt_col(pd.DataFrame(columns=["Prompt"])) == "Prompt"
    assert detect_prompt_col(pd.DataFrame(columns=["x"])) is None
    assert guess_filetype("a/b.CSV") == "csv"
    assert guess_filetype("r.json") == "json"
    assert guess_filetype("r.jsonl") == "jsonl"
    assert guess_filetype("r.csv.gz") == "csv"
    odd = tmp_path / "rules.txt"
    odd.write_text('{"rules": []}')
    assert guess_filetype(odd) == "json"
    odd.write_text("rule\na < 1\n")
    assert guess_filetype(odd) == "csv"
