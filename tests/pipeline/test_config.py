"""The typed stage-config framework (lib.pipeline.config) on small configs, and the configs of
stages 1-4: every flag of today's parsers is a field (same names, aliases and defaults) and
every field a flag, and `--random_seed` is `--seed`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from typing import Literal

import pytest

from lib.core.choices import DEFAULT_SEED
from lib.core.errors import UsageError
from lib.pipeline.config import (StageConfig, build_parser, config_as_dict, config_from_namespace, option,
                                 parse_config, require)
from tests.conftest import REPO

# ---------------------------------------------------------------------------------------------
# The framework on a small config


@dataclasses.dataclass(kw_only=True)
class Demo(StageConfig):
    inp: str = option(help="input file", aliases=("-i",))
    mode: Literal["fast", "slow"] = option("fast", "how to run")
    level: Literal[1, 2, 3] = option(2, "an integer choice")
    limit: int | None = option(None, "optional limit")
    out_dir: str | None = option(None, "optional folder")
    ratio: float = option(0.5, "a share")
    verbose: bool = option(False, "say more", aliases=("--loud",))
    sizes: list[int] = option([1, 2], "several sizes")
    secret: int = option(7, "a kept but unlisted flag", hidden=True)
    resolved: str | None = option(None, "set by Python callers only", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.ratio <= 1, f"--ratio must be in [0, 1], got {self.ratio}")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if not isinstance(a, argparse._HelpAction)}


def test_fields_become_typed_flags():
    p = build_parser(Demo)
    flags = _flags(p)
    assert set(flags) == {"--seed", "--random_seed", "--inp", "-i", "--mode", "--level", "--limit", "--out_dir",
                          "--ratio", "--verbose", "--loud", "--sizes", "--secret"}
    assert "--resolved" not in flags  # cli=False
    assert flags["--inp"].required and not flags["--mode"].required
    assert flags["--mode"].choices == ["fast", "slow"] and flags["--level"].choices == [1, 2, 3]
    assert flags["--level"].type is int and flags["--ratio"].type is float and flags["--limit"].type is int
    assert isinstance(flags["--verbose"], argparse._StoreTrueAction) and flags["--verbose"].default is False
    assert flags["--sizes"].nargs == "+" and flags["--sizes"].default == [1, 2]
    assert flags["--seed"] is flags["--random_seed"] and flags["--seed"].default == DEFAULT_SEED
    assert flags["--secret"].help == argparse.SUPPRESS


def test_help_lists_visible_flags_only():
    text = build_parser(Demo, "demo stage").format_help()
    for flag in ("--inp", "-i", "--mode", "--limit", "--verbose", "--loud", "--seed", "--random_seed"):
        assert flag in text
    assert "--secret" not in text and "--resolved" not in text
    assert "how to run" in text and "demo stage" in text


def test_parse_gives_a_checked_config_with_defaults():
    cfg = parse_config(Demo, ["-i", "a.txt"])
    assert cfg == Demo(inp="a.txt")
    assert (cfg.mode, cfg.level, cfg.limit, cfg.out_dir, cfg.ratio, cfg.verbose, cfg.sizes, cfg.secret,
            cfg.seed, cfg.resolved) == ("fast", 2, None, None, 0.5, False, [1, 2], 7, DEFAULT_SEED, None)
    cfg = parse_config(Demo, ["--inp", "b", "--mode", "slow", "--level", "3", "--limit", "5", "--loud",
                              "--sizes", "4", "5", "6", "--secret", "9", "--random_seed", "3", "--out_dir", "o"])
    assert (cfg.mode, cfg.level, cfg.limit, cfg.verbose, cfg.sizes, cfg.secret, cfg.seed, cfg.out_dir) == \
        ("slow", 3, 5, True, [4, 5, 6], 9, 3, "o")
    assert parse_config(Demo, ["-i", "b", "--seed", "3"]) == parse_config(Demo, ["-i", "b", "--random_seed", "3"])


def test_default_lists_are_not_shared():
    a, b = Demo(inp="x"), Demo(inp="y")
    a.sizes.append(3)
    assert b.sizes == [1, 2]


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "medium"], "--mode"),
    (["--level", "4"], "--level"),
    (["--limit", "many"], "--limit"),
    ([], "--inp"),
    (["--seed", "x"], "--seed"),
])
def test_bad_flag_is_a_usage_exit_naming_it(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(Demo, (["-i", "a"] if argv else []) + argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_post_init_checks_python_and_command_line_alike():
    with pytest.raises(UsageError, match=r"^--ratio must be in \[0, 1\], got 2.0$"):
        Demo(inp="a", ratio=2.0)
    with pytest.raises(UsageError, match=r"--ratio must be in \[0, 1\], got 1.5"):
        parse_config(Demo, ["-i", "a", "--ratio", "1.5"])
    with pytest.raises(UsageError, match="--seed must be an integer"):
        Demo(inp="a", seed=True)  # the base class's own check runs too


def test_switch_defaulting_to_true_and_unsupported_types_are_refused():
    @dataclasses.dataclass(kw_only=True)
    class On(StageConfig):
        flag: bool = option(True)

    @dataclasses.dataclass(kw_only=True)
    class Odd(StageConfig):
        mapping: dict = option(None)

    with pytest.raises(TypeError, match="flag"):
        build_parser(On)
    with pytest.raises(TypeError, match="mapping"):
        build_parser(Odd)


def test_extra_task_flags_are_attributes_and_recorded():
    seen = {}

    def extend(parser: argparse.ArgumentParser, known: argparse.Namespace) -> None:
        seen["inp"] = known.inp  # already known when the extra flags are added
        group = parser.add_argument_group("task")
        group.add_argument("--task_flag", choices=["a", "b"], default="a")
        group.add_argument("--task_range", type=int, nargs=2, default=None)

    cfg = parse_config(Demo, ["-i", "x", "--task_flag", "b", "--task_range", "1", "5"], extend=extend)
    assert seen == {"inp": "x"}
    assert cfg.task_flag == "b" and getattr(cfg, "task_range") == [1, 5]
    assert getattr(cfg, "no_such_flag", "fallback") == "fallback"
    with pytest.raises(AttributeError, match="no_such_flag"):
        cfg.no_such_flag  # noqa: B018
    with pytest.raises(SystemExit):
        parse_config(Demo, ["-i", "x", "--task_flag", "b"])  # without the task, its flags are unknown
    d = config_as_dict(cfg)
    assert d["task_flag"] == "b" and d["task_range"] == [1, 5] and d["inp"] == "x" and d["resolved"] is None
    assert "_extra" not in d


def test_config_as_dict_is_json_ready_and_complete():
    cfg = Demo(inp="a", sizes=[3], limit=4)
    cfg.resolved = "r"
    d = config_as_dict(cfg)
    assert set(d) == {f.name for f in dataclasses.fields(Demo)}
    assert d["seed"] == DEFAULT_SEED and d["sizes"] == [3] and d["resolved"] == "r"
    assert json.loads(json.dumps(d)) == d
    ns = argparse.Namespace(**{k: v for k, v in d.items() if k != "resolved"}, extra=(1, 2))
    back = config_from_namespace(Demo, ns)
    assert back == cfg.__class__(**{**d, "resolved": None}) and config_as_dict(back)["extra"] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Stages 1-4: today's flags, one field each


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), REPO / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stage_config(n: int):
    if n == 1:
        from lib.pipeline.stage1_answers import Stage1Config as C
    elif n == 2:
        from lib.pipeline.stage2_features import Stage2Config as C
    elif n == 3:
        from lib.pipeline.stage3_rules import Stage3Config as C
    else:
        from lib.pipeline.stage4_sampling import Stage4Config as C
    return C


SCRIPTS = {1: "1_generate_prompts_and_answers.py", 2: "2_generate_features.py", 3: "3_extract_rules.py",
           4: "4_spectral_sample_datapoints.py"}

# The flags of each stage before the typed configs (archived shell drivers pass them), with their
# defaults; `seed` now defaults to DEFAULT_SEED everywhere and `--random_seed` is its alias.
TODAY = {
    1: {"required": {"prompts_answers_pkl_file"},
        "aliases": {},
        "defaults": {"ai_model": "Qwen/Qwen2-7B-Instruct", "ai_model_cache_dir": None, "batch_size": 16,
                     "task_module": "lib.tasks.arithmetic_task", "stats_json_out": None, "seed": DEFAULT_SEED,
                     "max_prompts": 0, "max_new_tokens": 0, "regenerate": False, "no_progress": False,
                     "device": "auto", "dtype": "auto"}},
    2: {"required": {"prompts_answers_pkl_file"},
        "aliases": {"prompts_answers_pkl_file": ["-i"], "features_scores_dir": ["--out_dir", "-o"],
                    "cache_dir": ["-c"], "ai_model": ["-m"], "temperature": ["-T"], "n_features": ["-n"],
                    "feature_extraction_steps": ["--rounds", "-R"], "no_llm_feature_generation": ["--no_llm"],
                    "drop_low_predictive_power_features": ["--filter_by_metrics"],
                    "drop_near_duplicate_features": ["--drop_near_dups"],
                    "near_duplicate_features_threshold": ["--dup_corr_thresh"],
                    "drop_high_mad_variance_features": ["--drop_high_mad"], "train_ratio": ["-t"],
                    "max_number_of_prompts_to_analyze": ["--max_prompts"]},
        "defaults": {"features_scores_dir": "feature_report", "cache_dir": "./cache",
                     "ai_model": "local:smollm2-135m-instruct-q4_1", "temperature": 0.3, "max_tokens": 0,
                     "n_features": 16, "feature_extraction_steps": 10, "max_proposal_attempts": 0,
                     "num_correct_example_prompts": 32, "num_incorrect_example_prompts": 32,
                     "no_llm_feature_generation": False, "number_of_existing_features_to_show_for_diversity": 20,
                     "drop_low_predictive_power_features": False, "drop_near_duplicate_features": False,
                     "near_duplicate_features_threshold": 0.9999, "drop_high_mad_variance_features": False,
                     "train_ratio": 1.0, "min_auc": 0.0, "min_delta": 0.2, "min_ap_above_base": 0.0,
                     "z_thresh": 10.0, "max_number_of_prompts_to_analyze": 0, "feature_timeout": 10.0,
                     "sanity_rows": 10, "seed": DEFAULT_SEED, "task_module": "lib.tasks.arithmetic_task"}},
    3: {"required": {"features_scores_dir"},
        "aliases": {},
        "defaults": {"rules_dir": "xai_analyses_results", "seed": DEFAULT_SEED, "fake_targets": False,
                     "fake_target_max_abs_corr": 0.05, "fake_target_max_tries": 500, "fast_shap_estimate": False,
                     "npermutations": 10, "only_unique_datapoints_in_shap": False, "epsilon": 0.1,
                     "use_shap_in_xgb": False, "use_shap_in_lasso": False,
                     "only_unique_datapoints_in_rule_extraction": False, "task_module": "lib.tasks.arithmetic_task",
                     "min_combo_mcc_gain": 0.01, "n_estimators": 500, "max_depth": 10, "validation_folds": 4,
                     "validation_grid": "shap_weights,max_depth,combo_size", "validation_max_depths": "2,3,4",
                     "min_rule_support": 32}},
    4: {"required": {"features_scores_dir", "rules_dir", "ai_model", "output_path"},
        "aliases": {},
        "defaults": {"rules_glob": "association_rules_*.csv", "fake_targets": False, "ai_model_cache_dir": None,
                     "use_global_clusters": False, "global_n_clusters": 256, "coverage_radius": 0.5,
                     "max_points_per_ablation": 512, "min_points_per_ablation": 32, "batch_size": 16,
                     "seed": DEFAULT_SEED, "baseline_subset": "all", "pair_by_similarity_len_matched": False,
                     "pair_len_tolerance": 0, "pair_similarity_metric": "cosine", "compute_cover_stats": False,
                     "stats_sample_size": 200000, "stats_chunk_size": 8192,
                     "task_module": "lib.tasks.arithmetic_task", "spectral_space": "hidden",
                     "rep_hook_name": "ln_final.hook_normalized", "rep_pooling": "mean", "max_seq_len": None,
                     "spectral_dim": 16, "spectral_cache_dir": None, "device": "auto", "dtype": "auto",
                     "selection": "spectral", "no_progress": False}},
}
HIDDEN = {3: {"n_estimators"}}
CHOICES = {
    1: {"device": ["auto", "cpu", "cuda", "mps"],
        "dtype": ["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]},
    4: {"baseline_subset": ["all", "positive", "negative"], "spectral_space": ["hidden", "logits"],
        "rep_pooling": ["last", "mean"], "selection": ["spectral", "random"],
        "device": ["auto", "cpu", "cuda", "mps"],
        "dtype": ["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]},
}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_flag_is_a_field_and_every_field_a_flag(n):
    cfg_cls = _stage_config(n)
    parser = _script(SCRIPTS[n]).build_parser()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    cli_fields = {f.name: f for f in dataclasses.fields(cfg_cls) if f.metadata.get("cli", True)}
    assert {a.dest for a in actions} == set(cli_fields) == TODAY[n]["required"] | set(TODAY[n]["defaults"])
    by_dest = {a.dest: a for a in actions}
    for dest, default in TODAY[n]["defaults"].items():
        assert by_dest[dest].default == default and not by_dest[dest].required, dest
    for dest in TODAY[n]["required"]:
        assert by_dest[dest].required, dest
    for dest, action in by_dest.items():
        extra = TODAY[n]["aliases"].get(dest, []) + (["--random_seed"] if dest == "seed" else [])
        assert action.option_strings == [f"--{dest}", *extra], dest
        assert (action.help == argparse.SUPPRESS) == (dest in HIDDEN.get(n, set())), dest
        assert action.choices == CHOICES.get(n, {}).get(dest), dest
    text, usage = parser.format_help(), parser.format_usage()
    for dest, action in by_dest.items():
        if dest in HIDDEN.get(n, set()):
            assert f"--{dest}" not in usage
        else:
            assert f"--{dest}" in usage and all(flag in text for flag in action.option_strings), dest


def test_stage1_task_flags_come_from_the_task():
    task, cfg = _script(SCRIPTS[1]).parse_args(["--prompts_answers_pkl_file", "x.pkl", "--prompt_format", "raw",
                                                 "--operand_range", "0", "10", "--seed", "3"])
    assert task.name == "arithmetic"
    assert (cfg.prompt_format, cfg.operand_range, cfg.seed) == ("raw", [0, 10], 3)
    assert config_as_dict(cfg)["prompt_format"] == "raw"
    _, cfg = _script(SCRIPTS[1]).parse_args(["--prompts_answers_pkl_file", "x.pkl"])
    assert cfg.seed == DEFAULT_SEED and cfg.prompt_format == "auto" and cfg.operand_range is None


def test_stage3_random_seed_is_seed():
    from lib.pipeline.stage3_rules import Stage3Config

    base = ["--features_scores_dir", "f"]
    a = parse_config(Stage3Config, [*base, "--random_seed", "7"])
    b = parse_config(Stage3Config, [*base, "--seed", "7"])
    assert a == b and a.seed == 7 and a.random_seed == 7  # the original name, read by lib.rules.extraction
    assert config_as_dict(a) == config_as_dict(b)
    assert parse_config(Stage3Config, base).random_seed == DEFAULT_SEED


@pytest.mark.parametrize("n, kwargs, message", [
    (1, {"batch_size": 0}, "--batch_size must be >= 1, got 0"),
    (1, {"max_new_tokens": -1}, "--max_new_tokens must be >= 0, got -1"),
    (2, {"n_features": 0}, "--n_features must be >= 1, got 0"),
    (2, {"train_ratio": 1.5}, "--train_ratio must be in [0, 1], got 1.5"),
    (2, {"near_duplicate_features_threshold": 0.0}, "--near_duplicate_features_threshold must be in (0, 1]"),
    (2, {"feature_timeout": 0.0}, "--feature_timeout must be > 0"),
    (3, {"npermutations": 0}, "--npermutations must be >= 1, got 0"),
    (3, {"fake_target_max_abs_corr": 2.0}, "--fake_target_max_abs_corr must be in [0, 1]"),
    (3, {"n_estimators": 0}, "--n_estimators must be >= 1"),
    (3, {"validation_folds": 1}, "--validation_folds must be 0 or >= 2, got 1"),
    (3, {"min_rule_support": -1}, "--min_rule_support must be >= 0, got -1"),
    (3, {"validation_grid": "depth"},
     "--validation_grid: unknown item 'depth'; expected a comma list of shap_weights, max_depth, combo_size"),
    (3, {"validation_max_depths": "2,x"}, "--validation_max_depths: expected a comma list of integers, got '2,x'"),
    (4, {"spectral_dim": 0}, "--spectral_dim must be >= 1, got 0"),
    (4, {"stats_chunk_size": 0}, "--stats_chunk_size must be >= 1, got 0"),
    (4, {"coverage_radius": -1.0}, "--coverage_radius must be >= 0, got -1.0"),
    (4, {"selection": "random", "pair_by_similarity_len_matched": True},
     "--selection random picks both sides uniformly at random; drop --pair_by_similarity_len_matched"),
])
def test_stage_checks_in_post_init(n, kwargs, message):
    required = {1: {"prompts_answers_pkl_file": "x.pkl"}, 2: {"prompts_answers_pkl_file": "x.pkl"},
                3: {"features_scores_dir": "f"},
                4: {"features_scores_dir": "f", "rules_dir": "r", "ai_model": "m", "output_path": "p.json"}}[n]
    cfg_cls = _stage_config(n)
    cfg_cls(**required)  # the defaults pass
    with pytest.raises(UsageError) as exc:
        cfg_cls(**required, **kwargs)
    assert str(exc.value) == message


def test_stage2_count_checks_are_off_without_the_feature_llm():
    from lib.pipeline.stage2_features import Stage2Config

    assert Stage2Config(prompts_answers_pkl_file="x", n_features=0, no_llm_feature_generation=True).n_features == 0
