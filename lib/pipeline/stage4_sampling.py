"""Stage-4 sampling plans: build one per rule file, write it atomically, read it back validated.

A plan (spec §2.8, plus the identity keys `prompts_sha256` and `target_col`) lists, per rule of
the primary target, associated rows (the rule holds) and an equally long, index-aligned list of
unrelated rows (it does not). Row indices are positions in the TRAIN-only, regime-filtered table
of `lib.pipeline.feature_table.load_analysis_table`. Stages 5, 6 and 7 read plans with
`load_sampling_plan`, which checks the plan against their table and never falls back silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lib.pipeline.feature_table import (AnalysisTable, load_analysis_table, load_primary_rules, prompts_sha256,
                                rule_mask)
from lib.core.choices import DEFAULT_SEED, BaselineSubset, Device, Dtype, RepPooling, SpectralSpace
from lib.core.files_and_cache import ArtifactError, atomic_write_json, set_deterministic
from lib.models.loading import load_analysed_model
from lib.pipeline.config import StageConfig, option, require
from lib.pipeline.spectral_options import SpectralStageConfig
from lib.sampling.spectral import (DEFAULT_REP_HOOK, SPECTRAL_HELP, KCenterResult, RepresentationSettings,
                                   check_pair_metric, check_spectral_arguments, compute_representations,
                                   cover_stats, distance_summary, greedy_farthest_first_cover,
                                   kcenter_farthest_first, sample_len_tolerant_pairs,
                                   select_from_global_clusters, select_random, spectral_embedding,
                                   token_lengths)
from lib.tasks.base import load_task

__all__ = [
    "Selection",
    "SELECTIONS",
    "Stage4Config",
    "PAIRING_METHOD",
    "PlanError",
    "PlanOptions",
    "PlanInputs",
    "PlanEntry",
    "SamplingPlan",
    "build_rule_entry",
    "build_sampling_plan",
    "write_sampling_plan",
    "load_sampling_plan",
    "options_from_args",
    "run_stage4",
]

log = logging.getLogger(__name__)

Selection = Literal["spectral", "random"]
SELECTIONS: tuple[str, ...] = get_args(Selection)
PAIRING_METHOD = "exact_dot_product_len_matched"
STATS_SKIPPED = {"status": "skipped", "reason": "--compute_cover_stats not set"}


class PlanError(ArtifactError):
    """A sampling plan that is missing, malformed, made for another table, or lacks an entry."""


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class PlanOptions:
    """The selection settings of one plan (stage-4 flags)."""

    min_points: int = 32
    max_points: int = 512
    coverage_radius: float = 0.5
    use_global_clusters: bool = False
    global_n_clusters: int = 256
    pair_by_similarity: bool = False
    pair_len_tolerance: int = 0
    pair_metric: str = "cosine"
    compute_cover_stats: bool = False
    stats_sample_size: int = 200000
    stats_chunk_size: int = 8192
    selection: str = "spectral"
    seed: int = 0

    @property
    def effective_max(self) -> int:
        """`--max_points_per_ablation`, raised to the minimum when smaller (spec §2.1)."""
        return max(self.max_points, self.min_points)


@dataclass
class PlanInputs:
    """Per-row data the selection needs: raw vectors, their spectral embedding, token lengths."""

    reps: np.ndarray
    Z: np.ndarray
    lengths: np.ndarray | None = None
    clusters: KCenterResult | None = None


def _entry_head(rule: pd.Series, rule_target: str) -> dict:
    """Identity keys every rule entry starts with."""
    return {"rule_id": int(rule["rule_id"]), "rule": str(rule["rule"]),
            "rule_direction": str(rule["coefficient_sign"]), "rule_target": rule_target}


def _skipped(head: dict, reason: str, n_pos: int, n_neg: int, partial: dict | None = None) -> dict:
    """A skipped entry: reason, available counts, zero/empty selections (late skips keep partial keys)."""
    out = {**head, "status": "skipped", "reason": reason, "n_associated_available": int(n_pos),
           "n_unrelated_available": int(n_neg), "n_associated_selected": 0, "associated_indices": [],
           "n_unrelated_selected": 0, "unrelated_indices": []}
    for k, v in (partial or {}).items():
        out.setdefault(k, v)
    return out


def _pick(group: np.ndarray, n: int, inputs: PlanInputs, opts: PlanOptions,
          rng: np.random.Generator) -> tuple[list[int], dict]:
    """n rows of `group` by the plan's method (random, global-cluster medoids, or greedy cover)."""
    if opts.selection == "random":
        return select_random(group, n, rng)
    if opts.use_global_clusters:
        return select_from_global_clusters(group, n, inputs.clusters, inputs.Z, rng)
    return greedy_farthest_first_cover(inputs.Z, group, opts.coverage_radius, n, n)


def _cover(Z: np.ndarray, group: np.ndarray, chosen: list[int], opts: PlanOptions, rng: np.random.Generator) -> dict:
    """Cover statistics of a selection, or the 'skipped' marker without --compute_cover_stats."""
    if not opts.compute_cover_stats:
        return dict(STATS_SKIPPED)
    return cover_stats(Z, group, chosen, opts.coverage_radius, opts.stats_chunk_size, opts.stats_sample_size, rng)


def build_rule_entry(rule: pd.Series, rule_target: str, mask: np.ndarray, inputs: PlanInputs, opts: PlanOptions,
                     rng: np.random.Generator, stats_rng: np.random.Generator) -> dict:
    """One rule's plan entry: associated rows all satisfy the rule, unrelated rows none (spec §2.5)."""
    head = _entry_head(rule, rule_target)
    mask = np.asarray(mask, dtype=bool)
    pos, neg = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(pos) == 0 or len(neg) == 0:
        side = "associated" if len(pos) == 0 else "unrelated"
        return _skipped(head, f"Empty side: no {side} rows ({len(pos)} associated, {len(neg)} unrelated)",
                        len(pos), len(neg))
    t = opts.min_points
    if len(pos) < t or len(neg) < t:
        return _skipped(head, f"Too few datapoints: {len(pos)} associated and {len(neg)} unrelated rows, "
                              f"both sides need --min_points_per_ablation {t}", len(pos), len(neg))
    target_n = min(opts.effective_max, len(pos), len(neg))
    assoc, assoc_meta = _pick(pos, target_n, inputs, opts, rng)
    partial = {"n_associated_selected": len(assoc), "associated_indices": assoc}
    if not assoc:
        return _skipped(head, "Empty associated selection", len(pos), len(neg), partial)
    entry = {**head, "status": "ok", "n_associated_available": int(len(pos)), "n_unrelated_available": int(len(neg)),
             "n_associated_selected": len(assoc), "associated_indices": assoc,
             "associated_cover": {"greedy_meta": assoc_meta, "stats": _cover(inputs.Z, pos, assoc, opts, stats_rng)}}
    if opts.pair_by_similarity:
        assoc, unrel, pairing_meta = sample_len_tolerant_pairs(assoc, neg, inputs.reps, inputs.lengths,
                                                               opts.pair_len_tolerance, opts.pair_metric, rng)
        entry.update(n_unrelated_selected=len(unrel), unrelated_indices=unrel, pairing_meta=pairing_meta)
    else:
        unrel, unrel_meta = _pick(neg, len(assoc), inputs, opts, rng)
        entry.update(n_unrelated_selected=len(unrel), unrelated_indices=unrel,
                     unrelated_cover={"greedy_meta": unrel_meta,
                                      "stats": _cover(inputs.Z, neg, unrel, opts, stats_rng)})
    if not unrel or len(unrel) != len(assoc):
        return _skipped(head, f"Unrelated selection has {len(unrel)} rows for {len(assoc)} associated rows",
                        len(pos), len(neg), {k: v for k, v in entry.items() if k not in head and k != "status"})
    gaps = np.linalg.norm(inputs.reps[assoc].astype(np.float64) - inputs.reps[unrel].astype(np.float64), axis=1)
    entry["pair_stats"] = {"euclidean_dist": distance_summary(gaps, opts.stats_sample_size, stats_rng)}
    return entry


def build_sampling_plan(table: AnalysisTable, rules: pd.DataFrame, rule_target: str, inputs: PlanInputs,
                        opts: PlanOptions, header: dict, progress: bool = True) -> dict:
    """The full plan dict: header keys, dataset identity, one entry per rule (file order)."""
    n = len(table.df)
    masks = [rule_mask(table.df, str(r["rule"]), str(r["coefficient_sign"])) for _, r in rules.iterrows()]
    entries = []
    rows = list(rules.iterrows())
    for pos, ((_, rule), mask) in enumerate(tqdm(list(zip(rows, masks)), desc="rules", unit="rule",
                                                 disable=not progress, dynamic_ncols=True)):
        rng = np.random.default_rng([opts.seed, 1, pos])
        stats_rng = np.random.default_rng([opts.seed, 2, pos])
        entries.append(build_rule_entry(rule, rule_target, mask, inputs, opts, rng, stats_rng))
    plan = {**header,
            "coverage_radius": float(opts.coverage_radius), "min_points_per_ablation": int(opts.min_points),
            "max_points_per_ablation": int(opts.effective_max),
            "pairing": {"max_pairs_per_rule": int(opts.effective_max), "len_tolerance": int(opts.pair_len_tolerance),
                        "method": PAIRING_METHOD},
            "stats": {"compute_cover_stats": bool(opts.compute_cover_stats),
                      "stats_sample_size": int(opts.stats_sample_size), "stats_chunk_size": int(opts.stats_chunk_size)},
            "dataset_size": int(n),
            "prompts_sha256": prompts_sha256(table.prompts),
            "target_col": table.target_col,
            "rules": entries}
    if inputs.clusters is not None:
        plan["global_clusters"] = inputs.clusters.meta()
    return plan


def write_sampling_plan(path: str | Path, plan: dict) -> Path:
    """Write the plan JSON (indent 4) atomically; parents are created."""
    atomic_write_json(path, plan, indent=4)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class PlanEntry:
    """An `ok` rule entry: the two index-aligned row lists and the rule it serves."""

    rule_target: str
    rule_id: int
    rule: str
    rule_direction: str
    associated_indices: tuple[int, ...]
    unrelated_indices: tuple[int, ...]
    raw: dict = field(repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        """Any key of the raw JSON entry (`entry["associated_indices"]` works like the attribute)."""
        return self.raw[key]


@dataclass
class SamplingPlan:
    """A validated plan; `entry(target, rule_id)` gives an ok entry or raises PlanError."""

    path: Path
    data: dict
    entries: dict[tuple[str, int], dict]

    @property
    def dataset_size(self) -> int:
        return int(self.data["dataset_size"])

    @property
    def baseline_subset(self) -> str:
        return str(self.data.get("baseline_subset", "all"))

    @property
    def prompts_sha256(self) -> str | None:
        return self.data.get("prompts_sha256")

    @property
    def target_col(self) -> str | None:
        return self.data.get("target_col")

    def keys(self, only_ok: bool = False) -> list[tuple[str, int]]:
        """(rule_target, rule_id) of the entries in file order (only `ok` ones if asked)."""
        return [k for k, e in self.entries.items() if not only_ok or e.get("status") == "ok"]

    def skip_reason(self, rule_target: str, rule_id: int) -> str | None:
        """Stage 4's reason when it skipped this rule (a skip for the caller to record), else None."""
        e = self.entries.get((str(rule_target), int(rule_id)))
        if e is None or e.get("status") == "ok":
            return None
        return f"skipped by the sampling plan: {e.get('reason', 'no reason recorded')}"

    def entry(self, rule_target: str, rule_id: int) -> PlanEntry:
        """The ok entry of a rule; a missing or skipped entry is a PlanError for the caller to handle."""
        key = (str(rule_target), int(rule_id))
        e = self.entries.get(key)
        if e is None:
            have = ", ".join(f"({t}, {i})" for t, i in list(self.entries)[:10]) or "none"
            raise PlanError(f"sampling plan '{self.path}' has no entry for rule_target '{key[0]}', rule_id {key[1]} "
                            f"(entries: {have}); rebuild the plan from the same rules file with stage 4")
        if e.get("status") != "ok":
            raise PlanError(f"sampling plan '{self.path}': rule_target '{key[0]}', rule_id {key[1]} was "
                            f"{e.get('status')!r} in stage 4: {e.get('reason', 'no reason recorded')}")
        return PlanEntry(key[0], key[1], str(e.get("rule", "")), str(e.get("rule_direction", "positive")),
                         tuple(int(i) for i in e["associated_indices"]),
                         tuple(int(i) for i in e["unrelated_indices"]), e)


def _index_list(value: Any, name: str, where: str, n: int) -> list[int]:
    """Validate one index list of an ok entry: ints in [0, n)."""
    if not isinstance(value, list):
        raise PlanError(f"{where}: '{name}' is not a list")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise PlanError(f"{where}: '{name}' holds non-integer values such as {bad[:3]}")
    out_of_range = [v for v in value if not 0 <= v < n]
    if out_of_range:
        raise PlanError(f"{where}: '{name}' has indices outside the {n}-row table, e.g. {out_of_range[:3]}")
    return value


def _validate_entries(path: Path, rules: Any, n: int) -> dict[tuple[str, int], dict]:
    """Entries keyed by (rule_target, int rule_id), with every ok entry's index lists checked."""
    if not isinstance(rules, list):
        raise PlanError(f"sampling plan '{path}': 'rules' is not a list")
    out: dict[tuple[str, int], dict] = {}
    for pos, e in enumerate(rules):
        where = f"sampling plan '{path}', rules[{pos}]"
        if not isinstance(e, dict):
            raise PlanError(f"{where} is not an object")
        for k in ("rule_id", "rule_target", "status"):
            if k not in e:
                raise PlanError(f"{where} has no '{k}' key")
        try:
            key = (str(e["rule_target"]), int(e["rule_id"]))
        except (TypeError, ValueError):
            raise PlanError(f"{where}: rule_id {e['rule_id']!r} is not an integer") from None
        if key in out:
            raise PlanError(f"{where}: duplicate entry for rule_target '{key[0]}', rule_id {key[1]}")
        if e["status"] == "ok":
            for k in ("associated_indices", "unrelated_indices"):
                if k not in e:
                    raise PlanError(f"{where} (ok) has no '{k}' key")
            a = _index_list(e["associated_indices"], "associated_indices", where, n)
            u = _index_list(e["unrelated_indices"], "unrelated_indices", where, n)
            if not a or len(a) != len(u):
                raise PlanError(f"{where}: associated/unrelated lists must be non-empty and equally long "
                                f"(got {len(a)} and {len(u)})")
        out[key] = e
    return out


def load_sampling_plan(path: str | Path, expected_dataset_size: int | None = None,
                       expected_prompts_sha256: str | None = None,
                       expected_baseline_subset: str | None = None) -> SamplingPlan:
    """Read and validate a plan against the caller's table (size, prompt hash, regime)."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"sampling plan '{p}' does not exist (run 4_spectral_sample_datapoints.py first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"sampling plan '{p}' is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError(f"sampling plan '{p}' is not a JSON object")
    for k in ("dataset_size", "rules"):
        if k not in data:
            raise PlanError(f"sampling plan '{p}' has no '{k}' key")
    n = data["dataset_size"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PlanError(f"sampling plan '{p}': dataset_size {n!r} is not a non-negative integer")
    if expected_dataset_size is not None and n != int(expected_dataset_size):
        raise PlanError(f"sampling plan '{p}' was made for a table of {n} rows, but this table has "
                        f"{int(expected_dataset_size)}; rebuild the plan with stage 4 for this table")
    subset = str(data.get("baseline_subset", "all"))
    if expected_baseline_subset is not None and subset != expected_baseline_subset:
        raise PlanError(f"sampling plan '{p}' was made for --baseline_subset {subset}, not "
                        f"{expected_baseline_subset}")
    have_sha = data.get("prompts_sha256")
    if expected_prompts_sha256 is not None:
        if have_sha is None:
            log.warning("sampling plan '%s' has no prompts_sha256 (made by an older stage 4); only its row count "
                        "was checked", p)
        elif have_sha != expected_prompts_sha256:
            raise PlanError(f"sampling plan '{p}' was made for other prompts (prompts_sha256 differs) although "
                            f"the row count matches; rebuild the plan with stage 4 for this table")
    return SamplingPlan(p, data, _validate_entries(p, data["rules"], n))


# ---------------------------------------------------------------------------------------------
# Stage 4 driver


@dataclasses.dataclass(kw_only=True)
class Stage4Config(SpectralStageConfig):
    """The flags of `4_spectral_sample_datapoints.py`: spec §2.1 plus --dtype, --selection and --no_progress."""

    features_scores_dir: str = option(help="folder with scores.csv (stage 2)")
    rules_dir: str = option(help="rule folder (stage 3's xai_analyses_results)")
    rules_glob: str = option("association_rules_*.csv",
                             "rule-file prefix: files <prefix>_<target>.csv; the pipeline passes optimal_rule_set")
    fake_targets: bool = option(False, "use the <target>_fake rule file")
    ai_model: str = option(help="analysed model (hub id, folder, .gguf or embedded alias)")
    ai_model_cache_dir: str | None = option(None, "model cache folder")
    use_global_clusters: bool = option(
        False, "k-center cluster all rows once and pick one medoid per cluster, then fill at random")
    global_n_clusters: int = option(256, "number of global k-center clusters")
    coverage_radius: float = option(0.5, "L2 radius of the greedy cover (only sets stopped_reason and cover stats)")
    max_points_per_ablation: int = option(512, "max selected rows (= pairs) per rule")
    min_points_per_ablation: int = option(32, "a rule needs this many rows on both sides; max is raised to it if smaller")
    batch_size: int = option(16, "representation batch size")
    seed: int = option(DEFAULT_SEED, "seed: the same seed gives the same plan", aliases=("--random_seed",))
    output_path: str = option(help="plan JSON path (parents created)")
    baseline_subset: BaselineSubset = option("all",
                                             "rows kept: all, primary target True (positive) or False (negative)")
    pair_by_similarity_len_matched: bool = option(
        False, "match each associated row to its nearest unrelated row within --pair_len_tolerance")
    pair_len_tolerance: int = option(0, "max |token length difference| in pairing")
    pair_similarity_metric: str = option("cosine", "pairing distance: cosine, euclidean or any SciPy cdist metric name")
    compute_cover_stats: bool = option(False, "add coverage statistics to the plan")
    stats_sample_size: int = option(200000, "subsample size for distance quantiles (<= 0: exact)")
    stats_chunk_size: int = option(8192, "row chunk for nearest-center search")
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")
    device: Device = option("auto", "where to run the analysed model (auto: cuda > mps > cpu)")
    dtype: Dtype = option("auto", "weights/activation dtype (auto: float32, as TransformerLens uses)")
    selection: Selection = option("spectral", "spectral: coverage picks (default); random: uniform random control plan")
    no_progress: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        """Reject flag values that cannot work, naming the flag."""
        super().__post_init__()
        check_spectral_arguments(self)
        for flag in ("global_n_clusters", "max_points_per_ablation", "min_points_per_ablation", "batch_size",
                     "stats_chunk_size"):
            require(getattr(self, flag) >= 1, f"--{flag} must be >= 1, got {getattr(self, flag)}")
        require(self.pair_len_tolerance >= 0, f"--pair_len_tolerance must be >= 0, got {self.pair_len_tolerance}")
        require(self.coverage_radius >= 0, f"--coverage_radius must be >= 0, got {self.coverage_radius}")
        check_pair_metric(self.pair_similarity_metric)
        if self.selection == "random":
            for flag in ("use_global_clusters", "pair_by_similarity_len_matched"):
                require(not getattr(self, flag),
                        f"--selection random picks both sides uniformly at random; drop --{flag}")


def options_from_args(cfg: Stage4Config) -> PlanOptions:
    """PlanOptions of a stage-4 config."""
    return PlanOptions(min_points=cfg.min_points_per_ablation, max_points=cfg.max_points_per_ablation,
                       coverage_radius=cfg.coverage_radius, use_global_clusters=cfg.use_global_clusters,
                       global_n_clusters=cfg.global_n_clusters,
                       pair_by_similarity=cfg.pair_by_similarity_len_matched,
                       pair_len_tolerance=cfg.pair_len_tolerance, pair_metric=cfg.pair_similarity_metric,
                       compute_cover_stats=cfg.compute_cover_stats, stats_sample_size=cfg.stats_sample_size,
                       stats_chunk_size=cfg.stats_chunk_size, selection=cfg.selection, seed=cfg.seed)


def _header(cfg: Stage4Config, table: AnalysisTable) -> dict:
    """Top-level plan keys that echo the inputs and representation settings (spec §2.8 order)."""
    return {"scores_path": str(table.scores_path), "prompt_col": table.prompt_col,
            "baseline_subset": table.baseline_subset, "ai_model": cfg.ai_model,
            "ai_model_cache_dir": cfg.ai_model_cache_dir, "spectral_space": cfg.spectral_space,
            "rep_hook_name": cfg.rep_hook_name, "rep_pooling": cfg.rep_pooling, "max_seq_len": cfg.max_seq_len,
            "spectral_dim": int(cfg.spectral_dim)}


def run_stage4(cfg: Stage4Config) -> Path:
    """Load table, rules and model; build and write the plan; return its path."""
    task = load_task(cfg.task_module)
    table = load_analysis_table(cfg.features_scores_dir, task, cfg.baseline_subset)
    if len(table.df) == 0:
        raise ArtifactError(f"'{table.scores_path}' has no TRAIN rows with --baseline_subset {cfg.baseline_subset}")
    rules = load_primary_rules(cfg.rules_dir, cfg.rules_glob, table.target_col, cfg.fake_targets)
    rule_target = f"{table.target_col}_fake" if cfg.fake_targets else table.target_col
    for _, r in rules.iterrows():  # fail on a bad rule before the model loads
        rule_mask(table.df, str(r["rule"]), str(r["coefficient_sign"]))
    set_deterministic(cfg.seed)
    opts = options_from_args(cfg)
    model = load_analysed_model(cfg.ai_model, device=cfg.device, dtype=cfg.dtype,
                                ai_model_cache_dir=cfg.ai_model_cache_dir)
    progress = not cfg.no_progress
    reps = compute_representations(model, table.prompts, RepresentationSettings.from_args(cfg),
                                   batch_size=cfg.batch_size, cache_dir=cfg.spectral_cache_dir, progress=progress)
    inputs = PlanInputs(reps, spectral_embedding(reps, cfg.spectral_dim))
    if opts.pair_by_similarity:
        inputs.lengths = token_lengths(model.tokenizer, table.prompts)
    if opts.use_global_clusters:
        inputs.clusters = kcenter_farthest_first(inputs.Z, opts.global_n_clusters, np.random.default_rng([cfg.seed, 0]))
    plan = build_sampling_plan(table, rules, rule_target, inputs, opts, _header(cfg, table), progress=progress)
    out = write_sampling_plan(cfg.output_path, plan)
    n_ok = sum(e["status"] == "ok" for e in plan["rules"])
    print(f"wrote {out}: {n_ok} ok / {len(plan['rules'])} rules, {plan['dataset_size']} rows "
          f"(--baseline_subset {cfg.baseline_subset}, --selection {cfg.selection})")
    for e in plan["rules"]:
        if e["status"] != "ok":
            print(f"  rule {e['rule_id']} skipped: {e['reason']}")
    return out
