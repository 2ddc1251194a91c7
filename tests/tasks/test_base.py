"""Tests of task loading and the generic dataset statistics (no model)."""

from __future__ import annotations

import sys
import uuid

import numpy as np
import pandas as pd
import pytest

from lib.tasks.base import TaskError, TaskSpec, generic_dataset_stats, load_task, row_as_namedtuple
from lib.tasks import arithmetic_task


# ---- load_task --------------------------------------------------------------------------------
def test_load_task_full_module_name():
    spec = load_task("lib.tasks.arithmetic_task")
    assert spec is arithmetic_task.TASK_SPEC
    assert isinstance(spec, TaskSpec) and spec.name == "arithmetic"


def test_load_task_short_name():
    assert load_task("arithmetic") is arithmetic_task.TASK_SPEC


@pytest.mark.parametrize("name", ["no_such_task_xyz", "lib.tasks.no_such_task_xyz", "nopkg_xyz.sub"])
def test_load_task_unknown_module(name):
    with pytest.raises(TaskError) as info:
        load_task(name)
    msg = str(info.value)
    assert "--task_module" in msg
    assert name in msg
    assert "lib.tasks.arithmetic_task" in msg  # lists the known tasks


@pytest.fixture
def tmp_module(tmp_path, monkeypatch):
    """Write a uniquely named module under tmp_path, importable for the test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> str:
        name = f"tmp_task_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(source)
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


def test_load_task_module_without_task_spec(tmp_module):
    name = tmp_module("VALUE = 1\n")
    with pytest.raises(TaskError) as info:
        load_task(name)
    msg = str(info.value)
    assert "--task_module" in msg and name in msg and "TASK_SPEC" in msg


def test_load_task_module_with_task_spec(tmp_module):
    name = tmp_module("from lib.tasks.arithmetic_task import ArithmeticTask\nTASK_SPEC = ArithmeticTask()\n")
    spec = load_task(name)
    assert type(spec).__name__ == "ArithmeticTask" and spec is not arithmetic_task.TASK_SPEC


def test_load_task_missing_dependency_is_not_hidden(tmp_module):
    """A task module that exists but imports a missing package reports that package."""
    missing = f"missing_dep_{uuid.uuid4().hex[:8]}"
    name = tmp_module(f"import {missing}\nTASK_SPEC = None\n")
    with pytest.raises(ModuleNotFoundError) as info:
        load_task(name)
    assert info.value.name == missing


# ---- generic_dataset_stats --------------------------------------------------------------------
def _arith_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "operator_group": ["+", "+", "+", "-", "-", "*"],
            "prompt": ["1+1=", "1+2=", "1+3=", "5-1=", "5-2=", "2*3="],
            "is_correct": [True, False, None, True, True, False],
            "is_pure": [True, True, False, False, True, True],
        }
    )


def test_generic_dataset_stats_hand_computed():
    stats = generic_dataset_stats(_arith_df(), ["is_correct"])
    expected = {
        "n_examples": 6,
        # is_correct: 5 labelled (None excluded), 3 True
        "n_labeled_is_correct": 5,
        "n_is_correct": 3,
        "pct_is_correct": pytest.approx(0.6),
        # is_pure: all 6 labelled, 4 True
        "n_labeled_is_pure": 6,
        "n_is_pure": 4,
        "pct_is_pure": pytest.approx(4 / 6),
        "accuracy": pytest.approx(0.6),
        "n_correct": 3,
        "n_labeled": 5,
        "accuracy_by_operator": {
            "*": {"n": 1, "accuracy": pytest.approx(0.0)},
            "+": {"n": 3, "accuracy": pytest.approx(0.5)},  # True, False; None is skipped
            "-": {"n": 2, "accuracy": pytest.approx(1.0)},
        },
        "pure_number_output_rate": pytest.approx(4 / 6),
    }
    assert stats == expected
    assert list(stats["accuracy_by_operator"]) == ["*", "+", "-"]  # sorted operator order
    assert isinstance(stats["n_is_correct"], int) and isinstance(stats["accuracy"], float)


def test_generic_dataset_stats_nan_counts_as_unlabelled():
    df = _arith_df()
    df["is_correct"] = [1.0, 0.0, np.nan, 1.0, 1.0, 0.0]
    stats = generic_dataset_stats(df, ["is_correct"])
    assert stats["n_labeled"] == 5 and stats["n_correct"] == 3
    assert stats["accuracy"] == pytest.approx(0.6)


def test_generic_dataset_stats_jailbreak_and_missing_targets():
    df = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "is_jailbroken": [True, None, False, False]})
    stats = generic_dataset_stats(df, ["is_jailbroken", "not_a_column"])
    assert stats == {
        "n_examples": 4,
        "n_labeled_is_jailbroken": 3,
        "n_is_jailbroken": 1,
        "pct_is_jailbroken": pytest.approx(1 / 3),
        "jailbreak_rate": pytest.approx(1 / 3),
        "n_jailbroken": 1,
        "n_labeled_jailbreak": 3,
    }


def test_generic_dataset_stats_all_unlabelled_and_empty():
    stats = generic_dataset_stats(pd.DataFrame({"is_correct": [None, None]}), ["is_correct"])
    assert stats["n_examples"] == 2 and stats["n_labeled"] == 0 and stats["n_correct"] == 0
    assert stats["accuracy"] is None and stats["pct_is_correct"] is None
    assert generic_dataset_stats(pd.DataFrame({"x": []}), ["is_correct"]) == {"n_examples": 0}


def test_task_get_basic_statistics_uses_generic_stats():
    df = _arith_df()
    assert arithmetic_task.TASK_SPEC.get_basic_statistics(df) == generic_dataset_stats(df, ("is_correct",))


def test_generic_dataset_stats_operator_group_without_labels():
    df = pd.DataFrame({"operator_group": ["+", "-"], "is_correct": [True, None], "is_pure": [True, False]})
    stats = generic_dataset_stats(df, ["is_correct"])
    assert stats["accuracy_by_operator"]["+"] == {"n": 1, "accuracy": 1.0}
    assert stats["accuracy_by_operator"]["-"]["n"] == 1
    assert stats["accuracy_by_operator"]["-"]["accuracy"] is None


def test_generic_dataset_stats_nullable_boolean_dtype():
    df = pd.DataFrame({"is_correct": pd.array([True, None, False], dtype="boolean")})
    stats = generic_dataset_stats(df, ["is_correct"])
    assert stats["n_labeled"] == 2 and stats["n_correct"] == 1


# ---- row_as_namedtuple ------------------------------------------------------------------------
def test_row_as_namedtuple_keeps_identifier_keys():
    row = row_as_namedtuple({"prompt": "1+1=", "is_correct": True, "bad key": 1, 3: "x"})
    assert row._fields == ("prompt", "is_correct")
    assert row.prompt == "1+1=" and row.is_correct is True
