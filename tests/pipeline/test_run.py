"""The pipeline runner (`lib.pipeline.run`): its stage commands, paths, timings table and option errors
equal those of the original bash driver (fixture captured from it with --dry_run / --print_paths), the
original option names map to ours, and a second seed gets its own stage-2/3 folders.

One preset differs from the bash driver's on purpose: tiny runs at τ = 0.5 (the bash driver: 0.3), so
that CHA can prune with its 6 prompts per slice (docs/DEVIATIONS.md, Drivers 14). The tiny cases are
therefore compared twice: with `--tau 0.3` the commands must equal the capture byte for byte (τ is the
only change), and without it they must equal the capture with τ replaced in exactly the places it
reaches (stage-6/7 `--search_epsilon`, the run-mode folder names, `TAU=`)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from lib.pipeline import run as runner

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "data" / "run_pipeline_bash_dry_runs.json").read_text())
MODEL = "smollm2-135m-instruct-q4_1"
BASE = ["arithmetic", MODEL, "--data_root", "data_fx", "--cache_root", "cache_fx"]
BASH_TINY_TAU, TINY_TAU = "0.3", "0.5"  # the bash driver's tiny τ, and ours


def _is_tiny(case: dict) -> bool:
    opts = case["options"]
    return any(a == "--preset" and b == "tiny" for a, b in zip(opts, opts[1:]))


TINY_CASES = [c for c in FIXTURE["runs"] if _is_tiny(c)]


def _bash_preset_options(case: dict) -> list[str]:
    """The case's options, pinning the bash driver's τ for the tiny preset (the only preset value changed)."""
    return [*case["options"], "--tau", BASH_TINY_TAU] if _is_tiny(case) else list(case["options"])


_TAU_SITES = [(re.compile(r"--search_epsilon 0\.3(?![0-9])"), f"--search_epsilon {TINY_TAU}"),
              (re.compile(r"-tau0\.3(?![0-9])"), f"-tau{TINY_TAU}"), (re.compile(r"^TAU=0\.3$"), f"TAU={TINY_TAU}")]


def _with_tiny_tau(lines: list[str]) -> list[str]:
    """The bash capture of a tiny case with our tiny τ in every place τ reaches."""
    out = []
    for line in lines:
        for pattern, repl in _TAU_SITES:
            line = pattern.sub(repl, line)
        out.append(line)
    assert out != lines, "the capture has no τ to replace: the fixture is not the tiny preset's"
    return out


def _dry(monkeypatch, capsys, options: list[str], task_model: list[str] | None = None) -> tuple[int, str, str]:
    monkeypatch.setenv("PYTHON", ".env/bin/python")
    for var in ("MECHARULE_DATA_ROOT", "MECHARULE_CACHE_ROOT", "MIN_RULE_DATASET_COVERAGE"):
        monkeypatch.delenv(var, raising=False)
    rc = runner.main([*(task_model or BASE), *options])
    out = capsys.readouterr()
    return rc, out.out, out.err


NEW_STAGE3_FLAGS = ("--min_rule_support",)
"""Stage-3 flags the bash driver did not pass (docs/DEVIATIONS.md, stage 3 item 10); `_commands` drops
them (flag and value) so the rest is compared with the capture, and a test below checks their values."""


def _without_new_flags(head: str, argv: list[str]) -> list[str]:
    if " stage 3 " not in head + " ":
        return argv
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in NEW_STAGE3_FLAGS:
            skip = True
            continue
        out.append(a)
    return out


def _commands(stderr: str) -> list[tuple[str, list[str]]]:
    """(`[pipeline] stage N (name)` or the whole log line, argv without the new stage-3 flags) of each
    `[pipeline]` line."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("[pipeline]"):
            continue
        head, sep, cmd = line.partition("): ")
        rows.append((head, _without_new_flags(head, shlex.split(cmd))) if sep and " stage " in head else (line, []))
    return rows


@pytest.mark.parametrize("preset, pairs", [("cpu", "16"), ("tiny", "6"), ("paper", "128")])
def test_stage3_gets_the_discovery_plans_pairs_as_minimum_support(monkeypatch, capsys, tmp_path, preset, pairs):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _dry(monkeypatch, capsys, ["--preset", preset, "--dry_run"])
    assert rc == 0
    line = next(ln for ln in err.splitlines() if ln.startswith("[pipeline] stage 3 "))
    argv = shlex.split(line.partition("): ")[2])
    assert argv[argv.index("--min_rule_support") + 1] == pairs
    stage4 = [ln for ln in err.splitlines() if "discovery plan" in ln and "): " in ln]
    assert len(stage4) == (preset != "paper")  # the paper preset's discovery is random: no stage-4 plan
    for ln in stage4:
        s4 = shlex.split(ln.partition("): ")[2])
        assert s4[s4.index("--min_points_per_ablation") + 1] == pairs


@pytest.mark.parametrize("case", FIXTURE["runs"], ids=lambda c: " ".join(c["options"]) or "paper")
def test_dry_run_commands_equal_the_bash_driver(monkeypatch, capsys, tmp_path, case):
    monkeypatch.chdir(tmp_path)  # an empty folder: no stage output exists, nothing is skipped
    rc, _, err = _dry(monkeypatch, capsys, [*_bash_preset_options(case), "--dry_run"])
    assert rc == case["rc"]
    assert _commands(err) == _commands("\n".join(case["commands"]))
    assert [line for line in err.splitlines() if line.startswith("  ")] == case["timings"]


@pytest.mark.parametrize("case", FIXTURE["runs"], ids=lambda c: " ".join(c["options"]) or "paper")
def test_print_paths_equal_the_bash_driver(monkeypatch, capsys, case):
    rc, out, _ = _dry(monkeypatch, capsys, [*_bash_preset_options(case), "--print_paths"])
    assert rc == 0
    assert out.splitlines() == case["print_paths"]


@pytest.mark.parametrize("case", TINY_CASES, ids=lambda c: " ".join(c["options"]))
def test_tiny_preset_is_the_bash_drivers_with_tau_0_5(monkeypatch, capsys, tmp_path, case):
    """Without `--tau`, the tiny preset's commands and paths are the capture's with τ = 0.5."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = _dry(monkeypatch, capsys, [*case["options"], "--dry_run"])
    assert rc == case["rc"]
    got, want = _commands(err), _commands("\n".join(_with_tiny_tau(case["commands"])))
    assert got == want
    assert got != _commands("\n".join(case["commands"]))
    stage6 = [cmd for head, cmd in got if "stage 6" in head]
    assert all(cmd[cmd.index("--search_epsilon") + 1] == TINY_TAU for cmd in stage6)
    assert [line for line in err.splitlines() if line.startswith("  ")] == case["timings"]
    rc, out, _ = _dry(monkeypatch, capsys, [*case["options"], "--print_paths"])
    assert rc == 0
    assert out.splitlines() == _with_tiny_tau(case["print_paths"])
    assert f"TAU={TINY_TAU}" in out.splitlines()


def test_the_fixture_has_tiny_cases_with_and_without_stage6():
    assert len(TINY_CASES) == 3
    assert sum(any("6_analyze_bag_of_rules.py" in line for line in c["commands"]) for c in TINY_CASES) == 2


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


def test_task_adjustments_of_a_preset_sit_between_the_preset_and_explicit_options():
    arith = runner.parse_pipeline_args(["arithmetic", MODEL, "--preset", "cpu"], env={})
    bon = runner.parse_pipeline_args(["bon_jailbreaking", MODEL, "--preset", "cpu"], env={})
    assert (arith.top_k_neurons, bon.top_k_neurons) == ("1536", "512")
    assert bon.n_points == arith.n_points == "20"  # the rest of the preset is shared
    mine = runner.parse_pipeline_args(["bon_jailbreaking", MODEL, "--preset", "cpu", "--top_k_neurons", "64"], env={})
    assert mine.top_k_neurons == "64"
    assert runner.parse_pipeline_args(["bon_jailbreaking", MODEL, "--preset", "tiny"], env={}).top_k_neurons == "32"


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
