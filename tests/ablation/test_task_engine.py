"""The engine answers a label task with the label stage 1's log-likelihood scoring picked."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ablation.engine import ReplacementValues
from lib.ablation.task_engine import decoding_settings, engine_for_task, label_token_ids
from lib.models.label_scoring import score_continuations
from lib.tasks.base import AnswerChoices, TaskError
from lib.tasks.hans_nli_task import LABEL_CHOICES, TASK_SPEC as HANS, read_hans_file


@pytest.fixture()
def hans_prompts(repo_root):
    return [r["prompt"] for r in read_hans_file(repo_root / "tests" / "data" / "hans_sample.tsv")][:12]


def test_engine_choice_equals_loglik_choice(smollm2, hans_prompts, monkeypatch):
    monkeypatch.setenv("HANS_SCORING", "loglik")
    engine = engine_for_task(smollm2, HANS, "smollm2", batch_size=8)
    assert engine.max_new_tokens == 1
    prepared = engine.prepare(hans_prompts)
    answers = engine.generate(prepared, [None])[0]
    scored = score_continuations(smollm2, hans_prompts, LABEL_CHOICES.continuations)
    clear = np.abs(scored.score[:, 0] - scored.score[:, 1]) > 1e-3
    assert clear.sum() >= 10
    assert [a for a, c in zip(answers, clear) if c] == [p for p, c in zip(scored.predicted(), clear) if c]
    assert set(answers) <= set(LABEL_CHOICES.continuations)


def test_ablated_answers_stay_labels_and_margin_is_label_vs_label(smollm2, hans_prompts, monkeypatch):
    monkeypatch.setenv("HANS_SCORING", "loglik")
    engine = engine_for_task(smollm2, HANS, "smollm2", batch_size=8)
    prepared = engine.prepare(hans_prompts)
    ids = label_token_ids(smollm2.tokenizer, LABEL_CHOICES)
    groups = [None, {20: list(range(0, 576))}, {29: list(range(0, 288))}]
    answers, scores = engine.generate_scored(prepared, groups, ReplacementValues("zero"), targets="greedy")
    for g, texts in enumerate(answers):
        assert set(texts) <= set(LABEL_CHOICES.continuations)
        # Greedy among the labels: the reported token is a label, and its margin over the rival label is >= 0.
        assert set(scores[g].argmax_tokens.tolist()) <= set(ids)
        assert (scores[g].margin >= 0).all()
    # A whole-layer zero ablation changes the E/N margins, so the effect CHA measures is live.
    assert not np.allclose(scores[0].margin.numpy(), scores[1].margin.numpy())


def test_free_generation_when_scoring_is_generate(smollm2, monkeypatch):
    monkeypatch.setenv("HANS_SCORING", "generate")
    monkeypatch.setenv("HANS_MAX_NEW_TOKENS", "3")
    engine = engine_for_task(smollm2, HANS, "smollm2", batch_size=8)
    assert engine.choices is None and engine.max_new_tokens == 3
    assert decoding_settings(HANS, "smollm2")["answer_choices"] is None
    monkeypatch.setenv("HANS_SCORING", "loglik")
    assert decoding_settings(HANS, "smollm2")["answer_choices"] == LABEL_CHOICES.identity()


def test_multi_token_labels_are_refused(smollm2):
    with pytest.raises(TaskError, match="not single tokens"):
        label_token_ids(smollm2.tokenizer, AnswerChoices(("E", "N"), (" entailment", " non-entailment")))
    with pytest.raises(ValueError):
        AnswerChoices(("E",), (" E",))
