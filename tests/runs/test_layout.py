"""Run-mode names (spec 7-11 §3), their parsing, and the paths and CLI built from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.runs.layout import (
    ExperimentLayout,
    RunOptions,
    bag_label,
    canonical_run_mode,
    circuit_label,
    main,
    model_folder,
    parse_run_mode,
    role_label,
    run_mode,
    run_role,
)

MAIN = "rule_split-spectral_sample-decode_only-agonist_neurons-fast-spectral_anchor"


def test_canonical_names_match_the_pipeline():
    assert run_mode(RunOptions()) == MAIN
    assert canonical_run_mode("random_anchor") == MAIN.replace("spectral_anchor", "random_anchor")
    assert canonical_run_mode("fake") == MAIN + "-fake_targets"
    assert canonical_run_mode("spectral_split") == "spectral_split-decode_only-agonist_neurons-fast-random_anchor"
    assert canonical_run_mode("bruteforce") == "rule_split-spectral_sample-decode_only-agonist_neurons-spectral_anchor"
    assert canonical_run_mode("main", decode_only=False) == "rule_split-spectral_sample-agonist_neurons-fast-spectral_anchor"


def test_size_tau_and_intervention_suffixes():
    opts = RunOptions(circuit_size=25000, tau=0.3, intervention="mean-donor")
    assert circuit_label(opts) == "rule_split-spectral_sample-M25000-decode_only-eval_mean-donor"
    assert bag_label(opts) == "agonist_neurons-fast-spectral_anchor-tau0.3"
    assert circuit_label(RunOptions(intervention="mean")) == "rule_split-spectral_sample-decode_only"


@pytest.mark.parametrize("opts", [
    RunOptions(), RunOptions(anchoring="random", tau=0.45), RunOptions(fast=False, decode_only=False),
    RunOptions(split="spectral", discovery_sampling="random", anchoring="random"),
    RunOptions(circuit_size=80000, intervention="mean-donor-positional", fake_targets=True),
])
def test_parse_round_trips(opts):
    assert parse_run_mode(run_mode(opts)) == opts


def test_roles_and_labels():
    assert run_role(MAIN) == "main"
    assert run_role(MAIN.replace("-decode_only", "")) == "main"
    assert run_role(MAIN.replace("agonist_neurons", "M25000-agonist_neurons")) is None
    assert role_label(MAIN, "tables") == "Rule split + spectral coverage"
    assert role_label(MAIN, "compare") == "Rule split w/ Spectral anchoring plan"
    assert parse_run_mode("not_a_run") is None


def test_layout_paths(tmp_path):
    lay = ExperimentLayout(tmp_path / "data", "arithmetic", "Qwen/Qwen2-7B-Instruct", tmp_path / "cache")
    model_dir = tmp_path / "data" / "arithmetic" / "Qwen" / "Qwen2-7B-Instruct"
    assert lay.model_dir == model_dir
    assert lay.cache_dir == tmp_path / "cache" / "arithmetic" / "Qwen" / "Qwen2-7B-Instruct"
    assert lay.stats_dir(MAIN) == model_dir / "rule_extraction_results" / "neuron_flip_rules" / "stats" / MAIN
    fake = parse_run_mode(MAIN + "-fake_targets")
    assert lay.baseline_dir(fake, "negative_baseline") == (
        model_dir / "neural_circuit_discovery_results_fake_targets" / "eap_ig_inputs"
        / "rule_split-spectral_sample-decode_only" / "agonist_neurons-fast-spectral_anchor" / "negative_baseline")
    assert model_folder("smollm2-135m-instruct-q4_1") == Path("smollm2-135m-instruct-q4_1")
    assert model_folder("/models/x/tiny.gguf") == Path("tiny")


def test_cli_prints_names_and_paths(capsys):
    assert main(["run_mode", "--anchoring", "random", "--tau", "0.3"]) == 0
    assert capsys.readouterr().out.strip() == MAIN.replace("spectral_anchor", "random_anchor-tau0.3")
    assert main(["stats_dir", "--role", "fake", "--task", "arithmetic", "--model", "m", "--data_root", "d"]) == 0
    assert capsys.readouterr().out.strip() == f"d/arithmetic/m/rule_extraction_results/neuron_flip_rules/stats/{MAIN}-fake_targets"
    assert main(["parse", MAIN]) == 0
    assert json.loads(capsys.readouterr().out)["role"] == "main"
    assert main(["bag_dir"]) == 2
    assert "needs --task" in capsys.readouterr().err


def test_module_entry_point(repo_root):
    out = subprocess.run([sys.executable, "-m", "lib.runs.layout", "bag_label", "--slow"], cwd=repo_root,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "agonist_neurons-spectral_anchor"
