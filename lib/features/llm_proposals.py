"""Stage-2 feature-LLM dialogue: the user message (spec 5.3) and parsing of replies (5.4, fixed).

Replies are parsed leniently but never executed here: reasoning blocks are removed, a JSON
list or `{"features": [...]}` is found (also inside a fenced code block), and every item that
is not a well-formed feature is returned as a rejection with its reason.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from lib.features.feature import Feature

__all__ = ["build_user_message", "parse_feature_reply"]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json|python|py)?\s*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def build_user_message(positives: Sequence[str], negatives: Sequence[str], existing: Sequence[Feature],
                       n_features: int, info_keys: str, positive_name: str = "CORRECTLY ANSWERED",
                       negative_name: str = "INCORRECTLY ANSWERED") -> str:
    """The request for `n_features` new features separating the two groups of prompts."""
    lines = ["Below are two groups of input prompts given to a language model.", "",
             f"### {positive_name} inputs"]
    lines += [f"- {p!r}" for p in positives]
    lines += ["", f"### {negative_name} inputs"]
    lines += [f"- {p!r}" for p in negatives]
    if existing:
        lines += ["", "### ALREADY DEFINED FEATURES (DO NOT REPEAT)"]
        lines += [f"- {f.label}: {f.description}" for f in existing]
    lines += [
        "",
        f"Propose {n_features} new features that discriminate the first group from the second.",
        "Each feature is a Python function of the prompt. Reply with ONLY a JSON list; each item is an",
        'object with the keys "label" (short name), "description" (one sentence) and "python_src".',
        "python_src defines exactly one function with this signature:",
        "    def my_feature(prompt: str, info: dict):",
        f"info is a dict with the keys: {info_keys}.",
        "Return a number (int, float or bool) or None. Use only `prompt` and `info`; `math` and `re` are",
        "available without import. No imports, no eval/exec/open, no file or network access, no",
        "attributes starting with an underscore. Keep each function under 25 lines and deterministic.",
        "Example of one item (propose different ones):",
        json.dumps([{"label": "Prompt length", "description": "Number of characters in the prompt.",
                     "python_src": "def my_feature(prompt: str, info: dict):\n    return len(prompt)"}]),
    ]
    return "\n".join(lines)


def _json_candidates(text: str) -> list[str]:
    """Substrings that may hold the JSON payload, most specific first."""
    cands = [m.group(1) for m in _FENCE.finditer(text)]
    for open_ch, close_ch in (("[", "]"), ("{", "}")):
        i, j = text.find(open_ch), text.rfind(close_ch)
        if 0 <= i < j:
            cands.append(text[i : j + 1])
    return cands


def _loads_lenient(blob: str) -> Any:
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        return json.loads(_TRAILING_COMMA.sub(r"\1", blob))


def _strip_code_fence(src: str) -> str:
    m = _FENCE.search(src)
    return (m.group(1) if m else src).strip("\n")


def parse_feature_reply(reply: str | None) -> tuple[list[Feature], list[tuple[str, str]]]:
    """(features, rejections) from a feature-LLM reply; a rejection is (label or excerpt, reason)."""
    if not reply or not reply.strip():
        return [], [("(reply)", "empty reply")]
    text = _THINK.sub("", reply).strip()
    payload: Any = None
    for blob in _json_candidates(text):
        try:
            payload = _loads_lenient(blob)
            break
        except json.JSONDecodeError:
            continue
    if isinstance(payload, dict):
        payload = payload.get("features", [payload] if "python_src" in payload else None)
    if not isinstance(payload, list):
        return [], [(text[:60], "no JSON list of features found in the reply")]
    features: list[Feature] = []
    rejected: list[tuple[str, str]] = []
    for item in payload:
        if not isinstance(item, dict):
            rejected.append((str(item)[:60], "item is not a JSON object"))
            continue
        label = str(item.get("label") or "").strip()
        desc = str(item.get("description") or "").strip()
        src = item.get("python_src")
        name = label or desc[:60] or "(unnamed)"
        if not label:
            rejected.append((name, "missing label"))
        elif not isinstance(src, str) or "def " not in src:
            rejected.append((name, "python_src does not define a function"))
        else:
            features.append(Feature(label=label, description=desc, python_src=_strip_code_fence(src), origin="llm"))
    return features, rejected
