"""Stage 7 driver: candidate units → evaluation rows → flip columns → flip statistics → per-unit
rules → rule-metric summaries and HQ flip coverage (spec 7-11 §2).

Outputs live under `--rules_dir` (the pipeline's `.../rule_extraction_results/neuron_flip_rules`):
`<policy_tag>/ablation_cache/` (answers per unit keyed by prompt), `replacement_scores_cache/`,
`spectral_cache/`, `<policy_tag>/<lk>_<id>/` (raw rule files) and `stats/<run mode>/` (scores.csv
with flip columns and every summary). Run-mode names come from `lib.runs.layout`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd

from lib.core.choices import (DEFAULT_SEED, Device, Dtype, Intervention, RepPooling, RuleQualityMetric,
                              SpectralSpace)
from lib.core.errors import UsageError
from lib.pipeline.config import StageConfig, option, require
from lib.sampling.spectral import DEFAULT_REP_HOOK, SPECTRAL_HELP, check_spectral_arguments
from lib.core.files_and_cache import (
    ArtifactError,
    atomic_write_json,
    content_key,
    ensure_writable_dir,
    file_digest,
    set_deterministic,
    write_csv_atomic,
)
from lib.pipeline.feature_table import read_scores_table, scores_csv_path
from lib.anchoring.flips import (AblationContext, cached_replacements, compute_flip_columns, mean_pool_prompts,
                              policy_tag, prompt_sha1, recorded_labels)
from lib.anchoring.coverage_plots import write_hq_coverage
from lib.anchoring.flip_stats import discovery_original_rows, write_flip_stats
from lib.anchoring.eval_rows import select_eval_rows
from lib.anchoring.rules import QUALITY_COLUMNS, collect_rule_rows, extract_unit_rules, write_rule_summaries
from lib.anchoring.units import Unit, load_candidate_units
from lib.pipeline.stage3_rules import resolve_feature_columns
from lib.tasks.base import load_task

__all__ = ["Stage7Config", "run_stage7", "stats_dir_of", "find_ai_model", "load_inputs"]

_CORE, _IV, _MODES, _ROWS, _RX, _SUM = ("core", "intervention", "modes", "row sampling", "rule extraction",
                                        "summaries")


@dataclasses.dataclass(kw_only=True)
class Stage7Config(StageConfig):
    """Stage 7's flags, checked on construction (checks that need no files).

    `--seed` (mean pool, spectral sampling, torch) and `--random_seed` (RuleSHAP / SHAP) are two
    settings here, so `--random_seed` is not an alias of `--seed` on this stage."""

    circuit_agonists_path: str = option(help="stage-6 output folder (scanned recursively for neuron_buckets.json) "
                                             "or a .zip of it")
    features_scores_dir: str = option(help="folder with stage 2's scores.csv and features.json")
    # core
    search_epsilon: float | None = option(None, "τ: keep agonists whose stage-6 max_effect reaches τ (required; "
                                                "the pipeline uses 0.2)", group=_CORE)
    ai_model: str | None = option(None, "analysed model (default: ai_model of dataset_info.json)", group=_CORE)
    ai_model_cache_dir: str | None = option(None, "Hugging Face cache folder", group=_CORE)
    stats_dirname: str | None = option(None, "run mode: outputs go to <rules_dir>/stats/<stats_dirname>/",
                                       group=_CORE)
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC", group=_CORE)
    seed: int = option(DEFAULT_SEED, "global seed (mean pool, spectral sampling)", group=_CORE)
    batch_size: int = option(16, "rows (unit × prompt generations) per forward pass", group=_CORE)
    neuron_batch_size: int = option(4, "units evaluated together: each pass holds this many units × "
                                       "batch_size/this prompts (≤1 = one unit at a time)", group=_CORE)
    no_tqdm_batches: bool = option(False, "no progress bars", group=_CORE)
    max_neurons: int | None = option(None, "keep only the first N units (layer, id descending)", group=_CORE)
    # intervention
    intervention: Intervention = option("zero", "replacement of the ablated unit", group=_IV)
    points_to_use_for_mean_ablation: int = option(256, "TRAIN prompts for mean values", group=_IV)
    last_pos_only: bool = option(False, "intervene only from the last prompt position on (what --decode_only "
                                        "does here)", group=_IV)
    decode_only: bool = option(False, "prefill the prompt unhooked once; intervene on the last prompt position "
                                      "and every decode step", group=_IV)
    input_only: bool = option(False, "not supported (hooks during the prefill only)", group=_IV)
    semantic_quality_policy: Literal["none", "filter"] = option(
        "filter", "drop semantic-wrong rows before rule fitting (no task here has semantic columns)", group=_IV)
    no_rescore_cached_answers: bool = option(False, "accepted; cached answers are always rescored with the task "
                                                    "(cheap)", group=_IV)
    recompute_missing_semantic_cache: bool = option(False, "accepted; no semantic evaluator", group=_IV)
    # modes
    stats_only: bool = option(False, "reload stats/<run>/scores.csv and redo the statistics", group=_MODES)
    summarize_rule_metrics_only: bool = option(False, "only the rule-metric summaries and HQ coverage from "
                                                      "existing rule files", group=_MODES)
    skip_agonist_metric_stats: bool = option(False, "accepted (diagnostics not computed)", group=_MODES)
    agonist_metric_topk: int = option(30, "accepted (diagnostics not computed)", group=_MODES)
    exclude_discovery_rows_from_final_stats: bool = option(False, "drop stage-6 discovery rows from the flip "
                                                                  "statistics", group=_MODES)
    # row sampling
    use_spectral_sampling: bool = option(False, "evaluate a spectral sample of the rows", group=_ROWS)
    global_n_clusters: int = option(-1, ">0: k-center branch with this many clusters", group=_ROWS)
    keep_unsampled_rows: bool = option(False, "keep unsampled rows (flip columns NA)", group=_ROWS)
    spectral_space: SpectralSpace = option("hidden", SPECTRAL_HELP["spectral_space"], group=_ROWS)
    rep_hook_name: str = option(DEFAULT_REP_HOOK, SPECTRAL_HELP["rep_hook_name"], group=_ROWS)
    rep_pooling: RepPooling = option("mean", SPECTRAL_HELP["rep_pooling"], group=_ROWS)
    max_seq_len: int | None = option(None, SPECTRAL_HELP["max_seq_len"], group=_ROWS)
    spectral_dim: int = option(16, SPECTRAL_HELP["spectral_dim"], group=_ROWS)
    spectral_cache_dir: str | None = option(None, SPECTRAL_HELP["spectral_cache_dir"], group=_ROWS)
    coverage_radius: float = option(0.5, "greedy-cover radius", group=_ROWS)
    sampling_max_points: int = option(512, "rows to evaluate at most", group=_ROWS)
    sampling_min_points: int = option(64, "rows to evaluate at least", group=_ROWS)
    sampling_chunk_size: int = option(8192, "rows per nearest-center chunk", group=_ROWS)
    points_per_centroid: int = option(1, "greedy cover: rows per center", group=_ROWS)
    centroid_sampling_mode: Literal["random", "nearest"] = option("random", group=_ROWS)
    # rule extraction
    extract_rules: bool = option(False, "fit rules to every unit's flip columns", group=_RX)
    rules_dir: str = option("xai_analyses_results", "output root (pipeline: .../neuron_flip_rules)", group=_RX)
    rule_targets: str | None = option(None, "comma list of exact flip columns to fit", group=_RX)
    random_seed: int = option(DEFAULT_SEED, "RuleSHAP / SHAP seed", group=_RX)
    fast_shap_estimate: bool = option(False, "accepted: SHAP always uses the permutation estimator", group=_RX)
    npermutations: int = option(5, "SHAP antithetic orderings per row", group=_RX)
    n_estimators: int = option(500, "trees of the rule ensemble (stage 3's hidden flag)", group=_RX)
    only_unique_datapoints_in_shap: bool = option(False, group=_RX)
    epsilon: float = option(0.1, "SHAP background = feature minimum − epsilon", group=_RX)
    use_shap_in_xgb: bool = option(False, "SHAP-weighted column sampling in XGBoost", group=_RX)
    use_shap_in_lasso: bool = option(False, "accepted; stage 7 never filters rules with LASSO", group=_RX)
    only_unique_datapoints_in_rule_extraction: bool = option(False, group=_RX)
    no_emit_all_fit_rules: bool = option(False, "skip the descriptive ALL-FIT scope", group=_RX)
    force_all_fit_recompute: bool = option(False, group=_RX)
    # summaries
    summarize_rule_metrics: bool = option(False, "write rule-metric summaries and HQ coverage", group=_SUM)
    rule_metrics_quantiles: str = option("0.1,0.5,0.9", group=_SUM)
    rule_length_cap: int = option(30, group=_SUM)
    rule_metrics_topk: int = option(50, group=_SUM)
    threshold_metric: RuleQualityMetric = option("mcc", group=_SUM)
    rule_quality_metric: RuleQualityMetric | None = option(None, "default: --threshold_metric", group=_SUM)
    rule_quality_threshold: float = option(0.70, "HQ threshold, TEST scopes", group=_SUM)
    rule_quality_threshold_all_fit: float = option(0.70, "HQ threshold, ALL-FIT", group=_SUM)
    min_rule_dataset_coverage: float = option(0.005, "coverage floor (≤0 disables)", group=_SUM)
    device: Device = option("auto", "where to run the analysed model (auto: cuda > mps > cpu)")
    dtype: Dtype = option("auto", "weights/activation dtype (auto: float32, as TransformerLens uses)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.search_epsilon is not None, "--search_epsilon is required (τ of stage 6; the pipeline passes 0.2)")
        require(not (self.input_only and self.decode_only), "--input_only and --decode_only are mutually exclusive")
        require(not self.input_only,
                "--input_only (intervening during the prefill only) is not supported by the batched engine")
        require(not self.last_pos_only or self.decode_only,
                "--last_pos_only is supported only with --decode_only (which intervenes from the last prompt "
                "position on)")
        for flag in ("batch_size", "points_to_use_for_mean_ablation", "npermutations", "n_estimators",
                     "rule_length_cap", "rule_metrics_topk", "sampling_max_points", "sampling_chunk_size",
                     "points_per_centroid"):
            require(getattr(self, flag) >= 1, f"--{flag} must be >= 1, got {getattr(self, flag)}")
        require(self.sampling_min_points >= 0, "--sampling_min_points must be >= 0")
        require(self.max_neurons is None or self.max_neurons >= 1, "--max_neurons must be >= 1")
        try:
            qs = [float(x) for x in self.rule_metrics_quantiles.split(",")]
        except ValueError:
            raise UsageError(f"--rule_metrics_quantiles must be three numbers, got "
                             f"'{self.rule_metrics_quantiles}'") from None
        require(len(qs) == 3 and all(0 <= q <= 1 for q in qs), "--rule_metrics_quantiles must be three numbers in [0, 1]")
        require(not (self.stats_only and self.summarize_rule_metrics_only),
                "--stats_only and --summarize_rule_metrics_only are mutually exclusive")
        check_spectral_arguments(self)

    @property
    def emit_all_fit_rules(self) -> bool:
        """The descriptive ALL-FIT scope is written unless --no_emit_all_fit_rules."""
        return not self.no_emit_all_fit_rules

    @property
    def rule_targets_list(self) -> list[str] | None:
        """--rule_targets as a list of column names (None: every flip column of a unit)."""
        if not self.rule_targets:
            return None
        return [t.strip() for t in self.rule_targets.split(",") if t.strip()]


def stats_dir_of(cfg: Stage7Config) -> Path:
    """`<rules_dir>/stats/<stats_dirname>` (or `<rules_dir>/stats` without a run name): where the statistics go."""
    root = Path(cfg.rules_dir) / "stats"
    return root / cfg.stats_dirname if cfg.stats_dirname else root


def find_ai_model(features_dir: Path) -> str | None:
    """`ai_model` of the nearest `dataset_info.json` in the features folder or a parent."""
    for d in [features_dir, *features_dir.parents][:4]:
        p = d / "dataset_info.json"
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8")).get("ai_model")
            except json.JSONDecodeError:
                raise ArtifactError(f"'{p}' is not valid JSON") from None
    return None


def load_inputs(features_dir: str | Path, task: Any) -> tuple[pd.DataFrame, list[str], Path, str]:
    """(scores table with train and test rows, feature columns, scores path, digest of features.json)."""
    d = Path(features_dir)
    scores = scores_csv_path(d)
    if not scores.is_file() and not scores.with_suffix(".parquet").is_file():
        raise ArtifactError(f"no scores table '{scores}' in --features_scores_dir (run stage 2 first)")
    if not scores.is_file():
        scores = scores.with_suffix(".parquet")
    feats_path = (scores.parent if d.is_file() else d) / "features.json"
    if not feats_path.is_file():
        raise ArtifactError(f"no '{feats_path}' beside the scores table (stage 2 writes it)")
    targets = list(task.DEFAULT_TARGETS)
    df = read_scores_table(scores, targets)
    for col in (task.DEFAULT_INPUT, targets[0]):
        if col not in df.columns:
            raise ArtifactError(f"scores table '{scores}' has no column '{col}'")
    try:
        labels = [str(f["label"]) for f in json.loads(feats_path.read_text(encoding="utf-8"))]
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ArtifactError(f"'{feats_path}' must be a JSON list of objects with a 'label' ({exc})") from None
    features = resolve_feature_columns(list(df.columns), labels, targets)
    if not features:
        raise ArtifactError(f"no column of '{scores}' matches a feature label of '{feats_path}'")
    for c in features:
        num = pd.to_numeric(df[c].astype("float64") if df[c].dtype == bool else df[c], errors="coerce")
        df[c] = num.astype("float64").fillna(0.0)
    if "is_test" in df.columns:
        df["is_test"] = df["is_test"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)
    return df, features, scores, file_digest(feats_path, "sha1")


class _Model:
    """Lazy analysed-model loader (loaded on the first cache miss only)."""

    def __init__(self, args: Stage7Config, ai_model: str | None, echo: Callable[[str], None]) -> None:
        self.args, self.ai_model, self.echo, self.model = args, ai_model, echo, None

    def __call__(self) -> Any:
        if self.model is None:
            if not self.ai_model:
                raise ArtifactError("no model given: pass --ai_model (no dataset_info.json with 'ai_model' found "
                                    "beside --features_scores_dir)")
            from lib.models.loading import load_analysed_model

            self.echo(f"[stage7] loading {self.ai_model} ...")
            self.model = load_analysed_model(self.ai_model, self.args.device, self.args.dtype, self.args.ai_model_cache_dir)
        return self.model


def _eval_rows(df: pd.DataFrame, args: Stage7Config, prompt_col: str, get_model: _Model, rules_dir: Path,
               echo: Callable[[str], None]) -> tuple[pd.DataFrame, dict]:
    """Evaluation frame; a spectral selection is cached under a key of the prompts and every sampling flag."""
    if not args.use_spectral_sampling:
        return select_eval_rows(df, args, prompt_col, get_model, str(rules_dir / "spectral_cache"))
    flags = {k: getattr(args, k) for k in ("global_n_clusters", "spectral_space", "rep_hook_name", "rep_pooling",
                                           "max_seq_len", "spectral_dim", "coverage_radius", "sampling_max_points",
                                           "sampling_min_points", "sampling_chunk_size", "points_per_centroid",
                                           "centroid_sampling_mode", "seed", "keep_unsampled_rows")}
    key = content_key("stage7-eval-rows-v1", get_model.ai_model, args.dtype, flags,
                      [prompt_sha1(p) for p in df[prompt_col].astype(str)])
    path = rules_dir / "spectral_cache" / f"eval_rows_{key[:16]}.json"
    if path.is_file():
        obj = json.loads(path.read_text(encoding="utf-8"))
        from lib.anchoring.eval_rows import mark_rows

        frame = mark_rows(df, np.asarray(obj["picked"], dtype=np.int64), np.asarray(obj["centers"], dtype=np.int64),
                          bool(args.keep_unsampled_rows))
        return frame, {**obj["meta"], "from_cache": str(path)}
    cache = args.spectral_cache_dir or str(rules_dir / "spectral_cache")
    frame, meta = select_eval_rows(df, args, prompt_col, get_model, cache)
    picked = frame.loc[frame["_sampled"], "_orig_row"].astype(int).tolist()
    centers = frame.loc[frame["_spectral_sampled_center"], "_orig_row"].astype(int).tolist()
    atomic_write_json(path, {"picked": picked, "centers": centers, "meta": meta})
    echo(f"[stage7] spectral sampling kept {len(picked)} of {len(df)} rows ({meta.get('method')})")
    return frame, meta


def _semantic_config(args: Stage7Config) -> dict:
    return {"semantic_diagnostics_enabled": False,
            "reason": "the task exposes no semantic evaluator; no semantic_* columns are written",
            "semantic_quality_policy": args.semantic_quality_policy, "judge_model": None, "judge_mode": "off",
            "judge_cache_dir": None, "judge_max_tokens": None}


def _flips(df: pd.DataFrame, units: list[Unit], args: Stage7Config, task: Any, get_model: _Model, rules_dir: Path,
           tag: str, scores_path: Path, echo: Callable[[str], None]) -> tuple[pd.DataFrame, dict]:
    """Evaluation frame with flip columns appended, and the run report."""
    prompt_col, main_metric = task.DEFAULT_INPUT, task.DEFAULT_TARGETS[0]
    if not units:  # stage 6 found no agonist: nothing to ablate, no model needed; the files say so
        echo("[stage7] no candidate unit: stage 6 found no agonist, nothing is ablated")
        frame = df.assign(_evaluated=False)
        return frame, {"n_units": 0, "n_rows": int(len(frame)), "n_unit_generations": 0, "n_baseline_mismatch": 0,
                       "sampling": None, "policy_tag": tag, "scores_sha1": file_digest(scores_path, "sha1")}
    frame, sampling = _eval_rows(df, args, prompt_col, get_model, rules_dir, echo)
    ctx = AblationContext(get_model.ai_model or "", task, args.task_module, bool(args.decode_only), args.intervention,
                          int(args.batch_size), str(args.dtype), get_model)
    train_prompts = df.loc[~df["is_test"], prompt_col].astype(str).tolist() if "is_test" in df.columns \
        else df[prompt_col].astype(str).tolist()
    pool = [] if args.intervention == "zero" else mean_pool_prompts(train_prompts, args.points_to_use_for_mean_ablation,
                                                                    args.seed)
    repl, ident = cached_replacements(ctx, pool, units, rules_dir / "replacement_scores_cache",
                                      progress=not args.no_tqdm_batches)
    flips, report = compute_flip_columns(frame, units, prompt_col, main_metric, ctx, repl, ident,
                                         rules_dir / tag / "ablation_cache", args.neuron_batch_size,
                                         progress=not args.no_tqdm_batches, echo=echo)
    report.update(sampling=sampling, policy_tag=tag, scores_sha1=file_digest(scores_path, "sha1"))
    out = pd.concat([frame, flips], axis=1)
    if report["n_baseline_mismatch"]:
        echo(f"[stage7] {report['n_baseline_mismatch']} evaluated row(s) did not reproduce the recorded "
             f"'{main_metric}' without ablation; their flip columns are NA")
    return out, report


def _reload_stats_scores(stats_dir: Path, units: list[Unit]) -> pd.DataFrame:
    """`stats/<run>/scores.csv` of an earlier run, checked for every unit's flip columns."""
    p = stats_dir / "scores.csv"
    if not p.is_file():
        raise ArtifactError(f"'{p}' does not exist: run stage 7 without --stats_only/--summarize_rule_metrics_only first")
    df = pd.read_csv(p, low_memory=False)
    for u in units:
        for kind in ("any", "c2i", "i2c"):
            if u.column(kind) not in df.columns:
                raise ArtifactError(f"'{p}' lacks flip column '{u.column(kind)}' (rerun without --stats_only)")
            df[u.column(kind)] = df[u.column(kind)].map(
                lambda v: pd.NA if pd.isna(v) else str(v).strip().lower() in ("true", "1", "1.0")).astype("boolean")
    for c in ("is_test", "_evaluated", "_sampled", "_spectral_sampled_center"):
        if c in df.columns:
            df[c] = df[c].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)
    return df


def run_stage7(args: Stage7Config, echo: Callable[[str], None] = print) -> dict:
    """Run stage 7 as the flags ask; returns a small summary (units, HQ counts, timings)."""
    set_deterministic(args.seed)
    t0 = time.perf_counter()
    task = load_task(args.task_module)
    main_metric = task.DEFAULT_TARGETS[0]
    units = load_candidate_units(args.circuit_agonists_path, float(args.search_epsilon), args.max_neurons)
    df, features, scores_path, feats_digest = load_inputs(args.features_scores_dir, task)
    ai_model = args.ai_model or find_ai_model(Path(args.features_scores_dir))
    rules_dir = ensure_writable_dir(args.rules_dir, "--rules_dir")
    run = args.stats_dirname or ""
    stats_dir = ensure_writable_dir(stats_dir_of(args), "stats folder")
    tag = policy_tag(main_metric, args.intervention, bool(args.decode_only), bool(args.input_only), bool(args.last_pos_only))
    atomic_write_json(stats_dir / "semantic_runtime_config.json", _semantic_config(args))
    echo(f"[stage7] {len(units)} candidate unit(s) (τ={args.search_epsilon}); {len(df)} rows, "
         f"{len(features)} features; policy {tag}; run '{run or '(none)'}'")
    summary: dict = {"n_units": len(units), "run": run, "policy_tag": tag, "stats_dir": str(stats_dir)}
    get_model = _Model(args, ai_model, echo)

    if args.stats_only or args.summarize_rule_metrics_only:
        frame = _reload_stats_scores(stats_dir, units)
    else:
        t = time.perf_counter()
        frame, report = _flips(df, units, args, task, get_model, rules_dir, tag, scores_path, echo)
        write_csv_atomic(frame, stats_dir / "scores.csv")
        report["seconds"] = round(time.perf_counter() - t, 1)
        atomic_write_json(stats_dir / "flip_run_report.json", report)
        summary["flip_seconds"] = report["seconds"]
        get_model.model = None  # free the model before CPU-only work
    if not args.summarize_rule_metrics_only:
        exclude = discovery_original_rows(args.circuit_agonists_path) if args.exclude_discovery_rows_from_final_stats else None
        glob = write_flip_stats(frame, units, stats_dir, 50, exclude)
        echo(f"[stage7] flip statistics: {glob['union_any_unique_count']} of {glob['n_evaluated_rows']} evaluated "
             f"row(s) flipped by at least one unit")

    extracted: dict[str, list[str]] = {}
    if args.extract_rules or args.summarize_rule_metrics or args.summarize_rule_metrics_only:
        t = time.perf_counter()
        fit = bool(args.extract_rules) and not args.summarize_rule_metrics_only and not args.stats_only
        for n, u in enumerate(units, 1):
            unit_dir = rules_dir / tag / u.neuron_key
            try:
                res = extract_unit_rules(frame, features, u, args, unit_dir, feats_digest, echo, reuse_only=not fit)
            except Exception as exc:  # one unit's failure must not lose the others (spec §2.7: printed, swallowed)
                echo(f"[stage7] {u.key}: rule extraction failed ({type(exc).__name__}: {exc})")
                continue
            extracted[u.neuron_key] = res["targets"]
            if fit and not args.no_tqdm_batches:
                echo(f"[stage7] unit {n}/{len(units)} {u.key}: {len(res['targets'])} target(s)"
                     + (" (reused)" if res["reused"] else "") + (f"; skipped {sorted(res['skipped'])}" if res["skipped"] else ""))
        summary["rule_seconds"] = round(time.perf_counter() - t, 1)

    if args.summarize_rule_metrics or args.summarize_rule_metrics_only:
        rows = collect_rule_rows(units, extracted, rules_dir, tag)
        best = write_rule_summaries(rows, stats_dir, run, args)
        qcol = QUALITY_COLUMNS[args.rule_quality_metric or args.threshold_metric]
        thresholds = {"test": float(args.rule_quality_threshold), "test_selected": float(args.rule_quality_threshold),
                      "all_fit": float(args.rule_quality_threshold_all_fit)}
        base = recorded_labels(frame, main_metric)
        cov = write_hq_coverage(frame, units, best, qcol, thresholds, float(args.min_rule_dataset_coverage), main_metric,
                                base, stats_dir, run)
        summary.update(n_rule_bearing=cov["n_neurons_rule_bearing"],
                       n_hq_test=cov["score_scopes"]["test"]["n_neurons_high_quality"],
                       n_hq_all_fit=cov["score_scopes"]["all_fit"]["n_neurons_high_quality"],
                       n_hq_test_selected=cov["score_scopes"]["test_selected"]["n_neurons_high_quality"],
                       best_test=best["test"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
