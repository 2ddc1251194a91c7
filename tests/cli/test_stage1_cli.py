"""Stage 1 through its command line: end to end, reuse, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOLLM2

SCRIPT = REPO / "1_generate_prompts_and_answers.py"


def stage1(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--no_progress"], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def base_args(pkl: Path, n: int, bs: int = 8) -> list[str]:
    return ["--ai_model", SMOLLM2, "--prompts_answers_pkl_file", str(pkl), "--max_prompts", str(n),
            "--batch_size", str(bs), "--device", "cpu"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    pkl = out / "cache" / "llm_io_data.pkl"
    res = stage1(*base_args(pkl, 32), "--stats_json_out", str(out / "report"))
    assert res.returncode == 0, res.stderr
    return out, pkl, res


def test_end_to_end_writes_cache_stats_and_identity(stage1_run):
    out, pkl, res = stage1_run
    data = pickle.loads(pkl.read_bytes())
    assert list(data) == ["+", "-", "*", "/"]
    assert all(len(v) == 8 for v in data.values())  # operator-stratified subsample of 32
    prompt, num_out, raw, correct, pure = data["+"][0]
    assert prompt.endswith("=") and "\n" in prompt  # embedded default: few-shot block + query
    assert isinstance(raw, str) and isinstance(correct, bool) and isinstance(pure, bool)
    stats = json.loads((out / "report" / "dataset_stats.json").read_text())
    assert stats["n_examples"] == 32 and 0 <= stats["accuracy"] <= 1
    assert set(stats["accuracy_by_operator"]) == {"+", "-", "*", "/"}
    meta = json.loads(pkl.with_name("llm_io_data.meta.json").read_text())
    assert meta["ai_model"] == SMOLLM2 and meta["task"] == "arithmetic" and meta["n_prompts"] == 32
    assert not list(pkl.parent.glob("*.partial*")) and not list(pkl.parent.glob(".*tmp"))
    for folder in (pkl.parent, out / "report"):  # both output folders record the run
        entry = json.loads((folder / "run_manifest.json").read_text())["stages"]["stage1"]
        assert entry["seed"] == 42 and entry["device"] == "cpu" and entry["config"]["max_prompts"] == 32
        assert entry["config"]["prompt_format"] == "auto"  # the task's own flags too


def test_answers_are_the_models_real_answers(stage1_run, smollm2):
    from lib.models.generation import greedy_generate
    from lib.tasks.arithmetic_task import is_answer_correct

    _, pkl, _ = stage1_run
    rows = [r for v in pickle.loads(pkl.read_bytes()).values() for r in v][:8]
    again = greedy_generate(smollm2, [r[0] for r in rows], 6, batch_size=8, stop_strings=("\n",))
    assert again == [r[2] for r in rows]
    assert [is_answer_correct(r[0], r[2]) for r in rows] == [r[3] for r in rows]


def test_rerun_reuses_the_pickle(stage1_run):
    out, pkl, _ = stage1_run
    before = pkl.stat().st_mtime_ns
    res = stage1(*base_args(pkl, 32))
    assert res.returncode == 0, res.stderr
    assert "reusing" in res.stdout and pkl.stat().st_mtime_ns == before


def test_reuse_with_another_model_is_refused(stage1_run):
    _, pkl, _ = stage1_run
    res = stage1("--ai_model", "gemma-3-270m-q4_k_m", "--prompts_answers_pkl_file", str(pkl))
    assert res.returncode == 2
    assert "--regenerate" in res.stderr and str(pkl) in res.stderr


def test_killed_run_resumes_where_it_stopped(tmp_path, smollm2):
    from lib.models.generation import greedy_generate

    pkl = tmp_path / "llm_io_data.pkl"
    ckpt = tmp_path / "llm_io_data.pkl.partial.jsonl"
    args = [sys.executable, str(SCRIPT), *base_args(pkl, 24, bs=2), "--no_progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and ckpt.read_text().count("\n") >= 3:  # header + >= 2 answers
            break
        time.sleep(0.05)
    assert proc.poll() is None, "stage 1 finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not pkl.exists()
    n_done = ckpt.read_text().count("\n") - 1
    assert 0 < n_done < 24

    res = stage1(*base_args(pkl, 24, bs=2))
    assert res.returncode == 0, res.stderr
    assert f"resuming: {n_done} of 24" in res.stdout
    resumed = [r for v in pickle.loads(pkl.read_bytes()).values() for r in v]
    assert not ckpt.exists() and len(resumed) == 24
    # An uninterrupted generation of the same prompts gives the same answers.
    fresh = greedy_generate(smollm2, [r[0] for r in resumed], 6, batch_size=2, stop_strings=("\n",))
    assert fresh == [r[2] for r in resumed]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--task_module", "lib.tasks.no_such_task"], "--task_module"),
        (["--ai_model", "smollm9-unknown"], "unknown model 'smollm9-unknown'"),
        (["--ai_model", "missing/file.gguf"], "does not exist"),
        (["--batch_size", "0"], "--batch_size"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_artifact(tmp_path, extra, needle):
    pkl = tmp_path / "out" / "llm_io_data.pkl"
    res = stage1("--prompts_answers_pkl_file", str(pkl), "--max_prompts", "4", *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not pkl.exists() and not list(tmp_path.rglob("*.partial*"))


@pytest.mark.parametrize("extra, needle", [
    (["--device", "gpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
    (["--max_prompts", "-1"], "--max_prompts must be >= 0, got -1"),
    (["--prompt_format", "chat"], "--prompt_format"),  # a task flag
])
def test_bad_flag_value_exits_2_naming_the_flag(tmp_path, extra, needle):
    pkl = tmp_path / "llm_io_data.pkl"
    res = stage1("--prompts_answers_pkl_file", str(pkl), *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_unreadable_pickle_is_named(tmp_path):
    pkl = tmp_path / "llm_io_data.pkl"
    pkl.write_bytes(b"this is not a pickle")
    res = stage1(*base_args(pkl, 4))
    assert res.returncode == 2
    assert str(pkl) in res.stderr and "unreadable" in res.stderr and "Traceback" not in res.stderr


def test_unwritable_output_folder_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    pkl = blocker / "sub" / "llm_io_data.pkl"
    res = stage1(*base_args(pkl, 4))
    assert res.returncode == 2
    assert str(blocker / "sub") in res.stderr and "Traceback" not in res.stderr


def test_reuse_with_another_prompt_set_is_refused(stage1_run):
    _, pkl, _ = stage1_run
    res = stage1(*base_args(pkl, 16))
    assert res.returncode == 2
    assert "another prompt set" in res.stderr and "--regenerate" in res.stderr
