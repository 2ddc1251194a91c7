"""Stages 1-7 for one task and one analysed model: `python -m lib.pipeline.run <task> <model> [options]`.

`_run_pipeline.sh` is a thin wrapper around this module and keeps its command line. Options resolve
in one order: explicit options > `--main` > the `--preset` > the paper defaults (`lib.pipeline.presets`).
Every stage is skipped when its outputs exist (`--force` / `--from_stage` rerun it); a failing stage
stops the run with its exit code and names the stage; the per-stage timings go to stderr and to
`<model dir>/pipeline_timings.tsv`, the resolved options to `<model dir>/run_manifest.json`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lib.core.choices import CHA_SCOPES, CHA_STATISTICS, CIRCUIT_LEVELS, DEFAULT_SEED, DEVICES, DTYPES, INTERVENTIONS
from lib.core.files_and_cache import atomic_path
from lib.runs.layout import DEFAULT_CIRCUIT_SIZE, ExperimentLayout, RunOptions, run_mode
from lib.runs.manifest import now_iso, record_stage
from lib.pipeline.presets import MAIN_MODE, PAPER_DEFAULTS, PRESET_HELP, PRESETS, preset_layers

__all__ = ["PROG", "PipelineError", "PipelineSettings", "parse_pipeline_args", "stage_commands", "main"]

PROG = "_run_pipeline.sh"
SPECTRAL_FLAGS = ("--spectral_space", "hidden", "--rep_hook_name", "ln_final.hook_normalized",
                  "--rep_pooling", "last", "--spectral_dim", "32")
STAGE_NAMES = {1: "prompts and answers", 2: "features", 3: "rules", 5: "circuit discovery", 7: "neuron-anchored rules"}

USAGE = """\
usage: bash _run_pipeline.sh <task> <model> [options]

  <task>   arithmetic | bon_jailbreaking | hans_nli   (module lib.tasks.<task>_task)
  <model>  Hugging Face id, local folder, .gguf file, or an embedded alias
           (smollm2-135m-instruct-q4_1, gemma-3-270m-q4_k_m)

Run mode (folder names as in spec 7-11 §3):
  --spectral_discovery_plan   stage-5 pairs from a stage-4 spectral plan (paper default: random pairs)
  --random_discovery          stage-5 random pairs (overrides a preset)
  --spectral_anchoring_plan   stage-6 prompts from stage-4 spectral plans (paper default: random)
  --random_anchoring          stage-6 random prompts (overrides a preset)
  --main                      = --spectral_discovery_plan --spectral_anchoring_plan --decode_only
                              (the MAIN run mode; the cpu and tiny presets imply it)
  --slow_anchoring            exhaustive single-unit ablation in stage 6 (default: CHA, "fast")
  --incorrect_rules           fake-target control (stage 3 --fake_targets ...)
  --spectral_splits           spectral clusters instead of rules (not supported: stage 5 refuses
                              --cluster_by_spectral; see docs/DEVIATIONS.md)
  --decode_only               intervene only at answer-producing positions (stages 5-7)
  --no_decode_only            hooks on every position (overrides a preset; HANS runs)
  --intervention NAME         stage 6/7 replacement (mean-positional); stage 5 gets the non-donor name
  --tau T                     τ = min flip rate, stage 6 --search_epsilon and stage 7 (0.2)
  --circuit_size M            stage-5 top-M units (100000)
  --circuit_level LEVEL       neuron | node (neuron)
  --mlp_neurons_only          pass --mlp_neurons_only to stages 5 and 6
  --include_zero_scores       pass --include_zero_scores to stage 5

The original pipeline's option names are accepted too:
  --spectral_circuit_discovery = --spectral_discovery_plan   --random_circuit_discovery = --random_discovery
  --random_anchoring_plan = --random_anchoring                --fast_anchoring = CHA (the default)
  --max_number_of_circuits_to_analyze N = --max_circuits N    --eval_intervention NAME = --intervention NAME
  --min_flip_rate T = --tau T

Sizes and budgets (defaults = the paper setting, or the --preset's values):
  --preset NAME               paper (default) | cpu | tiny  (explicit options win over the preset)
  --max_prompts N             stage-1 seeded subsample (0 = all prompts of the task)
  --batch_size B              stage 1/6/7 batch size (256)
  --z_thresh Z                stage-2 MAD filter threshold; < 0 = off (-1)
  --feature_llm NAME          stage-2 feature LLM (gemma3:27b)
  --no_llm_features           stage 2 with the task's seed features only
  --max_circuits N            rules analysed by stages 5-6 (0 = all)
  --pairs_per_circuit N       stage-5 pairs per rule; also the discovery plan's min points (128)
  --discovery_clusters N      discovery plan k-center clusters (32)
  --ig_steps N                stage-5 EAP-IG steps m (3)
  --stage5_batch_size N       stage-5 pairs per forward/backward (1, as the original)
  --n_points N                stage-6 --n_associated/--n_unrelated and anchoring plan points (64)
  --anchoring_clusters N      anchoring plan clusters (16)
  --top_k_neurons K           stage-6 candidate budget per circuit (all)
  --last_k_layers K           stage 6 keeps only candidates of the last K MLP layers (all)
  --cha_statistic S           stage-6 group statistic: flip_ucb (the original) | effect_sprt
  --cha_scope S               stage-6 search space: candidates (stage 5's) | all_units (every MLP unit)
  --knockout_random_sets N    stage-6 knockout validation against N random same-size sets (20; 0 = off)
  --mean_pool N               --points_to_use_for_mean_ablation (256; 2048 for donor interventions)
  --stage7_max_points N       stage-7 --sampling_max_points (10000)
  --stage7_min_points N       stage-7 --sampling_min_points (64)
  --stage7_clusters N         stage-7 --global_n_clusters (64)
  --neuron_batch_size N       stage-7 units evaluated together (4)
  --n_estimators N            trees of the rule ensembles of stages 3 and 7 (500)
  --no_shap_in_xgb            stage 3 without --use_shap_in_xgb/--use_shap_in_lasso (on a few
                              hundred rows the SHAP weights can zero every feature: no rule at all)
  --num_threads N             torch/OpenMP threads per stage (0 = library default)
  --seed S                    seed of every stage (42; another seed gets its own stage-2/3 folders)
  --device D / --dtype T      where/how the analysed model runs (auto / auto)

Roots and control:
  --data_root DIR             data root (env MECHARULE_DATA_ROOT, default data)
  --cache_root DIR            cache root (env MECHARULE_CACHE_ROOT, default cache)
  --force                     rerun every stage even when its outputs exist
  --from_stage N              rerun stages >= N (earlier ones only if their outputs are missing)
  --to_stage N                stop after stage N (7)
  --no_summary                do not print the summary at the end
  --dry_run                   print the stage commands without running them
  --print_paths               print NAME=path lines of this run's folders and plans, then exit
  -h, --help                  this help

Environment: PYTHON (interpreter of the stages, default: this one), MIN_RULE_DATASET_COVERAGE (0.005).

""" + PRESET_HELP


class PipelineError(Exception):
    """A usage error of the runner (exit 2), or a stop with another exit code."""

    def __init__(self, message: str, code: int = 2, usage_hint: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.usage_hint = usage_hint


# ------------------------------------------------------------------ options
# Flags: option -> (setting, value). Explicit flags always win over --main and the preset.
_FLAGS: dict[str, tuple[str, Any]] = {
    "--spectral_discovery_plan": ("discovery", "spectral"), "--spectral_circuit_discovery": ("discovery", "spectral"),
    "--random_discovery": ("discovery", "random"), "--random_circuit_discovery": ("discovery", "random"),
    "--spectral_anchoring_plan": ("anchoring", "spectral"),
    "--random_anchoring": ("anchoring", "random"), "--random_anchoring_plan": ("anchoring", "random"),
    "--no_decode_only": ("decode_only", False), "--decode_only": ("decode_only", True),
    "--slow_anchoring": ("fast", False), "--fast_anchoring": ("fast", True),
    "--incorrect_rules": ("fake", True), "--spectral_splits": ("split", "spectral"),
    "--mlp_neurons_only": ("mlp_only", True), "--include_zero_scores": ("include_zero", True),
    "--no_llm_features": ("no_llm_features", True), "--no_shap_in_xgb": ("shap_in_xgb", False),
    "--force": ("force", True), "--no_summary": ("summary", False), "--dry_run": ("dry_run", True),
    "--print_paths": ("print_paths", True),
}
# Valued options: option -> (setting, kind) with kind str | int | num; the user's text is kept.
_VALUED: dict[str, tuple[str, str]] = {
    "--preset": ("preset", "str"), "--data_root": ("data_root", "str"), "--cache_root": ("cache_root", "str"),
    "--intervention": ("intervention", "str"), "--eval_intervention": ("intervention", "str"),
    "--tau": ("tau", "num"), "--min_flip_rate": ("tau", "num"), "--circuit_level": ("circuit_level", "str"),
    "--feature_llm": ("feature_llm", "str"), "--device": ("device", "str"), "--dtype": ("dtype", "str"),
    "--z_thresh": ("z_thresh", "num"), "--circuit_size": ("circuit_size", "int"),
    "--max_prompts": ("max_prompts", "int"), "--batch_size": ("batch_size", "int"),
    "--max_circuits": ("max_circuits", "int"), "--max_number_of_circuits_to_analyze": ("max_circuits", "int"),
    "--pairs_per_circuit": ("pairs_per_circuit", "int"), "--discovery_clusters": ("discovery_clusters", "int"),
    "--ig_steps": ("ig_steps", "int"), "--n_points": ("n_points", "int"),
    "--anchoring_clusters": ("anchoring_clusters", "int"), "--top_k_neurons": ("top_k_neurons", "int"),
    "--mean_pool": ("mean_pool", "int"), "--stage7_max_points": ("stage7_max_points", "int"),
    "--stage7_min_points": ("stage7_min_points", "int"), "--stage7_clusters": ("stage7_clusters", "int"),
    "--neuron_batch_size": ("neuron_batch_size", "int"), "--n_estimators": ("n_estimators", "int"),
    "--stage5_batch_size": ("stage5_batch_size", "int"), "--last_k_layers": ("last_k_layers", "int"),
    "--num_threads": ("num_threads", "int"), "--seed": ("seed", "int"), "--random_seed": ("seed", "int"),
    "--from_stage": ("from_stage", "int"), "--to_stage": ("to_stage", "int"),
    "--cha_statistic": ("cha_statistic", "str"), "--cha_scope": ("cha_scope", "str"),
    "--knockout_random_sets": ("knockout_random_sets", "int"),
}
_INT_RE = re.compile(r"^-?[0-9]+$")
_NUM_RE = re.compile(r"^-?[0-9]+([.][0-9]+)?([eE]-?[0-9]+)?$")
# Settings that must be >= 0 / >= 1 (as option names, for the error message).
_AT_LEAST_0 = ("max_prompts", "max_circuits", "num_threads")
_AT_LEAST_1 = ("batch_size", "pairs_per_circuit", "discovery_clusters", "ig_steps", "n_points", "anchoring_clusters",
               "mean_pool", "stage7_max_points", "stage7_min_points", "stage7_clusters", "neuron_batch_size",
               "n_estimators", "circuit_size", "stage5_batch_size")


@dataclass
class PipelineSettings:
    """The resolved options of one pipeline run (numbers kept as the user wrote them)."""

    task: str
    model: str
    preset: str = "paper"
    data_root: str = "data"
    cache_root: str = "cache"
    discovery: str = "random"
    anchoring: str = "random"
    fast: bool = True
    fake: bool = False
    split: str = "rule"
    decode_only: bool = False
    intervention: str = "mean-positional"
    tau: str = "0.2"
    circuit_size: str = str(DEFAULT_CIRCUIT_SIZE)
    circuit_level: str = "neuron"
    mlp_only: bool = False
    include_zero: bool = False
    feature_llm: str = "gemma3:27b"
    no_llm_features: bool = False
    shap_in_xgb: bool = True
    max_prompts: str = "0"
    batch_size: str = "256"
    z_thresh: str = "-1"
    max_circuits: str = "0"
    pairs_per_circuit: str = "128"
    discovery_clusters: str = "32"
    ig_steps: str = "3"
    stage5_batch_size: str = "1"
    n_points: str = "64"
    anchoring_clusters: str = "16"
    top_k_neurons: str = ""
    last_k_layers: str = ""
    cha_statistic: str = ""  # "" = stage 6's default
    cha_scope: str = ""
    knockout_random_sets: str = ""
    mean_pool: str = "256"
    stage7_max_points: str = "10000"
    stage7_min_points: str = "64"
    stage7_clusters: str = "64"
    neuron_batch_size: str = "4"
    n_estimators: str = "500"
    num_threads: str = "0"
    seed: str = str(DEFAULT_SEED)
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    from_stage: int = 1
    to_stage: int = 7
    summary: bool = True
    dry_run: bool = False
    print_paths: bool = False
    min_coverage: str = "0.005"
    python: str = field(default_factory=lambda: os.environ.get("PYTHON") or sys.executable)

    # ---- names and folders (one place: lib.runs.layout)
    @property
    def run_options(self) -> RunOptions:
        return RunOptions(split="rule", discovery_sampling=self.discovery, circuit_size=int(self.circuit_size),
                          decode_only=self.decode_only, intervention=self.intervention, fast=self.fast,
                          anchoring=self.anchoring, tau=float(self.tau), fake_targets=self.fake)

    @property
    def layout(self) -> ExperimentLayout:
        return ExperimentLayout(Path(self.data_root), self.task, self.model, Path(self.cache_root), int(self.seed))

    @property
    def run_mode(self) -> str:
        return run_mode(self.run_options)

    @property
    def task_module(self) -> str:
        return f"lib.tasks.{self.task}_task"

    @property
    def pkl(self) -> Path:
        return self.layout.cache_dir / "llm_io_data.pkl"

    @property
    def stage5_intervention(self) -> str:
        """Stage 5 has no donor interventions: the name without `donor`."""
        return self.intervention.replace("donor-", "").replace("-donor", "")

    def _plan(self, n: str, k: str, what: str) -> Path:
        fake = "_fake_targets" if self.fake else ""
        return self.layout.model_dir / "sampling_plans" / f"spectral_sampling_plan{fake}-n{n}-k{k}-seed{self.seed}_for_{what}.json"

    @property
    def discovery_plan(self) -> Path:
        return self._plan(self.pairs_per_circuit, self.discovery_clusters, "circuit_discovery")

    def anchoring_plan(self, regime: str) -> Path:
        return self._plan(self.n_points, self.anchoring_clusters, f"anchoring_{regime}")

    def must_rerun(self, stage: int) -> bool:
        """--force, or a stage at or after --from_stage when --from_stage was given."""
        return self.force or (self.from_stage > 1 and stage >= self.from_stage)


def _fail(message: str) -> PipelineError:
    return PipelineError(message)


def parse_pipeline_args(argv: Sequence[str], env: dict[str, str] | None = None) -> PipelineSettings:
    """Resolve `<task> <model> [options]`: explicit > --main > preset > paper defaults; checks every value."""
    env = dict(os.environ if env is None else env)
    args = list(argv)
    if len(args) < 2:
        raise PipelineError("a task and a model are required\n" + USAGE.split("\n\n")[0], usage_hint=True)
    task, model, rest = args[0], args[1], args[2:]
    if not task or task.startswith("-"):
        raise _fail(f"first argument must be the task, got '{task}'")
    if not model or model.startswith("-"):
        raise _fail(f"second argument must be the model, got '{model}'")
    given: dict[str, Any] = {}
    main_mode = False
    i = 0
    while i < len(rest):
        opt = rest[i]
        if opt == "--main":
            main_mode = True
        elif opt in _FLAGS:
            key, value = _FLAGS[opt]
            given[key] = value
        elif opt in _VALUED:
            if i + 1 >= len(rest) or rest[i + 1] == "":
                raise _fail(f"option {opt} needs a value")
            key, kind = _VALUED[opt]
            value = rest[i + 1]
            i += 1
            if kind == "num" and not _NUM_RE.match(value):
                raise _fail(f"{opt} needs a number, got '{value}'")
            if kind == "int" and not _INT_RE.match(value):
                raise _fail(f"{opt} needs an integer, got '{value}'")
            given[key] = value
        else:
            raise _fail(f"unknown option '{opt}'")
        i += 1

    preset = given.pop("preset", "paper")
    if preset not in PRESETS:
        raise _fail(f"unknown --preset '{preset}' ({', '.join(PRESETS)})")
    resolved: dict[str, Any] = {}
    layers = [given, MAIN_MODE if main_mode else {}, *preset_layers(preset, task), PAPER_DEFAULTS]
    keys = set().union(*layers) | {"mean_pool"}
    for key in keys:
        for layer in layers:
            if key in layer and layer[key] is not None:
                resolved[key] = layer[key]
                break
    if "mean_pool" not in resolved:
        resolved["mean_pool"] = 2048 if "donor" in str(resolved.get("intervention", "mean-positional")) else 256
    for key in ("from_stage", "to_stage"):
        if key in resolved:
            resolved[key] = int(resolved[key])
    for key, value in list(resolved.items()):  # the runner keeps numbers as text, as they go on the command lines
        if key in ("from_stage", "to_stage") or isinstance(value, bool):
            continue
        resolved[key] = str(value)
    if "no_llm_features" in resolved:
        resolved["no_llm_features"] = bool(resolved["no_llm_features"])
    settings = PipelineSettings(task=task, model=model, preset=preset,
                                data_root=env.get("MECHARULE_DATA_ROOT") or "data",
                                cache_root=env.get("MECHARULE_CACHE_ROOT") or "cache",
                                min_coverage=env.get("MIN_RULE_DATASET_COVERAGE") or "0.005")
    for key, value in resolved.items():
        setattr(settings, key, value)
    _validate(settings)
    return settings


def _validate(s: PipelineSettings) -> None:
    """The checks of the original driver, with messages naming the option."""
    if s.intervention not in INTERVENTIONS:
        raise _fail("--intervention must be " + ", ".join(INTERVENTIONS[:-1]) + f" or {INTERVENTIONS[-1]}")
    if s.circuit_level not in CIRCUIT_LEVELS:
        raise _fail("--circuit_level must be " + " or ".join(CIRCUIT_LEVELS))
    if s.device not in DEVICES:
        raise _fail("--device must be " + ", ".join(DEVICES[:-1]) + f" or {DEVICES[-1]}")
    if s.dtype not in DTYPES:
        raise _fail("--dtype must be one of " + ", ".join(DTYPES))
    if not (1 <= s.from_stage <= 7 and 1 <= s.to_stage <= 7):
        raise _fail("--from_stage/--to_stage must be 1..7")
    if s.cha_statistic and s.cha_statistic not in CHA_STATISTICS:
        raise _fail("--cha_statistic must be " + " or ".join(CHA_STATISTICS))
    if s.cha_scope and s.cha_scope not in CHA_SCOPES:
        raise _fail("--cha_scope must be " + " or ".join(CHA_SCOPES))
    if s.from_stage > s.to_stage:
        raise _fail("--from_stage is after --to_stage")
    if s.split == "spectral":
        if s.fake:
            raise _fail("--spectral_splits excludes --incorrect_rules")
        raise _fail("--spectral_splits is not supported: stage 5 has no --cluster_by_spectral mode (docs/DEVIATIONS.md)")
    for key in _AT_LEAST_0:
        if int(getattr(s, key)) < 0:
            raise _fail(f"--{key} must be >= 0")
    for key in _AT_LEAST_1:
        if int(getattr(s, key)) < 1:
            raise _fail(f"--{key} must be >= 1")
    for key in ("top_k_neurons", "last_k_layers"):
        if getattr(s, key) != "" and int(getattr(s, key)) < 1:
            raise _fail(f"--{key} must be >= 1")


# ------------------------------------------------------------------ stage commands
def _model_flags(s: PipelineSettings) -> list[str]:
    return ["--device", s.device, "--dtype", s.dtype]


def _fake_flag(s: PipelineSettings) -> list[str]:
    return ["--fake_targets"] if s.fake else []


def stage1_command(s: PipelineSettings) -> list[str]:
    lay = s.layout
    cmd = [s.python, "1_generate_prompts_and_answers.py", "--ai_model", s.model, "--task_module", s.task_module,
           "--prompts_answers_pkl_file", str(s.pkl), "--batch_size", s.batch_size,
           "--stats_json_out", str(lay.feature_report_dir), "--seed", s.seed, "--max_prompts", s.max_prompts,
           *_model_flags(s)]
    return cmd + (["--regenerate"] if s.must_rerun(1) else [])


def stage2_command(s: PipelineSettings) -> list[str]:
    lay = s.layout
    cmd = [s.python, "2_generate_features.py", "--prompts_answers_pkl_file", str(s.pkl),
           "--features_scores_dir", str(lay.feature_report_dir), "--cache_dir", str(lay.cache_dir),
           "--task_module", s.task_module, "--seed", s.seed,
           "--num_correct_example_prompts", "32", "--num_incorrect_example_prompts", "32",
           "--drop_near_duplicate_features", "--near_duplicate_features_threshold", "0.9999",
           "--drop_low_predictive_power_features", "--min_delta", "0.2"]
    cmd += ["--no_llm_feature_generation"] if s.no_llm_features else ["--ai_model", s.feature_llm]
    if float(s.z_thresh) >= 0:
        cmd += ["--drop_high_mad_variance_features", "--z_thresh", s.z_thresh]
    return cmd


def stage3_support_flags(s: PipelineSettings) -> list[str]:
    """Stage 3 keeps only literals that stage 4's discovery plan can sample: as many TRAIN rows on each
    side as the pairs it asks for per rule (`--min_points_per_ablation` there)."""
    return ["--min_rule_support", s.pairs_per_circuit]


def stage3_command(s: PipelineSettings) -> list[str]:
    lay = s.layout
    cmd = [s.python, "3_extract_rules.py", "--features_scores_dir", str(lay.feature_report_dir),
           "--rules_dir", str(lay.rules_dir), "--task_module", s.task_module, "--random_seed", s.seed,
           "--npermutations", "5", "--only_unique_datapoints_in_shap", "--n_estimators", s.n_estimators,
           *stage3_support_flags(s)]
    if s.shap_in_xgb:
        cmd += ["--use_shap_in_xgb", "--use_shap_in_lasso"]
    if s.fake:
        cmd += ["--fake_targets", "--fake_target_max_abs_corr", "0.05", "--fake_target_max_tries", "500"]
    return cmd


def _stage4_common(s: PipelineSettings) -> list[str]:
    lay = s.layout
    return [s.python, "4_spectral_sample_datapoints.py", "--features_scores_dir", str(lay.feature_report_dir),
            "--rules_dir", str(lay.rules_dir), "--rules_glob", "optimal_rule_set", "--ai_model", s.model,
            "--task_module", s.task_module, "--seed", s.seed, "--use_global_clusters", "--compute_cover_stats",
            "--batch_size", s.batch_size, "--spectral_cache_dir", f"{s.cache_root}/{s.task}", *SPECTRAL_FLAGS,
            *_model_flags(s), *_fake_flag(s)]


def stage4_discovery_command(s: PipelineSettings) -> list[str]:
    return _stage4_common(s) + [
        "--baseline_subset", "all", "--pair_by_similarity_len_matched", "--pair_similarity_metric", "euclidean",
        "--min_points_per_ablation", s.pairs_per_circuit, "--max_points_per_ablation", s.pairs_per_circuit,
        "--global_n_clusters", s.discovery_clusters, "--output_path", str(s.discovery_plan)]


def stage4_anchoring_command(s: PipelineSettings, regime: str) -> list[str]:
    return _stage4_common(s) + [
        "--baseline_subset", regime, "--min_points_per_ablation", s.n_points, "--max_points_per_ablation", s.n_points,
        "--global_n_clusters", s.anchoring_clusters, "--output_path", str(s.anchoring_plan(regime))]


def stage5_command(s: PipelineSettings) -> list[str]:
    lay, opts = s.layout, s.run_options
    cmd = [s.python, "5_discover_circuits.py", "--rules_dir", str(lay.rules_dir), "--rules_glob", "optimal_rule_set",
           "--features_scores_dir", str(lay.feature_report_dir), "--ai_model", s.model, "--task_module", s.task_module,
           "--method", "EAP-IG-inputs", "--intervention", "patching", "--absolute_value_attributions",
           "--circuit_level", s.circuit_level, "--circuit_size", s.circuit_size,
           "--eval_intervention", s.stage5_intervention, "--points_to_use_for_mean_ablation", s.mean_pool,
           "--temporal_agg", "mean", "--max_pairs_per_circuit", s.pairs_per_circuit,
           "--pair_similarity_metric", "euclidean", "--batch_size", s.stage5_batch_size,
           "--max_ig_steps", s.ig_steps, "--max_n_of_rules_to_analyze", s.max_circuits,
           "--cache_dir", str(lay.cache_dir), "--seed", s.seed, "--num_threads", s.num_threads,
           "--output_data_dir", str(lay.circuits_dir(opts)), *_model_flags(s), *_fake_flag(s)]
    if s.discovery != "random":
        cmd += ["--sampling_strategy", "plan", "--sampling_plan_path", str(s.discovery_plan)]
    if s.decode_only:
        cmd += ["--decode_only"]
    if s.mlp_only:
        cmd += ["--mlp_neurons_only"]
    if s.include_zero:
        cmd += ["--include_zero_scores"]
    # --keep_going: a rule that fails (e.g. one the stage-4 plan skipped) is recorded with status
    # "error" and the others go on; the run stops after stage 5 only when no rule is usable.
    return cmd + ["--keep_going"]


def stage6_command(s: PipelineSettings, out: Path, subset: str, plan: Path | None) -> list[str]:
    lay, opts = s.layout, s.run_options
    cmd = [s.python, "6_analyze_bag_of_rules.py", "--input_data_dir", str(lay.circuits_dir(opts)),
           "--output_data_dir", str(out), "--ai_model", s.model, "--task_module", s.task_module, "--seed", s.seed,
           "--search_epsilon", s.tau, "--n_associated", s.n_points, "--n_unrelated", s.n_points,
           "--points_to_use_for_mean_ablation", s.mean_pool, "--intervention", s.intervention,
           "--batch_size", s.batch_size, "--sign_split_first", "--baseline_subset", subset, *_model_flags(s)]
    if s.fast:
        cmd += ["--fast_ablation"]
    if s.top_k_neurons:
        cmd += ["--top_k_neurons", s.top_k_neurons]
    if s.last_k_layers:
        cmd += ["--last_k_layers", s.last_k_layers]
    for flag in ("cha_statistic", "cha_scope", "knockout_random_sets"):
        if getattr(s, flag) != "":
            cmd += [f"--{flag}", getattr(s, flag)]
    if s.decode_only:
        cmd += ["--decode_only"]
    if s.mlp_only:
        cmd += ["--mlp_neurons_only"]
    if plan is not None:
        cmd += ["--sampling_strategy", "plan", "--sampling_plan_path", str(plan)]
    return cmd


def stage7_command(s: PipelineSettings) -> list[str]:
    lay, opts = s.layout, s.run_options
    cmd = [s.python, "7_refine_neuron_anchored_rules.py", "--circuit_agonists_path", str(lay.bag_dir(opts)),
           "--features_scores_dir", str(lay.feature_report_dir), "--rules_dir", str(lay.neuron_rules_dir),
           "--ai_model", s.model, "--task_module", s.task_module, "--search_epsilon", s.tau,
           "--batch_size", s.batch_size, "--neuron_batch_size", s.neuron_batch_size, "--stats_dirname", s.run_mode,
           "--seed", s.seed, "--random_seed", s.seed, "--use_spectral_sampling",
           "--sampling_max_points", s.stage7_max_points, "--sampling_min_points", s.stage7_min_points,
           "--global_n_clusters", s.stage7_clusters, *SPECTRAL_FLAGS, "--spectral_cache_dir", f"{s.cache_root}/{s.task}",
           "--points_to_use_for_mean_ablation", s.mean_pool, "--intervention", s.intervention,
           "--extract_rules", "--only_unique_datapoints_in_shap", "--n_estimators", s.n_estimators,
           "--summarize_rule_metrics", "--min_rule_dataset_coverage", s.min_coverage, "--no_tqdm_batches",
           *_model_flags(s)]
    return cmd + (["--decode_only"] if s.decode_only else [])


def stage_commands(s: PipelineSettings) -> list[tuple[int, str, list[str]]]:
    """Every stage command of this run, in order, as if no output existed yet (what --dry_run prints
    on an empty data root)."""
    lay, opts = s.layout, s.run_options
    out: list[tuple[int, str, list[str]]] = [(1, STAGE_NAMES[1], stage1_command(s)), (2, STAGE_NAMES[2], stage2_command(s)),
                                             (3, STAGE_NAMES[3], stage3_command(s))]
    if s.discovery == "spectral":
        out.append((4, "discovery plan", stage4_discovery_command(s)))
    if s.anchoring == "spectral":
        out += [(4, f"anchoring plan ({r})", stage4_anchoring_command(s, r)) for r in ("positive", "negative")]
    out.append((5, STAGE_NAMES[5], stage5_command(s)))
    if s.anchoring == "random":
        out.append((6, "unit localisation (both regimes)", stage6_command(s, lay.bag_dir(opts), "all", None)))
    else:
        out += [(6, f"unit localisation ({r})", stage6_command(s, lay.baseline_dir(opts, r), r, s.anchoring_plan(r)))
                for r in ("positive", "negative")]
    out.append((7, STAGE_NAMES[7], stage7_command(s)))
    return [c for c in out if c[0] <= s.to_stage]


def path_lines(s: PipelineSettings) -> list[str]:
    """`NAME=value` lines of `--print_paths` (values shell-quoted, so `eval` can read them)."""
    lay, opts = s.layout, s.run_options
    items = [("RUN_MODE", s.run_mode), ("MODEL_DIR", lay.model_dir), ("CACHE_DIR", lay.cache_dir),
             ("FEATURES_DIR", lay.feature_report_dir), ("RULES_DIR", lay.rules_dir), ("PKL", s.pkl),
             ("CIRCUITS_DIR", lay.circuits_dir(opts)), ("BAG_DIR", lay.bag_dir(opts)),
             ("NEURON_RULES_DIR", lay.neuron_rules_dir), ("STATS_DIR", lay.stats_dir(s.run_mode)),
             ("DISC_PLAN", s.discovery_plan), ("ANCHOR_PLAN_POSITIVE", s.anchoring_plan("positive")),
             ("ANCHOR_PLAN_NEGATIVE", s.anchoring_plan("negative")), ("TASK_MODULE", s.task_module),
             ("TAU", s.tau), ("N_POINTS", s.n_points), ("BATCH_SIZE", s.batch_size), ("MEAN_POOL", s.mean_pool),
             ("S7_MAX", s.stage7_max_points), ("S7_MIN", s.stage7_min_points), ("S7_CLUSTERS", s.stage7_clusters),
             ("NEURON_BATCH", s.neuron_batch_size), ("TOP_K", s.top_k_neurons), ("LAST_K", s.last_k_layers),
             ("NUM_THREADS", s.num_threads), ("SEED", s.seed), ("DECODE_ONLY", "1" if s.decode_only else "0"),
             ("ANCHORING", s.anchoring)]
    return [f"{k}={shlex.quote(str(v))}" for k, v in items]


# ------------------------------------------------------------------ running
@dataclass
class _Timing:
    stage: str
    name: str
    wall: str
    cpu: str = ""


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class _Runner:
    """Runs, skips and times the stages of one settings object."""

    def __init__(self, s: PipelineSettings, execute: Callable[[list[str]], int]) -> None:
        self.s = s
        self.execute = execute
        self.timings: list[_Timing] = []

    def run(self, num: int, name: str, cmd: list[str]) -> None:
        _log(f"stage {num} ({name}): {shlex.join(cmd)}")
        if self.s.dry_run:
            self.timings.append(_Timing(str(num), name, "dry-run"))
            return
        t0, c0 = time.time(), _children_cpu()
        rc = self.execute(cmd)
        dt, cpu = int(time.time() - t0), _children_cpu() - c0
        if rc != 0:
            raise PipelineError(f"stage {num} ({name}) failed with exit code {rc} after {dt}s; stopping "
                                f"(task {self.s.task}, model {self.s.model})", code=rc, usage_hint=False)
        self.timings.append(_Timing(str(num), name, f"{dt}s", f"{cpu:.0f}s"))
        _log(f"stage {num} ({name}) done in {dt}s ({cpu:.0f} CPU-s)")

    def skip(self, num: int, name: str, reason: str) -> None:
        _log(f"stage {num} ({name}) skipped: {reason} (use --force or --from_stage {num} to rerun)")
        self.timings.append(_Timing(str(num), name, "skipped"))


def _count_rules(s: PipelineSettings) -> int:
    """Rules in this run's optimal rule sets (a one-class target leaves header-only files)."""
    n = 0
    for f in sorted(s.layout.rules_dir.glob("optimal_rule_set_*.csv")):
        if f.name.startswith(("optimal_rule_set_test_selected_", "optimal_rule_set_all_fit_")):
            continue
        if f.name.endswith("_fake.csv") != s.fake:
            continue
        lines = f.read_text(encoding="utf-8", errors="replace").splitlines()[1:]
        n += sum(1 for line in lines if line)
    return n


def _has_rule_set(s: PipelineSettings) -> bool:
    files = list(s.layout.rules_dir.glob("optimal_rule_set_*.csv"))
    return any(f.name.endswith("_fake.csv") == s.fake for f in files)


def _stage6_done(s: PipelineSettings, out: Path) -> bool:
    return (out / "cost_summary.json").is_file() and (out / "neuron_buckets.json").is_file() and not s.must_rerun(6)


def _usable_circuits(manifest: Path) -> int:
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"stage 5 left no readable {manifest}: {exc}", code=1, usage_hint=False) from exc
    return sum(isinstance(e, dict) and e.get("status") == "ok" for e in entries)


def run_pipeline(s: PipelineSettings, execute: Callable[[list[str]], int] | None = None) -> list[_Timing]:
    """Run (or with --dry_run print) stages 1..--to_stage; raises PipelineError on a failing stage."""
    execute = execute or (lambda cmd: subprocess.run(cmd).returncode)
    r = _Runner(s, execute)
    lay, opts = s.layout, s.run_options
    to_stage = s.to_stage
    _log(f"task {s.task}, model {s.model}, preset {s.preset}, run mode {s.run_mode}")
    _log(f"data in {lay.model_dir}, cache in {lay.cache_dir}")

    if to_stage >= 1:
        if s.pkl.is_file() and (lay.feature_report_dir / "dataset_stats.json").is_file() and not s.must_rerun(1):
            r.skip(1, STAGE_NAMES[1], f"{s.pkl} exists")
            meta = s.pkl.with_suffix(".meta.json")
            if int(s.max_prompts) > 0 and meta.is_file():
                try:
                    n = json.loads(meta.read_text(encoding="utf-8")).get("n_prompts")
                except ValueError:
                    n = None
                if n != int(s.max_prompts):
                    _log(f"note: {s.pkl} was made with another prompt count than --max_prompts {s.max_prompts} (see {meta})")
        else:
            r.run(1, STAGE_NAMES[1], stage1_command(s))
    if to_stage >= 2:
        if any(lay.feature_report_dir.glob("*.csv")) and not s.must_rerun(2):
            r.skip(2, STAGE_NAMES[2], f"{lay.feature_report_dir} has a CSV")
        else:
            r.run(2, STAGE_NAMES[2], stage2_command(s))
    if to_stage >= 3:
        if _has_rule_set(s) and not s.must_rerun(3):
            r.skip(3, STAGE_NAMES[3], f"{lay.rules_dir} has an optimal rule set")
        else:
            r.run(3, STAGE_NAMES[3], stage3_command(s))
    if not s.dry_run and to_stage >= 4 and lay.rules_dir.is_dir() and _count_rules(s) == 0:
        print(f"stage 3 found no rule to localise (see {lay.rules_dir}/rule_extraction_skipped_*.json); "
              "stopping after stage 3", file=sys.stderr)
        to_stage = 3
    if to_stage >= 4:
        if s.discovery == "random" and s.anchoring == "random":
            r.skip(4, "sampling plans", "random discovery and random anchoring need no plan")
        if s.discovery == "spectral":
            if s.discovery_plan.is_file() and not s.must_rerun(4):
                r.skip(4, "discovery plan", f"{s.discovery_plan} exists")
            else:
                r.run(4, "discovery plan", stage4_discovery_command(s))
        if s.anchoring == "spectral":
            for regime in ("positive", "negative"):
                plan = s.anchoring_plan(regime)
                if plan.is_file() and not s.must_rerun(4):
                    r.skip(4, f"anchoring plan ({regime})", f"{plan} exists")
                else:
                    r.run(4, f"anchoring plan ({regime})", stage4_anchoring_command(s, regime))
    if to_stage >= 5:
        circuits = lay.circuits_dir(opts)
        if (circuits / "manifest.json").is_file() and (circuits / "dataset_info.json").is_file() and not s.must_rerun(5):
            r.skip(5, STAGE_NAMES[5], f"{circuits / 'manifest.json'} exists")
        else:
            r.run(5, STAGE_NAMES[5], stage5_command(s))
            if not s.dry_run:
                n_ok = _usable_circuits(circuits / "manifest.json")
                if n_ok == 0:
                    raise PipelineError(f"stage 5 (circuit discovery) produced no usable circuit (see "
                                        f"{circuits / 'manifest.json'}); stopping: lower --pairs_per_circuit or "
                                        "use more prompts", code=1, usage_hint=False)
                _log(f"stage 5: {n_ok} usable circuit(s) in {circuits / 'manifest.json'}")
    if to_stage >= 6:
        bag = lay.bag_dir(opts)
        if s.anchoring == "random":
            if _stage6_done(s, bag / "positive_baseline") and _stage6_done(s, bag / "negative_baseline"):
                r.skip(6, "unit localisation", f"{bag} has both regimes")
            else:
                r.run(6, "unit localisation (both regimes)", stage6_command(s, bag, "all", None))
        else:
            for regime in ("positive", "negative"):
                out = lay.baseline_dir(opts, regime)
                if _stage6_done(s, out):
                    r.skip(6, f"unit localisation ({regime})", f"{out / 'cost_summary.json'} exists")
                else:
                    r.run(6, f"unit localisation ({regime})", stage6_command(s, out, regime, s.anchoring_plan(regime)))
    if to_stage >= 7:
        stats = lay.stats_dir(s.run_mode)
        if ((stats / "rule_combo_metrics_manifest.json").is_file() and (stats / "flip_stats_global.json").is_file()
                and not s.must_rerun(7)):
            r.skip(7, STAGE_NAMES[7], f"{stats} has its rule metrics")
        else:
            r.run(7, STAGE_NAMES[7], stage7_command(s))
    return r.timings


def timings_table(s: PipelineSettings, timings: list[_Timing], total: int) -> list[str]:
    """The per-stage wall/CPU table printed at the end."""
    lines = [f"per-stage wall time (task {s.task}, model {s.model}, preset {s.preset}):",
             f"  {'stage':<7s}  {'name':<34s} {'wall':>8s} {'CPU':>8s}"]
    lines += [f"  {t.stage:<7s}  {t.name:<34s} {t.wall:>8s} {t.cpu:>8s}" for t in timings]
    lines.append(f"  {'total':<7s}  {'':<34s} {f'{total}s':>8s}")
    return lines


def _write_timings(s: PipelineSettings, timings: list[_Timing], total: int) -> None:
    """`pipeline_timings.tsv` in the model folder (read by the summary)."""
    rows = ["stage\tname\twall\tcpu"] + [f"{t.stage}\t{t.name}\t{t.wall}\t{t.cpu}" for t in timings]
    rows.append(f"total\t{s.preset}\t{total}s\t")
    target = s.layout.model_dir / "pipeline_timings.tsv"
    with atomic_path(target) as tmp:
        Path(tmp).write_text("\n".join(rows) + "\n", encoding="utf-8")


def _settings_dict(s: PipelineSettings) -> dict[str, Any]:
    d = asdict(s)
    d.pop("python", None)
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then print paths, dry-run or run the stages; usage errors exit 2, a failing stage its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help") or "-h" in args[2:] or "--help" in args[2:]:
        print(USAGE)
        return 0
    if len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        s = parse_pipeline_args(args)
    except PipelineError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(f"(run 'bash {PROG} --help' for the options)", file=sys.stderr)
        return exc.code
    if s.print_paths:
        print("\n".join(path_lines(s)))
        return 0
    os.environ.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if int(s.num_threads) > 0:
        os.environ.update(OMP_NUM_THREADS=s.num_threads, MKL_NUM_THREADS=s.num_threads,
                          OPENBLAS_NUM_THREADS=s.num_threads)
    started, t0 = now_iso(), time.time()
    try:
        timings = run_pipeline(s)
    except PipelineError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    total = int(time.time() - t0)
    print("\n".join(timings_table(s, timings, total)), file=sys.stderr)
    if not s.dry_run and s.layout.model_dir.is_dir():
        _write_timings(s, timings, total)
        record_stage([s.layout.model_dir], "pipeline", config=_settings_dict(s), argv=[PROG, *args], started=started,
                     extra={"run_mode": s.run_mode,
                            "timings": [{"stage": t.stage, "name": t.name, "wall": t.wall, "cpu": t.cpu} for t in timings]})
    if s.summary and not s.dry_run:
        return subprocess.run([s.python, "-m", "lib.reporting.summary", "--task", s.task, "--model", s.model,
                               "--data_root", s.data_root, "--cache_root", s.cache_root, "--run_mode", s.run_mode,
                               "--tau", s.tau, "--min_rule_dataset_coverage", s.min_coverage,
                               "--seed", s.seed]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
