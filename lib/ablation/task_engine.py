"""The ablation engine set up the way a task answers: its token budget, stop strings and labels.

Stages 6 and 7 and the benchmarks all need "an engine that answers like stage 1 did"; building it
in one place keeps their decoding identical (a label task such as HANS answers with a one-step
choice among its label tokens, the log-likelihood choice stage 1 made).
"""

from __future__ import annotations

import argparse
from typing import Any

from lib.ablation.engine import AblationEngine
from lib.models.label_scoring import continuation_token_ids
from lib.models.loading import LoadedModel
from lib.tasks.base import AnswerChoices, TaskError

__all__ = ["label_token_ids", "engine_for_task", "decoding_settings"]


def label_token_ids(tokenizer: Any, choices: AnswerChoices) -> list[int]:
    """One distinct token id per label continuation; multi-token labels are refused (the engine
    chooses in one step, which equals the log-likelihood choice only for one-token labels)."""
    ids = continuation_token_ids(tokenizer, choices.continuations)
    long = [c for c, i in zip(choices.continuations, ids) if len(i) != 1]
    if long:
        raise TaskError(f"label continuations {long} are not single tokens for this tokenizer; the ablation "
                        "engine reads labels in one step, so each label must be one token")
    flat = [i[0] for i in ids]
    if len(set(flat)) != len(flat):
        raise TaskError(f"label continuations {list(choices.continuations)} share a token id")
    return flat


def engine_for_task(model: LoadedModel, task: Any, ai_model: str, batch_size: int, decode_only: bool = True,
                    **kwargs: Any) -> AblationEngine:
    """An AblationEngine decoding as `task` does in stage 1 (kwargs go to the engine)."""
    stops = task.generation_stop_strings(argparse.Namespace(), ai_model)
    choices = task.answer_choices()
    ids = label_token_ids(model.tokenizer, choices) if choices is not None else None
    return AblationEngine(model, task.MAX_NEW_TOKENS, batch_size, stops, decode_only, choice_token_ids=ids, **kwargs)


def decoding_settings(task: Any, ai_model: str) -> dict:
    """What fixes an unablated answer's decoding, for cache keys."""
    choices = task.answer_choices()
    return {"max_new_tokens": int(task.MAX_NEW_TOKENS),
            "stop_strings": list(task.generation_stop_strings(argparse.Namespace(), ai_model)),
            "answer_choices": choices.identity() if choices is not None else None}
