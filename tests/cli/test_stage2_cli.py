"""Stage 2 through its command line on a stage-1 table with a planted rule (no analysed model needed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from lib.core.files_and_cache import atomic_write_pickle
from lib.tasks.arithmetic_task import TASK_SPEC, parse_arithmetic_prompt, true_result
from tests.llm_protocol_server import LLMProtocolServer

SCRIPT = REPO / "2_generate_features.py"
GOOD_SRC = "def my_feature(prompt: str, info: dict):\n    return 1.0 if info['operand_a'] < 15 else 0.0"


def planted_pickle(path: Path, n: int = 400) -> Path:
    """Stage-1 cache where the 'model' is right exactly when operand a < 15."""
    ns = argparse.Namespace(prompt_format="few_shot", operand_range=(0, 30), max_prompts=n, seed=0)
    records = TASK_SPEC.build_prompts(ns, model_alias=None)
    answers = []
    for r in records:
        info = parse_arithmetic_prompt(r["prompt"])
        truth = true_result(info)
        good = info["operand_a"] < 15 and truth is not None
        answers.append(f"{int(truth) if good and float(truth).is_integer() else (truth if good else 9999)}\n")
    atomic_write_pickle(path, TASK_SPEC.assemble_cache(records, answers, ns))
    return path


def stage2(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pkl(tmp_path_factory) -> Path:
    return planted_pickle(tmp_path_factory.mktemp("s1") / "llm_io_data.pkl")


FILTERS = ["--drop_near_duplicate_features", "--drop_low_predictive_power_features", "--min_delta", "0.2"]


def test_seed_features_only_end_to_end_and_byte_identical_rerun(pkl, tmp_path):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    for out in (out1, out2):
        res = stage2("-i", str(pkl), "-o", str(out), "--no_llm_feature_generation", *FILTERS)
        assert res.returncode == 0, res.stderr
    assert (out1 / "scores.csv").read_bytes() == (out2 / "scores.csv").read_bytes()
    df = pd.read_csv(out1 / "scores.csv")
    feats = json.loads((out1 / "features.json").read_text())
    assert len(feats) >= 20 and all(f["origin"] == "predefined" for f in feats)
    assert set(feats[0]) == {"label", "description", "python_src", "fn_name", "origin"}
    assert list(df.columns[:7]) == ["operator_group", "prompt", "num_out", "raw_output", "is_correct", "is_pure",
                                    "row_id"]
    assert list(df.columns[-2:]) == ["is_test", "split"]
    feature_cols = df.columns[7:-2]
    assert len(feature_cols) == len(feats) and not df[feature_cols].isna().any().any()
    assert abs(df["is_test"].mean() - 0.2) < 0.02
    assert (df["split"] == np.where(df["is_test"], "test", "train")).all()
    assert df["prompt"].tolist() == sorted(df["prompt"], reverse=True)
    report = (out1 / "feature_report.md").read_text()
    assert "| Same sign | predefined |  | dropped | constant on train rows |" in report
    entry = json.loads((out1 / "run_manifest.json").read_text())["stages"]["stage2"]
    assert entry["seed"] == 42 and entry["config"]["no_llm_feature_generation"] is True
    assert entry["config"]["features_scores_dir"] == str(out1)


def test_llm_features_over_the_openai_protocol(pkl, tmp_path):
    reply = json.dumps([
        {"label": "Left operand below 15", "description": "a < 15", "python_src": GOOD_SRC},
        {"label": "Sneaky", "description": "x", "python_src": "def f(prompt: str, info: dict):\n    import os\n    return 1"},
        {"label": "Broken", "description": "x", "python_src": "def f(prompt: str, info: dict):\n    return (("},
    ])
    out = tmp_path / "out"
    args = ["-i", str(pkl), "-o", str(out), "--ai_model", "openai:gpt-4o-mini", "--rounds", "1",
            "--cache_dir", str(tmp_path / "llm"), "--num_correct_example_prompts", "200",
            "--num_incorrect_example_prompts", "200", *FILTERS]
    with LLMProtocolServer([reply]) as server:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.url + "/v1", "NO_PROXY": "127.0.0.1",
               "MECHARULE_LLM_MAX_RETRIES": "0"}
        res = stage2(*args, env=env)
        assert res.returncode == 0, res.stderr
        assert server.hits == 1
        body = server.requests[0].body
        first = (out / "scores.csv").read_bytes()
        res = stage2(*args, env=env)  # warm cache: no call, same bytes
        assert res.returncode == 0, res.stderr
        assert server.hits == 1 and (out / "scores.csv").read_bytes() == first
    system = next(m["content"] for m in body["messages"] if m["role"] == "system")
    assert system == TASK_SPEC.SYSTEM_PROMPT  # the whole system prompt, not its first character
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    df = pd.read_csv(out / "scores.csv")
    for prompt in df.loc[df["is_test"], "prompt"]:
        assert repr(prompt) not in user  # the feature LLM never sees held-out prompts
    assert sum(repr(p) in user for p in df.loc[~df["is_test"], "prompt"]) > 100
    assert "left_operand_below_15" in df.columns
    expected = [1.0 if parse_arithmetic_prompt(p)["operand_a"] < 15 else 0.0 for p in df["prompt"]]
    assert df["left_operand_below_15"].tolist() == expected
    report = (out / "feature_report.md").read_text()
    assert "| Left operand below 15 | llm | 1 | kept |" in report
    assert "| Sneaky | llm | 1 | dropped | sandbox: static check" in report
    assert "| Broken | llm | 1 | dropped | sandbox: static check" in report
    feats = json.loads((out / "features.json").read_text())
    assert feats[-1]["label"] == "Left operand below 15" and feats[-1]["fn_name"] == "my_feature"


def test_local_backend_runs_offline_and_still_completes(pkl, tmp_path):
    """SmolLM2-135M rarely writes a valid feature (see docs/DEVIATIONS.md); the run must still finish."""
    out = tmp_path / "out"
    res = stage2("-i", str(pkl), "-o", str(out), "--ai_model", "local:smollm2-135m-instruct-q4_1", "--rounds", "1",
                 "--max_proposal_attempts", "1", "--max_tokens", "48", "--n_features", "2",
                 "--num_correct_example_prompts", "4", "--num_incorrect_example_prompts", "4",
                 "--cache_dir", str(tmp_path / "llm"))
    assert res.returncode == 0, res.stderr
    assert "round 1:" in res.stdout
    assert len(json.loads((out / "features.json").read_text())) >= 20
    assert "| llm | 1 |" in (out / "feature_report.md").read_text()


def test_selection_never_reads_test_rows():
    from lib.pipeline.stage2_features import select_features

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    X[:, 3] = X[:, 2] * 2  # a duplicate
    y = (X[:, 0] + 0.1 * rng.normal(size=300) > 0).astype(int)
    train = rng.random(300) > 0.2
    args = argparse.Namespace(drop_high_mad_variance_features=True, z_thresh=10, drop_low_predictive_power_features=True,
                              train_ratio=1.0, seed=0, min_auc=0.0, min_delta=0.2, min_ap_above_base=0.0,
                              drop_near_duplicate_features=True, near_duplicate_features_threshold=0.9999)
    keep, _ = select_features(X, y, train, [str(j) for j in range(8)], args)
    X2, y2 = X.copy(), y.copy()
    X2[~train] = rng.normal(size=((~train).sum(), 8)) * 1e6
    X2[~train, 5] = 7.0
    y2[~train] = 1 - y2[~train]
    assert select_features(X2, y2, train, [str(j) for j in range(8)], args)[0] == keep
    assert 3 not in keep and 0 in keep


def test_missing_pickle_is_a_clear_error(tmp_path):
    res = stage2("-i", str(tmp_path / "nope.pkl"), "-o", str(tmp_path / "out"), "--no_llm")
    assert res.returncode == 2 and "nope.pkl" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "scores.csv").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--train_ratio", "2"], "--train_ratio must be in [0, 1], got 2.0"),
    (["--n_features", "0"], "--n_features must be >= 1, got 0"),
    (["--temperature", "warm"], "--temperature"),
    (["--seed", "x"], "--seed"),
])
def test_bad_flag_value_exits_2_naming_the_flag(pkl, tmp_path, extra, needle):
    res = stage2("-i", str(pkl), "-o", str(tmp_path / "out"), *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
