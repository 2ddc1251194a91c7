"""Stage 5 through its command line (in-process `main`) on a small arithmetic table.

24 few-shot prompts `…a+b=` with the model's answers (`raw_output`), feature `op1_small` (a < 10),
an `is_correct` target and 4 `is_test` rows. Rules: a real rule, a linear component (skipped)
and a rule over a missing column (an injected per-rule failure). The session's SmolLM2 is handed
to the stage (same weights, no second load).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, SMOLLM2, serve_loaded_model
from lib.core.files_and_cache import ArtifactError
from lib.pipeline.cli import UsageError, run_main
from lib.pipeline.stage4_sampling import PlanError

_spec = importlib.util.spec_from_file_location("stage5_cli", REPO / "5_discover_circuits.py")
stage5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage5)

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
RULES = ["op1_small >= 0.5", "op1_small < 0.5", "no_such_feature >= 1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """features/scores.csv and rules/optimal_rule_set_is_correct.csv."""
    root = tmp_path_factory.mktemp("stage5")
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(0, 10, 12), rng.integers(10, 30, 12)])
    b = rng.integers(0, 20, 24)
    answers = [str(x + y) if i % 3 else str(x + y + 1) for i, (x, y) in enumerate(zip(a, b))]
    df = pd.DataFrame({"prompt": [f"{FEW_SHOT}{x}+{y}=" for x, y in zip(a, b)],
                       "raw_output": [s + "\n" for s in answers],
                       "is_correct": np.arange(24) % 3 != 0,
                       "op1_small": (a < 10).astype(float),
                       "is_test": np.isin(np.arange(24), [2, 9, 15, 20])})
    (root / "features").mkdir()
    df.to_csv(root / "features" / "scores.csv", index=False)
    (root / "rules").mkdir()
    # a `rule` column keeps the file's component types (a `rule_expression` file is all literals)
    pd.DataFrame({"rule_id": [0, 1, 2], "rule": RULES,
                  "component_type": ["rule", "linear", "rule"], "coefficient_sign": "positive"}).to_csv(
        root / "rules" / "optimal_rule_set_is_correct.csv", index=False)
    return root


@pytest.fixture
def with_session_model(smollm2, monkeypatch):
    """The stage gets the already loaded SmolLM2 instead of loading it again."""
    import lib.pipeline.stage5_circuits as cd

    serve_loaded_model(monkeypatch, cd, smollm2)


def _argv(root: Path, out: str, *extra: str) -> list[str]:
    return ["--rules_dir", str(root / "rules"), "--rules_glob", "optimal_rule_set",
            "--features_scores_dir", str(root / "features"), "--ai_model", SMOLLM2, "--device", "cpu",
            "--cache_dir", str(root / "cache"), "--output_data_dir", str(root / out), "--no_progress", *extra]


FAST = ("--method", "EAP-IG-inputs", "--circuit_level", "neuron", "--circuit_size", "40", "--max_pairs_per_circuit",
        "3", "--points_to_use_for_mean_ablation", "6", "--batch_size", "4", "--max_ig_steps", "2",
        "--absolute_value_attributions")


def test_stage5_end_to_end_records_errors_and_resumes(workdir, with_session_model):
    out = workdir / "run"
    assert stage5.main(_argv(workdir, "run", *FAST)) == 1  # rule 2 fails → non-zero exit
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest] == ["ok", "skipped_linear", "error"]
    ok, lin, err = manifest
    assert ok["n_pairs"] == 3 and ok["sampling_strategy"] == "random" and ok["circuit_label"] == RULES[0]
    job = out / ok["scores_csv"]
    scores = json.loads(job.read_text())
    for key in ("level", "absolute", "include_special", "requested_n", "selected_n", "num_scored", "num_considered",
                "total_entities", "was_clipped", "score_range", "threshold", "empty_reason", "indices",
                "include_zero_scores", "d_model", "neuron_label_score", "neurons"):
        assert key in scores, key
    assert scores["selected_n"] == 40 and scores["d_model"] == 576 and scores["total_entities"] == 30 * 576
    labels = list(scores["neuron_label_score"])
    assert labels[0].startswith("('m") and sum(len(v) for v in scores["neurons"].values()) == 40
    mags = [abs(v) for v in scores["neuron_label_score"].values()]
    assert mags == sorted(mags, reverse=True)
    ev = json.loads((out / ok["eval_json"]).read_text())
    assert ev["circuit_edges"]["circuit_edges"] == 40 and 0 <= ev["faithfulness"]["mean"] <= 1
    assert len(ev["NL_c"]["data"]) == 1 and ok["faithfulness"] == ev["faithfulness"]
    assert json.loads((out / "is_correct" / "rule_1_op1-small-0-5" / "skipped.json").read_text())["skip_type"] == "linear"
    assert "no_such_feature" in err["reason"] and (out / err["error_json"]).is_file()
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["target_col"] == "is_correct" and info["dataset_size"] == 20 and info["analysis_mode"] == "rule"

    before = job.stat().st_mtime_ns
    assert stage5.main(_argv(workdir, "run", *FAST, "--keep_going")) == 0  # ok job reloaded, error retried
    assert job.stat().st_mtime_ns == before
    again = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in again] == ["ok", "skipped_linear", "error"]
    assert again[0]["metadata_topn"]["units"] == scores["units"]


def test_stage5_bad_inputs_are_clear_errors(workdir, tmp_path):
    with pytest.raises(ArtifactError, match="optimal_rule_set_is_correct.csv"):
        stage5.main(_argv(workdir, "x", "--rules_dir", str(tmp_path)))
    with pytest.raises(UsageError, match="unknown --method 'EAP-XYZ'"):
        stage5.main(_argv(workdir, "x", "--method", "EAP-XYZ"))
    with pytest.raises(SystemExit) as exc:  # a choice of the config: argparse rejects it (exit 2)
        stage5.main(_argv(workdir, "x", "--circuit_level", "edge"))
    assert exc.value.code == 2
    with pytest.raises(UsageError, match="--sampling_plan_path"):
        stage5.main(_argv(workdir, "x", "--sampling_strategy", "plan"))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"dataset_size": 999, "baseline_subset": "all", "rules": []}))
    with pytest.raises(PlanError, match="999 rows"):
        stage5.main(_argv(workdir, "x", "--sampling_strategy", "plan", "--sampling_plan_path", str(plan)))
    assert run_main(stage5.main, _argv(workdir, "x", "--method", "exact")) == 2
