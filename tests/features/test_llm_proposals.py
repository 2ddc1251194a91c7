"""Parsing feature-LLM replies: lenient on format, strict on content, never executing code."""

from __future__ import annotations

import json

from lib.features.llm_proposals import build_user_message, parse_feature_reply
from lib.features.feature import Feature

SRC = "def my_feature(prompt: str, info: dict):\n    return len(prompt)"


def test_plain_list_fenced_block_object_and_think_are_parsed():
    item = {"label": "Prompt length", "description": "chars", "python_src": SRC}
    for reply in (json.dumps([item]),
                  "Sure!\n```json\n" + json.dumps([item]) + "\n```\nDone.",
                  "<think>maybe [a] or {b}</think>" + json.dumps({"features": [item]}),
                  json.dumps([item]).replace("}]", "},]")):
        feats, bad = parse_feature_reply(reply)
        assert [f.label for f in feats] == ["Prompt length"] and bad == [], reply


def test_malformed_replies_are_rejected_with_reasons():
    assert parse_feature_reply("") == ([], [("(reply)", "empty reply")])
    feats, bad = parse_feature_reply("I cannot do that.")
    assert feats == [] and "no JSON list" in bad[0][1]
    feats, bad = parse_feature_reply(json.dumps([
        {"label": "", "description": "x", "python_src": SRC},
        {"label": "No code", "description": "x", "python_src": "return 1"},
        "just a string",
        {"label": "Good", "description": "ok", "python_src": "```python\n" + SRC + "\n```"},
    ]))
    assert [f.label for f in feats] == ["Good"] and feats[0].python_src == SRC
    assert [r for _, r in bad] == ["missing label", "python_src does not define a function",
                                   "item is not a JSON object"]


def test_user_message_contains_both_groups_and_existing_features():
    msg = build_user_message(["1+1="], ["9*9="], [Feature("Len", "length", SRC)], 4, "operator, operand_a")
    assert "### CORRECTLY ANSWERED inputs\n- '1+1='" in msg and "### INCORRECTLY ANSWERED inputs\n- '9*9='" in msg
    assert "### ALREADY DEFINED FEATURES (DO NOT REPEAT)\n- Len: length" in msg
    assert "Propose 4 new features" in msg and "operator, operand_a" in msg
