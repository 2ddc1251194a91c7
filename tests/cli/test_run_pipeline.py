"""`_run_pipeline.sh` for real: stages 1-7 on a tiny configuration of the embedded SmolLM2, failure
handling, option errors, and the summary module. Every run writes under tmp_path (--data_root,
--cache_root), never into the repository's data/ or cache/."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lib.runs.layout import ExperimentLayout, RunOptions, run_mode

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct-q4_1"
DRIVER = REPO / "_run_pipeline.sh"
TINY_OPTS = RunOptions(discovery_sampling="spectral", anchoring="random", tau=0.5)  # the tiny preset's run mode


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MECHARULE_DATA_ROOT", None)
    env.pop("MECHARULE_CACHE_ROOT", None)
    return env


def _driver(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DRIVER), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, ExperimentLayout]:
    """One tiny end-to-end run, shared by the checks below."""
    if not shutil.which("bash"):
        pytest.skip("bash is required")
    root = tmp_path_factory.mktemp("pipeline")
    proc = _driver("arithmetic", MODEL, "--preset", "tiny", "--data_root", str(root / "data"),
                   "--cache_root", str(root / "cache"))
    return proc, ExperimentLayout(root / "data", "arithmetic", MODEL, root / "cache")


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage(tiny_run):
    proc, lay = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    name = run_mode(TINY_OPTS)
    assert name == "rule_split-spectral_sample-decode_only-agonist_neurons-fast-random_anchor-tau0.5"
    assert f"run mode {name}" in proc.stderr
    for stage in range(1, 8):
        assert f"stage {stage} (" in proc.stderr
    assert "per-stage wall time" in proc.stderr
    # stage 1-2
    with open(lay.cache_dir / "llm_io_data.pkl", "rb") as fh:
        assert pickle.load(fh) is not None
    scores = pd.read_csv(lay.feature_report_dir / "scores.csv")
    assert len(scores) == 160 and "is_test" in scores.columns
    assert json.loads((lay.feature_report_dir / "features.json").read_text())
    # stage 4: the discovery plan
    assert list((lay.model_dir / "sampling_plans").glob("*_for_circuit_discovery.json"))
    # the summary printed at the end
    assert "MechaRule summary: task arithmetic" in proc.stdout
    assert "Stage 6" in proc.stdout and "group tests" in proc.stdout
    assert (lay.model_dir / "pipeline_timings.tsv").is_file()


@pytest.mark.slow
def test_tiny_pipeline_rule_ids_flow_from_stage3_to_stage7(tiny_run):
    proc, lay = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    rules = pd.read_csv(lay.model_dir / "xai_analyses_results" / "optimal_rule_set_is_correct.csv")
    assert len(rules) >= 1
    manifest = json.loads((lay.circuits_dir(TINY_OPTS) / "manifest.json").read_text())
    ids5 = {int(e["rule_id"]) for e in manifest}
    assert ids5 and ids5 <= set(range(len(rules)))
    assert len(manifest) <= 2  # --max_circuits 2 of the tiny preset
    ok5 = {int(e["rule_id"]) for e in manifest if e["status"] == "ok"}
    agonists: set[str] = set()
    n_evaluations = 0
    for regime in ("positive", "negative"):
        base = lay.baseline_dir(TINY_OPTS, regime)
        cost = json.loads((base / "cost_summary.json").read_text())
        assert cost["exhaustive_evaluations"] == cost["n_candidates"]
        n_evaluations += cost["n_evaluations"]
        per_rule = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in base.glob("is_correct/rule_*.json")}
        assert set(per_rule) == ok5
        for rid, obj in per_rule.items():
            assert obj["circuit_id"] == rid
        buckets = json.loads((base / "neuron_buckets.json").read_text())
        for key, rec in buckets["non_catastrophic_agonists"].items():
            assert int(rec["last_record"]["circuit_id"]) in ok5
            if abs(float(rec["last_record"]["max_effect"])) >= TINY_OPTS.tau:
                agonists.add(key)
    assert n_evaluations >= 1  # a regime may skip a circuit (too few prompts), not both
    # stage 7: its units are exactly stage 6's τ-agonists (also when there are none: which rules stage 3
    # hands on decides whether a 6-prompt slice finds one)
    assert f"[stage7] {len(agonists)} candidate unit(s) (τ={TINY_OPTS.tau})" in proc.stdout
    stats = lay.stats_dir(run_mode(TINY_OPTS))
    assert stats.is_dir(), f"stage 7 wrote no {stats}"
    df = pd.read_csv(stats / "flip_stats_by_neuron.csv")
    units = {f"{row.layer_label}:{int(row.neuron_id)}" for row in df.itertuples()}
    assert units == agonists, (units, agonists)


@pytest.mark.slow
def test_tiny_pipeline_stage6_prunes_groups(tiny_run):
    """The tiny preset's CHA discards groups: with 6 prompts per slice a group that flips nothing has
    a Clopper-Pearson bound of 0.46 < τ = 0.5, so it is pruned with its subtree (its units are never
    ablated alone), and every analysed circuit costs fewer group tests than its full tree."""
    proc, lay = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CHA prunes nothing" not in proc.stderr + proc.stdout
    analysed = 0
    for regime in ("positive", "negative"):
        base = lay.baseline_dir(TINY_OPTS, regime)
        cost = json.loads((base / "cost_summary.json").read_text())
        ok = [rec for rec in (json.loads(p.read_text()) for p in sorted(base.glob("is_correct/rule_*.json")))
              if rec["status"] == "ok"]
        assert len(ok) == cost["n_ok"], regime
        if not ok:  # a regime may skip every circuit (too few prompts on a rule side); the other is checked
            continue
        analysed += 1
        n_pruned = 0
        for rec in ok:
            assert min(rec["n_associated_tested"], rec["n_unrelated_tested"]) == 6, rec["circuit_id"]  # no slice below 6
            groups = [(next(iter(r["layers_neurons_dict"].items())), r) for r in rec["ablations"]]
            roots = {layer: len(ids) for (layer, ids), r in groups if r["depth"] == 0}
            full_tree = sum(2 * n - 1 for n in roots.values())  # every node of every layer's tree
            assert rec["cost"]["n_evaluations"] == len(groups) < full_tree, (regime, rec["circuit_id"], full_tree)
            for (layer, ids), r in groups:
                if r["group_size"] > 1 and not r["split"]:
                    n_pruned += 1
                    assert r["stop_reason"] == "max_effect_below_epsilon" and r["max_effect"] < TINY_OPTS.tau
                    below = [r2 for (l2, ids2), r2 in groups if l2 == layer and set(ids2) < set(ids)]
                    assert below == [], f"a pruned group's subtree was evaluated ({regime}, {rec['circuit_id']})"
        assert n_pruned >= 1, f"CHA pruned no group in the {regime} regime"
    assert analysed >= 1, "stage 6 analysed no circuit in either regime"


def test_failing_stage_stops_the_driver_with_its_name(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    lay = ExperimentLayout(data, "arithmetic", MODEL, cache)
    # stage 1 and 2 outputs exist (so they are skipped), but scores.csv is not a feature table
    lay.cache_dir.mkdir(parents=True)
    (lay.cache_dir / "llm_io_data.pkl").write_bytes(pickle.dumps({"not": "used"}))
    lay.feature_report_dir.mkdir(parents=True)
    (lay.feature_report_dir / "dataset_stats.json").write_text("{}")
    (lay.feature_report_dir / "scores.csv").write_text("prompt,x\na,1\n")
    (lay.feature_report_dir / "features.json").write_text("[]")
    proc = _driver("arithmetic", MODEL, "--preset", "tiny", "--data_root", str(data), "--cache_root", str(cache),
                   timeout=300)
    assert proc.returncode != 0
    assert "stage 1 (prompts and answers) skipped" in proc.stderr
    assert "stage 3 (rules) failed with exit code" in proc.stderr
    assert "stage 4" not in proc.stderr.split("stage 3 (rules) failed")[1]
    assert not (lay.model_dir / "sampling_plans").exists()


def test_bad_options_print_usage_and_exit_2(tmp_path):
    for args in (["arithmetic"], ["arithmetic", MODEL, "--bogus"], ["arithmetic", MODEL, "--preset", "huge"],
                 ["arithmetic", MODEL, "--max_prompts", "many"], ["arithmetic", MODEL, "--spectral_splits"],
                 ["arithmetic", MODEL, "--from_stage", "9"]):
        proc = _driver(*args, "--data_root", str(tmp_path / "d"), timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage" in proc.stderr or "error" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_dry_run_names_match_run_layout(tmp_path):
    proc = _driver("arithmetic", MODEL, "--main", "--tau", "0.4", "--dry_run", "--data_root", str(tmp_path / "d"),
                   "--cache_root", str(tmp_path / "c"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    opts = RunOptions(tau=0.4)
    lay = ExperimentLayout(tmp_path / "d", "arithmetic", MODEL, tmp_path / "c")
    assert f"--stats_dirname {run_mode(opts)}" in proc.stderr
    assert str(lay.baseline_dir(opts, "negative")) in proc.stderr
    assert f"--search_epsilon 0.4" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_cpu_preset_sizes_reach_the_stages_and_explicit_options_win(tmp_path):
    """The cpu preset's candidate budget, τ and tree count reach stages 3, 6 and 7; an explicit
    option overrides the preset's value."""
    base = ["arithmetic", MODEL, "--preset", "cpu", "--dry_run", "--data_root", str(tmp_path / "d"),
            "--cache_root", str(tmp_path / "c")]
    proc = _driver(*base, timeout=60)
    assert proc.returncode == 0, proc.stderr
    scripts = {"3": "3_extract_rules.py", "6": "6_analyze_bag_of_rules.py", "7": "7_refine_neuron_anchored_rules.py"}
    lines = {n: next(line for line in proc.stderr.splitlines() if script in line) for n, script in scripts.items()}
    assert "--n_estimators 200" in lines["3"] and "--n_estimators 200" in lines["7"]
    assert "--top_k_neurons 1536" in lines["6"] and "--last_k_layers 4" in lines["6"]
    assert "--search_epsilon 0.3" in lines["6"] and "--search_epsilon 0.3" in lines["7"]
    assert f"--stats_dirname {run_mode(RunOptions(tau=0.3))}" in lines["7"]
    proc = _driver(*base, "--tau", "0.2", "--n_estimators", "50", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--search_epsilon 0.2" in proc.stderr and "--search_epsilon 0.3" not in proc.stderr
    assert "--n_estimators 50" in proc.stderr and "--n_estimators 200" not in proc.stderr


def test_summary_of_a_missing_experiment_is_an_error(tmp_path):
    from lib.reporting import summary as pipeline_summary

    assert pipeline_summary.main(["--task", "arithmetic", "--model", MODEL, "--data_root", str(tmp_path)]) == 2
    (tmp_path / "arithmetic" / MODEL).mkdir(parents=True)
    assert pipeline_summary.main(["--task", "arithmetic", "--model", MODEL, "--data_root", str(tmp_path)]) == 0
