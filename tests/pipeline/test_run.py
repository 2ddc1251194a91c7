"""The pipeline runner (`lib.pipeline.run`): its stage commands, paths, timings table and option errors
equal those of the original bash driver (fixture captured from it with --dry_run / --print_paths), the
original option names map to ours, and a second seed gets its own stage-2/3 folders."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lib.pipeline import run as runner

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "data" / "run_pipeline_bash_dry_runs.json").read_text())
MODEL = "smollm2-135m-instruct-q4_1"
BASE = ["arithmetic", MODEL, "--data_root", "data_fx", "--cache_root", "cache_fx"]


def _dry(monkeypatch, capsys, options: list[str], task_model: list[str] | None = None) -> tuple[int, str, str]:
    monkeypatch.setenv("PYTHON", ".env/bin/python")
    for var in ("MECHARULE_DATA_ROOT", "MECHARULE_CACHE_ROOT", "MIN_RULE_DATASET_COVERAGE"):
        monkeypatch.delenv(var, raising=False)
    rc = runner.main([*(task_model or BASE), *options])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _commands(stderr: str) -> list[tuple[str, list[str]]]:
    """(`[pipeline] stage N (name)` or the whole log line, argv) of each `[pipeline]` line."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("[pipeline]"):
            continue
        head, sep, cmd = line.partition("): ")
        rows.append((head, shlex.split(cmd)) if sep and " stage " in head else (line, []))
    return rows


@pytest.mark.parametrize("case", FIXTURE["runs"], ids=lambda c: " ".join(c["options"]) or "paper")
def test_dry_run_commands_equal_the_bash_driver(monkeypatch, capsys, tmp_path, case):
    monkeypatch.chdir(tmp_path)  # an empty folder: no stage output exists, nothing is skipped
    rc, _, err = _dry(monkeypatch, capsys, [*case["options"], "--dry_run"])
    assert rc == case["rc"]
    assert _commands(err) == _commands("\n".join(case["commands"]))
    assert [line for line in err.splitlines() if line.startswith("  ")] == case["timings"]


@pytest.mark.parametrize("case", FIXTURE["runs"], ids=lambda c: " ".join(c["options"]) or "paper")
def test_print_paths_equal_the_bash_driver(monkeypatch, capsys, case):
    rc, out, _ = _dry(monkeypatch, capsys, [*case["options"], "--print_paths"])
    assert rc == 0
    assert out.splitlines() == case["print_paths"]


@pytest.mark.parametrize("case", FIXTURE["errors"], ids=lambda c: " ".join(c["options"]))
def test_option_errors_equal_the_bash_driver(monkeypatch, capsys, case):
    rc, _, err = _dry(monkeypatch, capsys, [*case["options"], "--dry_run"], ["arithmetic", "m"])
    assert rc == case["rc"]
    assert err.strip().splitlines()[0] == case["stderr"]


@pytest.mark.parametrize("original, ours", [
    (["--spectral_circuit_discovery"], ["--spectral_discovery_plan"]),
    (["--random_circuit_discovery"], ["--random_discovery"]),
    (["--random_anchoring_plan"], ["--random_anchoring"]),
    (["--slow_anchoring", "--fast_anchoring"], []),
    (["--max_number_of_circuits_to_analyze", "3"], ["--max_circuits", "3"]),
    (["--eval_intervention", "mean-donor"], ["--intervention", "mean-donor"]),
    (["--min_flip_rate", "0.25"], ["--tau", "0.25"]),
    (["--random_seed", "7"], ["--seed", "7"]),
])
def test_original_option_names_do_what_ours_do(original, ours):
    base = ["arithmetic", MODEL, "--preset", "cpu"]
    a, b = runner.parse_pipeline_args(base + original, env={}), runner.parse_pipeline_args(base + ours, env={})
    assert runner.stage_commands(a) == runner.stage_commands(b)
    assert runner.path_lines(a) == runner.path_lines(b)


def test_explicit_options_win_over_main_and_the_preset():
    s = runner.parse_pipeline_args(["arithmetic", MODEL, "--random_anchoring", "--preset", "cpu", "--main",
                                    "--n_points", "12", "--no_decode_only"], env={})
    assert (s.anchoring, s.discovery, s.n_points, s.decode_only, s.batch_size) == ("random", "spectral", "12", False, "128")
    donor = runner.parse_pipeline_args(["arithmetic", MODEL, "--intervention", "mean-donor-positional"], env={})
    assert donor.mean_pool == "2048" and donor.stage5_intervention == "mean-positional"


def test_a_second_seed_gets_its_own_stage2_and_stage3_folders():
    s42 = runner.parse_pipeline_args(["arithmetic", MODEL], env={})
    s7 = runner.parse_pipeline_args(["arithmetic", MODEL, "--seed", "7"], env={})
    assert s42.layout.feature_report_dir.name == "feature_report"
    assert s42.layout.rules_dir.name == "xai_analyses_results"
    assert s7.layout.feature_report_dir.name == "feature_report-seed7"
    assert s7.layout.rules_dir.name == "xai_analyses_results-seed7"
    cmd3 = next(cmd for num, _, cmd in runner.stage_commands(s7) if num == 3)
    assert cmd3[cmd3.index("--rules_dir") + 1].endswith("xai_analyses_results-seed7")


def test_a_failing_stage_stops_the_run_with_its_code(tmp_path, capsys):
    s = runner.parse_pipeline_args(["arithmetic", MODEL, "--data_root", str(tmp_path / "d"),
                                    "--cache_root", str(tmp_path / "c")], env={})
    calls: list[list[str]] = []

    def execute(cmd: list[str]) -> int:
        calls.append(cmd)
        return 3 if "2_generate_features.py" in cmd else 0

    with pytest.raises(runner.PipelineError) as err:
        runner.run_pipeline(s, execute)
    assert err.value.code == 3 and "stage 2 (features) failed with exit code 3" in str(err.value)
    assert [c[1] for c in calls] == ["1_generate_prompts_and_answers.py", "2_generate_features.py"]


def test_existing_outputs_are_skipped_and_from_stage_reruns(tmp_path, capsys):
    argv = ["arithmetic", MODEL, "--data_root", str(tmp_path / "d"), "--cache_root", str(tmp_path / "c"), "--to_stage", "2"]
    s = runner.parse_pipeline_args(argv, env={})
    s.pkl.parent.mkdir(parents=True)
    s.pkl.write_bytes(b"x")
    s.layout.feature_report_dir.mkdir(parents=True)
    (s.layout.feature_report_dir / "dataset_stats.json").write_text("{}")
    (s.layout.feature_report_dir / "scores.csv").write_text("a\n1\n")
    assert [t.wall for t in runner.run_pipeline(s, lambda cmd: 0)] == ["skipped", "skipped"]
    rerun = runner.parse_pipeline_args(argv + ["--from_stage", "2"], env={})
    ran: list[str] = []
    runner.run_pipeline(rerun, lambda cmd: ran.append(cmd[1]) or 0)
    assert ran == ["2_generate_features.py"]


def test_stage6_search_options_reach_stage6_only_when_given():
    plain = runner.parse_pipeline_args(["arithmetic", MODEL, "--preset", "cpu"], env={})
    cmd6 = next(cmd for num, _, cmd in runner.stage_commands(plain) if num == 6)
    assert "--cha_statistic" not in cmd6 and "--cha_scope" not in cmd6
    s = runner.parse_pipeline_args(["arithmetic", MODEL, "--preset", "cpu", "--cha_statistic", "effect_sprt",
                                    "--cha_scope", "all_units", "--knockout_random_sets", "5"], env={})
    for num, _, cmd in runner.stage_commands(s):
        if num == 6:
            assert cmd[cmd.index("--cha_statistic") + 1] == "effect_sprt"
            assert cmd[cmd.index("--cha_scope") + 1] == "all_units"
            assert cmd[cmd.index("--knockout_random_sets") + 1] == "5"
        else:
            assert "--cha_scope" not in cmd
    with pytest.raises(runner.PipelineError, match="--cha_statistic must be flip_ucb or effect_sprt"):
        runner.parse_pipeline_args(["arithmetic", MODEL, "--cha_statistic", "bogus"], env={})
