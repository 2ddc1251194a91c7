"""Stage 2 end to end: seed features, feature-LLM proposal rounds, sandboxed scoring, the held-out
split, train-only filters and imputation, and the outputs `scores.csv`, `features.json` and
`feature_report.md`.

Order matters for leakage (DESIGN 4.4): the split is drawn from seed features first, the
feature LLM only sees TRAIN prompts, and every filter and the imputation are fitted on TRAIN rows.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core.choices import DEFAULT_SEED
from lib.core.files_and_cache import (
    ArtifactError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    set_deterministic,
)
from lib.features.filters import (
    drop_constant,
    fit_medians,
    impute,
    mad_high_variance_filter,
    near_duplicate_filter,
    predictive_power_filter,
    sanitize_column_names,
)
from lib.features.llm_proposals import build_user_message, parse_feature_reply
from lib.features.feature import Feature
from lib.features.split import make_test_split
from lib.pipeline.config import StageConfig, option, require
from lib.tasks.base import TaskSpec

__all__ = ["DEFAULT_FEATURE_LLM", "Stage2Config", "FeatureLedger", "load_stage1_table", "select_features",
           "run_stage2"]

DEFAULT_FEATURE_LLM = "local:smollm2-135m-instruct-q4_1"


@dataclasses.dataclass(kw_only=True)
class Stage2Config(StageConfig):
    """The flags of `2_generate_features.py` (short and original long names kept as aliases)."""

    prompts_answers_pkl_file: str = option(help="stage-1 pickle", aliases=("-i",))
    features_scores_dir: str = option("feature_report", "output folder", aliases=("--out_dir", "-o"))
    cache_dir: str = option("./cache", "folder of the feature-LLM call cache", aliases=("-c",))
    ai_model: str = option(DEFAULT_FEATURE_LLM,
                           "feature LLM: ollama:NAME, openai:NAME, groq:NAME, local:ALIAS, or a bare name routed "
                           f"as in the original (default: {DEFAULT_FEATURE_LLM}, runs offline)", aliases=("-m",))
    temperature: float = option(0.3, "sampling temperature", aliases=("-T",))
    max_tokens: int = option(0, "reply length limit of the feature LLM (0 = backend default; local: 512)")
    n_features: int = option(16, "features requested per round", aliases=("-n",))
    feature_extraction_steps: int = option(10, "rounds that must each yield at least one valid feature",
                                           aliases=("--rounds", "-R"))
    max_proposal_attempts: int = option(0, "upper bound on proposal rounds (0 = 3 x --feature_extraction_steps)")
    num_correct_example_prompts: int = option(32, "positive prompts shown per round")
    num_incorrect_example_prompts: int = option(32, "negative prompts shown per round")
    no_llm_feature_generation: bool = option(False, "seed features only", aliases=("--no_llm",))
    number_of_existing_features_to_show_for_diversity: int = option(
        20, "earlier LLM features listed as 'do not repeat'")
    drop_low_predictive_power_features: bool = option(False, aliases=("--filter_by_metrics",))
    drop_near_duplicate_features: bool = option(False, aliases=("--drop_near_dups",))
    near_duplicate_features_threshold: float = option(0.9999, aliases=("--dup_corr_thresh",))
    drop_high_mad_variance_features: bool = option(False, aliases=("--drop_high_mad",))
    train_ratio: float = option(1.0, "share of TRAIN rows used by the predictive-power filter (0 or 1 = all)",
                                aliases=("-t",))
    min_auc: float = option(0.0, "active only if > 0")
    min_delta: float = option(0.2, "active only if > 0")
    min_ap_above_base: float = option(0.0, "active if > -1")
    z_thresh: float = option(10.0, "MAD robust-z cut")
    max_number_of_prompts_to_analyze: int = option(0, "seeded random subset of rows (0 = all)",
                                                   aliases=("--max_prompts",))
    feature_timeout: float = option(10.0, "CPU seconds a feature may use per 5,000 rows (wall clock: twice that)")
    sanity_rows: int = option(10, "rows every proposed feature must run on")
    seed: int = option(DEFAULT_SEED, "global seed", aliases=("--random_seed",))
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag in ("n_features", "feature_extraction_steps", "num_correct_example_prompts",
                     "num_incorrect_example_prompts"):
            require(getattr(self, flag) >= 1 or self.no_llm_feature_generation,
                    f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("max_number_of_prompts_to_analyze", "max_proposal_attempts",
                     "number_of_existing_features_to_show_for_diversity"):
            require(getattr(self, flag) >= 0, f"--{flag} must be >= 0, got {getattr(self, flag)}")
        require(0 <= self.train_ratio <= 1, f"--train_ratio must be in [0, 1], got {self.train_ratio}")
        require(0 < self.near_duplicate_features_threshold <= 1,
                "--near_duplicate_features_threshold must be in (0, 1]")
        require(self.feature_timeout > 0, "--feature_timeout must be > 0")


@dataclass
class FeatureLedger:
    """What happened to every proposed feature, for the markdown report."""

    entries: list[dict] = field(default_factory=list)

    def add(self, label: str, origin: str, status: str, reason: str = "", round_no: int | None = None) -> None:
        self.entries.append({"label": label, "origin": origin, "status": status, "reason": reason,
                             "round": round_no})

    def set_status(self, label: str, status: str, reason: str = "") -> None:
        for e in self.entries:
            if e["label"] == label and e["status"] == "scored":
                e["status"], e["reason"] = status, reason

    def to_markdown(self, title: str) -> str:
        kept = sum(e["status"] == "kept" for e in self.entries)
        lines = [f"# {title}", "", f"{len(self.entries)} features considered, {kept} kept.", "",
                 "| feature | origin | round | status | reason |", "|---|---|---|---|---|"]
        for e in self.entries:
            label = e["label"].replace("|", "\\|")
            reason = e["reason"].replace("|", "\\|").replace("\n", " ")
            rnd = "" if e["round"] is None else str(e["round"])
            lines.append(f"| {label} | {e['origin']} | {rnd} | {e['status']} | {reason} |")
        return "\n".join(lines) + "\n"


def load_stage1_table(task: TaskSpec, pkl: str, max_rows: int, seed: int) -> pd.DataFrame:
    """Stage-1 rows: deduplicated, optionally a seeded sample, sorted by prompt descending, row_id added."""
    df = task.load_dataset_from_cache(pkl)
    col = task.DEFAULT_INPUT
    target = task.DEFAULT_TARGETS[0]
    for needed in (col, target):
        if needed not in df.columns:
            raise ArtifactError(f"'{pkl}': column '{needed}' is missing from the stage-1 table")
    if "row_id" in df.columns:
        raise ArtifactError(f"'{pkl}': the stage-1 table already has a 'row_id' column")
    df = df.dropna(subset=[col]).drop_duplicates(subset=[col]).reset_index(drop=True)
    if df.empty:
        raise ArtifactError(f"'{pkl}': no prompts to analyse")
    if max_rows and len(df) > max_rows:
        df = df.sample(n=max_rows, random_state=seed)
    df = df.sort_values(col, ascending=False, kind="mergesort").reset_index(drop=True)
    df.insert(len(df.columns), "row_id", np.arange(len(df)))
    return df


def _propose_features(task: TaskSpec, cfg: Stage2Config, df: pd.DataFrame, train: np.ndarray,
                      sandbox: Any, prompts: list[str], infos: list[dict], ledger: FeatureLedger) -> list[Feature]:
    """Run proposal rounds until `feature_extraction_steps` rounds gave a valid feature (bounded)."""
    from lib.models.llm_clients import instruct_model

    target = task.DEFAULT_TARGETS[0]
    y = df[target].astype(bool).to_numpy()
    pos = [prompts[i] for i in np.flatnonzero(train & y)]
    neg = [prompts[i] for i in np.flatnonzero(train & ~y)]
    rng = random.Random(cfg.seed)
    sample_idx = [i for i in np.flatnonzero(train)[: max(10, cfg.sanity_rows)]]
    sample_prompts = [prompts[i] for i in sample_idx]
    sample_infos = [infos[i] for i in sample_idx]
    proposed: list[Feature] = []
    successes, attempts = 0, 0
    max_attempts = cfg.max_proposal_attempts or 3 * cfg.feature_extraction_steps
    system = task.SYSTEM_PROMPT
    while successes < cfg.feature_extraction_steps and attempts < max_attempts:
        attempts += 1
        rng.shuffle(pos)
        rng.shuffle(neg)
        shown = rng.sample(proposed, min(cfg.number_of_existing_features_to_show_for_diversity, len(proposed)))
        user = build_user_message(pos[: cfg.num_correct_example_prompts], neg[: cfg.num_incorrect_example_prompts],
                                  shown, cfg.n_features, task.TOKENS_DICT_KEYS)
        reply = instruct_model(cfg.ai_model, [(system, user)], temperature=cfg.temperature,
                               cache_dir=cfg.cache_dir, seed=cfg.seed + attempts,
                               max_tokens=cfg.max_tokens or None)[0]
        cands, bad = parse_feature_reply(reply)
        for label, reason in bad:
            ledger.add(label, "llm", "dropped", reason, attempts)
        checked = sandbox.evaluate(cands, sample_prompts, sample_infos) if cands else None
        valid = checked.kept if checked else []
        for feat, reason in (checked.rejected if checked else []):
            ledger.add(feat.label, "llm", "dropped", f"sandbox: {reason}", attempts)
        for feat in valid:
            ledger.add(feat.label, "llm", "scored", "", attempts)
        proposed.extend(valid)
        successes += bool(valid)
        print(f"[stage2] round {attempts}: {len(valid)} valid of {len(cands) + len(bad)} proposed "
              f"({successes}/{cfg.feature_extraction_steps} successful rounds)", flush=True)
    if successes < cfg.feature_extraction_steps:
        print(f"[stage2] warning: only {successes} of {cfg.feature_extraction_steps} rounds produced a valid "
              f"feature after {attempts} attempts; continuing with what was found", flush=True)
    return proposed


def _dedupe(features: list[Feature], ledger: FeatureLedger) -> list[Feature]:
    seen: set[str] = set()
    out = []
    for f in features:
        key = f.label.strip().lower()
        if key in seen:
            ledger.set_status(f.label, "dropped", "duplicate label")
            continue
        seen.add(key)
        out.append(f)
    return out


def select_features(X: np.ndarray, y: np.ndarray, train: np.ndarray, labels: list[str],
                    cfg: Stage2Config) -> tuple[list[int], dict[int, str]]:
    """Columns kept by the enabled filters, fitted on TRAIN rows only, and why each other one was dropped."""
    keep = list(range(X.shape[1]))
    reasons: dict[int, str] = {}

    def apply(result: Any) -> None:
        nonlocal keep
        for j, reason in result.dropped.items():
            reasons[keep[j]] = reason
        keep = [keep[j] for j in result.kept]

    Xt, yt = X[train], y[train]
    apply(drop_constant(Xt[:, keep]))
    if cfg.drop_high_mad_variance_features and keep:
        apply(mad_high_variance_filter(Xt[:, keep], cfg.z_thresh))
    if cfg.drop_low_predictive_power_features and keep:
        sel = np.arange(len(yt))
        if 0 < cfg.train_ratio < 1:
            rs = np.random.default_rng(cfg.seed)
            sel = np.sort(rs.choice(sel, size=max(2, int(round(cfg.train_ratio * len(sel)))), replace=False))
        res, _ = predictive_power_filter(Xt[sel][:, keep], yt[sel], cfg.min_auc, cfg.min_delta,
                                         cfg.min_ap_above_base)
        apply(res)
    if cfg.drop_near_duplicate_features and keep:
        apply(near_duplicate_filter(Xt[:, keep], cfg.near_duplicate_features_threshold, [labels[j] for j in keep]))
    return keep, reasons


def run_stage2(task: TaskSpec, cfg: Stage2Config) -> Path:
    """Write scores.csv, features.json and feature_report.md into `cfg.features_scores_dir`."""
    from lib.features.sandbox import FeatureSandbox

    set_deterministic(cfg.seed)
    out_dir = ensure_writable_dir(cfg.features_scores_dir, "--features_scores_dir")
    df = load_stage1_table(task, cfg.prompts_answers_pkl_file, cfg.max_number_of_prompts_to_analyze, cfg.seed)
    target = task.DEFAULT_TARGETS[0]
    y = df[target].astype(bool).to_numpy()
    if y.all() or not y.any():
        print(f"[stage2] warning: target '{target}' has one class only ({int(y.sum())} of {len(y)} true); "
              "features are scored but nothing can be learned from them", flush=True)
    prompts = df[task.DEFAULT_INPUT].astype(str).tolist()
    infos = [task.parse_prompt_row(row) for row in df.itertuples(index=False)]
    ledger = FeatureLedger()
    seeds = [Feature(f.label, f.description, f.python_src, f.fn_name, "predefined") for f in task.SEED_FEATURES]
    for f in seeds:
        ledger.add(f.label, "predefined", "scored")

    # Limits are per feature over the whole table: scale them with its size.
    cpu_s = cfg.feature_timeout * max(1.0, len(df) / 5000)
    with FeatureSandbox(timeout_s=2 * cpu_s, cpu_s=cpu_s) as sandbox:
        seed_res = sandbox.evaluate(seeds, prompts, infos)
        for feat, reason in seed_res.rejected:
            ledger.set_status(feat.label, "dropped", f"sandbox: {reason}")
        is_test = make_test_split(seed_res.matrix, y, cfg.seed)
        train = ~is_test
        llm_feats: list[Feature] = []
        if not cfg.no_llm_feature_generation:
            llm_feats = _propose_features(task, cfg, df, train, sandbox, prompts, infos, ledger)
        llm_feats = _dedupe([*seed_res.kept, *llm_feats], ledger)[len(seed_res.kept):]
        llm_res = sandbox.evaluate(llm_feats, prompts, infos) if llm_feats else None

    features = list(seed_res.kept) + (llm_res.kept if llm_res else [])
    blocks = [seed_res.matrix] + ([llm_res.matrix] if llm_res else [])
    if llm_res:
        for feat, reason in llm_res.rejected:
            ledger.set_status(feat.label, "dropped", f"sandbox: {reason}")
    X = np.hstack(blocks) if blocks else np.zeros((len(df), 0))
    names = sanitize_column_names([f.label for f in features], reserved=[*df.columns, "is_test", "split"])

    keep, reasons = select_features(X, y, train, [f.label for f in features], cfg)
    for j, reason in reasons.items():
        ledger.set_status(features[j].label, "dropped", reason)
    for j in keep:
        ledger.set_status(features[j].label, "kept")

    Xk = np.clip(X[:, keep], -1e12, 1e12)
    Xk = impute(Xk, fit_medians(Xk[train]))
    out = df.copy()
    if "split" in out.columns:
        out = out.rename(columns={"split": "source_split"})
    for col, j in zip([names[j] for j in keep], range(len(keep))):
        out[col] = Xk[:, j]
    out["is_test"] = is_test
    out["split"] = np.where(is_test, "test", "train")
    with atomic_path(out_dir / "scores.csv") as tmp:
        out.to_csv(tmp, index=False)
    kept_feats = [features[j] for j in keep]
    atomic_write_json(out_dir / "features.json", [f.to_json() for f in kept_feats])
    atomic_write_text(out_dir / "feature_report.md",
                      ledger.to_markdown(f"Stage 2 feature report ({task.name}, {len(df)} prompts)"))
    print(f"[stage2] kept {len(kept_feats)} features "
          f"({sum(f.origin == 'predefined' for f in kept_feats)} seed, "
          f"{sum(f.origin == 'llm' for f in kept_feats)} LLM); wrote {out_dir / 'scores.csv'}", flush=True)
    return out_dir
