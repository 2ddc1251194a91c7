"""Stage 5 driver: per-rule jobs, clean/corrupted pairs, top-M export, faithfulness, manifest.

One job per rule of the primary target (`<out>/<target>/rule_<id>_<slug>`). A job is `ok` when its
`scores.json` and `eval.json` exist (reloaded on resume), `skipped` with a `skipped.json`, and
otherwise run. An exception inside one job is recorded (`error.json`, manifest status `error`)
and never turned into a "full network" circuit (spec §6 note 7).

Units are the `hook_mlp_out` coordinates only (spec §6 note 9: attention units are not exported).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from lib.core.choices import (CIRCUIT_LEVELS, SAMPLING_STRATEGIES, AttributionIntervention, AttributionMetric,
                              BaselineSubset, CircuitLevel, DecodeMode, Device, Dtype, RepPooling, SamplingStrategy,
                              SpectralSpace, TemporalAgg)
from lib.core.errors import UsageError
from lib.pipeline.config import StageConfig, config_as_dict, option, require
from lib.pipeline.spectral_options import SpectralStageConfig
from lib.pipeline.feature_table import AnalysisTable, load_analysis_table, load_primary_rules, prompts_sha256, rule_mask
from lib.core.files_and_cache import (ArtifactError, DiskCache, atomic_write_json, content_key,
                                       ensure_writable_dir, set_deterministic)
from lib.models.loading import load_analysed_model
from lib.attribution.eap import (EncodedText, MeanActivations, attribute_pairs, canonical_method,
                                    compute_mean_activations, encode_text, evaluate_pairs)
from lib.sampling.spectral import DEFAULT_REP_HOOK, SPECTRAL_HELP, check_pair_metric, check_spectral_arguments
from lib.tasks.base import load_task

__all__ = [
    "LEVELS",
    "SAMPLING_STRATEGIES",
    "Stage5Config",
    "Job",
    "RulePairs",
    "slugify",
    "plan_jobs",
    "job_state",
    "node_label",
    "select_top_units",
    "lexical_vectors",
    "random_pairs",
    "plan_pairs",
    "run_stage5",
]

log = logging.getLogger(__name__)

LEVELS = CIRCUIT_LEVELS
MEAN_CACHE_NAMESPACE = "stage5_mean_activations"


@dataclasses.dataclass(kw_only=True)
class Stage5Config(SpectralStageConfig):
    """Stage 5's flags (names and defaults of spec §3.1 plus our additions), checked on construction."""

    rules_dir: str = option(help="folder with the stage-3 rule files")
    rules_glob: str = option("association_rules_*.csv",
                             "rule-file prefix: <prefix>_<target>.csv (the pipeline passes optimal_rule_set)")
    fake_targets: bool = option(False, "use the <target>_fake rule file")
    features_scores_dir: str = option(help="folder with stage 2's scores.csv")
    max_answer_tokens: int = option(16, "accepted, unused (as in the original)")
    stop_regex: str = option(r"\n{2,}|</s>|<\|endoftext\|>", "accepted, unused (as in the original)")
    intervention: AttributionIntervention = option(
        "zero", "attribution intervention for EAP (EAP-IG methods always use patching)")
    eval_intervention: AttributionIntervention = option(
        "mean-positional", "value given to non-circuit units in the faithfulness evaluation")
    absolute_value_attributions: bool = option(False, "rank units by |score|")
    include_zero_scores: bool = option(False, "exact-zero scores may be selected")
    mlp_neurons_only: bool = option(False, "keep MLP units only (always the case here: attention units are not scored)")
    ai_model: str = option("Qwen/Qwen2-7B-Instruct", "analysed model (hub id, folder, .gguf, alias)")
    ai_model_cache_dir: str | None = option(None, "model cache folder")
    cache_dir: str = option("./cache", "folder for the mean-activation cache", aliases=("-c",))
    max_n_of_rules_to_analyze: int = option(-1, "<=0: all rules, else the first N")
    temporal_agg: TemporalAgg = option("mean", "aggregation of answer-span logits for the KL metric and the "
                                               "faithfulness NL")
    decode_only: bool = option(False, "intervene only at answer-predicting positions")
    decode_mode: DecodeMode = option("after_prompt",
                                     "answer positions (auto/span/after_prompt coincide here; all = every real token)")
    method: str = option("EAP", "EAP, EAP-IG-inputs, or EAP-IG (alias of EAP-IG-inputs)")
    max_ig_steps: int = option(3, "EAP-IG interpolation steps m")
    circuit_size: int = option(20, "top-M units (or nodes) kept")
    circuit_level: CircuitLevel = option("node", "neuron (hook_mlp_out coordinates) or node (MLP layers)")
    max_pairs_per_circuit: int = option(512, "pairs per rule (random strategy)")
    pair_similarity_metric: str = option("cosine", "random pairing distance (cosine, euclidean, SciPy)")
    points_to_use_for_mean_ablation: int = option(512, "reference texts for mean values")
    batch_size: int = option(8, "pairs per forward/backward batch")
    sampling_strategy: SamplingStrategy = option("random", "pair source")
    sampling_plan_path: str | None = option(None, "stage-4 plan (required with --sampling_strategy plan)")
    cluster_by_spectral: bool = option(False, "not supported (use a stage-4 plan)")
    cluster_base_subset: BaselineSubset = option("all", "cluster mode only (not supported); recorded in "
                                                        "dataset_info.json")
    global_n_clusters: int = option(32, "cluster mode only (not supported)")
    output_data_dir: str = option("neural_circuit_discovery_results", "output root")
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")
    attribution_metric: AttributionMetric = option(
        "answer_logprob", "answer_logprob (non-zero gradient at the clean input) or kl (the original's span KL)")
    keep_going: bool = option(False, "exit 0 even when some rule jobs failed")
    num_threads: int = option(0, "torch CPU threads (0: torch's default)")
    no_progress: bool = option(False, "hide progress bars")
    device: Device = option("auto", "where to run the analysed model (auto: cuda > mps > cpu)")
    dtype: Dtype = option("auto", "weights/activation dtype (auto: float32, as TransformerLens uses)")

    def __post_init__(self) -> None:
        """Reject flag values that cannot work, naming the flag (checks that need no files)."""
        super().__post_init__()
        try:
            canonical_method(self.method)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        require(self.circuit_level != "edge",
                "--circuit_level edge is not supported: use neuron (hook_mlp_out coordinates) or node")
        require(self.circuit_level in LEVELS,
                f"--circuit_level must be one of {', '.join(LEVELS)}, not '{self.circuit_level}'")
        require(not self.cluster_by_spectral, "--cluster_by_spectral is not supported; build a stage-4 plan and pass "
                                              "--sampling_strategy plan --sampling_plan_path …")
        require(self.sampling_strategy != "plan" or bool(self.sampling_plan_path),
                "--sampling_strategy plan needs --sampling_plan_path")
        for flag in ("max_ig_steps", "batch_size", "max_pairs_per_circuit"):
            require(getattr(self, flag) >= 1, f"--{flag} must be >= 1, got {getattr(self, flag)}")
        require(self.circuit_size >= 0, f"--circuit_size must be >= 0, got {self.circuit_size}")
        require(self.num_threads >= 0, f"--num_threads must be >= 0, got {self.num_threads}")
        check_spectral_arguments(self)
        check_pair_metric(self.pair_similarity_metric)

    @property
    def progress(self) -> bool:
        """Progress bars unless --no_progress."""
        return not self.no_progress

    @property
    def attribution_intervention(self) -> str:
        """EAP-IG methods interpolate towards the corrupted input, so they always patch (spec §3.1)."""
        return "patching" if "EAP-IG" in canonical_method(self.method) else self.intervention


@dataclass
class Job:
    """One rule to attribute."""

    target: str
    rule_id: int
    rule: str
    coefficient_sign: str
    component_type: str
    folder: Path

    def head(self) -> dict:
        """Identity keys of every manifest entry."""
        return {"target": self.target, "circuit_id": self.rule_id, "rule_id": self.rule_id,
                "circuit_label": self.rule, "coefficient_sign": self.coefficient_sign,
                "component_type": self.component_type}


@dataclass
class RulePairs:
    """Index-aligned clean (associated) and corrupted (unrelated) table rows of one rule."""

    associated: list[int]
    unrelated: list[int]
    n_pos: int
    n_neg: int
    pairing_meta: dict = field(default_factory=dict)


def slugify(rule: str) -> str:
    """Lowercase, runs of non-[a-z0-9] → '-', trimmed, 'rule' if empty, at most 64 chars (spec §3.2)."""
    s = re.sub(r"[^a-z0-9]+", "-", str(rule).lower()).strip("-")
    return (s or "rule")[:64]


def plan_jobs(rules: pd.DataFrame, out_root: Path, target: str, max_n: int = -1) -> list[Job]:
    """Jobs in rule-file order (the first `max_n` rules when max_n > 0)."""
    rows = rules if max_n <= 0 else rules.head(max_n)
    jobs = []
    for _, r in rows.iterrows():
        rid = int(r["rule_id"])
        folder = out_root / target / f"rule_{rid}_{slugify(r['rule'])}"
        jobs.append(Job(target, rid, str(r["rule"]), str(r["coefficient_sign"]), str(r["component_type"]), folder))
    return jobs


def job_state(folder: Path) -> str:
    """ok (scores + eval), skipped (skipped.json) or missing."""
    if (folder / "scores.json").is_file() and (folder / "eval.json").is_file():
        return "ok"
    if (folder / "skipped.json").is_file():
        return "skipped"
    return "missing"


# --------------------------------------------------------------------------------------------
# Top-M selection and export
# --------------------------------------------------------------------------------------------


def node_label(layer: int) -> str:
    """Label of the MLP node of a layer, as in the original graph (`m12`)."""
    return f"m{layer}"


def _ranked(values: np.ndarray, absolute: bool, include_zero: bool) -> tuple[np.ndarray, int, int]:
    """(eligible indices best first, #scored, #eligible): finite, non-zero unless include_zero; ties by index."""
    scored = ~np.isnan(values)
    eligible = np.isfinite(values) & (include_zero | (values != 0))
    idx = np.flatnonzero(eligible)
    key = np.abs(values[idx]) if absolute else values[idx]
    order = idx[np.argsort(-key, kind="stable")]
    return order, int(scored.sum()), int(len(idx))


def select_top_units(scores: np.ndarray, circuit_size: int, level: str = "neuron", absolute: bool = False,
                     include_zero: bool = False) -> tuple[dict, np.ndarray]:
    """(`metadata_topn` of spec §3.12, kept mask [L, d]) for the top-M MLP coordinates or nodes."""
    if level not in LEVELS:
        raise ValueError(f"--circuit_level {level}: choose one of {', '.join(LEVELS)} (edge level is not supported)")
    scores = np.asarray(scores, dtype=np.float64)
    L, d = scores.shape
    values = scores.ravel() if level == "neuron" else np.nansum(scores, axis=1)
    order, n_scored, n_eligible = _ranked(values, absolute, include_zero)
    chosen = order[: max(0, int(circuit_size))]
    keep = np.zeros((L, d), dtype=bool)
    picked = values[chosen]
    key = np.abs(picked) if absolute else picked
    meta: dict[str, Any] = {
        "level": level, "absolute": bool(absolute), "include_special": False,
        "requested_n": int(circuit_size), "selected_n": int(len(chosen)), "num_scored": n_scored,
        "num_considered": n_eligible, "total_entities": int(values.size),
        "was_clipped": bool(len(chosen) < circuit_size),
        "score_range": [float(key.min()), float(key.max())] if len(chosen) else None,
        "threshold": float(picked[-1]) if len(chosen) else None,
        "empty_reason": None if len(chosen) else "no eligible scores (all zero or non-finite)",
        "indices": [int(i) for i in chosen], "include_zero_scores": bool(include_zero),
        "d_model": int(d), "n_layers": int(L), "unit_hook": "blocks.{L}.hook_mlp_out",
    }
    if level == "neuron":
        layers, ids = np.divmod(chosen, d)
        keep[layers, ids] = True
        meta["neuron_label_score"] = {f"('{node_label(int(l))}', {int(i)})": float(scores[l, i])
                                      for l, i in zip(layers, ids)}
        neurons: dict[str, list[int]] = {node_label(l): [] for l in sorted(set(int(x) for x in layers))}
        for l, i in zip(layers, ids):
            neurons[node_label(int(l))].append(int(i))
        meta["neurons"] = neurons
        meta["units"] = [f"m{int(l)}:{int(i)}" for l, i in zip(layers, ids)]
    else:
        keep[chosen, :] = True
        meta["node_label_score"] = {node_label(int(l)): float(values[l]) for l in chosen}
        meta["nodes"] = [node_label(int(l)) for l in chosen]
    return meta, keep


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


def _job_rng(seed: int, job: Job) -> np.random.Generator:
    """A per-rule generator: a resumed run draws the same pairs as a fresh one."""
    return np.random.default_rng([int(seed), zlib.crc32(job.target.encode()), int(job.rule_id) & 0xFFFFFFFF])


def random_pairs(mask: np.ndarray, usable: np.ndarray, vectors: np.ndarray, lengths: np.ndarray,
                 max_pairs: int, metric: str, rng: np.random.Generator) -> RulePairs | None:
    """Up to max_pairs covered rows, each with its nearest uncovered row of equal prompt length (else nearest)."""
    from lib.sampling.spectral import sample_len_tolerant_pairs

    pos = np.flatnonzero(mask & usable)
    neg = np.flatnonzero(~mask & usable)
    if len(pos) == 0 or len(neg) == 0:
        return None
    k = min(int(max_pairs), len(pos))
    assoc, unrel, meta = sample_len_tolerant_pairs(pos, neg, vectors, lengths, 0, metric, rng, k=k)
    return RulePairs(list(assoc), list(unrel), int(len(pos)), int(len(neg)), meta)


def plan_pairs(plan: Any, target: str, rule_id: int, mask: np.ndarray, usable: np.ndarray) -> RulePairs:
    """The plan's ok entry for (target, rule_id); a missing/skipped entry raises (no random fallback)."""
    entry = plan.entry(target, rule_id)
    a, u = list(entry.associated_indices), list(entry.unrelated_indices)
    keep = [i for i in range(len(a)) if usable[a[i]] and usable[u[i]]]
    if not keep:
        raise ArtifactError(f"sampling plan '{plan.path}': every pair of rule {rule_id} has a row without an answer")
    meta = {"source": "plan", "plan_path": str(plan.path), "n_plan_pairs": len(a),
            "n_dropped_without_answer": len(a) - len(keep),
            "n_associated_not_covered": int(sum(not mask[a[i]] for i in keep))}
    return RulePairs([a[i] for i in keep], [u[i] for i in keep], int(mask.sum()), int((~mask).sum()), meta)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    """Path relative to the output root (portable when the tree is archived or moved)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _ok_entry(job: Job, root: Path, scores: dict, evaluation: dict, sampling: str, pairing_meta: Any) -> dict:
    """Manifest entry of a finished job (spec §3.12), eval keys merged."""
    meta = {k: v for k, v in scores.items() if k != "attribution"}
    attribution = scores.get("attribution", {})
    return {**job.head(), "status": "ok", "n_pairs": attribution.get("n_pairs"),
            "scores_csv": _rel(job.folder / "scores.json", root), "eval_json": _rel(job.folder / "eval.json", root),
            "metadata_topn": meta, "attribution": attribution, "sampling_strategy": sampling,
            "pairing_meta": pairing_meta, **evaluation}


def _load_json(path: Path) -> Any:
    """A JSON artifact, with an error naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read '{path}' ({exc}); delete the job folder to recompute it") from None


def _reloaded_entry(job: Job, root: Path) -> dict:
    """Manifest entry of a job finished by an earlier run."""
    state = job_state(job.folder)
    if state == "skipped":
        sk = _load_json(job.folder / "skipped.json")
        status = "skipped_linear" if sk.get("skip_type") == "linear" else "skipped"
        return {**job.head(), "status": status, "n_pos": sk.get("n_pos"), "n_neg": sk.get("n_neg"),
                "reason": sk.get("reason")}
    scores = _load_json(job.folder / "scores.json")
    evaluation = _load_json(job.folder / "eval.json")
    att = scores.get("attribution", {})
    return _ok_entry(job, root, scores, evaluation, att.get("sampling_strategy"), att.get("pairing_meta"))


def _write_skip(job: Job, reason: str, n_pos: int | None, n_neg: int | None, skip_type: str | None = None) -> dict:
    """skipped.json of a job and its manifest entry."""
    body: dict[str, Any] = {"reason": reason, "n_pos": n_pos, "n_neg": n_neg}
    if skip_type:
        body["skip_type"] = skip_type
    atomic_write_json(job.folder / "skipped.json", body)
    status = "skipped_linear" if skip_type == "linear" else "skipped"
    return {**job.head(), "status": status, "n_pos": n_pos, "n_neg": n_neg, "reason": reason}


def _write_error(job: Job, root: Path, exc: BaseException) -> dict:
    """error.json of a failed job and its manifest entry (status `error`, never a fallback circuit)."""
    reason = f"{type(exc).__name__}: {exc}"
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    atomic_write_json(job.folder / "error.json", {"reason": reason, "traceback": "".join(tb[-6:])})
    return {**job.head(), "status": "error", "reason": reason, "error_json": _rel(job.folder / "error.json", root)}


def _write_manifest(root: Path, entries: Sequence[dict]) -> None:
    """manifest.json: a JSON list of job entries in job order."""
    atomic_write_json(root / "manifest.json", list(entries))


def _write_dataset_info(root: Path, cfg: Stage5Config, table: AnalysisTable) -> None:
    """dataset_info.json (spec §3.12)."""
    atomic_write_json(root / "dataset_info.json", {
        "scores_path": str(table.scores_path), "prompt_col": table.prompt_col, "target_col": table.target_col,
        "ai_model": cfg.ai_model, "analysis_mode": "rule", "cluster_base_subset": cfg.cluster_base_subset,
        "dataset_size": int(len(table.df)), "prompts_sha256": prompts_sha256(table.prompts)})


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every job shares once the model is loaded."""

    cfg: Stage5Config
    model: Any
    table: AnalysisTable
    texts: list[EncodedText]
    usable: np.ndarray  # rows with a non-empty answer
    means: MeanActivations | None
    plan: Any
    vectors: np.ndarray | None
    lengths: np.ndarray | None


def _answers(table: AnalysisTable, column: str) -> list[str]:
    """The analysed model's answers (trailing whitespace/stop newline removed; missing → '')."""
    if column not in table.df.columns:
        raise ArtifactError(f"scores table '{table.scores_path}' has no answer column '{column}' "
                            f"(the task's DEFAULT_OUTPUT)")
    return ["" if pd.isna(a) else str(a).rstrip() for a in table.df[column]]


def _reference_means(cfg: Stage5Config, model: Any, texts: list[EncodedText]) -> MeanActivations:
    """Mean activations over min(points, N//2) random rows (prompt + answer), cached by content."""
    n = min(int(cfg.points_to_use_for_mean_ablation), len(texts) // 2)
    if n < 1:
        raise ArtifactError("mean interventions need at least 2 table rows (and --points_to_use_for_mean_ablation >= 1)")
    rows = np.sort(np.random.default_rng([cfg.seed, 7]).choice(len(texts), size=n, replace=False))
    ref = [texts[i] for i in rows]
    key = (MEAN_CACHE_NAMESPACE, "v1", cfg.ai_model, str(model.dtype), model.n_layers, model.d_model,
           content_key([list(t.ids) for t in ref]))
    cache = DiskCache(cfg.cache_dir, MEAN_CACHE_NAMESPACE)
    return cache.get_or_compute(key, lambda: compute_mean_activations(model, ref, cfg.batch_size, cfg.progress))


def _rule_pairs(ctx: _Context, job: Job, mask: np.ndarray) -> RulePairs | None:
    """Pairs of one rule from the plan or by random length-matched nearest-neighbour pairing."""
    if ctx.cfg.sampling_strategy == "plan":
        return plan_pairs(ctx.plan, job.target, job.rule_id, mask, ctx.usable)
    return random_pairs(mask, ctx.usable, ctx.vectors, ctx.lengths, ctx.cfg.max_pairs_per_circuit,
                        ctx.cfg.pair_similarity_metric, _job_rng(ctx.cfg.seed, job))


def _run_job(ctx: _Context, job: Job, root: Path) -> dict:
    """Attribute, select, evaluate and write one rule; returns its manifest entry."""
    cfg = ctx.cfg
    mask = rule_mask(ctx.table.df, job.rule, job.coefficient_sign)
    planned_skip = ctx.plan.skip_reason(job.target, job.rule_id) if cfg.sampling_strategy == "plan" else None
    if planned_skip:
        return _write_skip(job, planned_skip, int(mask.sum()), int((~mask).sum()))
    pairs = _rule_pairs(ctx, job, mask)
    if pairs is None:
        n_pos, n_neg = int((mask & ctx.usable).sum()), int((~mask & ctx.usable).sum())
        side = "associated" if n_pos == 0 else "unrelated"
        return _write_skip(job, f"Empty side: no {side} rows with an answer ({n_pos} associated, {n_neg} unrelated)",
                           n_pos, n_neg)
    clean = [ctx.texts[i] for i in pairs.associated]
    corrupted = [ctx.texts[i] for i in pairs.unrelated]
    common = dict(batch_size=cfg.batch_size, means=ctx.means, temporal_agg=cfg.temporal_agg,
                  decode_only=cfg.decode_only, decode_mode=cfg.decode_mode, progress=cfg.progress)
    result = attribute_pairs(ctx.model, clean, corrupted, method=cfg.method, intervention=cfg.attribution_intervention,
                             metric=cfg.attribution_metric, ig_steps=cfg.max_ig_steps,
                             desc=f"rule {job.rule_id} attribution", **common)
    scores = result.scores.numpy()
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"{int((~np.isfinite(scores)).sum())} attribution scores are not finite")
    meta, keep = select_top_units(scores, cfg.circuit_size, cfg.circuit_level, cfg.absolute_value_attributions,
                                  cfg.include_zero_scores)
    evaluation = evaluate_pairs(ctx.model, clean, corrupted, torch.from_numpy(keep), intervention=cfg.eval_intervention,
                                desc=f"rule {job.rule_id} faithfulness", **common)
    n_kept, total = int(keep.sum()), int(keep.size)
    evaluation = {"circuit_edges": {"corrupted_edges": total - n_kept, "circuit_edges": n_kept,
                                    "corrupted_edges_ppt": 100.0 * (total - n_kept) / total},
                  **evaluation, "eval_intervention": cfg.eval_intervention,
                  "unit": "blocks.{L}.hook_mlp_out coordinate"}
    method = canonical_method(cfg.method)
    meta["attribution"] = {
        "method": method, "attribution_metric": cfg.attribution_metric, "temporal_agg": cfg.temporal_agg,
        "intervention": cfg.attribution_intervention, "max_ig_steps": cfg.max_ig_steps,
        "ig_alphas": [(k - 0.5) / cfg.max_ig_steps for k in range(1, cfg.max_ig_steps + 1)]
        if method == "EAP-IG-inputs" else None,
        "n_pairs": result.n_pairs, "n_batches": result.n_batches, "batch_size": cfg.batch_size,
        "clean_metric_mean": result.clean_metric_mean, "decode_only": cfg.decode_only,
        "sampling_strategy": cfg.sampling_strategy, "pairing_meta": pairs.pairing_meta,
        "n_pos": pairs.n_pos, "n_neg": pairs.n_neg}
    atomic_write_json(job.folder / "scores.json", meta)
    atomic_write_json(job.folder / "eval.json", evaluation)
    (job.folder / "error.json").unlink(missing_ok=True)
    return _ok_entry(job, root, meta, evaluation, cfg.sampling_strategy, pairs.pairing_meta)


def _rule_counts(table: AnalysisTable, job: Job) -> tuple[int | None, int | None]:
    """(covered, uncovered) row counts of a rule, or (None, None) if it cannot be evaluated."""
    try:
        m = rule_mask(table.df, job.rule, job.coefficient_sign)
    except ArtifactError:
        return None, None
    return int(m.sum()), int((~m).sum())


def _load_plan(cfg: Stage5Config, table: AnalysisTable) -> Any:
    """The stage-4 plan checked against this table (size, prompt hash, regime `all`)."""
    from lib.pipeline.stage4_sampling import load_sampling_plan

    return load_sampling_plan(cfg.sampling_plan_path, expected_dataset_size=len(table.df),
                              expected_prompts_sha256=prompts_sha256(table.prompts), expected_baseline_subset="all")


def lexical_vectors(token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """TF-IDF bag-of-token vectors of prompts: a free, offline stand-in for the original's MiniLM embeddings.

    Tokens present in every prompt (a shared few-shot block) get weight 0, so rows differ by
    what distinguishes them (operands, operator)."""
    vocab = {t: j for j, t in enumerate(sorted({int(t) for ids in token_ids for t in ids}))}
    X = np.zeros((len(token_ids), max(1, len(vocab))), dtype=np.float64)
    for i, ids in enumerate(token_ids):
        for t in ids:
            X[i, vocab[int(t)]] += 1.0
    df = (X > 0).sum(0)
    return (X * np.log((1.0 + len(X)) / (1.0 + df))[None, :]).astype(np.float32)


def _primary_rules(cfg: Stage5Config, target_col: str) -> pd.DataFrame:
    """Rules of the primary target through the shared loader (stages 4–7 read them identically)."""
    return load_primary_rules(cfg.rules_dir, cfg.rules_glob, target_col, cfg.fake_targets)


def _load_context(cfg: Stage5Config, table: AnalysisTable, answer_col: str, plan: Any, model: Any) -> _Context:
    """Tokenise every row once, and prepare means / pairing vectors when the run needs them."""
    answers = _answers(table, answer_col)
    texts = [encode_text(model.tokenizer, p, a, cfg.max_seq_len) for p, a in zip(table.prompts, answers)]
    usable = np.array([t.answer_len > 0 for t in texts], dtype=bool)
    if not usable.any():
        raise ArtifactError(f"no row of '{table.scores_path}' has a non-empty '{answer_col}' answer")
    needs_means = "mean" in cfg.attribution_intervention or "mean" in cfg.eval_intervention
    means = _reference_means(cfg, model, texts) if needs_means else None
    vectors = lengths = None
    if cfg.sampling_strategy == "random":
        from lib.sampling.spectral import token_lengths

        vectors = lexical_vectors([t.ids[: t.prompt_len] for t in texts])
        lengths = token_lengths(model.tokenizer, table.prompts)
    return _Context(cfg, model, table, texts, usable, means, plan, vectors, lengths)


# Settings that do not change a job's result (places, speed, verbosity).
_NOT_RESULT_SETTINGS = ("features_scores_dir", "output_data_dir", "cache_dir", "ai_model_cache_dir", "keep_going",
                        "num_threads", "no_progress", "device", "batch_size", "sampling_plan_path")
INPUTS_KEY_FILE = "inputs_key.json"


def inputs_key(cfg: Stage5Config, table: AnalysisTable, rules: pd.DataFrame) -> str:
    """Identity of everything a job's result depends on: the table (prompts, answers, target), the
    rules, the plan's content and the result-changing settings."""
    plan_bytes = Path(cfg.sampling_plan_path).read_bytes() if cfg.sampling_strategy == "plan" and \
        cfg.sampling_plan_path and Path(cfg.sampling_plan_path).is_file() else b""
    settings = {k: v for k, v in config_as_dict(cfg).items() if k not in _NOT_RESULT_SETTINGS}
    return content_key(settings, table.df.to_csv(index=False), rules.to_csv(index=False), plan_bytes.hex())


def _invalidate_stale_jobs(root: Path, jobs: Sequence[Job], key: str) -> None:
    """When the inputs changed since the jobs were written, remove their results so they run again.

    A folder without a key file (an archived artifact, an older run) is reused as before."""
    path = root / INPUTS_KEY_FILE
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("inputs_key") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        old = None
    if old is not None and old != key:
        stale = [j for j in jobs if job_state(j.folder) != "missing"]
        if stale:
            print(f"stage 5: inputs changed since the last run (scores, rules, plan or settings): "
                  f"recomputing {len(stale)} job(s)", flush=True)
        for job in stale:
            for name in ("scores.json", "eval.json", "skipped.json", "error.json"):
                (job.folder / name).unlink(missing_ok=True)
    atomic_write_json(path, {"inputs_key": key})


def run_stage5(cfg: Stage5Config, model: Any = None) -> int:
    """Run every missing job; write manifest/dataset_info. Returns 0, or 1 if a job failed (unless keep_going)."""
    method = canonical_method(cfg.method)
    if "EAP-IG" in method and cfg.intervention != "patching":
        log.info("--method %s interpolates inputs: attribution uses patching (not --intervention %s)",
                 method, cfg.intervention)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = load_task(cfg.task_module)
    table = load_analysis_table(cfg.features_scores_dir, task, "all")
    if len(table.df) == 0:
        raise ArtifactError(f"'{table.scores_path}' has no TRAIN rows")
    rules = _primary_rules(cfg, table.target_col)
    target = f"{table.target_col}_fake" if cfg.fake_targets else table.target_col
    root = ensure_writable_dir(cfg.output_data_dir, "--output_data_dir")
    jobs = plan_jobs(rules, root, target, cfg.max_n_of_rules_to_analyze)
    for job in jobs:  # preflight: linear components need no model
        if job.component_type == "linear" and job_state(job.folder) == "missing":
            n_pos, n_neg = _rule_counts(table, job)
            _write_skip(job, "linear component (not a rule)", n_pos, n_neg, "linear")
    _write_dataset_info(root, cfg, table)
    _invalidate_stale_jobs(root, jobs, inputs_key(cfg, table, rules))
    missing = [j for j in jobs if job_state(j.folder) == "missing"]
    entries: dict[int, dict] = {i: _reloaded_entry(j, root) for i, j in enumerate(jobs) if j not in missing}
    if not missing:
        _write_manifest(root, [entries[i] for i in range(len(jobs))])
        log.info("stage 5: all %d jobs already done; manifest rewritten", len(jobs))
        return 0
    plan = _load_plan(cfg, table) if cfg.sampling_strategy == "plan" else None
    set_deterministic(cfg.seed)
    t0 = time.perf_counter()
    if model is None:
        model = load_analysed_model(cfg.ai_model, device=cfg.device, dtype=cfg.dtype,
                                    ai_model_cache_dir=cfg.ai_model_cache_dir)
    ctx = _load_context(cfg, table, task.DEFAULT_OUTPUT, plan, model)
    print(f"stage 5: model, {len(table.df)} rows, means and pairing inputs ready in "
          f"{time.perf_counter() - t0:.1f} s; {len(missing)} rule job(s) to run", flush=True)
    n_errors = 0
    for i, job in enumerate(jobs):
        if job not in missing:
            continue
        started = time.perf_counter()
        try:
            entries[i] = _run_job(ctx, job, root)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # recorded per rule, reported at the end (never a silent fallback)
            log.error("rule %s failed: %s: %s", job.rule_id, type(exc).__name__, exc)
            entries[i] = _write_error(job, root, exc)
            n_errors += 1
        e = entries[i]
        print(f"rule {job.rule_id}: {e['status']} ({e.get('n_pairs', 0) or 0} pairs, "
              f"{time.perf_counter() - started:.1f} s){' - ' + e['reason'] if e.get('reason') else ''}", flush=True)
        _write_manifest(root, [entries[k] for k in sorted(entries)])
    _write_manifest(root, [entries[k] for k in range(len(jobs))])
    if n_errors:
        print(f"stage 5: {n_errors} of {len(missing)} rule job(s) failed; see error.json in their folders "
              f"and status 'error' in {root / 'manifest.json'}")
        return 0 if cfg.keep_going else 1
    return 0
