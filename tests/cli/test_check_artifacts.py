"""check_artifacts.py: lists what the tables need and is missing, exits non-zero then."""

from __future__ import annotations

import shutil
import subprocess
import sys

from lib.runs.layout import ExperimentLayout, parse_run_mode
from tests.synthetic_artifacts import BF, MAIN, MODEL, build_tree


def _check(repo_root, data, cache, *extra):
    return subprocess.run([sys.executable, "check_artifacts.py", "--data_root", str(data), "--cache_root", str(cache),
                           "--tasks", "arithmetic", "--models", MODEL, "--runs", "main", *extra],
                          cwd=repo_root, capture_output=True, text=True)


def _complete(data):
    """Add the negative-regime stage-6 files the synthetic tree leaves out."""
    lay = ExperimentLayout(data, "arithmetic", MODEL)
    for run in (MAIN, BF):
        opts = parse_run_mode(run)
        shutil.copytree(lay.baseline_dir(opts, "positive"), lay.baseline_dir(opts, "negative"))


def test_passes_on_a_complete_tree(tmp_path, repo_root):
    data, cache = build_tree(tmp_path)
    _complete(data)
    res = _check(repo_root, data, cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MISSING" not in res.stdout and "required artifacts present" in res.stdout


def test_reports_a_missing_folder(tmp_path, repo_root):
    data, cache = build_tree(tmp_path)
    _complete(data)
    lay = ExperimentLayout(data, "arithmetic", MODEL, cache)
    shutil.rmtree(lay.bag_dir(parse_run_mode(BF)))
    shutil.rmtree(lay.cache_dir)
    res = _check(repo_root, data, cache, "--quiet", "--json", str(tmp_path / "report.json"))
    assert res.returncode == 1
    missing = [line for line in res.stdout.splitlines() if line.startswith("MISSING")]
    assert any("agonist_neurons-spectral_anchor/positive_baseline/neuron_buckets.json" in m and "table3" in m
               for m in missing)
    assert any("llm_io_data.pkl" in m for m in missing)
    assert (tmp_path / "report.json").is_file()


def test_missing_model_folder_and_scan(tmp_path, repo_root):
    data, cache = build_tree(tmp_path)
    res = subprocess.run([sys.executable, "check_artifacts.py", "--data_root", str(data), "--cache_root", str(cache),
                          "--tasks", "hans_nli", "--models", MODEL, "--quiet"], cwd=repo_root, capture_output=True,
                         text=True)
    assert res.returncode == 1 and "hans_nli" in res.stdout and "model folder" in res.stdout
    scan = subprocess.run([sys.executable, "check_artifacts.py", "--data_root", str(data), "--cache_root", str(cache),
                           "--quiet"], cwd=repo_root, capture_output=True, text=True)
    assert scan.returncode == 1 and "fake stage-7 stats folder" in scan.stdout  # the tree has no bon fake run
    bad = subprocess.run([sys.executable, "check_artifacts.py", "--runs", "nope"], cwd=repo_root,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--runs" in bad.stderr
