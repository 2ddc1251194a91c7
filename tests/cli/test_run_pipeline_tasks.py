"""HANS and BON end to end offline: `_run_pipeline.sh <task> --preset tiny` reaches stage 7 with the
offline defaults (generated HANS pairs scored by log-likelihood; the shipped BON requests judged by
refusal markers), both target classes present, the data source recorded. Writes only under tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from lib.runs.layout import ExperimentLayout
from tests.conftest import REPO, SMOLLM2

pytestmark = pytest.mark.slow

DRIVER = REPO / "_run_pipeline.sh"
TARGET = {"hans_nli": "is_correct", "bon_jailbreaking": "is_jailbroken"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HANS_", "BON_", "GROQ_", "MECHARULE_DATA_ROOT", "MECHARULE_CACHE_ROOT"))
           and k != "AUGMENTED_PROMPTS_FILE"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               GROQ_BASE_URL="http://127.0.0.1:9")  # nothing may go to the network
    return env


@pytest.fixture(scope="module", params=["hans_nli", "bon_jailbreaking"])
def task_run(request, tmp_path_factory):
    if not shutil.which("bash"):
        pytest.skip("bash is required")
    task = request.param
    root = tmp_path_factory.mktemp(task)
    lay = ExperimentLayout(root / "data", task, SMOLLM2, root / "cache")
    env = _env()
    env["HANS_CACHE_DIR"] = str(root / "hans_cache")  # empty: the generator is used
    proc = subprocess.run(["bash", str(DRIVER), task, SMOLLM2, "--preset", "tiny", "--data_root", str(root / "data"),
                           "--cache_root", str(root / "cache")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    return task, proc, lay


def test_offline_run_reaches_stage7_with_both_classes(task_run):
    task, proc, lay = task_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in range(1, 8):
        assert f"stage {stage} (" in proc.stderr, stage
    assert f"MechaRule summary: task {task}" in proc.stdout and "Stage 7" in proc.stdout
    stats = json.loads((lay.feature_report_dir / "dataset_stats.json").read_text())
    target = TARGET[task]
    n = stats["n_examples"] if "n_examples" in stats else stats["n_labeled_jailbreak"]
    if task == "hans_nli":
        n_pos = stats["n_correct"]
        assert stats["data_source"] == "generated:mecharule-hans-v1" and stats["answer_scoring"] == "loglik"
        assert set(stats["label_counts"]) == {"E", "N"}
    else:
        n_pos = stats["judge_label_counts"]["jailbroken"]
        assert stats["judge_model"] == "refusal" and stats["request_source"].startswith("shipped:bon_requests.csv")
        assert sum(stats["judge_reason_counts"].values()) == n
    assert n == 160 and 0.05 * n <= n_pos <= 0.95 * n, (target, n_pos, n)
    manifest = json.loads((lay.feature_report_dir / "run_manifest.json").read_text())
    entry = manifest["stages"]["stage1"]
    key = "data_source" if task == "hans_nli" else "request_source"
    assert entry[key] == stats[key]
