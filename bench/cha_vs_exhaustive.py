"""Benchmark: CHA against exhaustive single-unit ablation on the same prompts and candidates.

Takes one rule circuit of a stage-5 run (its candidate units in stage 5's rank order, the top
--n_candidates of them), samples the associated and unrelated prompts of the regime from the
stage-2 table as stage 6 does, and runs, on one engine with the same replacement values:

  (a) exhaustive: every candidate ablated alone (N evaluations), the reference agonist set;
  (b) CHA (`--sign_split_first` as the pipeline): group tests until singletons.

Printed side by side: agonists found by each (max_effect UCB ≥ τ, not catastrophic), recall of
(a)'s agonists by (b), overall and by (a)'s max_effect bins [τ,0.3), [0.3,0.5), [0.5,1] as the
paper's Table 3, (b)'s evaluations / (a)'s, (b)'s evaluations / the bound k·log2(N/k)+k, and wall
times. The paper reports 97 % recall at 2.14 % of the exhaustive cost (N = all units, 64+64
prompts, GPU). A JSON copy of the numbers goes to --out_json.

Run: .env/bin/python bench/cha_vs_exhaustive.py --circuits_dir <stage-5 neural_circuits folder>
     [--n_candidates 2048] [--n_associated 20 --n_unrelated 20] [--regime positive] [--rule_index 0]
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
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

from lib.ablation.engine import AblationEngine  # noqa: E402
from lib.pipeline.feature_table import load_analysis_table, rule_mask  # noqa: E402
from lib.ablation.cha import group_testing_bound, is_agonist, run_cha, run_exhaustive  # noqa: E402
from lib.attribution.manifest import read_dataset_info, read_manifest  # noqa: E402
from lib.models.loading import load_analysed_model  # noqa: E402
from lib.ablation.buckets import is_catastrophic  # noqa: E402
from lib.ablation.interventions import estimate_replacements  # noqa: E402
from lib.tasks.base import load_task  # noqa: E402


def agonists(records: list[dict], tau: float, regime: str) -> dict[tuple[int, int], float]:
    """(layer, id) → max_effect of singleton records at or above τ that are not catastrophic."""
    out = {}
    for r in records:
        if is_agonist(r, tau) and not is_catastrophic(r, regime, 1e-12):
            (label, ids), = r["layers_neurons_dict"].items()
            out[(int(label[1:]), int(ids[0]))] = r["max_effect"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--circuits_dir", required=True, help="stage-5 output holding manifest.json and dataset_info.json")
    ap.add_argument("--rule_index", type=int, default=0, help="which ok circuit of the manifest (0 = first)")
    ap.add_argument("--n_candidates", type=int, default=2048, help="top-N units of stage 5's ranking (max: all)")
    ap.add_argument("--regime", choices=["positive", "negative"], default="positive")
    ap.add_argument("--n_associated", type=int, default=20)
    ap.add_argument("--n_unrelated", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--prune_alpha", type=float, default=0.05)
    ap.add_argument("--intervention", default="mean-positional")
    ap.add_argument("--points_to_use_for_mean_ablation", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--task_module", default="lib.tasks.arithmetic_task")
    ap.add_argument("--out_json", default=None)
    a = ap.parse_args()

    task = load_task(a.task_module)
    info = read_dataset_info(a.circuits_dir)
    circuits = [c for c in read_manifest(a.circuits_dir, top_k_neurons=a.n_candidates) if c.units]
    if not circuits:
        sys.exit(f"no circuit with units in '{a.circuits_dir}/manifest.json'")
    c = circuits[min(a.rule_index, len(circuits) - 1)]
    table = load_analysis_table(info["scores_path"], task, a.regime, info.get("prompt_col"), info.get("target_col"))
    mask = rule_mask(table.df, c.label, c.direction or "positive")
    rng = np.random.default_rng(a.seed)
    assoc_pool, unrel_pool = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(assoc_pool) < a.n_associated or len(unrel_pool) < a.n_unrelated:
        sys.exit(f"rule {c.circuit_id} has {len(assoc_pool)}/{len(unrel_pool)} associated/unrelated prompts "
                 f"in the {a.regime} regime; lower --n_associated/--n_unrelated or pick another --rule_index")
    assoc = sorted(rng.choice(assoc_pool, a.n_associated, replace=False).tolist())
    unrel = sorted(rng.choice(unrel_pool, a.n_unrelated, replace=False).tolist())
    idx = assoc + unrel
    prompts = table.df[table.prompt_col].astype(str).iloc[idx].tolist()
    rows = table.df.iloc[idx].to_dict("records")

    model = load_analysed_model(info.get("ai_model") or "smollm2-135m-instruct-q4_1", device=a.device)
    stop = task.generation_stop_strings(argparse.Namespace(), model.spec)
    engine = AblationEngine(model, task.MAX_NEW_TOKENS, a.batch_size, stop, decode_only=True)
    train = table.train_df
    t = train[table.target_col].to_numpy(dtype=bool)
    pool = train[t if a.regime == "positive" else ~t][table.prompt_col].astype(str).tolist()
    pool = [pool[i] for i in sorted(np.random.default_rng(a.seed).choice(len(pool), min(len(pool), a.points_to_use_for_mean_ablation), replace=False))]
    repl = estimate_replacements(engine, pool, a.intervention, c.units)
    prepared = engine.prepare(prompts)
    base = task.is_answer_positive(rows, engine.generate(prepared, [None])[0])
    keep = [i for i, f in enumerate(base) if bool(f) == (a.regime == "positive")]
    if len(keep) < len(base):
        print(f"dropping {len(base) - len(keep)} prompt(s) whose baseline differs from the regime")
        n_a = sum(1 for i in keep if i < len(assoc))
        prompts, rows = [prompts[i] for i in keep], [rows[i] for i in keep]
        prepared = engine.prepare(prompts)
    else:
        n_a = len(assoc)

    def tester(groups):
        out = []
        for ans in engine.generate(prepared, list(groups), repl, progress=f"{len(groups)} group tests"):
            f = [bool(x) for x in task.is_answer_positive(rows, ans)]
            out.append((f[:n_a], f[n_a:]))
        return out

    N = c.n_units
    t0 = time.perf_counter()
    cha = run_cha(c.units, tester, a.tau, a.prune_alpha, a.regime, np.random.default_rng(a.seed), c.scores, True)
    t_cha = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = run_exhaustive(c.units, tester, a.prune_alpha, a.regime)
    t_ex = time.perf_counter() - t0
    A, B = agonists(ex, a.tau, a.regime), agonists(cha, a.tau, a.regime)
    hit = set(A) & set(B)
    bins = {f"[{a.tau},0.3)": (a.tau, 0.3), "[0.3,0.5)": (0.3, 0.5), "[0.5,1.0]": (0.5, 1.01)}
    by_bin = {}
    for name, (lo, hi) in bins.items():
        ref = {u for u, e in A.items() if lo <= e < hi}
        by_bin[name] = {"n_exhaustive": len(ref), "recalled": len(ref & set(B))}
    k = len(A)
    res = {"model": model.spec, "rule": c.label, "regime": a.regime, "n_prompts": len(prompts), "N": N,
           "exhaustive_evaluations": len(ex), "cha_evaluations": len(cha), "exhaustive_agonists": k,
           "cha_agonists": len(B), "recall": (len(hit) / k) if k else None, "recall_by_bin": by_bin,
           "cost_ratio": len(cha) / len(ex), "bound": group_testing_bound(N, k),
           "evaluations_over_bound": len(cha) / max(group_testing_bound(N, k), 1e-9),
           "wall_seconds": {"cha": round(t_cha, 1), "exhaustive": round(t_ex, 1)}}
    print(f"\nrule {c.circuit_id} ({c.label}), regime {a.regime}, {len(prompts)} prompts, N = {N} candidate units")
    print(f"{'':24s} {'exhaustive':>12s} {'CHA':>10s}")
    print(f"{'evaluations':24s} {len(ex):12d} {len(cha):10d}")
    print(f"{'agonists (UCB >= tau)':24s} {k:12d} {len(B):10d}")
    print(f"{'wall seconds':24s} {t_ex:12.1f} {t_cha:10.1f}")
    rec = f"{100 * res['recall']:.1f} %" if k else "n/a (no exhaustive agonist)"
    print(f"recall of exhaustive agonists: {rec}   (paper: 97 %)")
    for name, b in by_bin.items():
        print(f"  {name}: {b['recalled']}/{b['n_exhaustive']}")
    print(f"CHA cost / exhaustive cost: {100 * res['cost_ratio']:.2f} %   (paper: 2.14 %)")
    print(f"CHA evaluations / (k·log2(N/k)+k = {res['bound']:.1f}): {res['evaluations_over_bound']:.2f}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
