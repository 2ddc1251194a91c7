"""The exhaustive single-unit sweep split into shards run by Ray actors, each holding the model once.

A sweep ablates every candidate unit alone on one regime's prompts (the reference CHA is measured
against). Here its units are cut into shards in `run_exhaustive`'s order; a pool of Ray actors (one
per GPU, or per `cpus_per_worker` cores) loads the analysed model once each and runs shards, and
every finished shard is written to its own JSON file. Merged in shard order the records equal the
single-process `run_exhaustive` on the same inputs. A rerun reuses the shard files of the same
sweep; an actor that dies (killed, out of memory) is restarted by Ray and its shard retried
(`max_restarts`, `max_task_retries`), the other shards are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lib.ablation.cha import run_exhaustive
from lib.core.files_and_cache import atomic_write_json, content_key

__all__ = ["SweepSpec", "SweepWorker", "shard_units", "sweep_key", "sharded_exhaustive"]

Unit = tuple[int, int]


@dataclass(frozen=True)
class SweepSpec:
    """Everything a worker needs to answer a group test: model, task, prompts, regime, intervention."""

    ai_model: str
    task_module: str
    prompts: tuple[str, ...]
    rows: tuple[dict, ...]
    n_associated: int
    regime: str
    prune_alpha: float
    intervention: str = "zero"
    means: Mapping[int, Any] = field(default_factory=dict)  # layer -> [S, d_model] table (numpy/torch)
    batch_size: int = 64
    decode_only: bool = True
    device: str = "cpu"
    dtype: str = "auto"
    torch_threads: int = 1

    def identity(self) -> str:
        """Content key of the spec (means included); shard files of another sweep are never reused."""
        plain = {k: v for k, v in asdict(self).items() if k not in ("means", "batch_size", "device", "torch_threads")}
        means = {int(L): torch.as_tensor(t).float().numpy().round(6).tolist() for L, t in sorted(self.means.items())}
        return content_key(plain, means)


def shard_units(layer_units: Mapping[int, Sequence[int]], shard_size: int) -> list[list[Unit]]:
    """The units in `run_exhaustive`'s order (layers as given, ids sorted), cut into shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    singles = [(int(L), int(i)) for L, ids in layer_units.items() for i in sorted(int(x) for x in ids)]
    return [singles[k:k + shard_size] for k in range(0, len(singles), shard_size)]


def sweep_key(spec: SweepSpec, shards: Sequence[Sequence[Unit]]) -> str:
    return content_key(spec.identity(), [list(map(list, s)) for s in shards])


class SweepWorker:
    """One model, one engine, the regime's prompts prepared once; `run(units)` = their single-unit records."""

    def __init__(self, spec: SweepSpec) -> None:
        from lib.ablation.engine import ReplacementValues
        from lib.ablation.task_engine import engine_for_task
        from lib.models.loading import load_analysed_model
        from lib.tasks.base import load_task

        torch.set_num_threads(max(1, int(spec.torch_threads)))
        self.spec = spec
        self.task = load_task(spec.task_module)
        model = load_analysed_model(spec.ai_model, spec.device, spec.dtype)
        self.engine = engine_for_task(model, self.task, spec.ai_model, spec.batch_size, spec.decode_only)
        self.prepared = self.engine.prepare(list(spec.prompts))
        self.replacement = ReplacementValues(spec.intervention, {int(L): torch.as_tensor(t).float()
                                                                  for L, t in spec.means.items()})
        self.rows = [dict(r) for r in spec.rows]

    def pid(self) -> int:
        return os.getpid()

    def _test(self, groups: Sequence[Mapping[int, Sequence[int]]]) -> list[tuple[list[bool], list[bool]]]:
        """The group tester `run_exhaustive` expects: per group, the associated and unrelated answer flags."""
        n_a = self.spec.n_associated
        out = []
        for ans in self.engine.generate(self.prepared, list(groups), self.replacement):
            flags = [bool(x) for x in self.task.is_answer_positive(self.rows, ans)]
            out.append((flags[:n_a], flags[n_a:]))
        return out

    def run(self, units: Sequence[Unit]) -> tuple[int, list[dict]]:
        """(this process's pid, the records of every unit of the shard ablated alone, in order)."""
        by_layer: dict[int, list[int]] = {}
        for L, i in units:  # shards are contiguous in run_exhaustive's order, so this keeps it
            by_layer.setdefault(int(L), []).append(int(i))
        return os.getpid(), run_exhaustive(by_layer, self._test, self.spec.prune_alpha, self.spec.regime)


def _shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard_{index:05d}.json"


def _finished(path: Path, key: str, units: Sequence[Unit]) -> list[dict] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("sweep_key") != key or data.get("units") != [list(u) for u in units]:
        return None
    return data.get("records")


def sharded_exhaustive(spec: SweepSpec, layer_units: Mapping[int, Sequence[int]], out_dir: str | Path, *,
                       shard_size: int = 32, n_workers: int = 2, cpus_per_worker: float = 1.0,
                       gpus_per_worker: float = 0.0, max_restarts: int = 3, progress: bool = True,
                       on_shard: Callable[[int, int], None] | None = None) -> list[dict]:
    """Single-unit records of every unit of `layer_units`, computed shard by shard on Ray actors.

    Ray must be initialised (`lib.core.ray_runtime.start_ray`). `on_shard(index, worker_pid)` is
    called as each shard's file is written (progress hooks, tests). Returns the records merged in
    shard order, identical to `run_exhaustive` on one process.
    """
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        raise RuntimeError("sharded_exhaustive needs a Ray runtime: call lib.core.ray_runtime.start_ray first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_units(layer_units, shard_size)
    key = sweep_key(spec, shards)
    results: dict[int, list[dict]] = {}
    for i, units in enumerate(shards):
        done = _finished(_shard_path(out, i), key, units)
        if done is not None:
            results[i] = done
    todo = [i for i in range(len(shards)) if i not in results]
    bar = tqdm(total=len(shards), initial=len(results), unit="shard", desc="exhaustive sweep",
               disable=not progress)
    if todo:
        actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_restarts,
                               max_task_retries=max_restarts)(SweepWorker)
        spec_ref = ray.put(spec)
        workers = [actor_cls.remote(spec_ref) for _ in range(max(1, min(n_workers, len(todo))))]
        pending: dict[Any, tuple[int, Any]] = {}  # object ref -> (shard, actor)
        queue = list(todo)
        free = list(workers)
        while queue or pending:
            while queue and free:
                i, w = queue.pop(0), free.pop(0)
                pending[w.run.remote(shards[i])] = (i, w)
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, w = pending.pop(ready[0])
            pid, records = ray.get(ready[0])
            atomic_write_json(_shard_path(out, i), {"sweep_key": key, "units": [list(u) for u in shards[i]],
                                                    "records": records})
            results[i] = records
            bar.update(1)
            if on_shard is not None:
                on_shard(i, pid)
            free.append(w)
        for w in workers:
            ray.kill(w)
    bar.close()
    return [rec for i in range(len(shards)) for rec in results[i]]
