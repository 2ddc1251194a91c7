"""Answering a task's prompts with the analysed model, resumably: the loop every task's cache needs.

Answers are appended to a JSON-lines checkpoint after every batch; a killed run restarted with the
same settings skips what it already answered. The checkpoint's first line holds an identity key
(model, prompts, decoding settings): a checkpoint from other settings is set aside, never mixed in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from lib.core.files_and_cache import content_key

__all__ = ["AnswerCheckpoint", "generate_task_cache", "cache_identity"]

log = logging.getLogger(__name__)


class AnswerCheckpoint:
    """Append-only JSON-lines store of finished answers, keyed by prompt index."""

    def __init__(self, path: str | Path, identity: str) -> None:
        self.path = Path(path)
        self.identity = identity

    def load(self) -> dict[int, str]:
        """Answers already finished under the same identity (a torn last line is ignored)."""
        return {i: a for i, (a, _) in self.load_scored().items()}

    def load_scored(self) -> dict[int, tuple[str, list[float] | None]]:
        """Finished answers with the label scores stored beside them (None for free generation)."""
        if not self.path.exists():
            return {}
        done: dict[int, tuple[str, list[float] | None]] = {}
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("identity") != self.identity:
            stale = self.path.with_name(self.path.name + ".stale")
            os.replace(self.path, stale)
            log.warning("checkpoint %s was made with other settings; moved to %s", self.path, stale)
            return {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                s = rec.get("s")
                done[int(rec["i"])] = (str(rec["a"]), [float(x) for x in s] if s is not None else None)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the write of this line was interrupted
        return done

    def append(self, indices: Sequence[int], answers: Sequence[str],
               scores: Sequence[Sequence[float]] | None = None) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"identity": self.identity}) + "\n")
            for k, (i, a) in enumerate(zip(indices, answers)):
                rec: dict[str, Any] = {"i": int(i), "a": a}
                if scores is not None:
                    rec["s"] = [float(x) for x in scores[k]]
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def cache_identity(task: Any, ai_model: str, args: argparse.Namespace, prompts: Sequence[str],
                   max_new_tokens: int, stop_strings: Sequence[str]) -> dict:
    """Everything that determines the answers; two runs with equal identities give equal caches."""
    choices = task.answer_choices() if hasattr(task, "answer_choices") else None
    return {
        "task": task.name,
        "ai_model": ai_model,
        "n_prompts": len(prompts),
        "prompts_sha256": content_key(list(prompts)),
        "max_new_tokens": max_new_tokens,
        "stop_strings": list(stop_strings),
        "dtype": getattr(args, "dtype", "auto"),
        "decoding": choices.identity() if choices is not None else "greedy",
    }


def generate_task_cache(task: Any, ai_model_name: str, ai_model_cache_dir: str | None,
                        args: argparse.Namespace) -> Any:
    """Build prompts, answer the unanswered ones (checkpointing), score, return the cache object."""
    from lib.models.generation import greedy_generate
    from lib.models.loading import load_analysed_model

    records = task.build_prompts(args, model_alias=ai_model_name)
    if not records:
        raise ValueError(f"task {task.name} produced no prompts with these settings")
    prompts = [r["prompt"] for r in records]
    max_new = int(getattr(args, "max_new_tokens", 0) or task.MAX_NEW_TOKENS)
    stops = task.generation_stop_strings(args, ai_model_name)
    identity = cache_identity(task, ai_model_name, args, prompts, max_new, stops)
    args.cache_identity = identity

    ckpt_path = getattr(args, "checkpoint_path", None)
    ckpt = AnswerCheckpoint(ckpt_path, content_key(identity)) if ckpt_path else None
    choices = task.answer_choices()
    done = ckpt.load_scored() if ckpt else {}
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info("resuming: %d of %d prompts already answered", len(done), len(prompts))
        print(f"[stage1] resuming: {len(done)} of {len(prompts)} prompts already answered", flush=True)
    if todo:
        model = load_analysed_model(ai_model_name, getattr(args, "device", "auto"),
                                    getattr(args, "dtype", "auto"), ai_model_cache_dir)

        progress = False if getattr(args, "no_progress", False) else "stage 1: answering"
        if choices is None:
            def on_batch(local_idx: list[int], texts: list[str]) -> None:
                glob = [todo[j] for j in local_idx]
                done.update((g, (t, None)) for g, t in zip(glob, texts))
                if ckpt:
                    ckpt.append(glob, texts)

            greedy_generate(model, [prompts[i] for i in todo], max_new, batch_size=int(args.batch_size),
                            stop_strings=stops, on_batch=on_batch, progress=progress)
        else:
            _score_choices(model, prompts, todo, choices, int(args.batch_size), done, ckpt, progress)
        del model
    answers = [done[i][0] for i in range(len(prompts))]
    if choices is None:
        return task.assemble_cache(records, answers, args)
    return task.assemble_cache(records, answers, args, label_loglik=[done[i][1] for i in range(len(prompts))])


def _score_choices(model: Any, prompts: Sequence[str], todo: Sequence[int], choices: Any, batch_size: int,
                   done: dict, ckpt: AnswerCheckpoint | None, progress: bool | str) -> None:
    """Label answers by log-likelihood (lib.models.label_scoring), checkpointed per block of prompts."""
    from tqdm.auto import tqdm

    from lib.models.label_scoring import score_continuations

    block = max(1, batch_size) * 8
    bar = tqdm(total=len(todo), desc=progress if isinstance(progress, str) else "scoring labels",
               unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), block):
        glob = list(todo[start:start + block])
        sc = score_continuations(model, [prompts[i] for i in glob], choices.continuations,
                                 choices.normalisation, batch_size=batch_size)  # type: ignore[arg-type]
        texts = sc.predicted()
        rows = [list(map(float, r)) for r in sc.score]
        done.update((g, (t, r)) for g, t, r in zip(glob, texts, rows))
        if ckpt:
            ckpt.append(glob, texts, rows)
        bar.update(len(glob))
    bar.close()
