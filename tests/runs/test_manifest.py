"""run_manifest.json: one entry per stage, rerunning a stage replaces only its entry, versions and git."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lib.runs import manifest as manifest_mod
from lib.runs.manifest import (MANIFEST_NAME, TRACKED_PACKAGES, git_commit, library_versions, read_manifest,
                               record_stage)

FAKE_GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}


def test_record_stage_writes_each_folder_and_keeps_other_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "git_commit", lambda: dict(FAKE_GIT))  # the checkout's state is not fixed
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    record_stage([a, b, a], "stage2", config={"seed": 7, "device": "cpu", "dtype": "auto", "x": [1, 2]},
                 argv=["2_generate_features.py", "--seed", "7"], started="2026-01-01T00:00:00+00:00")
    record_stage([a], "stage3", config={"seed": 7}, argv=["3_extract_rules.py"], started="2026-01-01T00:01:00+00:00",
                 ended="2026-01-01T00:02:00+00:00")
    record_stage([a], "stage2", config={"seed": 8}, argv=["2_generate_features.py", "--seed", "8"],
                 started="2026-01-01T00:03:00+00:00")
    ma = json.loads((a / MANIFEST_NAME).read_text())
    assert set(ma["stages"]) == {"stage2", "stage3"}
    assert ma["stages"]["stage2"]["seed"] == 8 and ma["stages"]["stage2"]["argv"][-1] == "8"
    assert ma["stages"]["stage3"]["ended"] == "2026-01-01T00:02:00+00:00"
    entry = json.loads((b / MANIFEST_NAME).read_text())["stages"]["stage2"]
    assert entry["device"] == "cpu" and entry["config"]["x"] == [1, 2]
    for pkg in ("torch", "transformers", "transformer-lens", "xgboost", "shap", "scikit-learn"):
        assert entry["versions"][pkg], pkg
    assert entry["git"] == FAKE_GIT


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_reads_head_and_dirty_state_and_is_none_outside_a_checkout(tmp_path):
    if not shutil.which("git"):
        pytest.skip("git is not installed on this machine")
    assert git_commit(tmp_path) is None  # no .git folder
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert len(head) == 40
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("x")  # untracked files do not make the tree dirty
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert git_commit(repo) == {"commit": head, "dirty": True}


def test_missing_folders_are_not_created_and_a_torn_manifest_is_rewritten(tmp_path):
    record_stage([tmp_path / "absent"], "stage1", config={}, started="t")
    assert not (tmp_path / "absent").exists()
    (tmp_path / MANIFEST_NAME).write_text("{torn")
    assert read_manifest(tmp_path) == {}
    record_stage([tmp_path], "stage1", config={"seed": 1}, started="t")
    assert read_manifest(tmp_path)["stages"]["stage1"]["seed"] == 1


def test_library_versions_reports_absent_packages_as_none():
    v = library_versions([*TRACKED_PACKAGES, "no-such-package-mecharule"])
    assert v["no-such-package-mecharule"] is None and v["python"].count(".") == 2
