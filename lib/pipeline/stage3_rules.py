"""Stage 3 driver: read the feature table, split TRAIN / TEST, and extract rules per behaviour target.

The per-target extraction itself (SHAP weights, RuleSHAP, OR-combos and their scopes) lives in
`lib.rules.extraction`, shared with stage 7; this module resolves columns and targets, handles the
fake-target control and one-class targets, and writes the stage's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from lib.core.choices import DEFAULT_SEED
from lib.core.files_and_cache import write_csv_atomic
from lib.pipeline.config import StageConfig, option, require
from lib.rules.combos import DEFAULT_MIN_MCC_GAIN
from lib.rules.extraction import make_fake_targets, run_rule_extraction

__all__ = ["Stage3Config", "run_stage3", "resolve_feature_columns", "write_empty_rule_files", "EMPTY_RULE_COLUMNS"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class Stage3Config(StageConfig):
    """The flags of `3_extract_rules.py`. `--random_seed` (the original name) is an alias of `--seed`."""

    features_scores_dir: str = option(help="folder holding scores.csv and features.json")
    rules_dir: str = option("xai_analyses_results", "output folder")
    seed: int = option(DEFAULT_SEED, "global seed", aliases=("--random_seed",))
    fake_targets: bool = option(False, "incorrect-rules control: explain random <t>_fake targets instead")
    fake_target_max_abs_corr: float = option(0.05, "accept a fake target once |Pearson r| with the real one is <= this")
    fake_target_max_tries: int = option(500, "resampling attempts per target")
    fast_shap_estimate: bool = option(False, "force the permutation SHAP estimator")
    npermutations: int = option(10, "antithetic feature orderings per row in the SHAP permutation estimator")
    only_unique_datapoints_in_shap: bool = option(False, "deduplicate (features, target) rows before SHAP")
    epsilon: float = option(0.1, "SHAP background = per-feature minimum - epsilon")
    use_shap_in_xgb: bool = option(False, "SHAP-weighted column sampling in the trees")
    use_shap_in_lasso: bool = option(False, "SHAP-weighted Lasso over the rules")
    only_unique_datapoints_in_rule_extraction: bool = option(
        False, "deduplicate (features, target) rows before tree fitting and selection")
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")
    min_combo_mcc_gain: float = option(DEFAULT_MIN_MCC_GAIN,
                                       "the greedy OR-combo stops when adding a literal raises MCC by this much or "
                                       "less (0 = the original's rule)")
    n_estimators: int = option(500, "number of trees", hidden=True)
    max_depth: int = option(10, "depth of the trees whose paths become rules (when --validation_grid "
                                "holds max_depth, the first candidate)")
    validation_folds: int = option(
        4, "stratified folds of the TRAIN rows that choose the --validation_grid options by mean held-out-fold "
           "MCC before the final fit on all TRAIN rows (0 = none: the flags as given)")
    validation_grid: str = option(
        "shap_weights,max_depth,combo_size",
        "what the folds choose: comma list of shap_weights (SHAP-weighted trees on or off, whatever "
        "--use_shap_in_xgb says), max_depth (--max_depth or one of --validation_max_depths) and combo_size "
        "(literals in the OR-combo); empty = nothing, the folds only report a validation MCC")
    validation_max_depths: str = option("2,3,4", "the other tree depths the folds try")
    min_rule_support: int = option(
        32, "a literal must fire on at least this many TRAIN rows and miss as many, so that stage 4 finds "
            "prompts on both sides of it (its --min_points_per_ablation); 0 = off")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.npermutations >= 1, f"--npermutations must be >= 1, got {self.npermutations}")
        require(self.fake_target_max_tries >= 1,
                f"--fake_target_max_tries must be >= 1, got {self.fake_target_max_tries}")
        require(0 <= self.fake_target_max_abs_corr <= 1, "--fake_target_max_abs_corr must be in [0, 1]")
        require(self.epsilon >= 0, "--epsilon must be >= 0")
        require(self.n_estimators >= 1, "--n_estimators must be >= 1")
        require(self.validation_folds == 0 or self.validation_folds >= 2,
                f"--validation_folds must be 0 or >= 2, got {self.validation_folds}")
        require(self.max_depth >= 1, f"--max_depth must be >= 1, got {self.max_depth}")
        require(self.min_rule_support >= 0, f"--min_rule_support must be >= 0, got {self.min_rule_support}")
        from lib.rules.validation import parse_int_list, parse_validation_grid

        try:
            parse_validation_grid(self.validation_grid)
            parse_int_list(self.validation_max_depths, "--validation_max_depths")
        except ValueError as exc:
            require(False, str(exc))

    @property
    def random_seed(self) -> int:
        """The seed under its original name, which `lib.rules.extraction` reads."""
        return self.seed


def _to_float_target(s: pd.Series) -> pd.Series:
    if s.dtype == object:
        s = s.map(lambda v: {"true": 1.0, "false": 0.0}.get(v.strip().lower(), v) if isinstance(v, str) else v)
    return pd.to_numeric(s.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v), errors="coerce")


def _parse_bool_column(s: pd.Series, name: str, where: str) -> np.ndarray:
    if s.dtype == bool:
        return s.to_numpy()
    mapped = s.map(lambda v: {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
                   .get(str(v).strip().lower()))
    if mapped.isna().any():
        bad = s[mapped.isna()].iloc[0]
        from lib.core.files_and_cache import ArtifactError
        raise ArtifactError(f"{where}: column '{name}' must be boolean, found {bad!r}")
    return mapped.astype(bool).to_numpy()


def resolve_feature_columns(columns: Sequence[str], labels: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Columns of scores.csv (file order) that are stage-2 feature columns for `labels`, minus targets.

    Stage 2 names features with `sanitize_column_names(labels, reserved=<table columns>)`, so a
    repeated label or one clashing with a table column carries a `_1`, `_2`… suffix. The
    non-feature columns are reconstructed as every column that is no (suffixed) form of a label,
    plus, per label base, the lowest-numbered surplus forms (a table column that clashed).
    """
    import re

    from lib.features.filters import sanitize_column_names

    bases = [re.sub(r"[^0-9a-zA-Z]+", "_", str(lb)).strip("_").lower() or "feature" for lb in labels]
    n_labels: dict[str, int] = {}
    for b in bases:
        n_labels[b] = n_labels.get(b, 0) + 1
    groups: dict[str, list[tuple[int, str]]] = {}
    reserved: list[str] = []
    for c in columns:
        m = re.fullmatch(r"(.+?)(?:_(\d+))?", str(c))
        hit = None
        for b in (str(c), m.group(1) if m else None):
            if b in n_labels:
                hit = b
                break
        if hit is None:
            reserved.append(str(c))
            continue
        k = 0 if str(c) == hit else int(str(c)[len(hit) + 1:])
        groups.setdefault(hit, []).append((k, str(c)))
    for b, forms in groups.items():
        forms.sort()
        surplus = len(forms) - n_labels[b]
        reserved += [c for _, c in forms[:max(0, surplus)]]
    names = set(sanitize_column_names(labels, reserved=reserved))
    tset = set(targets)
    return [c for c in columns if c in names and c not in tset]


def run_stage3(cfg: Stage3Config, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Stage 3 (§3): read stage-2 outputs, validate, build (fake) targets, split, extract rules."""
    from lib.core.files_and_cache import ArtifactError, atomic_write_json, ensure_writable_dir, set_deterministic
    from lib.tasks.base import load_task

    set_deterministic(cfg.seed)
    task = load_task(cfg.task_module)
    targets = list(task.DEFAULT_TARGETS)
    in_dir = Path(cfg.features_scores_dir)
    scores_path, feats_path = in_dir / "scores.csv", in_dir / "features.json"
    for p in (scores_path, feats_path):
        if not p.is_file():
            raise ArtifactError(f"'{p}' does not exist (run stage 2 first or pass another --features_scores_dir)")
    rules_dir = ensure_writable_dir(cfg.rules_dir, "--rules_dir")
    try:
        df = pd.read_csv(scores_path, low_memory=False)
    except Exception as exc:
        raise ArtifactError(f"'{scores_path}' is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        feats = json.loads(feats_path.read_text(encoding="utf-8"))
        labels = [str(f["label"]) for f in feats]
    except Exception as exc:
        raise ArtifactError(f"'{feats_path}' must be a JSON list of objects with a 'label' "
                            f"({type(exc).__name__}: {exc})") from None
    for t in targets:
        if t not in df.columns:
            raise ArtifactError(f"'{scores_path}' has no target column '{t}' (task {cfg.task_module})")
        df[t] = _to_float_target(df[t])

    features = resolve_feature_columns(list(df.columns), labels, targets)
    if not features:
        raise ArtifactError(f"no column of '{scores_path}' matches a feature label of '{feats_path}'")
    for c in features:
        col = df[c]
        if col.dtype == bool:
            df[c] = col.astype(np.float64)
            continue
        num = pd.to_numeric(col, errors="coerce")
        bad = col.notna() & num.isna()
        if bad.any():
            if col.dtype == object and set(col[col.notna()].astype(str).str.lower()) <= {"true", "false"}:
                num = col.map(lambda v: {"true": 1.0, "false": 0.0}.get(str(v).lower(), np.nan))
            else:
                raise ArtifactError(f"feature column '{c}' of '{scores_path}' is not numeric "
                                    f"(e.g. {col[bad].iloc[0]!r})")
        df[c] = num.astype(np.float64).fillna(0.0)

    if cfg.fake_targets:
        try:
            df, report = make_fake_targets(df, targets, cfg.seed, cfg.fake_target_max_abs_corr,
                                           cfg.fake_target_max_tries)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        atomic_write_json(rules_dir / "fake_targets_report.json", report)
        targets = [f"{t}_fake" for t in targets]
        for t, e in report.items():
            echo(f"[stage3] fake target {e['fake_column']}: |r| = {e['abs_pearson_corr_true_vs_fake']} "
                 f"after {e['tries']} tries")

    if "is_test" in df.columns:
        is_test = _parse_bool_column(df["is_test"], "is_test", str(scores_path))
        train, test = df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)
        if train.empty or test.empty:
            raise ArtifactError(f"'{scores_path}': the is_test split leaves no {'train' if train.empty else 'test'} rows")
    else:
        echo(f"[stage3] warning: '{scores_path}' has no is_test column; every row is TRAIN and "
             "no held-out (test) scope exists")
        train, test = df, None

    constant = {t: train[t].dropna().unique() for t in targets}
    constant = {t: v for t, v in constant.items() if len(v) < 2}
    results: dict[str, dict] = {}
    for t, vals in constant.items():
        reason = (f"target '{t}' has a single class ({vals[0] if len(vals) else 'no values'}) on the train rows: "
                  "the model behaves the same on every prompt, so there is nothing to explain or localise")
        echo(f"[stage3] warning: {reason}; writing empty rule files")
        write_empty_rule_files(rules_dir, t, reason)
        results[t] = {"status": "single_class", "reason": reason}
    targets = [t for t in targets if t not in constant]
    if not targets:
        return results
    echo(f"[stage3] {len(features)} features, {len(train)} train rows"
         + (f", {len(test)} held-out test rows" if test is not None else "") + f"; targets {targets}")
    sig = _options_signature(cfg, train, test, features, targets)
    sig_path = rules_dir / "_rule_extraction_signature.json"
    old = None
    if sig_path.is_file():
        try:
            old = json.loads(sig_path.read_text(encoding="utf-8")).get("signature")
        except (json.JSONDecodeError, AttributeError):
            old = None
    if old != sig["signature"]:
        if old is not None:
            echo("[stage3] the data or the rule options changed since the last run: refitting every target")
        cfg.force_rule_recompute = True  # read by run_rule_extraction (files and SHAP cache)
    results.update(run_rule_extraction(train, features, targets, cfg, eval_df=test, rules_dir=rules_dir, echo=echo))
    atomic_write_json(sig_path, sig)
    return results


_SIGNATURE_KNOBS = ("seed", "npermutations", "only_unique_datapoints_in_shap", "epsilon", "use_shap_in_xgb",
                    "use_shap_in_lasso", "only_unique_datapoints_in_rule_extraction", "min_combo_mcc_gain",
                    "n_estimators", "max_depth", "validation_folds", "validation_grid", "validation_max_depths",
                    "min_rule_support")


def _options_signature(cfg: Stage3Config, train: pd.DataFrame, test: pd.DataFrame | None,
                       features: Sequence[str], targets: Sequence[str]) -> dict:
    """Key of everything stage 3's rule files depend on (rows, features, targets, knobs): a rerun with
    other data or flags refits instead of reusing the files of the last run."""
    from lib.core.files_and_cache import content_key

    cols = list(features) + list(targets)
    parts = [train[cols]] + ([test[cols]] if test is not None else [])
    data = hashlib.sha1(b"".join(np.ascontiguousarray(p.to_numpy(dtype=np.float64)).tobytes() for p in parts))
    details = {"n_train": int(len(train)), "n_test": int(len(test)) if test is not None else 0,
               "columns_sha1": hashlib.sha1("\x1f".join(cols).encode()).hexdigest(), "values_sha1": data.hexdigest(),
               "knobs": {k: getattr(cfg, k) for k in _SIGNATURE_KNOBS}}
    return {"signature": content_key(details), "details": details}


EMPTY_RULE_COLUMNS = ("rule_index", "is_negated", "rule_expression", "component_type", "dataset_coverage",
                      "coefficient_sign")


def write_empty_rule_files(rules_dir: Path, target: str, reason: str) -> None:
    """Header-only rule files and a note for a target that cannot be explained (one class):
    later stages then see zero rules instead of a missing file."""
    from lib.core.files_and_cache import atomic_write_json

    empty = pd.DataFrame(columns=list(EMPTY_RULE_COLUMNS))
    for name in (f"association_rules_{target}.csv", f"optimal_rule_set_{target}.csv"):
        write_csv_atomic(empty, rules_dir / name)
    atomic_write_json(rules_dir / f"rule_extraction_skipped_{target}.json", {"target": target, "reason": reason})
