"""HANS through the stage-1 and stage-2 command lines, with the embedded SmolLM2 answering 32 fixture rows.

Data come from `tests/data/hans_sample.tsv` via HANS_LOCAL_FILE (no network).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, SMOLLM2
from lib.tasks.hans_nli_task import SEED_FEATURES

pytestmark = pytest.mark.slow

STAGE1 = REPO / "1_generate_prompts_and_answers.py"
STAGE2 = REPO / "2_generate_features.py"
SAMPLE = REPO / "tests" / "data" / "hans_sample.tsv"
TASK = "lib.tasks.hans_nli_task"
SEED_COLUMNS = [
    "lexical_overlap_ratio_1", "full_lexical_overlap_1", "hypothesis_is_subsequence_1", "premise_length",
    "hypothesis_length", "hypothesis_shorter_than_premise", "premise_has_negation_1", "hypothesis_has_negation_1",
    "lexical_overlap_heuristic", "subsequence_heuristic", "constituent_heuristic",
]


def hans_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANS_")}
    env.update({"HANS_LOCAL_FILE": str(SAMPLE), "HANS_NUM_EXAMPLES": "32"}, **extra)
    return env


def run(script: Path, *args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hans_stage1")
    pkl = out / "llm_io_data.pkl"
    res = run(STAGE1, "--task_module", TASK, "--ai_model", SMOLLM2, "--prompts_answers_pkl_file", str(pkl),
              "--batch_size", "16", "--device", "cpu", "--no_progress", "--stats_json_out", str(out / "report"),
              env=hans_env())
    assert res.returncode == 0, res.stderr
    return out, pkl


def test_stage1_end_to_end(stage1_run):
    out, pkl = stage1_run
    data = pickle.loads(pkl.read_bytes())
    assert isinstance(data, list) and len(data) == 32
    assert Counter(r["expected_label"] for r in data) == {"E": 16, "N": 16}
    assert [r["dataset_index"] for r in data] == list(range(32))
    assert all(isinstance(r["raw_output"], str) for r in data)
    assert {r["predicted_label"] for r in data} <= {"E", "N", None}
    assert all(isinstance(r["is_correct"], bool) for r in data)
    assert all(r["is_correct"] == (r["predicted_label"] == r["expected_label"]) for r in data)
    stats = json.loads((out / "report" / "dataset_stats.json").read_text())
    assert stats["n_examples"] == 32 and 0 <= stats["accuracy"] <= 1
    assert stats["label_counts"] == {"E": 16, "N": 16}
    assert set(stats["accuracy_by_heuristic"]) <= {"lexical_overlap", "subsequence", "constituent"}
    assert sum(v["n"] for v in stats["accuracy_by_heuristic"].values()) == 32
    assert "accuracy_by_subcase" in stats
    meta = json.loads(pkl.with_name("llm_io_data.meta.json").read_text())
    assert meta["task"] == "hans_nli" and meta["decoding"] == "loglik:tokens: E| N"
    # Log-likelihood scoring gives every row a label, so the target is not constant.
    assert {r["predicted_label"] for r in data} <= {"E", "N"}
    assert 0 < sum(r["is_correct"] for r in data) < 32
    assert all(r["answer_scoring"] == "loglik" for r in data)
    assert all((r["label_margin"] > 0) == r["is_correct"] for r in data)


def test_stage1_labels_match_direct_scoring(stage1_run, smollm2):
    from lib.models.label_scoring import score_continuations

    _, pkl = stage1_run
    data = pickle.loads(pkl.read_bytes())[:8]
    sc = score_continuations(smollm2, [r["prompt"] for r in data], [" E", " N"])
    assert sc.predicted() == [r["raw_output"] for r in data]
    for r, (e, n) in zip(data, sc.score):
        assert r["loglik_E"] == pytest.approx(e, abs=2e-3) and r["loglik_N"] == pytest.approx(n, abs=2e-3)


def test_stage1_free_generation_flag(tmp_path, smollm2):
    from lib.models.generation import greedy_generate

    pkl = tmp_path / "llm_io_data.pkl"
    res = run(STAGE1, "--task_module", TASK, "--ai_model", SMOLLM2, "--prompts_answers_pkl_file", str(pkl),
              "--batch_size", "16", "--device", "cpu", "--no_progress", "--max_prompts", "8",
              env=hans_env(HANS_SCORING="generate"))
    assert res.returncode == 0, res.stderr
    data = pickle.loads(pkl.read_bytes())
    again = greedy_generate(smollm2, [r["prompt"] for r in data], 3, batch_size=8)
    assert again == [r["raw_output"] for r in data]
    assert all(r["answer_scoring"] == "generate" for r in data)


def test_stage1_missing_local_file_is_one_error_line(tmp_path):
    res = run(STAGE1, "--task_module", TASK, "--ai_model", SMOLLM2, "--prompts_answers_pkl_file",
              str(tmp_path / "x.pkl"), "--device", "cpu", "--no_progress",
              env=hans_env(HANS_LOCAL_FILE=str(tmp_path / "absent.tsv")), timeout=300)
    assert res.returncode == 2
    assert "error: HANS_LOCAL_FILE" in res.stderr and "absent.tsv" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.pkl").exists()


def test_stage2_seed_features_only(stage1_run, tmp_path):
    _, pkl = stage1_run
    out = tmp_path / "feature_report"
    res = run(STAGE2, "-i", str(pkl), "-o", str(out), "--task_module", TASK, "--no_llm", env=hans_env())
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out / "scores.csv")
    assert len(df) == 32
    for col in SEED_COLUMNS:
        assert col in df.columns, col
        assert df[col].notna().all()
    # the dataset's own columns survive next to the clashing seed columns
    for col in ("lexical_overlap_ratio", "full_lexical_overlap", "premise", "hypothesis", "expected_label",
                "predicted_label", "raw_output", "is_correct", "row_id"):
        assert col in df.columns
    assert (df["lexical_overlap_ratio_1"] - df["lexical_overlap_ratio"]).abs().max() < 1e-9
    assert (df["premise_length"] == df["premise_num_words"]).all()
    # HANS's own split is kept as source_split; stage 2's split is train/test
    assert set(df["source_split"]) == {"validation"}
    assert set(df["split"]) == {"train", "test"}
    assert df["is_test"].dtype == bool and (df["is_test"] == (df["split"] == "test")).all()
    feats = json.loads((out / "features.json").read_text())
    assert [f["label"] for f in feats] == [f.label for f in SEED_FEATURES]
    assert all(f["origin"] == "predefined" for f in feats)
