"""Run-folder discovery: experiment folders of a data tree, the `-decode_only` fallback, and the
(task, model) and layout of a stats path."""

from __future__ import annotations

import pytest

from lib.runs.discovery import find_model_dirs, layout_for_stats_root, resolve_run_dir, task_model_from_path
from lib.runs.layout import ExperimentLayout
from tests.synthetic_artifacts import MAIN, MAIN_NO_DECODE, MODEL, build_tree


@pytest.fixture()
def tree(tmp_path):
    return build_tree(tmp_path)


def test_decode_only_fallback_and_paths(tree):
    data, _ = tree
    lay = ExperimentLayout(data, "bon_jailbreaking", MODEL)
    assert resolve_run_dir(lay, MAIN).name == MAIN_NO_DECODE
    assert [(m.task, m.model) for m in find_model_dirs(data)] == [("arithmetic", MODEL), ("bon_jailbreaking", MODEL)]
    assert task_model_from_path(lay.stats_dir(MAIN_NO_DECODE)) == ("bon_jailbreaking", MODEL)
    assert layout_for_stats_root(lay.stats_root).model_dir.resolve() == lay.model_dir.resolve()
