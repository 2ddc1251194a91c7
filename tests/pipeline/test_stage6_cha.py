"""Stage 6 on the embedded model: planted agonists are found by CHA at a fraction of the
exhaustive cost, and the CLI writes the spec's files, resumes, and rejects bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.ablation.engine import AblationEngine, ReplacementValues
from lib.ablation.cha import is_agonist, run_cha, run_exhaustive
from lib.tasks.arithmetic_task import TASK_SPEC as ARITH
from tests.conftest import SMOLLM2
from tests.planted import PLANTED, planted_model

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"


@pytest.fixture(scope="module")
def correct_prompts(smollm2):
    """16 few-shot additions the unmodified model answers correctly."""
    eng = AblationEngine(smollm2, ARITH.MAX_NEW_TOKENS, batch_size=128, stop_strings=("\n",))
    cands = [FEW_SHOT + f"{a}+{b}=" for a in range(10, 17) for b in range(10, 17)]
    answers = eng.generate(eng.prepare(cands), [None])[0]
    ok = [p for p, good in zip(cands, ARITH.is_answer_positive([{"prompt": p} for p in cands], answers)) if good]
    assert len(ok) >= 16, f"only {len(ok)} correct prompts"
    return ok[:16]


def test_planted_agonists_found_by_cha_far_below_exhaustive_cost(smollm2, correct_prompts):
    rows = [{"prompt": p} for p in correct_prompts]
    with planted_model(smollm2):
        eng = AblationEngine(smollm2, ARITH.MAX_NEW_TOKENS, batch_size=256, stop_strings=("\n",))
        prepared = eng.prepare(correct_prompts)
        base = ARITH.is_answer_positive(rows, eng.generate(prepared, [None])[0])
        assert all(base), "the planted model must answer like the original when nothing is ablated"
        calls = []

        def tester(groups):
            calls.append(len(groups))
            out = []
            for ans in eng.generate(prepared, list(groups), ReplacementValues("zero")):
                f = ARITH.is_answer_positive(rows, ans)
                out.append((f[:8], f[8:]))
            return out

        units = {10: list(range(256)), 20: list(range(256))}
        recs = run_cha(units, tester, tau=0.9, prune_alpha=0.05, regime="positive", rng=np.random.default_rng(0))
        found = {(int(k[1:]), ids[0]) for r in recs if r["group_size"] == 1 and r["max_effect"] >= 0.9
                 for k, ids in r["layers_neurons_dict"].items()}
        assert found == {(L, i) for L, ids in PLANTED.items() for i in ids}
        assert sum(calls) == len(recs)
        assert len(recs) < 512 / 6, f"{len(recs)} evaluations for 512 candidates"
        ex = run_exhaustive({10: list(range(28, 40))}, tester, 0.05, "positive")
        assert [r["layers_neurons_dict"]["m10"][0] for r in ex if r["max_effect"] >= 0.9] == [33]


# ---- the CLI ---------------------------------------------------------------------------------

def _addition_table(tmp_path, smollm2):
    """A scores table of the 64 few-shot additions a+b (a, b in 10..17) with the model's real answers
    and one feature `small_first` (a < 14). Every TRAIN class × rule side holds at least 9 rows with
    the embedded SmolLM2 (correct 9 / 10, incorrect 19 / 18 for a < 14 / a >= 14), so slices of 4
    prompts exist in both regimes."""
    eng = AblationEngine(smollm2, ARITH.MAX_NEW_TOKENS, batch_size=64, stop_strings=("\n",))
    prompts = [FEW_SHOT + f"{a}+{b}=" for a in range(10, 18) for b in range(10, 18)]
    answers = eng.generate(eng.prepare(prompts), [None])[0]
    correct = ARITH.is_answer_positive([{"prompt": p} for p in prompts], answers)
    df = pd.DataFrame({"prompt": prompts, "raw_output": answers, "is_correct": correct,
                       "small_first": [float(int(p.split("\n")[-1][:2]) < 14) for p in prompts],
                       "is_test": [i % 8 == 7 for i in range(len(prompts))]})
    scores = tmp_path / "scores.csv"
    df.to_csv(scores, index=False)
    return df, scores


def _write_dataset_info(disc, scores) -> None:
    (disc / "dataset_info.json").write_text(json.dumps({"scores_path": str(scores), "prompt_col": "prompt",
                                                        "target_col": "is_correct", "ai_model": SMOLLM2}))


def _write_inputs(tmp_path, smollm2, n_units=24, neurons=None):
    """The addition table, a manifest of two rules on `small_first`: rule 0 with `n_units` units in
    layers 28-29 (or the units `neurons`), rule 1 without units."""
    df, scores = _addition_table(tmp_path, smollm2)
    train = df[~df.is_test]
    for correct in (True, False):  # the precondition of the CLI test: both regimes have 4 + 4 prompts
        side = train[train.is_correct == correct].small_first
        assert (side == 1.0).sum() >= 4 and (side == 0.0).sum() >= 4, (correct, side.value_counts().to_dict())
    rng = np.random.default_rng(0)
    neurons = neurons or {"m28": list(range(n_units // 2)), "m29": list(range(n_units // 2))}
    label_score = {f"('{L}', {i})": float(rng.normal()) for L, ids in neurons.items() for i in ids}
    disc = tmp_path / "disc"
    disc.mkdir()
    entry = {"status": "ok", "circuit_id": 0, "circuit_label": "small_first >= 0.5", "target": "is_correct",
             "coefficient_sign": "positive", "sampling_strategy": "random",
             "metadata_topn": {"level": "neuron", "neurons": neurons, "neuron_label_score": label_score, "d_model": 576}}
    skipped = {**entry, "circuit_id": 1, "circuit_label": "small_first < 0.5",
               "metadata_topn": {"level": "neuron", "neurons": {}, "d_model": 576}}
    (disc / "manifest.json").write_text(json.dumps([entry, skipped]))
    _write_dataset_info(disc, scores)
    return disc, df


def _write_addition_inputs(tmp_path, smollm2):
    """The addition table, one rule `small_first >= 0.5` (first operand below 14), a manifest with 4
    stage-5 candidates in layer 29."""
    _, scores = _addition_table(tmp_path, smollm2)
    neurons = {"m29": [1, 2, 3, 4]}
    disc = tmp_path / "disc"
    disc.mkdir()
    entry = {"status": "ok", "circuit_id": 0, "circuit_label": "small_first >= 0.5", "target": "is_correct",
             "coefficient_sign": "positive", "sampling_strategy": "random",
             "metadata_topn": {"level": "neuron", "neurons": neurons, "d_model": 576,
                               "neuron_label_score": {f"('m29', {i})": 0.1 * i for i in neurons["m29"]}}}
    (disc / "manifest.json").write_text(json.dumps([entry]))
    _write_dataset_info(disc, scores)
    return disc


def _run(argv):
    import importlib

    mod = importlib.import_module("6_analyze_bag_of_rules")
    from lib.pipeline.cli import run_main

    return run_main(mod.main, argv)


def test_stage6_cli_writes_outputs_and_resumes(tmp_path, smollm2, capsys):
    disc, df = _write_inputs(tmp_path, smollm2)
    out = tmp_path / "out"
    argv = ["--input_data_dir", str(disc), "--output_data_dir", str(out), "--device", "cpu", "--fast_ablation",
            "--decode_only", "--mlp_neurons_only", "--sign_split_first", "--intervention", "mean-positional",
            "--n_associated", "4", "--n_unrelated", "4", "--search_epsilon", "0.9", "--batch_size", "64",
            "--points_to_use_for_mean_ablation", "16", "--baseline_subset", "all", "--seed", "1"]
    assert _run(argv) == 0
    for regime in ("positive", "negative"):
        d = out / f"{regime}_baseline"
        for name in ("rule_knockout.json", "neuron_buckets.json", "neuron_bucket_stats.json", "cost_summary.json"):
            assert (d / name).is_file(), (regime, name)
        rec = json.loads((d / "is_correct" / "rule_0000.json").read_text())
        assert rec["baseline_subset"] == regime and rec["decode_only"] is True
        assert rec["status"] == "ok", rec.get("reason")  # _write_inputs checked that both regimes have 4 + 4 rows
        assert rec["n_associated_tested"] + len(rec["baseline_dropped_associated_indices"]) == 4
        assert rec["n_unrelated_tested"] + len(rec["baseline_dropped_unrelated_indices"]) == 4
        assert rec["cost"]["n_evaluations"] == len(rec["ablations"]) > 0
        assert rec["cost"]["n_candidates"] == 24
        sampled = df[~df.is_test].reset_index(drop=True)
        sampled = sampled[sampled.is_correct == (regime == "positive")].reset_index(drop=True)
        assert all(sampled.small_first.iloc[i] == 1.0 for i in rec["sampled_associated_indices"])
        assert all(sampled.small_first.iloc[i] == 0.0 for i in rec["sampled_unrelated_indices"])
        assert {"depth", "split", "max_effect", "max_effect_hat", "acc_after_knockout_on_associated_all"} <= set(rec["ablations"][0])
        skipped = json.loads((d / "is_correct" / "rule_0001.json").read_text())
        assert skipped["status"] == "skipped" and skipped["reason"] == "No usable units found for this circuit."
        knock = json.loads((d / "rule_knockout.json").read_text())
        assert [k["circuit_id"] for k in knock] == [0, 1]
    first = (out / "negative_baseline" / "is_correct" / "rule_0000.json").read_text()
    capsys.readouterr()
    assert _run(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert (out / "negative_baseline" / "is_correct" / "rule_0000.json").read_text() == first
    # New inputs (here: other answers in the scores table) are never answered from the old records.
    scores = Path(json.loads((disc / "dataset_info.json").read_text())["scores_path"])
    table = pd.read_csv(scores, dtype={"raw_output": str})
    table["raw_output"] = table["raw_output"].fillna("") + "!"
    table.to_csv(scores, index=False)
    capsys.readouterr()
    assert _run(argv) == 0
    assert "reused" not in capsys.readouterr().out


def test_stage6_cli_bad_input(tmp_path, smollm2, capsys):
    assert _run(["--input_data_dir", str(tmp_path), "--output_data_dir", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["--input_data_dir", str(tmp_path), "--output_data_dir", str(tmp_path / "o"), "--intervention", "resample"])
    disc, _ = _write_inputs(tmp_path, smollm2)
    code = _run(["--input_data_dir", str(disc), "--output_data_dir", str(tmp_path / "o2"), "--device", "cpu",
                 "--baseline_subset", "positive", "--n_associated", "500", "--fast_ablation"])
    assert code == 0
    rec = json.loads((tmp_path / "o2" / "is_correct" / "rule_0000.json").read_text())
    assert rec["status"] == "skipped" and "Insufficient" in rec["reason"]
    assert _run(["--input_data_dir", str(disc), "--output_data_dir", str(tmp_path / "o3"),
                 "--sampling_strategy", "plan"]) == 2
    assert "--sampling_plan_path" in capsys.readouterr().err


def test_full_space_effect_cha_finds_planted_units_and_knockout_beats_random(tmp_path, smollm2):
    """`--cha_scope all_units --cha_statistic effect_sprt` on the real model: every unit of the last
    layer is searched (not only stage 5's 4 candidates), the planted units are the agonists, at a
    fraction of exhaustive forward rows, and knocking them out removes the behaviour where random
    same-size sets of the layer do not."""
    from lib.pipeline.stage6_cha import Stage6Config, run_stage6
    from tests.conftest import SMOLLM2

    disc = _write_addition_inputs(tmp_path, smollm2)
    planted = {29: [33, 201]}
    out = tmp_path / "out"
    cfg = Stage6Config(input_data_dir=str(disc), output_data_dir=str(out), device="cpu", fast_ablation=True,
                       decode_only=True, sign_split_first=True, intervention="zero", n_associated=8, n_unrelated=8,
                       search_epsilon=0.5, batch_size=256, baseline_subset="positive", seed=3,
                       cha_statistic="effect_sprt", cha_scope="all_units", last_k_layers=1, knockout_random_sets=20,
                       catastrophic_acc_tol=-1.0)  # planted units break every answer: keep them as agonists
    with planted_model(smollm2, planted):
        (total,) = run_stage6(cfg, echo=lambda _: None, models={SMOLLM2: smollm2})
    rec = json.loads((out / "is_correct" / "rule_0000.json").read_text())
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["cost"]["n_candidates"] == 576 and rec["cost"]["scope"] == "all_units"
    found = {(int(k[1:]), ids[0]) for r in rec["ablations"] if r["group_size"] == 1 and r.get("is_agonist")
             for k, ids in r["layers_neurons_dict"].items()}
    assert found == {(29, 33), (29, 201)}
    assert rec["cost"]["forward_rows_over_exhaustive"] < 0.5
    ko = rec["knockout"]
    assert ko["n_units"] == 2 and ko["n_random_sets"] == 20
    assert ko["removal_associated"] == 1.0 and ko["random_removal_associated_mean"] < 0.5
    assert ko["p_value_associated"] <= 1 / 21 + 1e-9
    assert total["statistic"] == "effect_sprt" and total["knockout"]["n_circuits_with_agonists"] == 1


def _tiny_stage6_argv(disc, out) -> list[str]:
    """Stage 6's arguments exactly as the pipeline runner builds them for `--preset tiny`, on our inputs."""
    from lib.pipeline import run as runner

    s = runner.parse_pipeline_args(["arithmetic", SMOLLM2, "--preset", "tiny"], env={})
    (cmd,) = [cmd for num, _, cmd in runner.stage_commands(s) if num == 6]
    argv = cmd[2:]  # drop the interpreter and the script
    for flag, value in (("--input_data_dir", str(disc)), ("--output_data_dir", str(out)), ("--device", "cpu")):
        argv[argv.index(flag) + 1] = value
    return argv


# Units of layer 29 that, ablated alone (mean-positional, decode-only), flip one of the 6 associated
# prompts the tiny settings sample from the addition table's positive regime (found by exhaustive
# ablation of layers 28-29: 15 of the 1152 units flip a prompt there, none of layer 28's units 0-15
# or layer 29's units 0-13 does).
FLIPPING_M29 = [92, 134]


def test_tiny_preset_stage6_prunes_groups_on_the_embedded_model(tmp_path, smollm2):
    """The tiny preset's stage 6 (6 + 6 prompts, τ = 0.5, flip-rate UCB) on the real model discards
    groups: a group that flips no prompt has the bound 0.46 < τ and is pruned with its subtree, so a
    circuit costs fewer group tests than its full tree (and than ablating every unit alone), while the
    groups that hold a flipping unit are split down to it. At the bash driver's τ = 0.3 nothing could
    be pruned (0.46 ≥ 0.3): every run walked the full tree."""
    from lib.pipeline.config import parse_config
    from lib.pipeline.stage6_cha import Stage6Config, run_stage6

    neurons = {"m28": list(range(16)), "m29": FLIPPING_M29 + list(range(14))}
    disc, _ = _write_inputs(tmp_path, smollm2, neurons=neurons)
    argv = _tiny_stage6_argv(disc, tmp_path / "out")
    cfg = parse_config(Stage6Config, argv)
    assert (cfg.cha_statistic, cfg.search_epsilon, cfg.n_associated, cfg.n_unrelated, cfg.fast_ablation) == (
        "flip_ucb", 0.5, 6, 6, True)
    messages: list[str] = []
    totals = run_stage6(cfg, echo=messages.append, models={SMOLLM2: smollm2})
    assert not any("prunes nothing" in m for m in messages)
    full_tree = 2 * 16 - 1 + 2 * 16 - 1  # every node of the two layers' trees (16 units each)
    for total in totals:
        regime = total["regime"]
        rec = json.loads((tmp_path / "out" / f"{regime}_baseline" / "is_correct" / "rule_0000.json").read_text())
        assert rec["status"] == "ok", rec.get("reason")
        assert (rec["n_associated_tested"], rec["n_unrelated_tested"]) == (6, 6)  # no baseline drop on these rows
        recs = rec["ablations"]
        pruned = [r for r in recs if r["group_size"] > 1 and not r["split"]]
        assert pruned, f"no group pruned in the {regime} regime"
        for r in pruned:
            assert r["stop_reason"] == "max_effect_below_epsilon" and r["max_effect"] < 0.5
            assert r["delta_on_associated_hat"] == 0 and r["delta_on_unrelated_hat"] == 0
            (layer, ids), = r["layers_neurons_dict"].items()
            below = [x for x in recs if layer in x["layers_neurons_dict"]
                     and set(x["layers_neurons_dict"][layer]) < set(ids)]
            assert below == [], f"the subtree of a pruned group was evaluated: {below}"
        assert total["n_evaluations"] == len(recs) < min(full_tree, total["exhaustive_evaluations"]), (regime, total)
        if regime == "positive":  # the flipping units' groups are kept and split down to them
            holding = [r for r in recs if set(FLIPPING_M29) & set(r["layers_neurons_dict"].get("m29", []))]
            assert all(r["split"] for r in holding if r["group_size"] > 1)
            found = {ids[0] for r in recs if is_agonist(r, 0.5) for layer, ids in r["layers_neurons_dict"].items()}
            assert found == set(FLIPPING_M29)
    # the bash driver's tiny τ = 0.3 could not prune with 6 prompts per slice (stage 6 warns so)
    from lib.pipeline.stage6_cha import min_prompts_to_prune

    assert min_prompts_to_prune(0.5, cfg.prune_alpha) <= 6 < min_prompts_to_prune(0.3, cfg.prune_alpha)
