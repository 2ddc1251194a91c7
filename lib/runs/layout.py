"""Run-mode folder names (spec 7-11 §3) and the artifact paths built from them.

One place composes the names `_run_pipeline.sh` used (CIRCUIT_LABEL, BAG_LABEL, run mode), parses
them back, and turns (data root, task, model, options) into the folders stages 5-7 write. Stage 7,
the reporting scripts and the shell drivers all call this module, so names cannot drift apart.

Shell use: `python -m lib.runs.layout run_mode --anchoring random` prints a name;
`python -m lib.runs.layout stats_dir --data_root data --task arithmetic --model Qwen/Qwen2-7B-Instruct`
prints a path; `python -m lib.runs.layout parse NAME` prints the options of a run mode as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lib.core.choices import DEFAULT_SEED, PLAIN_INTERVENTIONS, REGIMES

__all__ = [
    "DEFAULT_CIRCUIT_SIZE",
    "DEFAULT_TAU",
    "BASELINE_SUBSETS",
    "RunOptions",
    "circuit_label",
    "bag_label",
    "run_mode",
    "parse_run_mode",
    "format_tau",
    "model_folder",
    "ExperimentLayout",
    "CANONICAL_ROLES",
    "canonical_run_mode",
    "run_role",
    "role_label",
    "without_decode_only",
    "main",
]

DEFAULT_CIRCUIT_SIZE = 100000
DEFAULT_TAU = 0.2
BASELINE_SUBSETS = REGIMES


@dataclass(frozen=True)
class RunOptions:
    """The experiment switches that name a run folder."""

    split: str = "rule"  # rule | spectral  (spectral = clusters replace rules)
    discovery_sampling: str = "spectral"  # spectral | random  (stage-4 plan for discovery; rule split only)
    circuit_size: int = DEFAULT_CIRCUIT_SIZE
    decode_only: bool = True
    intervention: str = "mean-positional"
    fast: bool = True  # CHA; False = exhaustive single-unit ablation
    anchoring: str = "spectral"  # spectral | random  (stage-6 prompt plan)
    tau: float = DEFAULT_TAU
    fake_targets: bool = False

    def __post_init__(self) -> None:
        """Reject values the pipeline cannot name."""
        if self.split not in ("rule", "spectral"):
            raise ValueError(f"split must be 'rule' or 'spectral', got {self.split!r}")
        if self.discovery_sampling not in ("spectral", "random"):
            raise ValueError(f"discovery_sampling must be 'spectral' or 'random', got {self.discovery_sampling!r}")
        if self.anchoring not in ("spectral", "random"):
            raise ValueError(f"anchoring must be 'spectral' or 'random', got {self.anchoring!r}")
        if int(self.circuit_size) < 1:
            raise ValueError(f"circuit_size must be >= 1, got {self.circuit_size}")
        if self.split == "spectral" and self.fake_targets:
            raise ValueError("spectral splits have no rules, so no fake-target control")


def format_tau(tau: float | str) -> str:
    """τ as the shell prints it (`0.3`, `0.25`), no trailing zeros."""
    return f"{float(tau):g}"


def circuit_label(opts: RunOptions) -> str:
    """CIRCUIT_LABEL: split kind, discovery sample, size, decode-only, non-default intervention."""
    parts = ["spectral_split" if opts.split == "spectral" else f"rule_split-{opts.discovery_sampling}_sample"]
    if int(opts.circuit_size) != DEFAULT_CIRCUIT_SIZE:
        parts.append(f"M{int(opts.circuit_size)}")
    if opts.decode_only:
        parts.append("decode_only")
    if opts.intervention not in PLAIN_INTERVENTIONS:
        parts.append(f"eval_{opts.intervention}")
    return "-".join(parts)


def bag_label(opts: RunOptions) -> str:
    """BAG_LABEL: CHA or brute force, anchoring plan, non-default τ."""
    parts = ["agonist_neurons"]
    if opts.fast:
        parts.append("fast")
    parts.append(f"{opts.anchoring}_anchor")
    if abs(float(opts.tau) - DEFAULT_TAU) > 1e-12:
        parts.append(f"tau{format_tau(opts.tau)}")
    return "-".join(parts)


def run_mode(opts: RunOptions) -> str:
    """Stage-7 `--stats_dirname`: `{CIRCUIT_LABEL}-{BAG_LABEL}[-fake_targets]`."""
    name = f"{circuit_label(opts)}-{bag_label(opts)}"
    return name + "-fake_targets" if opts.fake_targets else name


_RUN_RE = re.compile(
    r"^(?:(?P<spectral>spectral_split)|rule_split-(?P<disc>spectral|random)_sample)"
    r"(?:-M(?P<size>\d+))?(?P<decode>-decode_only)?(?:-eval_(?P<interv>[a-z][a-z-]*?))?"
    r"-agonist_neurons(?P<fast>-fast)?-(?P<anchor>spectral|random)_anchor"
    r"(?:-tau(?P<tau>\d+(?:\.\d+)?(?:e-?\d+)?))?(?P<fake>-fake_targets)?$"
)


def parse_run_mode(name: str) -> RunOptions | None:
    """Options of a run-mode folder name, or None when the name is not one the pipeline composes."""
    m = _RUN_RE.match(name.strip())
    if m is None:
        return None
    try:
        return RunOptions(
            split="spectral" if m.group("spectral") else "rule",
            discovery_sampling=m.group("disc") or "random",
            circuit_size=int(m.group("size")) if m.group("size") else DEFAULT_CIRCUIT_SIZE,
            decode_only=bool(m.group("decode")),
            intervention=m.group("interv") or "mean-positional",
            fast=bool(m.group("fast")),
            anchoring=m.group("anchor"),
            tau=float(m.group("tau")) if m.group("tau") else DEFAULT_TAU,
            fake_targets=bool(m.group("fake")),
        )
    except ValueError:
        return None


def without_decode_only(name: str) -> str:
    """The same run mode without `-decode_only` (HANS runs and the tables' folder fallback)."""
    return name.replace("-decode_only", "", 1)


# Canonical run roles: (options, script-8 label, tables/script-10 label).
CANONICAL_ROLES: dict[str, tuple[RunOptions, str, str]] = {
    "main": (RunOptions(), "Rule split w/ Spectral anchoring plan", "Rule split + spectral coverage"),
    "random_anchor": (RunOptions(anchoring="random"), "Rule split w/ Random anchoring plan",
                      "Rule split + random coverage"),
    "fake": (RunOptions(fake_targets=True), "Fake rule split w/ Spectral anchoring plan",
             "Fake rule split + spectral coverage"),
    "spectral_split": (RunOptions(split="spectral", discovery_sampling="random", anchoring="random"),
                       "Spectral split", "Spectral split (no rule)"),
    "bruteforce": (RunOptions(fast=False), "Rule split w/ Bruteforce search", "Rule split + bruteforce search"),
}


def _canonical_key(opts: RunOptions) -> RunOptions:
    """Options with the switches that do not define a role reset (decode-only, plain interventions)."""
    interv = "mean-positional" if opts.intervention in PLAIN_INTERVENTIONS else opts.intervention
    disc = "random" if opts.split == "spectral" else opts.discovery_sampling
    return replace(opts, decode_only=True, intervention=interv, discovery_sampling=disc)


def canonical_run_mode(role: str, decode_only: bool = True) -> str:
    """Run-mode name of a canonical role (`main`, `random_anchor`, `fake`, `spectral_split`, `bruteforce`)."""
    if role not in CANONICAL_ROLES:
        raise ValueError(f"unknown run role {role!r}; expected one of {sorted(CANONICAL_ROLES)}")
    return run_mode(replace(CANONICAL_ROLES[role][0], decode_only=decode_only))


def run_role(name: str) -> str | None:
    """Canonical role of a run-mode name (with or without `-decode_only`), else None."""
    opts = parse_run_mode(name)
    if opts is None:
        return None
    key = _canonical_key(opts)
    for role, (ref, _, _) in CANONICAL_ROLES.items():
        if key == _canonical_key(ref):
            return role
    return None


def role_label(name: str, style: str = "tables") -> str:
    """Display label of a run (`style` 'compare' = script 8, 'tables' = tables/script 10); name if not canonical."""
    role = run_role(name)
    if role is None:
        return name
    _, compare_label, table_label = CANONICAL_ROLES[role]
    return compare_label if style == "compare" else table_label


def model_folder(model: str) -> Path:
    """Relative folder of a model under `data/<task>/`: the HF id (org/name), an alias, or a file/folder stem."""
    text = model.split("@", 1)[0].strip().rstrip("/")
    if not text:
        raise ValueError("empty model name")
    p = Path(text)
    if text.endswith(".gguf") or p.is_absolute() or text.startswith("."):
        return Path(p.stem if text.endswith(".gguf") else p.name)
    return p


@dataclass(frozen=True)
class ExperimentLayout:
    """Folders of one (task, model) experiment under a data root (and its cache root)."""

    data_root: Path
    task: str
    model: str
    cache_root: Path = Path("cache")
    seed: int = DEFAULT_SEED  # stages 2 and 3 of another seed get their own folders (`…-seed7`)

    @property
    def model_dir(self) -> Path:
        return Path(self.data_root) / self.task / model_folder(self.model)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache_root) / self.task / model_folder(self.model)

    @property
    def seed_suffix(self) -> str:
        """`""` for the default seed (the original's folder names), else `-seed<S>`."""
        return "" if int(self.seed) == DEFAULT_SEED else f"-seed{int(self.seed)}"

    @property
    def feature_report_dir(self) -> Path:
        """Stage 2's folder (and stage 1's `dataset_stats.json`)."""
        return self.model_dir / f"feature_report{self.seed_suffix}"

    @property
    def rules_dir(self) -> Path:
        """Stage 3's `--rules_dir`."""
        return self.model_dir / f"xai_analyses_results{self.seed_suffix}"

    @property
    def neuron_rules_dir(self) -> Path:
        """Stage 7's `--rules_dir` (shared by every run mode, fake runs included)."""
        return self.model_dir / "rule_extraction_results" / "neuron_flip_rules"

    @property
    def stats_root(self) -> Path:
        return self.neuron_rules_dir / "stats"

    def stats_dir(self, run: RunOptions | str) -> Path:
        """Stage 7's `stats/<run mode>/` folder."""
        return self.stats_root / (run if isinstance(run, str) else run_mode(run))

    def discovery_root(self, fake_targets: bool = False) -> Path:
        """`neural_circuit_discovery_results[_fake_targets]/eap_ig_inputs`."""
        base = "neural_circuit_discovery_results" + ("_fake_targets" if fake_targets else "")
        return self.model_dir / base / "eap_ig_inputs"

    def circuits_dir(self, opts: RunOptions) -> Path:
        """Stage 5's output folder (`manifest.json`, `dataset_info.json`)."""
        return self.discovery_root(opts.fake_targets) / circuit_label(opts) / "neural_circuits"

    def bag_dir(self, opts: RunOptions) -> Path:
        """Stage 6's output parent (holds `positive_baseline/` and `negative_baseline/`)."""
        return self.discovery_root(opts.fake_targets) / circuit_label(opts) / bag_label(opts)

    def baseline_dir(self, opts: RunOptions, baseline_subset: str) -> Path:
        """Stage 6's `--output_data_dir` for one regime."""
        subset = baseline_subset.removesuffix("_baseline")
        if subset not in BASELINE_SUBSETS:
            raise ValueError(f"baseline subset must be positive or negative, got {baseline_subset!r}")
        return self.bag_dir(opts) / f"{subset}_baseline"


_PATH_KINDS = ("model_dir", "cache_dir", "feature_report_dir", "rules_dir", "neuron_rules_dir", "stats_root", "stats_dir",
               "discovery_root", "circuits_dir", "bag_dir", "baseline_dir")
_NAME_KINDS = ("run_mode", "circuit_label", "bag_label")


def _build_cli() -> argparse.ArgumentParser:
    """Parser of `python -m lib.runs.layout`."""
    p = argparse.ArgumentParser(prog="python -m lib.runs.layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=_NAME_KINDS + _PATH_KINDS + ("parse",), help="what to print")
    p.add_argument("name", nargs="?", help="run-mode name (only for 'parse')")
    p.add_argument("--split", choices=("rule", "spectral"), default="rule")
    p.add_argument("--discovery_sampling", choices=("spectral", "random"), default=None,
                   help="default: spectral for rule splits, random for spectral splits")
    p.add_argument("--circuit_size", type=int, default=DEFAULT_CIRCUIT_SIZE)
    p.add_argument("--no_decode_only", action="store_true", help="run without -decode_only (e.g. HANS)")
    p.add_argument("--intervention", default="mean-positional")
    p.add_argument("--slow", action="store_true", help="exhaustive (brute-force) stage 6 instead of CHA")
    p.add_argument("--anchoring", choices=("spectral", "random"), default=None,
                   help="default: spectral for rule splits, random for spectral splits")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU)
    p.add_argument("--fake_targets", action="store_true")
    p.add_argument("--role", choices=sorted(CANONICAL_ROLES), default=None,
                   help="start from a canonical run role instead of the switches above")
    p.add_argument("--data_root", default="data")
    p.add_argument("--cache_root", default="cache")
    p.add_argument("--task", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--baseline_subset", choices=BASELINE_SUBSETS, default="positive")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="stages 2-3 folders of another seed carry it")
    return p


def _options_from_args(args: argparse.Namespace) -> RunOptions:
    """RunOptions from the CLI switches (a role wins over the individual switches)."""
    if args.role:
        return replace(CANONICAL_ROLES[args.role][0], decode_only=not args.no_decode_only)
    spectral = args.split == "spectral"
    return RunOptions(
        split=args.split,
        discovery_sampling=args.discovery_sampling or ("random" if spectral else "spectral"),
        circuit_size=args.circuit_size,
        decode_only=not args.no_decode_only,
        intervention=args.intervention,
        fast=not args.slow,
        anchoring=args.anchoring or ("random" if spectral else "spectral"),
        tau=args.tau,
        fake_targets=args.fake_targets,
    )


def main(argv: list[str] | None = None) -> int:
    """Print a run-mode name, a path, or the parsed options of a name; usage errors exit 2."""
    args = _build_cli().parse_args(argv)
    try:
        if args.what == "parse":
            if not args.name:
                raise ValueError("'parse' needs a run-mode name")
            opts = parse_run_mode(args.name)
            if opts is None:
                raise ValueError(f"'{args.name}' is not a run-mode name the pipeline composes")
            print(json.dumps({**asdict(opts), "role": run_role(args.name)}, sort_keys=True))
            return 0
        opts = _options_from_args(args)
        if args.what in _NAME_KINDS:
            print({"run_mode": run_mode, "circuit_label": circuit_label, "bag_label": bag_label}[args.what](opts))
            return 0
        if not args.task or not args.model:
            raise ValueError(f"'{args.what}' needs --task and --model")
        layout = ExperimentLayout(Path(args.data_root), args.task, args.model, Path(args.cache_root), args.seed)
        if args.what in ("stats_dir", "circuits_dir", "bag_dir"):
            path = getattr(layout, args.what)(opts)
        elif args.what == "baseline_dir":
            path = layout.baseline_dir(opts, args.baseline_subset)
        elif args.what == "discovery_root":
            path = layout.discovery_root(opts.fake_targets)
        else:
            path = getattr(layout, args.what)
        print(path)
        return 0
    except ValueError as exc:
        print(f"run_layout: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
