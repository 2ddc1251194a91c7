"""The exhaustive sweep sharded over Ray actors on a local 2-CPU cluster equals the single-process
sweep, record for record; a killed actor's shard is retried (the result stays complete and
identical); a rerun reuses the shard files of the same sweep."""

from __future__ import annotations

import os
import signal

import pytest

from lib.ablation.cha import run_exhaustive
from lib.ablation.engine import ReplacementValues
from lib.ablation.sharded_sweep import SweepSpec, shard_units, sharded_exhaustive
from lib.ablation.task_engine import engine_for_task
from lib.tasks.arithmetic_task import TASK_SPEC as ARITH
from tests.conftest import SMOLLM2

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
UNITS = {29: list(range(0, 40, 2)), 28: [3, 5, 7, 11]}  # 24 units in two layers


@pytest.fixture(scope="module")
def cluster():
    from lib.core.ray_runtime import start_ray, stop_ray

    start_ray(num_cpus=2)
    yield ray
    stop_ray()


@pytest.fixture(scope="module")
def spec(smollm2):
    """4 + 4 correctly answered additions of the embedded model (positive regime), zero ablation."""
    eng = engine_for_task(smollm2, ARITH, SMOLLM2, 64, True)
    prompts = [FEW_SHOT + f"{a}+{b}=" for a in range(10, 16) for b in range(10, 16)]
    answers = eng.generate(eng.prepare(prompts), [None])[0]
    ok = ARITH.is_answer_positive([{"prompt": p} for p in prompts], answers)
    chosen = [p for p, good in zip(prompts, ok) if good][:8]
    assert len(chosen) == 8
    return SweepSpec(ai_model=SMOLLM2, task_module="lib.tasks.arithmetic_task", prompts=tuple(chosen),
                     rows=tuple({"prompt": p} for p in chosen), n_associated=4, regime="positive",
                     prune_alpha=0.05, batch_size=64)


@pytest.fixture(scope="module")
def reference(smollm2, spec):
    eng = engine_for_task(smollm2, ARITH, SMOLLM2, 64, True)
    prepared = eng.prepare(list(spec.prompts))
    rows = list(spec.rows)

    def tester(groups):
        out = []
        for ans in eng.generate(prepared, list(groups), ReplacementValues("zero")):
            f = [bool(x) for x in ARITH.is_answer_positive(rows, ans)]
            out.append((f[:4], f[4:]))
        return out

    return run_exhaustive(UNITS, tester, spec.prune_alpha, spec.regime)


def test_shards_follow_run_exhaustive_order():
    shards = shard_units(UNITS, 10)
    assert [len(s) for s in shards] == [10, 10, 4]
    assert [u for s in shards for u in s] == [(29, i) for i in range(0, 40, 2)] + [(28, i) for i in (3, 5, 7, 11)]
    with pytest.raises(ValueError):
        shard_units(UNITS, 0)


def test_sharded_equals_single_process_and_resumes(cluster, spec, reference, tmp_path):
    seen: list[int] = []
    got = sharded_exhaustive(spec, UNITS, tmp_path, shard_size=5, n_workers=2, progress=False,
                             on_shard=lambda i, pid: seen.append(pid))
    assert got == reference and len(got) == 24
    assert len(set(seen)) == 2  # both actors worked
    (tmp_path / "shard_00002.json").unlink()
    ran: list[int] = []
    again = sharded_exhaustive(spec, UNITS, tmp_path, shard_size=5, n_workers=2, progress=False,
                               on_shard=lambda i, pid: ran.append(i))
    assert again == reference and ran == [2]  # only the missing shard ran


def test_a_killed_actor_is_restarted_and_the_result_is_identical(cluster, spec, reference, tmp_path):
    killed: list[int] = []

    def kill_first(i: int, pid: int) -> None:
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    got = sharded_exhaustive(spec, UNITS, tmp_path, shard_size=4, n_workers=2, progress=False, on_shard=kill_first)
    assert killed and got == reference
    assert sorted(p.name for p in tmp_path.glob("shard_*.json")) == [f"shard_{i:05d}.json" for i in range(6)]


def test_stage6_exhaustive_on_ray_equals_local(cluster, smollm2, tmp_path):
    """`6_analyze_bag_of_rules.py --engine ray` (no --fast_ablation) writes the local run's records."""
    import json

    from tests.pipeline.test_stage6_cha import _run, _write_inputs

    disc, _ = _write_inputs(tmp_path, smollm2, n_units=8)
    base = ["--input_data_dir", str(disc), "--device", "cpu", "--decode_only", "--mlp_neurons_only",
            "--intervention", "mean-positional", "--n_associated", "4", "--n_unrelated", "4", "--batch_size", "64",
            "--points_to_use_for_mean_ablation", "16", "--baseline_subset", "positive", "--seed", "1",
            "--knockout_random_sets", "0"]
    assert _run([*base, "--output_data_dir", str(tmp_path / "local")]) == 0
    assert _run([*base, "--output_data_dir", str(tmp_path / "ray"), "--engine", "ray", "--ray_workers", "2",
                 "--shard_size", "3"]) == 0
    local = json.loads((tmp_path / "local" / "is_correct" / "rule_0000.json").read_text())
    remote = json.loads((tmp_path / "ray" / "is_correct" / "rule_0000.json").read_text())
    assert local["status"] == remote["status"] == "ok"
    strip = lambda recs: [{k: v for k, v in r.items() if "time" not in k} for r in recs]  # noqa: E731
    assert strip(remote["ablations"]) == strip(local["ablations"]) and len(local["ablations"]) == 8
    assert len(list((tmp_path / "ray" / "is_correct" / "shards_0000").glob("shard_*.json"))) == 3
