"""The stage-1 answer checkpoint: resume semantics without a model."""

from __future__ import annotations

import json

from lib.pipeline.stage1_answers import identity_sidecar_path
from lib.tasks.answering import AnswerCheckpoint


def test_checkpoint_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "x.pkl.partial.jsonl"
    ck = AnswerCheckpoint(path, "id-1")
    ck.append([3, 1], ["7\n", "twelve"])
    ck.append([0], ["ünï"])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"i": 2, "a": "half-writ')  # a write interrupted by a kill
    assert AnswerCheckpoint(path, "id-1").load() == {3: "7\n", 1: "twelve", 0: "ünï"}


def test_checkpoint_from_other_settings_is_set_aside(tmp_path):
    path = tmp_path / "x.pkl.partial.jsonl"
    AnswerCheckpoint(path, "old").append([0], ["1"])
    assert AnswerCheckpoint(path, "new").load() == {}
    assert not path.exists()
    stale = path.with_name(path.name + ".stale")
    assert json.loads(stale.read_text().splitlines()[0]) == {"identity": "old"}


def test_remove_and_sidecar_name(tmp_path):
    path = tmp_path / "c.partial.jsonl"
    ck = AnswerCheckpoint(path, "k")
    ck.append([0], ["a"])
    ck.remove()
    assert not path.exists()
    assert identity_sidecar_path(tmp_path / "llm_io_data.pkl").name == "llm_io_data.meta.json"
