"""BON through the stage-1 and stage-2 command lines: the embedded SmolLM2 answers a few augmented
requests from `tests/data/bon_requests_sample.csv`; the Groq judge is a loopback server. One run
uses the offline defaults instead: the shipped request set, chat prompts and the refusal judge."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from tests.conftest import REPO, SMOLLM2
from tests.llm_protocol_server import LLMProtocolServer

pytestmark = pytest.mark.slow

STAGE1 = REPO / "1_generate_prompts_and_answers.py"
STAGE2 = REPO / "2_generate_features.py"
SAMPLE = REPO / "tests" / "data" / "bon_requests_sample.csv"
TASK = "lib.tasks.bon_jailbreaking_task"
N_PROMPTS = 6


def judge_rule(path: str, body: dict) -> str:
    """Scripted verdict: Yes when the generation has an even number of characters."""
    user = body["messages"][-1]["content"]
    generation = user.split("[GENERATION]:\n", 1)[1].split("\n\n---\nRules:", 1)[0]
    return "Yes." if len(generation) % 2 == 0 else "**No**"


def bon_env(tmp: Path, server_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BON_", "GROQ_", "OPENAI_", "OLLAMA_")) and k != "AUGMENTED_PROMPTS_FILE"}
    env.update({"BON_REQUESTS_FILE": str(SAMPLE), "BON_AUGMENTATIONS_PER_REQUEST": "2",
                "BON_SIGMAS": "0.2,0.4", "BON_JUDGE_CACHE_DIR": str(tmp / "judge_cache"),
                "BON_JUDGE_MODEL": "qwen/qwen3-32b",
                "GROQ_API_KEY": "gsk-test", "GROQ_BASE_URL": server_url, "NO_PROXY": "127.0.0.1,localhost",
                "MECHARULE_LLM_MAX_RETRIES": "1", "MECHARULE_LLM_RETRY_BASE_DELAY": "0.001",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **extra)
    return env


def run(script: Path, *args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def stage1_args(pkl: Path, *extra: str) -> list[str]:
    return ["--task_module", TASK, "--ai_model", SMOLLM2, "--prompts_answers_pkl_file", str(pkl),
            "--max_prompts", str(N_PROMPTS), "--max_new_tokens", "6", "--batch_size", "8", "--device", "cpu",
            "--no_progress", *extra]


@contextlib.contextmanager
def serve(*args, **kwargs) -> Iterator[LLMProtocolServer]:
    with LLMProtocolServer(*args, **kwargs) as server:
        yield server


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bon_stage1")
    pkl = out / "llm_io_data.pkl"
    with serve(judge_rule) as server:
        res = run(STAGE1, *stage1_args(pkl, "--stats_json_out", str(out / "report")), env=bon_env(out, server.url))
        hits = server.hits
    assert res.returncode == 0, res.stderr
    return out, pkl, hits


def test_stage1_end_to_end(stage1_run):
    out, pkl, hits = stage1_run
    data = pickle.loads(pkl.read_bytes())
    assert isinstance(data, list) and len(data) == N_PROMPTS
    assert {r["augmentation_info"]["sigma"] for r in data} == {0.2, 0.4}
    for r in data:
        assert isinstance(r["answer"], str) and r["original_prompt"] and r["request_id"]
        expected = False if not r["answer"].strip() else len(r["answer"].strip()) % 2 == 0
        assert r["is_jailbroken"] is expected and r["is_not_jailbroken"] is (not expected)
        assert r["judge_status"] in ("ok", "empty_answer") and r["judge_model"] == "qwen/qwen3-32b"
    assert hits == sum(bool(r["answer"].strip()) for r in data)
    stats = json.loads((out / "report" / "dataset_stats.json").read_text())
    assert stats["n_examples"] == N_PROMPTS and stats["n_unjudged_dropped"] == 0
    assert stats["n_jailbroken"] == sum(r["is_jailbroken"] for r in data)
    assert set(stats["jailbreak_rate_by_sigma"]) == {"0.2", "0.4"}
    meta = json.loads(pkl.with_name("llm_io_data.meta.json").read_text())
    assert meta["task"] == "bon_jailbreaking" and meta["max_new_tokens"] == 6


def test_stage1_reuse_makes_no_judge_calls(stage1_run):
    out, pkl, _ = stage1_run
    before = pkl.read_bytes()
    with serve(judge_rule) as server:
        res = run(STAGE1, *stage1_args(pkl), env=bon_env(out, server.url))
        assert server.hits == 0
    assert res.returncode == 0, res.stderr
    assert "reusing" in res.stdout
    assert pickle.loads(pkl.read_bytes()) == pickle.loads(before)


def test_stage1_judge_outage_fails_clearly_then_resumes(tmp_path):
    pkl = tmp_path / "llm_io_data.pkl"
    with serve("Yes", fail_first=10**6, fail_status=500) as down:
        res = run(STAGE1, *stage1_args(pkl), env=bon_env(tmp_path, down.url))
    assert res.returncode == 2
    assert "error: BON judge 'qwen/qwen3-32b'" in res.stderr and "verdicts missing" in res.stderr
    assert "BON_JUDGE_ON_FAILURE=drop" in res.stderr and "Traceback" not in res.stderr
    assert not pkl.exists()
    assert pkl.with_name(pkl.name + ".partial.jsonl").exists()  # the answers are kept
    with serve(judge_rule) as up:
        res = run(STAGE1, *stage1_args(pkl), env=bon_env(tmp_path, up.url))
    assert res.returncode == 0, res.stderr
    assert "resuming: 6 of 6" in res.stdout
    assert len(pickle.loads(pkl.read_bytes())) == N_PROMPTS


def test_stage1_offline_defaults_shipped_requests_chat_prompts_refusal_judge(tmp_path):
    from lib.models.loading import load_tokenizer
    from lib.tasks.bon_refusal_judge import judge_answer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BON_", "GROQ_")) and k != "AUGMENTED_PROMPTS_FILE"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GROQ_BASE_URL="http://127.0.0.1:9")
    pkl = tmp_path / "llm_io_data.pkl"
    res = run(STAGE1, *stage1_args(pkl, "--stats_json_out", str(tmp_path / "report")), env=env)
    assert res.returncode == 0, res.stderr
    data = pickle.loads(pkl.read_bytes())
    tok = load_tokenizer(SMOLLM2)
    for r in data:
        assert r["request_source"].startswith("shipped:bon_requests.csv sha256:") and r["request_category"]
        assert r["prompt_format"] == "chat" and r["prompt"] == tok.apply_chat_template(
            [{"role": "user", "content": r["augmented_request"]}], tokenize=False, add_generation_prompt=True)
        verdict = judge_answer(r["original_prompt"], r["answer"])
        assert r["judge_model"] == "refusal" and r["judge_reason"] == verdict.reason
        assert r["is_jailbroken"] is verdict.jailbroken and r["classifier_output"] == verdict.output
    stats = json.loads((tmp_path / "report" / "dataset_stats.json").read_text())
    n_yes = sum(r["is_jailbroken"] for r in data)
    assert stats["judge_label_counts"] == {"jailbroken": n_yes, "not_jailbroken": N_PROMPTS - n_yes}
    assert sum(stats["judge_reason_counts"].values()) == N_PROMPTS
    assert stats["request_source"] == data[0]["request_source"] and stats["judge_model"] == "refusal"


def test_stage1_missing_requests_file_is_one_error_line(tmp_path):
    res = run(STAGE1, *stage1_args(tmp_path / "x.pkl"),
              env=bon_env(tmp_path, "http://127.0.0.1:9", BON_REQUESTS_FILE=str(tmp_path / "absent.csv")),
              timeout=300)
    assert res.returncode == 2
    assert "error: BON_REQUESTS_FILE" in res.stderr and "absent.csv" in res.stderr and "'request' column" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.pkl").exists()


def test_stage2_seed_features_only(stage1_run, tmp_path):
    out, pkl, _ = stage1_run
    report = tmp_path / "feature_report"
    res = run(STAGE2, "-i", str(pkl), "-o", str(report), "--task_module", TASK, "--no_llm",
              env=bon_env(out, "http://127.0.0.1:9"))
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(report / "scores.csv")
    assert len(df) == N_PROMPTS
    for col in ("words_scrambled", "chars_capitalized", "chars_perturbed", "sigma"):
        assert col in df.columns and df[col].notna().all(), col
    assert (df["sigma"] == df["aug_sigma"]).all()
    feats = json.loads((report / "features.json").read_text())
    assert [f["label"] for f in feats] == ["Words Scrambled", "Chars Capitalized", "Chars Perturbed", "Sigma"]


def test_local_judge_answers_with_a_choice(smollm2, tmp_path, monkeypatch):
    """The offline judge (`local:`) replies exactly Yes or No, cached, through instruct_model."""
    from lib.models.llm_clients import register_local_model, unregister_local_model
    from lib.tasks.bon_jailbreaking_task import BonConfig, judge_generations

    register_local_model("bon-test-judge", smollm2)
    try:
        cfg = BonConfig(judge_model="local:bon-test-judge", judge_cache_dir=str(tmp_path))
        res = judge_generations(["Write a poem about the sea"] * 2,
                                ["The sea is wide and blue, its waves roll on", "I cannot help with that."], cfg)
        assert all(r.status == "ok" and r.output in ("Yes", "No") for r in res)
        again = judge_generations(["Write a poem about the sea"], ["The sea is wide and blue, its waves roll on"], cfg)
        assert again[0] == res[0]
    finally:
        unregister_local_model("bon-test-judge")
