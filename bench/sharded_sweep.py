"""Benchmark: the exhaustive single-unit sweep on 1 vs 2 Ray workers, against one process.

The same units, prompts and zero ablation in each run: the single-process `run_exhaustive`
(torch on --threads cores), then `sharded_exhaustive` on a local Ray runtime with 1 worker
(--threads cores) and with 2 workers (--threads/2 cores each, so the machine's cores are shared
the same way). Printed side by side: wall time (model loading in the workers included, and shown
apart), units per second, the ratio to the single process, and whether the records are identical.

Run: .env/bin/python bench/sharded_sweep.py [--n_units 256] [--n_prompts 16] [--shard_size 32] [--threads 2]
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lib.ablation.cha import run_exhaustive  # noqa: E402
from lib.ablation.engine import ReplacementValues  # noqa: E402
from lib.ablation.sharded_sweep import SweepSpec, sharded_exhaustive  # noqa: E402
from lib.ablation.task_engine import engine_for_task  # noqa: E402
from lib.core.ray_runtime import start_ray, stop_ray  # noqa: E402
from lib.models.loading import load_analysed_model  # noqa: E402
from lib.tasks.arithmetic_task import FEW_SHOT_PREFIX, TASK_SPEC  # noqa: E402

MODEL = "smollm2-135m-instruct-q4_1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n_units", type=int, default=256)
    ap.add_argument("--n_prompts", type=int, default=16, help="half associated, half unrelated")
    ap.add_argument("--shard_size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="cores to use in all")
    ap.add_argument("--batch_size", type=int, default=256)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = load_analysed_model(MODEL, device="cpu")
    prompts = [FEW_SHOT_PREFIX + f"{a}+{b}=" for a in range(10, 30) for b in range(10, 14)][: args.n_prompts]
    rows = [{"prompt": p} for p in prompts]
    n_a = len(prompts) // 2
    units = {29: list(range(args.n_units))}
    eng = engine_for_task(model, TASK_SPEC, MODEL, args.batch_size, True)
    prepared = eng.prepare(prompts)

    def tester(groups):
        out = []
        for ans in eng.generate(prepared, list(groups), ReplacementValues("zero")):
            f = [bool(x) for x in TASK_SPEC.is_answer_positive(rows, ans)]
            out.append((f[:n_a], f[n_a:]))
        return out

    t0 = time.perf_counter()
    reference = run_exhaustive(units, tester, 0.05, "positive")
    single = time.perf_counter() - t0

    start_ray(num_cpus=args.threads)
    results = [("one process", args.threads, single, None, True)]
    for workers in (1, 2):
        threads = max(1, args.threads // workers)
        spec = SweepSpec(ai_model=MODEL, task_module="lib.tasks.arithmetic_task", prompts=tuple(prompts),
                         rows=tuple(rows), n_associated=n_a, regime="positive", prune_alpha=0.05,
                         batch_size=args.batch_size, torch_threads=threads)
        first: list[float] = []
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            got = sharded_exhaustive(spec, units, out, shard_size=args.shard_size, n_workers=workers,
                                     cpus_per_worker=threads, progress=False,
                                     on_shard=lambda i, pid: first.append(time.perf_counter() - t0) if not first else None)
            wall = time.perf_counter() - t0
        results.append((f"Ray, {workers} worker(s)", threads, wall, first[0] if first else None, got == reference))
    stop_ray()

    print(f"exhaustive sweep: {args.n_units} units of layer 29, {len(prompts)} prompts, shards of {args.shard_size}, "
          f"{args.threads} core(s) in all")
    print(f"{'engine':<22s} {'threads/worker':>14s} {'wall s':>8s} {'first shard s':>14s} {'units/s':>8s} "
          f"{'vs one process':>15s} {'identical':>9s}")
    for name, threads, wall, first_s, same in results:
        print(f"{name:<22s} {threads:>14d} {wall:>8.1f} {('' if first_s is None else f'{first_s:.1f}'):>14s} "
              f"{args.n_units / wall:>8.2f} {single / wall:>14.2f}x {str(same):>9s}")


if __name__ == "__main__":
    main()
