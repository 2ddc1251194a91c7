"""Stage 6 driver: for each circuit, sample prompts, check the baseline, run CHA (or the
exhaustive reference) on the batched engine, and write the spec's per-circuit and run files.

Differences from the original that matter for results are listed in docs/DEVIATIONS.md
(stage 6): per-circuit seeded RNG (a resumed run equals a fresh one), no contamination of the
associated slice, baseline mismatches dropped and recorded, regime `all` runs both regimes,
cross-circuit exclusion of known agonists only with `--exclude_known_agonists`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lib.core.choices import BaselineSubset, ChaScope, ChaStatistic, Device, Dtype, Intervention, SamplingStrategy
from lib.pipeline.config import StageConfig, option, require
from lib.ablation.engine import AblationEngine, PreparedPrompts, ReplacementValues
from lib.core.errors import UsageError
from lib.pipeline.feature_table import AnalysisTable, load_analysis_table, prompts_sha256, rule_mask
from lib.core.files_and_cache import (ArtifactError, atomic_write_json, content_key, ensure_writable_dir,
                                      set_deterministic)
from lib.ablation.cha import clopper_pearson_upper, group_testing_bound, is_agonist, run_cha, run_exhaustive
from lib.attribution.manifest import Circuit, manifest_entry_summary, read_dataset_info, read_manifest
from lib.ablation.buckets import NeuronBuckets, is_catastrophic, unit_key
from lib.ablation.engine_tester import EngineSequentialTester
from lib.ablation.task_engine import engine_for_task
from lib.ablation.knockout import knockout_validation
from lib.ablation.sequential_cha import SequentialSettings, run_sequential_cha
from lib.ablation.interventions import estimate_replacements
from lib.tasks.base import TaskSpec, load_task

__all__ = ["Stage6Config", "run_stage6", "output_folders", "circuit_output_path", "regimes_of", "cost_block"]

_COMPAT = "accepted for compatibility; the diagnostic suites are not computed (docs/DEVIATIONS.md)"


@dataclasses.dataclass(kw_only=True)
class Stage6Config(StageConfig):
    """Stage 6's flags, checked on construction (checks that need no files)."""

    input_data_dir: str = option(help="stage-5 folder holding manifest.json (and dataset_info.json)")
    output_data_dir: str = option(help="output root")
    scores_path: str | None = option(None, "scores table (default: dataset_info.json's scores_path)")
    ai_model: str | None = option(None, "analysed model (default: dataset_info.json's ai_model)")
    ai_model_cache_dir: str | None = option(None, "Hugging Face cache folder")
    search_epsilon: float = option(0.2, "τ: a group is split, and a single unit is an agonist, when its flip-rate "
                                        "UCB reaches τ (≤0: always split)")
    prune_alpha: float = option(0.05, "error budget per node; each slice's one-sided Clopper–Pearson bound uses α/2 "
                                      "(≤0: no pruning)")
    catastrophic_acc_tol: float = option(1e-12, "tolerance for an accuracy of 0 (or 1)")
    catastrophic_n_runs: int = option(3, "trials that decide whether a catastrophic unit is confirmed")
    n_associated: int = option(100, "associated prompts per circuit")
    n_unrelated: int = option(100, "unrelated prompts per circuit")
    decode_only: bool = option(False, "intervene only where answer tokens are produced (last prompt position and "
                                      "every decode step); the prompt's KV cache is computed once and shared by "
                                      "every group test")
    intervention: Intervention = option("zero", "replacement of ablated units")
    points_to_use_for_mean_ablation: int = option(256, "TRAIN prompts used to estimate mean replacement values")
    top_k_neurons: int | None = option(None, "keep the K units with the largest |score| per circuit")
    last_k_layers: int | None = option(None, "keep only units of the last K MLP layers")
    mlp_neurons_only: bool = option(False, "drop non-MLP units (always the case here: only hook_mlp_out units are "
                                           "ablated)")
    batch_size: int = option(16, "rows (group × prompt generations) per forward pass")
    fast_ablation: bool = option(False, "run CHA; without it every unit is ablated alone")
    sign_split_first: bool = option(False, "CHA: split each layer's root by the sign of the stage-5 score")
    cha_statistic: ChaStatistic = option("flip_ucb", "group statistic: flip_ucb (the original: keep a group while its "
                                                     "flip-rate UCB reaches τ) or effect_sprt (sequential test of its "
                                                     "first-token margin drop against random same-size groups)")
    cha_scope: ChaScope = option("candidates", "search space: stage 5's candidates, or all_units = every MLP unit of "
                                               "the chosen layers (all, or --last_k_layers; stage-5 scores still "
                                               "sign-split the root)")
    cha_n_start: int = option(16, "effect_sprt: prompts per slice of a node's first test (doubled while ambiguous)")
    cha_alpha_keep: float = option(0.05, "effect_sprt: false-keep rate per slice and decision")
    cha_beta_prune: float = option(0.01, "effect_sprt: false-prune (recall) error rate per slice and decision")
    agonist_alpha: float = option(0.05, "effect_sprt: two-sided level of a single unit's flip-rate interval; an "
                                        "agonist's lower bound reaches τ on one slice")
    knockout_random_sets: int = option(20, "knockout validation: random same-size, same-layer-mix unit sets the "
                                           "found agonists are compared with (0: no validation)")
    baseline_subset: BaselineSubset = option("all", "regime; 'all' runs positive and negative into "
                                                    "<out>/{positive,negative}_baseline")
    sampling_strategy: SamplingStrategy = option("random", "random: rule-covered vs other rows; plan: the stage-4 "
                                                           "plan's lists")
    sampling_plan_path: str | None = option(None, "stage-4 plan (required with --sampling_strategy plan)")
    exclude_known_agonists: bool = option(False, "the original's behaviour: units found in an earlier circuit are "
                                                 "not searched again (results then depend on circuit order)")
    # accepted and ignored (spectral-cluster circuits are not supported): hidden from --help
    cluster_by_spectral: bool = option(False, hidden=True)
    global_n_clusters: int = option(32, hidden=True)
    spectral_space: str = option("hidden", hidden=True)
    rep_hook_name: str = option("ln_final.hook_normalized", hidden=True)
    rep_pooling: str = option("mean", hidden=True)
    max_seq_len: int | None = option(None, hidden=True)
    spectral_dim: int = option(16, hidden=True)
    spectral_cache_dir: str | None = option(None, hidden=True)
    skip_agonist_activation_stats: bool = option(False, _COMPAT)
    skip_agonist_margin_stats: bool = option(False, _COMPAT)
    skip_agonist_saliency_stats: bool = option(False, _COMPAT)
    agonist_saliency_metrics: str = option("wanda,gradient,activation_x_gradient",
                                           "accepted for compatibility (see --skip_agonist_saliency_stats)")
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")
    device: Device = option("auto", "where to run the analysed model (auto: cuda > mps > cpu)")
    dtype: Dtype = option("auto", "weights/activation dtype (auto: float32, as TransformerLens uses)")
    engine: str = option("local", "exhaustive sweeps (without --fast_ablation): local (this process) or ray "
                                  "(shards on Ray actors that each load the model once)")
    ray_address: str | None = option(None, "--engine ray: none = a local Ray runtime; auto or host:port joins "
                                           "a running cluster")
    ray_workers: int = option(2, "--engine ray: actors (each holds one model copy)")
    ray_cpus_per_worker: float = option(1.0, "--engine ray: CPUs reserved per actor")
    ray_gpus_per_worker: float = option(0.0, "--engine ray: GPUs per actor (1 on a GPU cluster)")
    shard_size: int = option(64, "--engine ray: units per shard (one result file each)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.engine in ("local", "ray"), f"--engine must be local or ray, got {self.engine!r}")
        require(self.ray_workers >= 1 and self.shard_size >= 1, "--ray_workers and --shard_size must be >= 1")
        require(self.n_associated >= 1 and self.n_unrelated >= 1, "--n_associated and --n_unrelated must be >= 1")
        require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        require(self.points_to_use_for_mean_ablation >= 1, "--points_to_use_for_mean_ablation must be >= 1")
        require(self.catastrophic_n_runs >= 1, "--catastrophic_n_runs must be >= 1")
        require(self.prune_alpha < 1, "--prune_alpha must be < 1")
        require(self.cha_n_start >= 1, f"--cha_n_start must be >= 1, got {self.cha_n_start}")
        for flag in ("cha_alpha_keep", "cha_beta_prune", "agonist_alpha"):
            require(0 < getattr(self, flag) < 1, f"--{flag} must be in (0, 1), got {getattr(self, flag)}")
        require(self.knockout_random_sets >= 0, "--knockout_random_sets must be >= 0")
        require(self.sampling_strategy != "plan" or bool(self.sampling_plan_path),
                "--sampling_strategy plan needs --sampling_plan_path")
        require(not self.cluster_by_spectral, "--cluster_by_spectral (spectral-cluster circuits) is not supported; "
                                              "analyse rule circuits (docs/DEVIATIONS.md, stage 6)")
        for flag in ("top_k_neurons", "last_k_layers"):
            v = getattr(self, flag)
            require(v is None or v >= 1, f"--{flag} must be >= 1")


def output_folders(cfg: Stage6Config) -> list[Path]:
    """Folders a run writes: --output_data_dir and, with --baseline_subset all, its regime subfolders."""
    root = Path(cfg.output_data_dir)
    if cfg.baseline_subset != "all":
        return [root]
    return [root, *(root / f"{regime}_baseline" for regime in regimes_of("all"))]


def regimes_of(baseline_subset: str) -> list[str]:
    """`all` runs both regimes (into `positive_baseline/` and `negative_baseline/`)."""
    return ["positive", "negative"] if baseline_subset == "all" else [baseline_subset]


def circuit_output_path(out_dir: Path, c: Circuit) -> Path:
    """`<out>/<target>/rule_0003.json` or `<out>/spectral_clusters/cluster_0003.json`."""
    if c.is_cluster:
        return out_dir / "spectral_clusters" / f"cluster_{c.circuit_id:04d}.json"
    return out_dir / c.target / f"rule_{c.circuit_id:04d}.json"


def _circuit_rng(seed: int, c: Circuit) -> np.random.Generator:
    """An RNG per circuit (so results do not depend on which circuits ran before or were reused)."""
    return np.random.default_rng([int(seed) % (2**32), int(c.circuit_id), zlib.crc32(c.target.encode())])


def settings_key(args: Stage6Config, regime: str, ai_model: str, inputs: Any = "") -> str:
    """Identity of every setting and input that changes a circuit's result (resume reuses only on a match).

    `inputs`: what the run reads beyond its flags (the table's prompts and targets, the plan, the
    task's decoding settings), so that new answers or a new plan are never answered from old records."""
    keys = ("search_epsilon", "prune_alpha", "catastrophic_acc_tol", "catastrophic_n_runs", "n_associated",
            "n_unrelated", "decode_only", "intervention", "points_to_use_for_mean_ablation", "top_k_neurons",
            "last_k_layers", "mlp_neurons_only", "fast_ablation", "sign_split_first", "sampling_strategy",
            "seed", "exclude_known_agonists", "dtype", "cha_statistic", "cha_scope", "cha_n_start",
            "cha_alpha_keep", "cha_beta_prune", "agonist_alpha", "knockout_random_sets")
    return content_key({k: getattr(args, k, None) for k in keys}, regime, ai_model, inputs)


def cost_block(records: Sequence[dict], n_candidates: int, tau: float) -> dict:
    """N, k (singleton agonists), evaluations, the group-testing bound and the exhaustive cost."""
    k = sum(1 for r in records if is_agonist(r, tau))
    return {"n_candidates": int(n_candidates), "n_agonists": int(k), "n_evaluations": len(records),
            "bound_k_log2_N_over_k_plus_k": round(group_testing_bound(n_candidates, k), 3),
            "exhaustive_evaluations": int(n_candidates),
            "evaluations_over_bound": round(len(records) / max(group_testing_bound(n_candidates, k), 1e-9), 4),
            "evaluations_over_exhaustive": round(len(records) / n_candidates, 6) if n_candidates else None}


@dataclass
class _Sample:
    assoc: list[int]
    unrel: list[int]
    n_assoc_avail: int
    n_unrel_avail: int
    strategy: str


class Stage6:
    """One regime of one stage-6 run."""

    def __init__(self, args: Stage6Config, task: TaskSpec, regime: str, out_dir: Path,
                 info: dict, echo: Callable[[str], None], models: dict) -> None:
        self.args, self.task, self.regime, self.out_dir, self.echo = args, task, regime, out_dir, echo
        self.models = models  # loaded model shared by the regimes of one run
        self.ai_model = args.ai_model or info.get("ai_model")
        if not self.ai_model:
            raise ArtifactError("no model given: pass --ai_model (dataset_info.json has no 'ai_model')")
        scores = args.scores_path or info.get("scores_path")
        if not scores:
            raise ArtifactError("no scores table: pass --scores_path (dataset_info.json has no 'scores_path')")
        self.table: AnalysisTable = load_analysis_table(scores, task, regime, info.get("prompt_col"),
                                                        info.get("target_col"))
        self.plan = None
        if args.sampling_strategy == "plan":
            from lib.pipeline.stage4_sampling import load_sampling_plan

            self.plan = load_sampling_plan(args.sampling_plan_path, expected_dataset_size=len(self.table.df),
                                           expected_prompts_sha256=prompts_sha256(self.table.prompts),
                                           expected_baseline_subset=regime)
        from lib.ablation.task_engine import decoding_settings

        plan_bytes = Path(args.sampling_plan_path).read_bytes() if self.plan is not None else b""
        inputs = (content_key(self.table.df.to_csv(index=False), self.table.train_df.to_csv(index=False)),
                  content_key(plan_bytes.hex()), decoding_settings(task, self.ai_model))
        self.key = settings_key(args, regime, self.ai_model, inputs)
        self.buckets = NeuronBuckets(args.search_epsilon, args.catastrophic_acc_tol, args.catastrophic_n_runs)
        self.engine: AblationEngine | None = None
        self.replacement: ReplacementValues | None = None
        self.circuits: list[Circuit] = []

    # ---- prompts -----------------------------------------------------------------------------
    def sample(self, c: Circuit, rng: np.random.Generator) -> _Sample | str:
        """Associated/unrelated indices for a circuit, or the reason it must be skipped."""
        a = self.args
        if self.plan is not None:
            skipped = self.plan.skip_reason(c.target, c.circuit_id)
            if skipped:
                return skipped
            entry = self.plan.entry(c.target, c.circuit_id)
            assoc_pool, unrel_pool, strategy = list(entry["associated_indices"]), list(entry["unrelated_indices"]), "plan"
            unrel_pool = list(dict.fromkeys(unrel_pool))
        else:
            mask = rule_mask(self.table.df, c.label, c.direction or "positive")
            assoc_pool = np.flatnonzero(mask).tolist()
            unrel_pool = np.flatnonzero(~mask).tolist()
            strategy = "random"
        if len(assoc_pool) < a.n_associated or len(unrel_pool) < a.n_unrelated:
            return _Sample([], [], len(assoc_pool), len(unrel_pool), strategy)
        assoc = sorted(rng.choice(assoc_pool, size=a.n_associated, replace=False).tolist())
        unrel = sorted(rng.choice(unrel_pool, size=a.n_unrelated, replace=False).tolist())
        return _Sample(assoc, unrel, len(assoc_pool), len(unrel_pool), strategy)

    # ---- model -------------------------------------------------------------------------------
    def ensure_engine(self, circuits: Sequence[Circuit]) -> None:
        """Load the model and estimate replacement values once, over every layer still to search."""
        if self.engine is not None:
            return
        from lib.models.loading import load_analysed_model

        a = self.args
        if self.ai_model not in self.models:
            self.echo(f"loading {self.ai_model} ...")
            self.models[self.ai_model] = load_analysed_model(self.ai_model, a.device, a.dtype, a.ai_model_cache_dir)
        model = self.models[self.ai_model]
        self.engine = engine_for_task(model, self.task, self.ai_model, a.batch_size, a.decode_only)
        layers: dict[int, set[int]] = {}
        for c in circuits:
            for L, ids in c.units.items():
                layers.setdefault(L, set()).update(ids)
        for L, ids in self.scope_units().items():
            layers.setdefault(L, set()).update(ids)
        pool = self._mean_pool()
        self.replacement = estimate_replacements(self.engine, pool, a.intervention,
                                                 {L: sorted(v) for L, v in layers.items()},
                                                 progress=f"{a.intervention} values" if a.intervention != "zero" else False)

    def scope_units(self) -> dict[int, list[int]]:
        """`--cha_scope all_units`: every MLP unit of the chosen layers (all, or the last K); else {}."""
        if self.args.cha_scope != "all_units":
            return {}
        model = self.models[self.ai_model]
        n_layers, width = model.n_layers, model.d_model
        first = n_layers - self.args.last_k_layers if self.args.last_k_layers else 0
        return {L: list(range(width)) for L in range(max(first, 0), n_layers)}

    def _mean_pool(self) -> list[str]:
        """TRAIN prompts of the regime (all TRAIN if none), seeded sample of the requested size."""
        train = self.table.train_df
        t = train[self.table.target_col].to_numpy(dtype=bool)
        rows = train[t] if self.regime == "positive" else train[~t]
        if rows.empty:
            rows = train
        n = min(self.args.points_to_use_for_mean_ablation, len(rows))
        pick = np.sort(np.random.default_rng(self.args.seed).choice(len(rows), size=n, replace=False))
        return rows[self.table.prompt_col].astype(str).iloc[pick].tolist()

    # ---- one circuit -------------------------------------------------------------------------
    def analyse(self, c: Circuit, excluded: set[str]) -> dict:
        """The per-circuit JSON (status ok or skipped)."""
        a = self.args
        base = {**manifest_entry_summary(c), "intervention": a.intervention, "decode_only": bool(a.decode_only),
                "baseline_subset": self.regime, "settings_key": self.key}
        rng = _circuit_rng(a.seed, c)
        if not c.units and a.cha_scope != "all_units":
            reason = ("No MLP neurons left after applying --mlp_neurons_only." if c.dropped_attention_units
                      else "No usable units found for this circuit.")
            return self._skip(base, reason, 0, 0)
        s = self.sample(c, rng)
        if isinstance(s, str):
            return self._skip(base, s, 0, 0)
        base.update(n_associated_positive=s.n_assoc_avail, n_unrelated_positive=s.n_unrel_avail,
                    n_associated_available=s.n_assoc_avail, n_unrelated_available=s.n_unrel_avail)
        if not s.assoc:
            return self._skip(base, "Insufficient associated or unrelated prompts", s.n_assoc_avail, s.n_unrel_avail)
        self.ensure_engine(self.circuits)
        assert self.engine is not None and self.replacement is not None
        space = self.scope_units() or c.units
        units = {L: [i for i in ids if unit_key(f"m{L}", i) not in excluded] for L, ids in space.items()}
        units = {L: ids for L, ids in units.items() if ids}
        df = self.table.df
        prompts = df[self.table.prompt_col].astype(str)
        idx = s.assoc + s.unrel
        rows = df.iloc[idx].to_dict("records")
        prepared = self.engine.prepare([prompts.iloc[i] for i in idx])
        flags = self.task.is_answer_positive(rows, self.engine.generate(prepared, [None])[0])
        want = self.regime == "positive"
        ok = [bool(f) == want for f in flags]
        dropped_a = [i for i, good in zip(s.assoc, ok[:len(s.assoc)]) if not good]
        dropped_u = [i for i, good in zip(s.unrel, ok[len(s.assoc):]) if not good]
        if dropped_a or dropped_u:
            self.echo(f"  circuit {c.circuit_id}: {len(dropped_a) + len(dropped_u)} prompt(s) did not reproduce "
                      f"the {self.regime} baseline and were dropped")
            s.assoc = [i for i in s.assoc if i not in set(dropped_a)]
            s.unrel = [i for i in s.unrel if i not in set(dropped_u)]
            if not s.assoc or not s.unrel:
                return self._skip(base, "No sampled prompt reproduced the baseline outcome", s.n_assoc_avail,
                                  s.n_unrel_avail)
            idx = s.assoc + s.unrel
            rows = df.iloc[idx].to_dict("records")
            prepared = self.engine.prepare([prompts.iloc[i] for i in idx])
        n_a = len(s.assoc)
        counter = {"evaluations": 0}
        seq_tester = None
        if a.cha_statistic == "effect_sprt" or a.knockout_random_sets > 0:
            seq_tester = EngineSequentialTester(
                self.engine, self.task, [([prompts.iloc[i] for i in s.assoc], rows[:n_a]),
                                         ([prompts.iloc[i] for i in s.unrel], rows[n_a:])], self.replacement, self.regime)
        t0 = time.perf_counter()
        retrial = self._catastrophic_retrials(c) if a.exclude_known_agonists and a.fast_ablation else {}
        scores = c.scores if a.sign_split_first else None
        n_max = max(n_a, len(s.unrel))
        if a.cha_statistic == "effect_sprt":
            assert seq_tester is not None
            margins = (seq_tester.base_margins[0], seq_tester.base_margins[1])
            records, seq_cost = [], {"evaluations": 0, "forward_rows": 0, "background_groups": 0}
            for part, singles in ((retrial, True), (units, not a.fast_ablation)):
                if not part:
                    continue
                recs, cost = run_sequential_cha(part, seq_tester, n_max, margins, self.regime, self._seq_settings(),
                                                rng, scores, a.sign_split_first, singletons=singles,
                                                progress=f"  CHA ({self.regime}, effect statistic)")
                records += recs
                seq_cost = {k: seq_cost[k] + cost.get(k, 0) for k in seq_cost}
        else:
            tester = self._tester(prepared, rows, n_a, counter)
            records = run_exhaustive(retrial, tester, a.prune_alpha, self.regime) if retrial else []
            if not units:
                pass
            elif a.fast_ablation:
                records += run_cha(units, tester, a.search_epsilon, a.prune_alpha, self.regime, rng, scores,
                                   a.sign_split_first)
            elif a.engine == "ray":
                records += self._ray_exhaustive(c, units, [prompts.iloc[i] for i in idx], rows, n_a)
            else:
                records += run_exhaustive(units, tester, a.prune_alpha, self.regime)
            seq_cost = {"evaluations": len(records), "forward_rows": len(records) * (n_a + len(s.unrel)),
                        "background_groups": 0}
        elapsed = time.perf_counter() - t0
        n_candidates = sum(len(v) for v in units.values())
        found = self._agonist_units(records)
        knockout = None
        if a.knockout_random_sets > 0 and seq_tester is not None:
            knockout = knockout_validation(seq_tester, found, units, n_max,
                                           (seq_tester.base_margins[0], seq_tester.base_margins[1]),
                                           a.knockout_random_sets, _circuit_rng(a.seed + 1, c),
                                           layer_width=self.models[self.ai_model].d_model)
        cost = {**cost_block(records, n_candidates, a.search_epsilon), "statistic": a.cha_statistic,
                "scope": a.cha_scope, "group_evaluations": int(seq_cost["evaluations"]),
                "background_groups": int(seq_cost["background_groups"]),
                "forward_rows": int(seq_cost["forward_rows"]),
                "exhaustive_forward_rows": int(n_candidates * (n_a + len(s.unrel))),
                "wall_seconds": round(elapsed, 2)}
        cost["forward_rows_over_exhaustive"] = (round(cost["forward_rows"] / cost["exhaustive_forward_rows"], 6)
                                                if cost["exhaustive_forward_rows"] else None)
        base_acc = 1.0 if want else 0.0
        out = {**base, "status": "ok", "n_associated_tested": n_a, "n_unrelated_tested": len(s.unrel),
               "baseline_acc_associated": base_acc, "baseline_acc_unrelated": base_acc,
               "baseline_gap_neg_minus_pos": 0.0,
               "sampled_associated_indices": s.assoc, "sampled_unrelated_indices": s.unrel,
               "sampled_associated_original_idx": df["original_idx"].iloc[s.assoc].astype(int).tolist(),
               "sampled_unrelated_original_idx": df["original_idx"].iloc[s.unrel].astype(int).tolist(),
               "baseline_dropped_associated_indices": dropped_a, "baseline_dropped_unrelated_indices": dropped_u,
               "sampling_strategy_used": s.strategy, "search": "cha" if a.fast_ablation else "exhaustive",
               "n_excluded_known_units": c.n_units - n_candidates,
               "ablations": records, "cost": cost, "knockout": knockout,
               "agonist_activation_stats": None, "agonist_margin_stats": None, "agonist_saliency_stats": None}
        return out

    def _seq_settings(self) -> SequentialSettings:
        a = self.args
        return SequentialSettings(tau=a.search_epsilon, alpha_keep=a.cha_alpha_keep, beta_prune=a.cha_beta_prune,
                                  alpha_agonist=a.agonist_alpha, n_start=a.cha_n_start)

    def _agonist_units(self, records: Sequence[dict]) -> dict[int, list[int]]:
        """Layer → units of the singleton agonists of one circuit (catastrophic units left out)."""
        out: dict[int, set[int]] = {}
        for r in records:
            if is_agonist(r, self.args.search_epsilon) and not is_catastrophic(r, self.regime, self.args.catastrophic_acc_tol):
                (label, ids), = r["layers_neurons_dict"].items()
                out.setdefault(int(label[1:]), set()).add(int(ids[0]))
        return {L: sorted(v) for L, v in sorted(out.items())}

    def _catastrophic_retrials(self, c: Circuit) -> dict[int, list[int]]:
        """Units of this circuit that are catastrophic candidates: each is tried alone again (spec §5.2.1)."""
        out: dict[int, list[int]] = {}
        for L, ids in c.units.items():
            again = [i for i in ids if unit_key(f"m{L}", i) in self.buckets.candidates]
            if again:
                out[L] = again
        return out

    def _ray_exhaustive(self, c: Circuit, units: dict[int, list[int]], prompts: list[str], rows: list[dict],
                        n_a: int) -> list[dict]:
        """The exhaustive sweep of one circuit on Ray actors (`lib.ablation.sharded_sweep`), shards kept
        under `<out>/<target>/shards_<circuit id>/` so a killed run resumes shard by shard."""
        from lib.ablation.sharded_sweep import SweepSpec, sharded_exhaustive
        from lib.core.ray_runtime import start_ray

        a = self.args
        assert self.replacement is not None
        if self.replacement.donor_fn is not None:
            raise UsageError(f"--engine ray does not support --intervention {a.intervention}; use zero, mean or "
                             "mean-positional, or --engine local")
        start_ray(a.ray_address)
        spec = SweepSpec(ai_model=self.ai_model, task_module=a.task_module, prompts=tuple(prompts),
                         rows=tuple(rows), n_associated=n_a, regime=self.regime, prune_alpha=a.prune_alpha,
                         intervention=self.replacement.intervention,
                         means={L: t.cpu() for L, t in self.replacement.means.items()},
                         batch_size=a.batch_size, decode_only=a.decode_only,
                         device="cuda" if a.ray_gpus_per_worker > 0 else "cpu", dtype=a.dtype,
                         torch_threads=max(1, int(a.ray_cpus_per_worker)))
        shards = self.out_dir / c.target / f"shards_{c.circuit_id:04d}"
        return sharded_exhaustive(spec, units, shards, shard_size=a.shard_size, n_workers=a.ray_workers,
                                  cpus_per_worker=a.ray_cpus_per_worker, gpus_per_worker=a.ray_gpus_per_worker)

    def _tester(self, prepared: PreparedPrompts, rows: list[dict], n_a: int, counter: dict) -> Callable:
        assert self.engine is not None

        def test(groups: Sequence[dict]) -> list[tuple[list[bool], list[bool]]]:
            answers = self.engine.generate(prepared, list(groups), self.replacement,
                                           progress=f"  {len(groups)} group test(s)" if len(groups) > 8 else False)
            counter["evaluations"] += len(groups)
            out = []
            for ans in answers:
                f = [bool(x) for x in self.task.is_answer_positive(rows, ans)]
                out.append((f[:n_a], f[n_a:]))
            return out

        return test

    @staticmethod
    def _skip(base: dict, reason: str, n_a: int, n_u: int) -> dict:
        return {**base, "n_associated_positive": n_a, "n_unrelated_positive": n_u, "status": "skipped",
                "reason": reason, "n_associated_tested": 0, "n_unrelated_tested": 0, "ablations": []}


def _reusable(path: Path, c: Circuit, key: str) -> dict | None:
    """A finished per-circuit JSON of the same circuit and settings, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    same = (data.get("status") in ("ok", "skipped") and data.get("circuit_id") == c.circuit_id
            and data.get("circuit_label") == c.label and data.get("rule_target") == c.target
            and data.get("rule_direction") == c.direction and data.get("settings_key") == key)
    return data if same else None


def _summary(res: dict) -> dict:
    keys = ["circuit_id", "circuit_label", "analysis_mode", "cluster_index", "rule_target", "rule_direction",
            "status", "baseline_subset", "n_associated_positive", "n_unrelated_positive",
            "n_associated_tested", "n_unrelated_tested"]
    out = {k: res.get(k) for k in keys}
    if res["status"] == "ok":
        out.update(baseline_acc_associated=res["baseline_acc_associated"],
                   baseline_acc_unrelated=res["baseline_acc_unrelated"],
                   baseline_gap_neg_minus_pos=res["baseline_gap_neg_minus_pos"],
                   n_ablation_groups=len(res["ablations"]), n_candidates=res["cost"]["n_candidates"],
                   sampling_strategy_used=res["sampling_strategy_used"], cost=res["cost"],
                   knockout=res.get("knockout"))
    else:
        out["reason"] = res.get("reason")
    return out


def _run_regime(args: Stage6Config, task: TaskSpec, regime: str, out_dir: Path, info: dict,
                circuits: list[Circuit], models: dict, echo: Callable[[str], None]) -> dict:
    st = Stage6(args, task, regime, out_dir, info, echo, models)
    st.circuits = circuits
    summaries = []
    t0 = time.perf_counter()
    for n, c in enumerate(circuits, 1):
        path = circuit_output_path(out_dir, c)
        res = _reusable(path, c, st.key)
        if res is None:
            echo(f"[{regime}] circuit {n}/{len(circuits)} (rule {c.circuit_id}: {c.label}) with {c.n_units} units")
            excluded = st.buckets.excluded() if args.exclude_known_agonists else set()
            res = st.analyse(c, excluded)
            atomic_write_json(path, res)
            if res["status"] == "ok":
                cost = res["cost"]
                echo(f"  {cost['n_evaluations']} group tests, {cost['n_agonists']} agonist(s) among "
                     f"{cost['n_candidates']} units, {cost['wall_seconds']} s")
                ko = res.get("knockout")
                if ko and ko.get("n_units"):
                    echo(f"  knockout of the {ko['n_units']} agonist(s): {100 * ko['removal_associated']:.1f} % of "
                         f"associated prompts leave the {regime} regime (random same-size sets: "
                         f"{100 * ko.get('random_removal_associated_mean', float('nan')):.1f} %)")
            else:
                echo(f"  skipped: {res['reason']}")
        else:
            echo(f"[{regime}] circuit {n}/{len(circuits)} reused from {path}")
        for rec in res.get("ablations", []):
            st.buckets.update(rec, c.circuit_id)
        summaries.append(_summary(res))
    atomic_write_json(out_dir / "rule_knockout.json", summaries)
    atomic_write_json(out_dir / "neuron_buckets.json", st.buckets.to_json())
    atomic_write_json(out_dir / "neuron_bucket_stats.json", st.buckets.stats())
    ok = [s for s in summaries if s["status"] == "ok"]
    total = {"regime": regime, "search": "cha" if args.fast_ablation else "exhaustive",
             "n_circuits": len(summaries), "n_ok": len(ok),
             "n_candidates": sum(s["cost"]["n_candidates"] for s in ok),
             "n_agonists": sum(s["cost"]["n_agonists"] for s in ok),
             "n_evaluations": sum(s["cost"]["n_evaluations"] for s in ok),
             "bound_k_log2_N_over_k_plus_k": round(sum(s["cost"]["bound_k_log2_N_over_k_plus_k"] for s in ok), 3),
             "exhaustive_evaluations": sum(s["cost"]["exhaustive_evaluations"] for s in ok),
             "unique_agonists": len(st.buckets.agonists), "wall_seconds": round(time.perf_counter() - t0, 2)}
    total["evaluations_over_exhaustive"] = (round(total["n_evaluations"] / total["exhaustive_evaluations"], 6)
                                            if total["exhaustive_evaluations"] else None)
    total.update(statistic=args.cha_statistic, scope=args.cha_scope,
                 forward_rows=sum(s["cost"].get("forward_rows", 0) for s in ok),
                 exhaustive_forward_rows=sum(s["cost"].get("exhaustive_forward_rows", 0) for s in ok))
    total["forward_rows_over_exhaustive"] = (round(total["forward_rows"] / total["exhaustive_forward_rows"], 6)
                                             if total["exhaustive_forward_rows"] else None)
    total["knockout"] = knockout_totals([s.get("knockout") for s in ok])
    atomic_write_json(out_dir / "cost_summary.json", total)
    return total


def knockout_totals(reports: Sequence[dict | None]) -> dict:
    """Mean knockout removal over the circuits with agonists, and that of their random sets."""
    done = [r for r in reports if r and r.get("n_units")]
    out: dict = {"n_circuits_with_agonists": len(done)}
    for key in ("removal_associated", "random_removal_associated_mean", "margin_drop_associated",
                "random_margin_drop_associated_mean", "removal_unrelated", "random_removal_unrelated_mean"):
        vals = [float(r[key]) for r in done if r.get(key) is not None]
        out[key] = round(float(np.mean(vals)), 6) if vals else None
    return out


def min_prompts_to_prune(tau: float, prune_alpha: float) -> int:
    """Smallest slice size at which zero flips give a UCB below τ (below it CHA never prunes)."""
    if tau <= 0 or prune_alpha <= 0:
        return 0
    n = 1
    while clopper_pearson_upper(0, n, prune_alpha / 2) >= tau and n < 100000:
        n += 1
    return n


def run_stage6(args: Stage6Config, echo: Callable[[str], None] = print, models: dict | None = None) -> list[dict]:
    """Run every requested regime; returns the run-level cost summaries. `models` maps a model name
    to an already loaded model (shared with the caller, e.g. a notebook or a test)."""
    set_deterministic(args.seed)
    need = min_prompts_to_prune(args.search_epsilon, args.prune_alpha)
    if args.fast_ablation and args.cha_statistic == "flip_ucb" and min(args.n_associated, args.n_unrelated) < need:
        echo(f"warning: with fewer than {need} prompts per slice a group with no flip still has an upper "
             f"bound >= tau={args.search_epsilon}, so CHA prunes nothing and tests every unit; raise "
             f"--n_associated/--n_unrelated")
    task = load_task(args.task_module)
    circuits = read_manifest(args.input_data_dir, cluster_mode=args.cluster_by_spectral,
                             top_k_neurons=args.top_k_neurons, last_k_layers=args.last_k_layers)
    if not circuits:
        raise ArtifactError(f"'{args.input_data_dir}/manifest.json' has no circuit with status ok")
    info = read_dataset_info(args.input_data_dir)
    out_root = ensure_writable_dir(args.output_data_dir)
    models = {} if models is None else models
    totals = []
    for regime in regimes_of(args.baseline_subset):
        out_dir = out_root / f"{regime}_baseline" if args.baseline_subset == "all" else out_root
        out_dir.mkdir(parents=True, exist_ok=True)
        totals.append(_run_regime(args, task, regime, out_dir, info, circuits, models, echo))
    return totals
