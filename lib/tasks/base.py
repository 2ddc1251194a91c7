"""The task interface every stage relies on, plus task loading and the generic dataset stats.

A task module `lib.tasks.<name>_task` exports `TASK_SPEC`, an instance of a `TaskSpec`
subclass. Stage 1 calls `build_prompts` → generation → `assemble_cache`; later stages call
`load_dataset_from_cache`, `parse_prompt_row` and `is_answer_positive`. A task whose answer is
one of a few labels may declare `answer_choices`: the labels are then read by log-likelihood
(stage 1) and by a greedy step restricted to the labels' tokens (the ablation engine).
"""

from __future__ import annotations

import abc
import argparse
import importlib
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd

from lib.features.feature import Feature

__all__ = ["AnswerChoices", "TaskSpec", "TaskError", "load_task", "generic_dataset_stats", "row_as_namedtuple"]


class TaskError(RuntimeError):
    """A user-facing task problem (unknown module, malformed dataset)."""


@dataclass(frozen=True)
class AnswerChoices:
    """Labels a task reads by log-likelihood instead of parsing free generation.

    `continuations[i]` is the text appended to the prompt that states `labels[i]` (e.g. " E");
    `normalisation` is how summed log-probs are compared (lib.models.label_scoring)."""

    labels: tuple[str, ...]
    continuations: tuple[str, ...]
    normalisation: str = "tokens"

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.continuations) or len(self.labels) < 2:
            raise ValueError("AnswerChoices needs >= 2 labels, one continuation each")

    def label_of(self, continuation: str) -> str:
        return self.labels[self.continuations.index(continuation)]

    def identity(self) -> str:
        """How answers are decoded, for cache keys."""
        return f"loglik:{self.normalisation}:" + "|".join(self.continuations)


class TaskSpec(abc.ABC):
    """Base class of the three tasks; attribute names follow the original interface."""

    name: str = "task"
    DEFAULT_INPUT: str = "prompt"
    DEFAULT_OUTPUT: str = "raw_output"
    DEFAULT_TARGETS: tuple[str, ...] = ("is_correct",)
    MAX_NEW_TOKENS: int = 10
    SYSTEM_PROMPT: str = ""
    TOKENS_DICT_KEYS: str = ""
    SEED_FEATURES: list[Feature] = []

    # ---- stage 1 -------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Register task-specific stage-1 flags (none by default)."""

    @abc.abstractmethod
    def build_prompts(self, args: argparse.Namespace, model_alias: str | None = None) -> list[dict]:
        """The prompt records to answer, each a dict with at least `prompt`; deterministic in args."""

    def generation_stop_strings(self, args: argparse.Namespace, model_alias: str | None = None) -> tuple[str, ...]:
        """Strings that end an answer early (none by default: stop at EOS or the token budget)."""
        return ()

    def answer_choices(self) -> AnswerChoices | None:
        """Labels to score by log-likelihood; None (the default): answers are generated freely."""
        return None

    @abc.abstractmethod
    def assemble_cache(self, records: list[dict], answers: list[str], args: argparse.Namespace,
                       label_loglik: Sequence[Sequence[float]] | None = None) -> Any:
        """Score answers and build the picklable stage-1 cache object in the task's format.

        With `answer_choices`, `answers[i]` is the winning continuation and `label_loglik[i]` the
        normalised score of every choice (choice order)."""

    def generate_cache(self, ai_model_name: str, ai_model_cache_dir: str | None, args: argparse.Namespace) -> Any:
        """Original entry point: build prompts, answer them with the analysed model, score them."""
        from lib.tasks.answering import generate_task_cache

        return generate_task_cache(self, ai_model_name, ai_model_cache_dir, args)

    # ---- later stages --------------------------------------------------------------------
    @abc.abstractmethod
    def load_dataset_from_cache(self, path: str) -> pd.DataFrame:
        """One row per prompt, with DEFAULT_INPUT, DEFAULT_OUTPUT and DEFAULT_TARGETS columns."""

    @abc.abstractmethod
    def parse_prompt_row(self, row: Any) -> dict:
        """The `info` dict that feature functions receive (keys listed in TOKENS_DICT_KEYS)."""

    @abc.abstractmethod
    def is_answer_positive(self, rows: Sequence[dict], responses: Sequence[str]) -> list[bool]:
        """Primary-target label of each (possibly ablated) response to its row's prompt."""

    def get_basic_statistics(self, df: pd.DataFrame) -> dict:
        return generic_dataset_stats(df, self.DEFAULT_TARGETS)


def load_task(module_name: str) -> TaskSpec:
    """Import `module_name` (or `lib.tasks.<name>_task` for a short name) and return its TASK_SPEC."""
    candidates = [module_name]
    if "." not in module_name:
        candidates.append(f"lib.tasks.{module_name}_task")
    last: Exception | None = None
    for cand in candidates:
        try:
            module = importlib.import_module(cand)
        except ModuleNotFoundError as exc:
            if exc.name and (cand == exc.name or cand.startswith(exc.name + ".")):
                last = exc
                continue
            raise
        spec = getattr(module, "TASK_SPEC", None)
        if spec is None:
            raise TaskError(f"--task_module {module_name}: module '{cand}' has no TASK_SPEC")
        return spec
    known = "lib.tasks.arithmetic_task, lib.tasks.bon_jailbreaking_task, lib.tasks.hans_nli_task"
    raise TaskError(f"--task_module {module_name}: no such module ({last}); known tasks: {known}")


def row_as_namedtuple(row: dict) -> Any:
    """The namedtuple form of a row that `parse_prompt_row` receives (DataFrame.itertuples style)."""
    keys = [k for k in row if isinstance(k, str) and k.isidentifier()]
    return namedtuple("Row", keys)(*(row[k] for k in keys))


def _as_nullable_bool(series: pd.Series) -> pd.Series:
    """Booleans with missing values (None, NaN, pd.NA) kept missing."""
    return pd.Series([None if _is_missing(v) else bool(v) for v in series], index=series.index, dtype="boolean")


def _is_missing(v: Any) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):  # containers: never missing
        return False


def _rate(col: pd.Series) -> float | None:
    """Share of True among labelled values (None when nothing is labelled)."""
    labeled = col.dropna()
    return float(labeled.mean()) if len(labeled) else None


def generic_dataset_stats(df: pd.DataFrame, targets: Iterable[str]) -> dict:
    """Dataset summary written to dataset_stats.json (spec 4.3)."""
    stats: dict[str, Any] = {"n_examples": int(len(df))}
    cands = list(dict.fromkeys([*targets, "is_correct", "is_jailbroken", "is_pure"]))
    for t in cands:
        if t not in df.columns:
            continue
        col = _as_nullable_bool(df[t])
        labeled = col.dropna()
        stats[f"n_labeled_{t}"] = int(len(labeled))
        stats[f"n_{t}"] = int(labeled.sum())
        stats[f"pct_{t}"] = _rate(col)
    if "is_correct" in df.columns:
        col = _as_nullable_bool(df["is_correct"])
        labeled = col.dropna()
        stats["accuracy"] = _rate(col)
        stats["n_correct"] = int(labeled.sum())
        stats["n_labeled"] = int(len(labeled))
        if "operator_group" in df.columns:
            stats["accuracy_by_operator"] = {
                str(op): {"n": int(len(g)), "accuracy": _rate(_as_nullable_bool(g["is_correct"]))}
                for op, g in df.groupby("operator_group", sort=True)
            }
        if "is_pure" in df.columns:
            stats["pure_number_output_rate"] = _rate(_as_nullable_bool(df["is_pure"]))
    if "is_jailbroken" in df.columns:
        col = _as_nullable_bool(df["is_jailbroken"])
        labeled = col.dropna()
        stats["jailbreak_rate"] = _rate(col)
        stats["n_jailbroken"] = int(labeled.sum())
        stats["n_labeled_jailbreak"] = int(len(labeled))
    return stats
