"""run_manifest.json: one entry per stage, rerunning a stage replaces only its entry, versions and git."""

from __future__ import annotations

import json

from lib.runs.manifest import MANIFEST_NAME, TRACKED_PACKAGES, library_versions, read_manifest, record_stage


def test_record_stage_writes_each_folder_and_keeps_other_stages(tmp_path):
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
    assert entry["git"] is None or len(entry["git"]["commit"]) == 40


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
