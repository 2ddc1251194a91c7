"""Benchmark: CHA against exhaustive single-unit ablation of every unit in a search space, on the
same prompts, in one run — recall of the reference's high-impact units with its cost.

Prompts are the task's own (all of `build_prompts`), answered once by the analysed model (cached);
per regime (positive = answered correctly, negative = not) the associated slice holds the prompts of
one operator (`--associated_operator`, default addition), the unrelated slice the others. Each slice
gives `--n_prompts` search prompts and `--n_fresh` fresh ones never used by any search.

  reference  every unit alone on all search prompts; high-impact when, on one slice, the observed
             flip rate and its Clopper–Pearson lower bound both reach τ;
  effect     sequential effect CHA (`--cha_statistic effect_sprt`), one run per `--seeds`;
  flip_ucb   the original rule (`--cha_statistic flip_ucb`), one run per `--flip_ucb_seeds`.

Printed side by side, per regime and seed: recall of the reference's high-impact units (overall and
by the paper's Table 3 bins, with a 95 % interval), precision, evaluations / N and / (2N−1), forward
rows (prompts × evaluations) / the reference's, evaluations / k·log2(N/k)+k with the reference's k,
wall times; the knockout of the found agonists together against `--knockout_random_sets` random
same-size sets of the same layer mix; and replication: the share of the reference's high-impact
units (and of each search's agonists) whose flip rate on the fresh prompts still reaches τ.

Everything is resumable (`--work_dir`: answers, reference chunks and each search are stored as they
finish) and shows progress. A JSON copy of every figure goes to `--out_json` (default
`bench/results/cha_vs_exhaustive_<model>_<space>.json`) with the summary keys `recall`,
`forward_rows_ratio`, `evaluations_ratio`, `knockout_removal`, `random_removal`, `replication`.

CPU default space: the last 4 MLP layers (2,304 SmolLM2 units); on a GPU use `--all_layers`.
  .env/bin/python bench/cha_vs_exhaustive.py                       # last 4 layers, 160 prompts per slice
  .env/bin/python bench/cha_vs_exhaustive.py --layers 29 --n_prompts 64 --n_fresh 64
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lib.ablation.cha import run_cha  # noqa: E402
from lib.ablation.engine import AblationEngine  # noqa: E402
from lib.ablation.task_engine import engine_for_task  # noqa: E402
from lib.ablation.engine_tester import EngineSequentialTester  # noqa: E402
from lib.ablation.interventions import estimate_replacements  # noqa: E402
from lib.ablation.knockout import knockout_validation  # noqa: E402
from lib.ablation.recall import (cost_report, high_impact_units, recall_report,  # noqa: E402
                                 singleton_agonists)
from lib.ablation.sequential_cha import SequentialSettings, run_sequential_cha, run_sequential_exhaustive  # noqa: E402
from lib.core.files_and_cache import atomic_write_json  # noqa: E402
from lib.models.loading import load_analysed_model  # noqa: E402
from lib.tasks.base import load_task  # noqa: E402


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def answers_of(engine: AblationEngine, task, records: list[dict], work: Path, model: str) -> list[str]:
    """The model's unablated answers to every prompt (cached in the work folder, keyed by prompts and model)."""
    prompts = [r["prompt"] for r in records]
    key = hashlib.sha256(json.dumps([model, prompts]).encode()).hexdigest()[:16]
    path = work / f"answers_{key}.json"
    cached = _read(path)
    if cached is not None:
        return cached
    out: list[str] = []
    step = 512
    for i in tqdm(range(0, len(prompts), step), desc="answering", unit="chunk"):
        out += engine.generate(engine.prepare(prompts[i:i + step]), [None])[0]
    atomic_write_json(path, out)
    return out


def slices_for(records, positive, regime: str, op: str, n: int, n_fresh: int, n_pool: int, seed: int):
    """Search and fresh (associated, unrelated) slices and a mean pool, from the prompts of the regime."""
    want = regime == "positive"
    idx = [i for i, p in enumerate(positive) if bool(p) == want]
    rng = np.random.default_rng([seed, 0 if want else 1])
    idx = [idx[j] for j in rng.permutation(len(idx))]
    assoc = [i for i in idx if records[i].get("operator") == op]
    unrel = [i for i in idx if records[i].get("operator") != op]
    m = min(n, len(assoc) - n_fresh, len(unrel) - n_fresh)
    if m < 8:
        raise SystemExit(f"regime {regime}: {len(assoc)} associated / {len(unrel)} unrelated prompts, too few for "
                         f"{n} search + {n_fresh} fresh per slice; lower --n_prompts/--n_fresh")
    if m < n:
        print(f"[{regime}] only {m} search prompts per slice available (asked {n})")
    search = (assoc[:m], unrel[:m])
    fresh = (assoc[m:m + n_fresh], unrel[m:m + n_fresh])
    used = set(search[0] + search[1] + fresh[0] + fresh[1])
    pool = [i for i in idx if i not in used][:n_pool] or search[0]
    return search, fresh, pool


def reference_of(tester, layer_units: dict[int, list[int]], n: int, st: SequentialSettings, path: Path,
                 chunk: int) -> tuple[list[dict], dict]:
    """Exhaustive single-unit ablation, stored chunk by chunk (a rerun resumes where it stopped)."""
    state = _read(path) or {"records": [], "forward_rows": 0, "evaluations": 0, "wall_seconds": 0.0}
    done = {(r["layer"], r["unit"]) for r in state["records"]}
    todo = [(L, i) for L, ids in layer_units.items() for i in ids if (L, i) not in done]
    bar = tqdm(total=sum(len(v) for v in layer_units.values()), initial=len(done), desc="exhaustive", unit="unit")
    for s in range(0, len(todo), chunk):
        part: dict[int, list[int]] = {}
        for L, i in todo[s:s + chunk]:
            part.setdefault(L, []).append(i)
        t0 = time.perf_counter()
        recs, cost = run_sequential_exhaustive(part, tester, n, st, chunk=chunk)
        state["records"] += recs
        state["forward_rows"] += cost["forward_rows"]
        state["evaluations"] += cost["evaluations"]
        state["wall_seconds"] += time.perf_counter() - t0
        atomic_write_json(path, state)
        bar.update(len(recs))
    bar.close()
    return state["records"], state


def replication(fresh_tester, units: dict[tuple[int, int], str | None], tau: float, n: int) -> dict:
    """Share of `units` whose flip rate on fresh prompts reaches τ (on their slice, or either slice)."""
    if not units:
        return {"n_units": 0, "replicated": 0, "share": None}
    keys = sorted(units)
    out = fresh_tester([{L: [i]} for L, i in keys], 0, n)
    ok = 0
    for key, (a, u) in zip(keys, out):
        rates = {"associated": float(np.mean(a.flips)), "unrelated": float(np.mean(u.flips))}
        side = units[key]
        ok += int((rates[side] if side else max(rates.values())) >= tau)
    return {"n_units": len(keys), "replicated": ok, "share": ok / len(keys)}


def _flip_tester(tester, n: int, regime: str):
    """The original CHA's group tester (positive-answer flags per slice) on the sequential tester."""
    def test(groups):
        out = []
        for a, u in tester(list(groups), 0, n):
            pos = [(~r.flips) if regime == "positive" else r.flips for r in (a, u)]
            out.append(([bool(x) for x in pos[0]], [bool(x) for x in pos[1]]))
        return out
    return test


def _fmt(x, pct=True, digits=1):
    if x is None:
        return "n/a"
    return f"{100 * x:.{digits}f} %" if pct else f"{x:.{digits}f}"


def run_regime(a, task, engine, records, positive, regime, layer_units, work: Path) -> dict:
    """Reference, the searches, knockout and replication of one regime."""
    search, fresh, pool = slices_for(records, positive, regime, a.associated_operator, a.n_prompts, a.n_fresh,
                                     a.mean_pool, a.prompt_seed)
    n = len(search[0])
    prompts = [[records[i]["prompt"] for i in s] for s in search]
    rows = [[records[i] for i in s] for s in search]
    repl = estimate_replacements(engine, [records[i]["prompt"] for i in pool], a.intervention, layer_units,
                                 progress=f"[{regime}] {a.intervention} values")
    tester = EngineSequentialTester(engine, task, list(zip(prompts, rows)), repl, regime)
    for s in range(2):
        if bool(np.any(tester.base_positive[s] != (regime == "positive"))):
            raise SystemExit(f"[{regime}] the engine's unablated answers differ from the cached ones")
    fresh_tester = EngineSequentialTester(engine, task, [([records[i]["prompt"] for i in s], [records[i] for i in s])
                                                         for s in fresh], repl, regime)
    st = SequentialSettings(tau=a.tau, n_start=a.n_start)
    space = "-".join(f"{L}" for L in layer_units)
    ref_records, ref_state = reference_of(tester, layer_units, n, st, work / f"reference_{regime}_L{space}_n{n}.json",
                                          a.chunk)
    hi = high_impact_units(ref_records)
    hi_side = {}
    for r in ref_records:
        if r.get("high_impact"):
            hi_side[(r["layer"], r["unit"])] = ("associated" if r["flip_hat_associated"] >= r["flip_hat_unrelated"]
                                                else "unrelated")
    n_units = sum(len(v) for v in layer_units.values())
    margins = (tester.base_margins[0], tester.base_margins[1])
    out = {"regime": regime, "n_prompts_per_slice": n, "n_fresh_per_slice": len(fresh[0]), "n_units": n_units,
           "reference": {"n_high_impact": len(hi), "forward_rows": ref_state["forward_rows"],
                         "wall_seconds": round(ref_state["wall_seconds"], 1),
                         "n_flip_any": int(sum(1 for r in ref_records
                                               if r["flip_hat_associated"] > 0 or r["flip_hat_unrelated"] > 0)),
                         "max_flip_rate": max((max(r["flip_hat_associated"], r["flip_hat_unrelated"])
                                               for r in ref_records), default=None),
                         "replication": replication(fresh_tester, hi_side, a.tau, len(fresh[0]))},
           "searches": []}
    runs = [("effect_sprt", s) for s in a.seeds] + [("flip_ucb", s) for s in a.flip_ucb_seeds]
    for statistic, seed in runs:
        path = work / f"{statistic}_{regime}_L{space}_n{n}_seed{seed}.json"
        res = _read(path)
        if res is None:
            rng = np.random.default_rng(seed)
            t0 = time.perf_counter()
            if statistic == "effect_sprt":
                recs, cost = run_sequential_cha(layer_units, tester, n, margins, regime, st, rng)
            else:
                recs = run_cha(layer_units, _flip_tester(tester, n, regime), a.tau, 0.05, regime, rng)
                cost = {"evaluations": len(recs), "forward_rows": len(recs) * 2 * n}
            wall = time.perf_counter() - t0
            found = sorted(singleton_agonists(recs, a.tau))
            by_layer: dict[int, list[int]] = {}
            for L, i in found:
                by_layer.setdefault(L, []).append(i)
            ko = knockout_validation(tester, by_layer, layer_units, n, margins, a.knockout_random_sets,
                                     np.random.default_rng([seed, 7]))
            res = {"statistic": statistic, "seed": seed, "found": [list(u) for u in found],
                   "wall_seconds": round(wall, 1), "cost": cost, "knockout": ko,
                   "replication": replication(fresh_tester, {u: None for u in found}, a.tau, len(fresh[0]))}
            atomic_write_json(path, res)
        found = {tuple(u) for u in res["found"]}
        res = {**res, "recall": recall_report(hi, found, a.tau),
               "cost_vs_reference": cost_report(n_units, len(hi), res["cost"]["evaluations"],
                                                res["cost"]["forward_rows"], ref_state["forward_rows"])}
        out["searches"].append(res)
    return out


def print_regime(r: dict, tau: float) -> None:
    ref = r["reference"]
    print(f"\n[{r['regime']}] N = {r['n_units']} units, {r['n_prompts_per_slice']}+{r['n_prompts_per_slice']} prompts, "
          f"τ = {tau:g}: reference {ref['n_high_impact']} high-impact unit(s) ({ref['n_flip_any']} flip at least one "
          f"prompt, max flip rate {_fmt(ref['max_flip_rate'])}), {ref['forward_rows']} forward rows, "
          f"{ref['wall_seconds']} s; replicate on {r['n_fresh_per_slice']} fresh prompts: "
          f"{ref['replication']['replicated']}/{ref['replication']['n_units']}")
    head = f"  {'search':18s} {'recall (95 % CI)':>24s} {'prec.':>7s} {'eval/N':>8s} {'eval/(2N-1)':>11s} " \
           f"{'rows/ref':>9s} {'eval/bound':>10s} {'wall s':>7s} {'knockout':>9s} {'random':>8s}"
    print(head)
    for s in r["searches"]:
        rc, c, ko = s["recall"], s["cost_vs_reference"], s["knockout"]
        ci = rc["recall_ci95"]
        rec = (f"{_fmt(rc['recall'])} [{_fmt(ci[0], digits=0)}, {_fmt(ci[1], digits=0)}]" if rc["recall"] is not None
               else f"n/a (k=0), found {rc['n_found']}")
        print(f"  {s['statistic'] + ' seed ' + str(s['seed']):18s} {rec:>24s} {_fmt(rc['precision']):>7s} "
              f"{_fmt(c['evaluations_over_n']):>8s} {_fmt(c['evaluations_over_2n_minus_1']):>11s} "
              f"{_fmt(c['forward_rows_ratio']):>9s} {_fmt(c['evaluations_over_bound'], pct=False, digits=2):>10s} "
              f"{s['wall_seconds']:>7.1f} {_fmt(ko.get('removal_associated')):>9s} "
              f"{_fmt(ko.get('random_removal_associated_mean')):>8s}")


def summary(regimes: list[dict]) -> dict:
    """The headline figures over regimes and seeds of the effect statistic (and of flip_ucb apart)."""
    out = {}
    for statistic in ("effect_sprt", "flip_ucb"):
        runs = [(r, s) for r in regimes for s in r["searches"] if s["statistic"] == statistic]
        if not runs:
            continue
        k = sum(s["recall"]["n_reference_high_impact"] for _, s in runs)
        hit = sum(s["recall"]["n_recalled"] for _, s in runs)
        kos = [s["knockout"] for _, s in runs if s["knockout"].get("n_units")]
        out[statistic] = {
            "recall": hit / k if k else None, "n_reference_high_impact_total": k,
            "forward_rows_ratio": float(np.mean([s["cost_vs_reference"]["forward_rows_ratio"] for _, s in runs])),
            "evaluations_ratio": float(np.mean([s["cost_vs_reference"]["evaluations_over_n"] for _, s in runs])),
            "knockout_removal": float(np.mean([k_["removal_associated"] for k_ in kos])) if kos else None,
            "random_removal": float(np.mean([k_["random_removal_associated_mean"] for k_ in kos])) if kos else None,
            "n_found_mean": float(np.mean([s["recall"]["n_found"] for _, s in runs])),
        }
    reps = [r["reference"]["replication"] for r in regimes if r["reference"]["replication"]["n_units"]]
    n_rep = sum(x["n_units"] for x in reps)
    head = dict(out.get("effect_sprt", {}))
    head["replication"] = (sum(x["replicated"] for x in reps) / n_rep) if n_rep else None
    return {**{k: head.get(k) for k in ("recall", "forward_rows_ratio", "evaluations_ratio", "knockout_removal",
                                        "random_removal", "replication")}, "by_statistic": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--task_module", default="lib.tasks.arithmetic_task")
    space = ap.add_mutually_exclusive_group()
    space.add_argument("--last_k_layers", type=int, default=4, help="search space: every unit of the last K layers")
    space.add_argument("--layers", default=None, help="comma-separated layers instead (e.g. 29 or 0,29)")
    space.add_argument("--all_layers", action="store_true", help="every unit of every layer (GPU)")
    ap.add_argument("--n_prompts", type=int, default=160, help="search prompts per slice (reference and searches)")
    ap.add_argument("--n_fresh", type=int, default=64, help="fresh prompts per slice for replication")
    ap.add_argument("--regimes", nargs="+", choices=["positive", "negative"], default=["positive", "negative"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="effect-CHA seeds")
    ap.add_argument("--flip_ucb_seeds", type=int, nargs="*", default=[0], help="flip-UCB CHA seeds (none: skip)")
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--n_start", type=int, default=16, help="effect CHA: first prompts per slice of a node")
    ap.add_argument("--associated_operator", default="+")
    ap.add_argument("--intervention", default="mean-positional")
    ap.add_argument("--mean_pool", type=int, default=64)
    ap.add_argument("--knockout_random_sets", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64, help="reference units per stored chunk")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt_seed", type=int, default=1234)
    ap.add_argument("--work_dir", default=None, help="resumable state (default: cache/bench/cha_vs_exhaustive)")
    ap.add_argument("--out_json", default=None)
    a = ap.parse_args()

    task = load_task(a.task_module)
    model = load_analysed_model(a.model, device=a.device)
    n_layers, width = model.n_layers, model.d_model
    if a.all_layers:
        layers = list(range(n_layers))
    elif a.layers:
        layers = [int(x) for x in a.layers.split(",")]
        bad = [L for L in layers if not 0 <= L < n_layers]
        if bad:
            raise SystemExit(f"--layers {bad} outside 0..{n_layers - 1}")
    else:
        layers = list(range(max(0, n_layers - a.last_k_layers), n_layers))
    layer_units = {L: list(range(width)) for L in layers}
    space_name = "all_layers" if a.all_layers else f"layers{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer{layers[0]}"
    work = Path(a.work_dir or REPO / "cache" / "bench" / "cha_vs_exhaustive")
    work.mkdir(parents=True, exist_ok=True)
    engine = engine_for_task(model, task, model.spec, a.batch_size, decode_only=True)
    records = task.build_prompts(None, model.spec)
    answers = answers_of(engine, task, records, work, model.spec)
    positive = task.is_answer_positive(records, answers)
    print(f"{model.spec}: {len(records)} prompts, {int(np.sum(positive))} answered correctly; space {space_name} "
          f"({len(layers) * width} units)")
    regimes = [run_regime(a, task, engine, records, positive, r, layer_units, work) for r in a.regimes]
    for r in regimes:
        print_regime(r, a.tau)
    head = summary(regimes)
    print("\nsummary (effect statistic, over regimes and seeds): " + ", ".join(
        f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in head.items() if k != "by_statistic"))
    out = Path(a.out_json or REPO / "bench" / "results" / f"cha_vs_exhaustive_{model.spec}_{space_name}.json")
    result = {**head, "model": model.spec, "space": space_name, "tau": a.tau, "n_prompts_per_slice": a.n_prompts,
              "intervention": a.intervention, "command": " ".join(["bench/cha_vs_exhaustive.py", *sys.argv[1:]]),
              "regimes": regimes}
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
