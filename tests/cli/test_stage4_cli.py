"""Stage 4 through its command line (in-process `main`) on a small arithmetic-like table.

40 prompts `a+b=` / `a*b=` with feature columns `op1_small` (a < 10) and `is_mul`, an
`is_correct` target and an `is_test` split (8 test rows, so the TRAIN table has 32 rows).
One test loads the embedded SmolLM2 through the CLI; the others hand the session's model to the
stage (same weights) to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, SMOLLM2, serve_loaded_model
from lib.pipeline.feature_table import load_analysis_table, prompts_sha256, rule_mask
from lib.pipeline.cli import run_main
from lib.pipeline.stage4_sampling import PlanError, load_sampling_plan
from lib.tasks.base import load_task

_spec = importlib.util.spec_from_file_location("stage4_cli", REPO / "4_spectral_sample_datapoints.py")
stage4 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage4)

RULES = ["op1_small >= 0.5", "NOT(op1_small >= 0.5)", "is_mul >= 0.5 & op1_small >= 0.5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """scores.csv (40 rows, 8 test) and optimal_rule_set_is_correct.csv in a temporary folder."""
    root = tmp_path_factory.mktemp("stage4")
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(0, 10, 20), rng.integers(10, 100, 20)])
    b = rng.integers(0, 30, 40)
    op = np.where(np.arange(40) % 4 == 0, "*", "+")
    df = pd.DataFrame({"prompt": [f"{x}{o}{y}=" for x, o, y in zip(a, op, b)],
                       "raw_output": ["0"] * 40,
                       "is_correct": np.arange(40) % 3 == 0,
                       "op1_small": (a < 10).astype(float),
                       "is_mul": (op == "*").astype(float),
                       "is_test": np.isin(np.arange(40), [1, 6, 11, 17, 22, 27, 33, 38])})
    (root / "features").mkdir()
    df.to_csv(root / "features" / "scores.csv", index=False)
    (root / "rules").mkdir()
    pd.DataFrame({"rule_index": [3, 5, 9], "is_negated": [False, True, False], "rule_expression": RULES,
                  "component_type": "rule", "coefficient_sign": "positive"}).to_csv(
        root / "rules" / "optimal_rule_set_is_correct.csv", index=False)
    return root


@pytest.fixture
def with_session_model(smollm2, monkeypatch):
    """The stage gets the already loaded SmolLM2 instead of loading it again."""
    import lib.pipeline.stage4_sampling as sp

    serve_loaded_model(monkeypatch, sp, smollm2)
    return smollm2


def _argv(root: Path, out: str, *extra: str) -> list[str]:
    return ["--features_scores_dir", str(root / "features"), "--rules_dir", str(root / "rules"),
            "--rules_glob", "optimal_rule_set", "--ai_model", SMOLLM2, "--device", "cpu",
            "--output_path", str(root / out), "--spectral_cache_dir", str(root / "cache"),
            "--rep_pooling", "last", "--spectral_dim", "8", "--batch_size", "16", "--no_progress", *extra]


DISCOVERY = ("--use_global_clusters", "--global_n_clusters", "6", "--compute_cover_stats",
             "--pair_by_similarity_len_matched", "--pair_similarity_metric", "euclidean",
             "--min_points_per_ablation", "6", "--max_points_per_ablation", "8")


def _train(root: Path, subset: str = "all"):
    return load_analysis_table(root / "features", load_task("lib.tasks.arithmetic_task"), subset)


def _check_sides(plan: dict, table) -> None:
    for e in plan["rules"]:
        if e["status"] != "ok":
            continue
        mask = rule_mask(table.df, e["rule"], e["rule_direction"])
        assert mask[e["associated_indices"]].all(), e["rule"]
        assert not mask[e["unrelated_indices"]].any(), e["rule"]
        assert len(e["associated_indices"]) == len(e["unrelated_indices"]) > 0


def test_discovery_plan_real_load_and_byte_identical_rerun(workdir, capsys):
    assert stage4.main(_argv(workdir, "plan_a.json", *DISCOVERY)) == 0  # loads the embedded model itself
    table = _train(workdir)
    plan = json.loads((workdir / "plan_a.json").read_text())
    assert plan["dataset_size"] == len(table.df) == 32
    assert plan["prompts_sha256"] == prompts_sha256(table.prompts) and plan["target_col"] == "is_correct"
    assert plan["global_clusters"]["n_clusters"] == 6 and plan["rep_hook_name"] == "ln_final.hook_normalized"
    assert [e["rule_id"] for e in plan["rules"]] == [0, 1, 2]
    assert [e["status"] for e in plan["rules"]] == ["ok", "ok", "skipped"]  # rule 2 covers 3 TRAIN rows
    assert "--min_points_per_ablation 6" in plan["rules"][2]["reason"]
    _check_sides(plan, table)
    for pm in plan["rules"][0]["pairing_meta"]["pair_meta"]:
        assert pm["len_matched"] == (pm["len_diff"] == 0)  # --pair_len_tolerance 0
    out = capsys.readouterr().out
    assert "2 ok / 3 rules" in out and "rule 2 skipped" in out
    stages = json.loads((workdir / "run_manifest.json").read_text())["stages"]
    entry = stages["stage4:plan_a.json"]  # one entry per plan file of the folder
    assert entry["seed"] == 42 and entry["device"] == "cpu" and entry["config"]["global_n_clusters"] == 6


def test_same_seed_same_plan_and_length_matching(workdir, with_session_model):
    assert stage4.main(_argv(workdir, "plan_b.json", *DISCOVERY)) == 0
    # a fresh representation cache (vectors recomputed) gives the same bytes
    assert stage4.main(_argv(workdir, "plan_c.json", *DISCOVERY, "--spectral_cache_dir", str(workdir / "cache2"))) == 0
    assert (workdir / "cache2").is_dir()
    b, c = (workdir / "plan_b.json").read_bytes(), (workdir / "plan_c.json").read_bytes()
    assert b == c
    table = _train(workdir)
    from lib.sampling.spectral import token_lengths

    lengths = token_lengths(with_session_model.tokenizer, table.prompts)
    plan = json.loads(b)
    ok = [x for x in plan["rules"] if x["status"] == "ok"]
    assert [e["rule_id"] for e in ok] == [0, 1]  # as in plan_a: rule 2 covers too few TRAIN rows
    matched = 0
    for e in ok:
        mask = rule_mask(table.df, e["rule"], e["rule_direction"])
        neg_lengths = set(lengths[~mask].tolist())
        assert e["pairing_meta"]["pair_meta"]
        for pm in e["pairing_meta"]["pair_meta"]:
            assert pm["source_len"] == lengths[pm["source_idx"]] and pm["target_len"] == lengths[pm["target_idx"]]
            assert pm["len_matched"] == (pm["source_len"] in neg_lengths)  # tolerance 0
            assert pm["len_matched"] == (pm["len_diff"] == 0)
            matched += pm["len_matched"]
    assert matched > 0  # some pairs are length-matched, so the tolerance-0 check above is exercised
    assert stage4.main(_argv(workdir, "plan_d.json", *DISCOVERY, "--seed", "3")) == 0
    assert json.loads((workdir / "plan_d.json").read_text())["dataset_size"] == 32


def test_anchoring_plans_and_random_plan(workdir, with_session_model):
    for subset in ("positive", "negative"):
        argv = _argv(workdir, f"anchor_{subset}.json", "--baseline_subset", subset, "--use_global_clusters",
                     "--global_n_clusters", "4", "--compute_cover_stats", "--min_points_per_ablation", "3",
                     "--max_points_per_ablation", "5")
        assert stage4.main(argv) == 0
        table = _train(workdir, subset)
        plan = json.loads((workdir / f"anchor_{subset}.json").read_text())
        assert plan["baseline_subset"] == subset and plan["dataset_size"] == len(table.df)
        assert table.target.all() if subset == "positive" else not table.target.any()
        _check_sides(plan, table)
        ok = [e for e in plan["rules"] if e["status"] == "ok"]
        assert ok and all("unrelated_cover" in e and "pairing_meta" not in e for e in ok)
        sp = load_sampling_plan(workdir / f"anchor_{subset}.json", expected_dataset_size=len(table.df),
                                expected_prompts_sha256=prompts_sha256(table.prompts), expected_baseline_subset=subset)
        assert sp.entry("is_correct", ok[0]["rule_id"]).associated_indices
    # greedy (no global clusters) and random control plans
    assert stage4.main(_argv(workdir, "greedy.json", "--min_points_per_ablation", "4", "--max_points_per_ablation", "6")) == 0
    greedy = json.loads((workdir / "greedy.json").read_text())
    assert greedy["rules"][0]["associated_cover"]["greedy_meta"]["max_points"] == 6
    assert stage4.main(_argv(workdir, "random.json", "--selection", "random", "--min_points_per_ablation", "4",
                             "--max_points_per_ablation", "6")) == 0
    rnd = json.loads((workdir / "random.json").read_text())
    _check_sides(rnd, _train(workdir))
    assert rnd["rules"][0]["associated_cover"]["greedy_meta"]["status"] == "random"
    assert rnd["rules"][0]["unrelated_cover"]["greedy_meta"]["status"] == "random"


def test_plan_for_another_table_size_is_rejected(workdir, with_session_model):
    assert stage4.main(_argv(workdir, "plan_e.json", "--min_points_per_ablation", "4")) == 0
    with pytest.raises(PlanError, match="made for a table of 32 rows, but this table has 40"):
        load_sampling_plan(workdir / "plan_e.json", expected_dataset_size=40)


def test_bad_input_gives_clear_errors(workdir, with_session_model, capsys):
    assert run_main(stage4.main, _argv(workdir, "x.json", "--rules_glob", "association_rules")) == 2
    err = capsys.readouterr().err
    assert "no rules file 'association_rules_is_correct.csv'" in err
    assert run_main(stage4.main, _argv(workdir, "x.json", "--rep_hook_name", "blocks.99.hook_resid_post")) == 2
    err = capsys.readouterr().err
    assert "--rep_hook_name 'blocks.99.hook_resid_post' is not a hook" in err and "valid names include" in err
    assert run_main(stage4.main, _argv(workdir, "x.json", "--selection", "random", "--use_global_clusters")) == 2
    assert "drop --use_global_clusters" in capsys.readouterr().err
    assert run_main(stage4.main, _argv(workdir, "x.json", "--pair_similarity_metric", "nonsense")) == 2
    assert "--pair_similarity_metric 'nonsense'" in capsys.readouterr().err
    assert run_main(stage4.main, _argv(workdir, "x.json", "--global_n_clusters", "-1")) == 2
    assert "--global_n_clusters must be >= 1" in capsys.readouterr().err
    assert run_main(stage4.main, _argv(workdir, "x.json", "--features_scores_dir", str(workdir / "nope"))) == 2
    assert "scores table" in capsys.readouterr().err
    assert not (workdir / "x.json").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--spectral_dim", "0"], "--spectral_dim must be >= 1, got 0"),
    (["--pair_len_tolerance", "-1"], "--pair_len_tolerance must be >= 0, got -1"),
    (["--baseline_subset", "both"], "--baseline_subset"),
    (["--selection", "greedy"], "--selection"),
    (["--device", "gpu"], "--device"),
    (["--seed", "x"], "--seed"),
])
def test_bad_flag_value_exits_2_naming_the_flag(workdir, capsys, extra, needle):
    try:
        code = run_main(stage4.main, _argv(workdir, "bad.json", *extra))
    except SystemExit as exc:  # argparse rejects the value before any work
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (workdir / "bad.json").exists()
