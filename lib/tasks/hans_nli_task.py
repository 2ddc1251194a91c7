"""HANS NLI task (spec §4): premise/hypothesis prompts, E/N answer scoring, `info` parse, 11 seeds.

HANS (McCoy et al., 2019) pairs a premise with a hypothesis built to trip up three shallow
heuristics (lexical overlap, subsequence, constituent); each pair is `entailment` or
`non-entailment`. The analysed model answers `E` or `N` after a 4-line prompt.

Configuration is by environment only (spec 4.1): `HANS_TASK_SEED` (42), `HANS_SPLIT`
(`validation`; aliases valid/dev/eval/evaluation, train/training), `HANS_NUM_EXAMPLES` (1024;
≤ 0 = all; stage 1's `--max_prompts N > 0` overrides it), `HANS_BALANCE_LABELS` (on; off for
0/false/no/off), `HANS_MAX_NEW_TOKENS` (3; stage 1's `--max_new_tokens > 0` overrides it),
`HANS_CACHE_DIR` (`./cache/hans`), `HANS_LOCAL_FILE` (empty), `HANS_SCORING` (`loglik`) and
`HANS_SOURCE` (`auto`: HANS_LOCAL_FILE, else the split's file in HANS_CACHE_DIR, else our offline
generator of HANS-style pairs, `lib.tasks.hans_templates`; `file`, `download`, `generated` force one).
Sampling follows `HANS_TASK_SEED`, not stage 1's `--seed`. Differences from the original are listed in
docs/DEVIATIONS.md (section "HANS NLI task").
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from lib.core.files_and_cache import load_pickle
from lib.features.feature import Feature
from lib.tasks.base import AnswerChoices, TaskError, TaskSpec, generic_dataset_stats

__all__ = [
    "HANS_BASE_URL",
    "SPLIT_FILES",
    "DEFAULT_TASK_SEED",
    "DEFAULT_NUM_EXAMPLES",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_CACHE_DIR",
    "MAX_NEW_TOKENS",
    "SYSTEM_PROMPT",
    "TOKENS_DICT_KEYS",
    "INSTRUCTION",
    "NEGATION_WORDS",
    "SEED_FEATURES",
    "HansConfig",
    "normalize_split",
    "word_tokens",
    "content_tokens",
    "pair_statistics",
    "map_gold_label",
    "build_prompt",
    "split_prompt",
    "make_row",
    "read_hans_file",
    "download_file",
    "resolve_data_file",
    "SOURCE_MODES",
    "HansSource",
    "load_source_rows",
    "sample_rows",
    "parse_predicted_label",
    "info_from_row",
    "HansNliTask",
    "TASK_SPEC",
]

# Raw files of the public HANS repository (github.com/tommccoy1/hans).
HANS_BASE_URL = "https://raw.githubusercontent.com/tommccoy1/hans/master/"
SPLIT_FILES: dict[str, str] = {
    "validation": "heuristics_evaluation_set.txt",
    "train": "heuristics_train_set.txt",
}
_SPLIT_ALIASES: dict[str, str] = {
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "eval": "validation", "evaluation": "validation", "test": "validation",
    "train": "train", "training": "train",
}
DEFAULT_TASK_SEED = 42
DEFAULT_SPLIT = "validation"
DEFAULT_NUM_EXAMPLES = 1024
DEFAULT_MAX_NEW_TOKENS = 3
# How the label is read: `loglik` (the higher log-likelihood of " E" / " N" after the prompt, as
# evaluation harnesses score multiple choice) or `generate` (free greedy text, parsed; the original).
SCORING_MODES = ("loglik", "generate")
DEFAULT_SCORING = "loglik"
LABEL_CHOICES = AnswerChoices(labels=("E", "N"), continuations=(" E", " N"), normalisation="tokens")
DEFAULT_CACHE_DIR = "./cache/hans"
# Where the pairs come from: `auto` = a given or cached HANS file, else the offline generator (never
# the network); `file` = a given or cached file only; `download` = the original (fetch if absent);
# `generated` = the generator only.
SOURCE_MODES = ("auto", "file", "download", "generated")
DEFAULT_SOURCE = "auto"
# The generated "file" of each split: a fixed HANS-sized set (seed per split), sampled like a real file.
GENERATED_SPLIT_SEEDS: dict[str, int] = {"validation": 0, "train": 1}
DOWNLOAD_TIMEOUT_S = 30.0
_FALSE_WORDS = frozenset({"0", "false", "no", "off", "n", "f"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})

TOKENS_DICT_KEYS = (
    "premise_num_words, hypothesis_num_words, premise_num_chars, hypothesis_num_chars, "
    "premise_content_words, hypothesis_content_words, lexical_overlap_ratio, full_lexical_overlap, "
    "hypothesis_is_subsequence, premise_has_negation, hypothesis_has_negation, heuristic, subcase, template"
)
_INT_KEYS = ("premise_num_words", "hypothesis_num_words", "premise_num_chars", "hypothesis_num_chars",
             "premise_content_words", "hypothesis_content_words")
_FLOAT_KEYS = ("lexical_overlap_ratio",)
_BOOL_KEYS = ("full_lexical_overlap", "hypothesis_is_subsequence", "premise_has_negation",
              "hypothesis_has_negation")
_STR_KEYS = ("heuristic", "subcase", "template")
INFO_KEYS: tuple[str, ...] = tuple(k.strip() for k in TOKENS_DICT_KEYS.split(","))
assert INFO_KEYS == (*_INT_KEYS, *_FLOAT_KEYS, *_BOOL_KEYS, *_STR_KEYS)

SYSTEM_PROMPT = (
    "You are an expert on the ways small language models fail at short natural-language inference "
    "problems. Each prompt comes from the HANS benchmark: a premise P and a hypothesis H, and the "
    "model had to answer E when H must be true whenever P is true (entailment) or N when it need "
    "not be (non-entailment). Every answer was marked right or wrong. Propose simple, testable "
    "features of a prompt that tell apart the pairs the model labels correctly from those it gets "
    "wrong. Useful directions: how many of the hypothesis words also occur in the premise "
    "(lexical overlap), whether the hypothesis is a contiguous or gapped subsequence of the premise, "
    "cues that the hypothesis is a whole constituent of the premise (clauses under if, unless, "
    "since, that, or, adverbs such as perhaps or certainly), how much longer one sentence is than "
    "the other, passives, relative clauses, conjunctions and prepositional phrases, and negation "
    "words. Each feature should capture a different idea."
)

# Line 1 of every prompt (our wording); lines 2–4 are `P: …`, `H: …`, `A:` as in the original.
INSTRUCTION = (
    "Does the premise P guarantee that the hypothesis H is true? "
    "Answer with a single letter: E if it does (entailment), N if it does not (non-entailment)."
)

# ---- tokens and pair statistics (spec 4.1) --------------------------------------------------
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)?")
_ARTICLES = frozenset({"a", "an", "the"})
NEGATION_WORDS = frozenset({"no", "not", "never", "none", "nobody", "nothing", "neither"})


def word_tokens(text: Any) -> list[str]:
    """Lower-cased word tokens: runs of letters, optionally joined to one more run by `-` or `'`."""
    return _WORD.findall(str(text or "").lower())


def content_tokens(tokens: Sequence[str]) -> list[str]:
    """Word tokens without the articles a/an/the."""
    return [t for t in tokens if t not in _ARTICLES]


def _is_subsequence(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    """True when the tokens of `needle` occur in `haystack` in the same order (gaps allowed)."""
    it = iter(haystack)
    return all(any(tok == h for h in it) for tok in needle)


def pair_statistics(premise: str, hypothesis: str) -> dict:
    """The eleven numeric/boolean row fields of a premise–hypothesis pair."""
    p_tok, h_tok = word_tokens(premise), word_tokens(hypothesis)
    p_content, h_content = content_tokens(p_tok), content_tokens(h_tok)
    h_set = set(h_content)
    ratio = len(set(p_content) & h_set) / len(h_set) if h_set else 0.0
    return {
        "premise_num_words": len(p_tok),
        "hypothesis_num_words": len(h_tok),
        "premise_num_chars": len(premise),
        "hypothesis_num_chars": len(hypothesis),
        "premise_content_words": len(p_content),
        "hypothesis_content_words": len(h_content),
        "lexical_overlap_ratio": float(ratio),
        "full_lexical_overlap": bool(ratio >= 0.999),
        "hypothesis_is_subsequence": _is_subsequence(h_tok, p_tok),
        "premise_has_negation": any(t in NEGATION_WORDS for t in p_tok),
        "hypothesis_has_negation": any(t in NEGATION_WORDS for t in h_tok),
    }


# ---- labels ---------------------------------------------------------------------------------
_GOLD_LABELS: dict[str, str] = {
    "entailment": "E", "e": "E",
    "non-entailment": "N", "non_entailment": "N", "nonentailment": "N", "non entailment": "N",
    "not-entailment": "N", "not_entailment": "N", "not entailment": "N", "n": "N",
    # three-way NLI labels collapse to HANS's two classes
    "neutral": "N", "contradiction": "N",
}


def map_gold_label(label: Any) -> str:
    """entailment → E; non-entailment (and neutral/contradiction) → N; anything else is a ValueError."""
    key = re.sub(r"\s+", " ", str(label).strip().lower())
    if key not in _GOLD_LABELS:
        raise ValueError(f"unknown gold label {label!r} (expected entailment or non-entailment)")
    return _GOLD_LABELS[key]


_NON_ENTAILMENT = re.compile(
    r"\bnon[-_ ]?entail\w*|\bnot[-_ ]?(?:an? )?entail\w*|\bno entailment\b|\bdoes not entail\b"
    r"|\bdoesn't entail\b|\bneutral\b|\bcontradict\w*"
)
_ENTAILMENT = re.compile(r"\bentail(?:ment|s|ed)?\b")
_LETTER = re.compile(r"(?<![a-z0-9'-])([en])(?![a-z0-9'-])")


def parse_predicted_label(text: Any) -> str | None:
    """The label an answer states: N, E or None (spec 4.2, read on the first non-blank line).

    Only the first non-blank line is read (the model's continuation, e.g. a new `P:` line, is
    ignored); none → None. Lower-cased, a non-entailment phrase (`non-entailment`, `non entailment`,
    `nonentailment`, `not entailment`, `not entailed`, `neutral`, `contradiction`, …) → N; else the word
    `entailment` (or `entails`/`entailed`) → E; else the last standalone letter `e`/`n`; else None.
    """
    if text is None:
        return None
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return None
    t = lines[0].strip().lower()
    if _NON_ENTAILMENT.search(t):
        return "N"
    if _ENTAILMENT.search(t):
        return "E"
    letters = _LETTER.findall(t)
    return letters[-1].upper() if letters else None


# ---- prompts --------------------------------------------------------------------------------
def build_prompt(premise: str, hypothesis: str) -> str:
    """The 4-line prompt: instruction, `P: premise`, `H: hypothesis`, `A:`."""
    return f"{INSTRUCTION}\nP: {premise}\nH: {hypothesis}\nA:"


def split_prompt(prompt: Any) -> tuple[str, str] | None:
    """(premise, hypothesis) read back from a prompt's `P: ` and `H: ` lines, or None."""
    premise = hypothesis = None
    for line in str(prompt or "").splitlines():
        if line.startswith("P: ") and premise is None:
            premise = line[3:]
        elif line.startswith("H: ") and hypothesis is None:
            hypothesis = line[3:]
    if premise is None or hypothesis is None:
        return None
    return premise, hypothesis


def make_row(premise: str, hypothesis: str, gold_label: str, *, split: str, example_id: str,
             pair_id: str | None = None, heuristic: str = "", subcase: str = "", template: str = "") -> dict:
    """One task row with every field of spec 4.1 except `dataset_index` (added by sampling)."""
    premise, hypothesis = str(premise).strip(), str(hypothesis).strip()
    row = {
        "example_id": example_id,
        "pair_id": pair_id or example_id,
        "split": split,
        "premise": premise,
        "hypothesis": hypothesis,
        "gold_label": str(gold_label).strip(),
        "expected_label": map_gold_label(gold_label),
        "heuristic": str(heuristic or "").strip(),
        "subcase": str(subcase or "").strip(),
        "template": str(template or "").strip(),
    }
    row.update(pair_statistics(premise, hypothesis))
    row["prompt"] = build_prompt(premise, hypothesis)
    return row


# ---- configuration (spec 4.1) ---------------------------------------------------------------
def normalize_split(name: Any) -> str:
    """`validation` or `train` from the split name or one of its aliases; TaskError otherwise."""
    key = str(name).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise TaskError(
            f"HANS_SPLIT={name!r} is not a HANS split; use validation (valid/dev/eval/evaluation) "
            "or train (training)"
        )
    return _SPLIT_ALIASES[key]


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = str(env.get(name, "") or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise TaskError(f"{name}={raw!r} is not an integer") from None


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = str(env.get(name, "") or "").strip().lower()
    if not raw:
        return default
    if raw in _FALSE_WORDS:
        return False
    if raw in _TRUE_WORDS:
        return True
    raise TaskError(f"{name}={raw!r} is not a yes/no value (use 1/true/yes or 0/false/no)")


@dataclass(frozen=True)
class HansConfig:
    """The HANS_* settings."""

    seed: int = DEFAULT_TASK_SEED
    split: str = DEFAULT_SPLIT
    num_examples: int = DEFAULT_NUM_EXAMPLES
    balance_labels: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    scoring: str = DEFAULT_SCORING
    cache_dir: str = DEFAULT_CACHE_DIR
    local_file: str = ""
    source: str = DEFAULT_SOURCE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "HansConfig":
        env = os.environ if env is None else env
        max_new = _env_int(env, "HANS_MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS)
        if max_new < 1:
            raise TaskError(f"HANS_MAX_NEW_TOKENS must be >= 1, got {max_new}")
        scoring = str(env.get("HANS_SCORING", "") or DEFAULT_SCORING).strip().lower()
        if scoring not in SCORING_MODES:
            raise TaskError(f"HANS_SCORING={scoring!r}: use one of {', '.join(SCORING_MODES)}")
        source = str(env.get("HANS_SOURCE", "") or DEFAULT_SOURCE).strip().lower()
        if source not in SOURCE_MODES:
            raise TaskError(f"HANS_SOURCE={source!r}: use one of {', '.join(SOURCE_MODES)}")
        return cls(
            seed=_env_int(env, "HANS_TASK_SEED", DEFAULT_TASK_SEED),
            split=normalize_split(env.get("HANS_SPLIT", "") or DEFAULT_SPLIT),
            num_examples=_env_int(env, "HANS_NUM_EXAMPLES", DEFAULT_NUM_EXAMPLES),
            balance_labels=_env_bool(env, "HANS_BALANCE_LABELS", True),
            max_new_tokens=max_new,
            scoring=scoring,
            cache_dir=str(env.get("HANS_CACHE_DIR", "") or DEFAULT_CACHE_DIR),
            local_file=str(env.get("HANS_LOCAL_FILE", "") or "").strip(),
            source=source,
        )


# ---- data file ------------------------------------------------------------------------------
def download_file(url: str, dest: str | Path, timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool = True) -> Path:
    """Fetch `url` into `dest` atomically (temp file + rename) with a progress bar.

    Any network or HTTP failure raises one TaskError that names the URL and says to set
    HANS_LOCAL_FILE; nothing is left at `dest`.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as fh, tqdm(total=total, unit="B", unit_scale=True, desc=f"HANS {dest.name}",
                                             disable=not progress, file=sys.stderr) as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    fh.write(chunk)
                    bar.update(len(chunk))
        if tmp.stat().st_size == 0:
            raise TaskError(f"downloading {url} gave an empty file")
        os.replace(tmp, dest)
    except (urllib.error.URLError, HTTPException, socket.timeout, TimeoutError, ConnectionError, ValueError,
            OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TaskError(
            f"could not download the HANS data file from {url} ({reason}). Without network access, get "
            f"{dest.name} from github.com/tommccoy1/hans by other means and set HANS_LOCAL_FILE=/path/to/"
            f"{dest.name} (or place it at {dest})"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _given_or_cached_file(cfg: HansConfig) -> Path | None:
    """HANS_LOCAL_FILE if set (TaskError if it is missing), else the split's non-empty cached file, else None."""
    if cfg.local_file:
        p = Path(cfg.local_file).expanduser()
        if not p.is_file():
            raise TaskError(f"HANS_LOCAL_FILE '{cfg.local_file}' does not exist or is not a file")
        return p
    dest = Path(cfg.cache_dir).expanduser() / SPLIT_FILES[cfg.split]
    return dest if dest.is_file() and dest.stat().st_size > 0 else None


def resolve_data_file(cfg: HansConfig, progress: bool = True) -> Path:
    """HANS_LOCAL_FILE if set (must exist), else the split's file in HANS_CACHE_DIR, downloaded if absent/empty."""
    found = _given_or_cached_file(cfg)
    if found is not None:
        return found
    name = SPLIT_FILES[cfg.split]
    dest = Path(cfg.cache_dir).expanduser() / name
    print(f"[hans] downloading {name} into {dest.parent}", file=sys.stderr, flush=True)
    return download_file(HANS_BASE_URL + name, dest, progress=progress)


@dataclass(frozen=True)
class HansSource:
    """Which data a run used: `file:<name> sha256:<first 16 hex>` or the generator's `generated:<version>`."""

    kind: str  # file | generated
    description: str


def _file_source(path: Path) -> HansSource:
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return HansSource("file", f"file:{path.name} sha256:{digest}")


def load_source_rows(cfg: HansConfig, progress: bool = True) -> tuple[list[dict], HansSource]:
    """Every labelled row of the source HANS_SOURCE selects, each tagged with `data_source`.

    `auto` never touches the network: a given or cached file wins, else the offline generator writes
    a HANS-sized set (30 000 pairs, 1 000 per subcase; a fixed seed per split), sampled like a file.
    """
    path: Path | None = None
    if cfg.source == "download":
        path = resolve_data_file(cfg, progress=progress)
    elif cfg.source in ("auto", "file"):
        path = _given_or_cached_file(cfg)
        if path is None and cfg.source == "file":
            raise TaskError(
                f"HANS_SOURCE=file but no HANS file: set HANS_LOCAL_FILE or place {SPLIT_FILES[cfg.split]} in "
                f"HANS_CACHE_DIR ({cfg.cache_dir}); HANS_SOURCE=generated or auto uses the offline generator"
            )
    if path is not None:
        rows, source = read_hans_file(path, cfg.split), _file_source(path)
    else:
        from lib.tasks.hans_templates import DATA_SOURCE, FULL_SIZE, generate_hans_rows

        print(f"[hans] no HANS file given or cached: using the offline generator ({DATA_SOURCE})",
              file=sys.stderr, flush=True)
        rows = generate_hans_rows(FULL_SIZE, GENERATED_SPLIT_SEEDS[cfg.split], split=cfg.split)
        source = HansSource("generated", DATA_SOURCE)
    for row in rows:
        row["data_source"] = source.description
    return rows, source


_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "gold_label": ("gold_label", "label"),
    "premise": ("sentence1", "premise"),
    "hypothesis": ("sentence2", "hypothesis"),
    "heuristic": ("heuristic",),
    "subcase": ("subcase",),
    "template": ("template",),
    "pair_id": ("pairID", "pair_id", "pairid"),
}
_REQUIRED = ("gold_label", "premise", "hypothesis")


def _find_columns(header: Sequence[str], path: Path) -> dict[str, int | None]:
    """Column index of each field (first matching name, case-insensitive); TaskError if one required is missing."""
    lowered = [h.strip().lower() for h in header]
    found: dict[str, int | None] = {}
    for field_name, names in _FIELD_NAMES.items():
        found[field_name] = next((lowered.index(n.lower()) for n in names if n.lower() in lowered), None)
        if found[field_name] is None and field_name in _REQUIRED:
            raise TaskError(
                f"HANS file '{path}': header has no column {' or '.join(names)} "
                f"(header: {', '.join(h.strip() for h in header) or 'empty'})"
            )
    return found


def read_hans_file(path: str | Path, split: str = DEFAULT_SPLIT) -> list[dict]:
    """Rows of a HANS TSV file (header line first); rows with an empty or `-` gold label are skipped.

    `example_id` is `<split>_<i>` with i the 0-based data-line number (skipped lines included), and
    is also the `pair_id` when the file has no pairID column or the cell is empty.
    """
    path = Path(path)
    split = normalize_split(split)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise TaskError(f"HANS file '{path}' is empty")
            cols = _find_columns(header, path)
            rows: list[dict] = []
            for i, cells in enumerate(reader):
                if not any(c.strip() for c in cells):
                    continue  # blank line

                def cell(name: str) -> str:
                    j = cols[name]
                    return cells[j].strip() if j is not None and j < len(cells) else ""

                label = cell("gold_label")
                if label in ("", "-"):
                    continue
                example_id = f"{split}_{i}"
                try:
                    rows.append(make_row(
                        cell("premise"), cell("hypothesis"), label, split=split, example_id=example_id,
                        pair_id=cell("pair_id") or example_id, heuristic=cell("heuristic"),
                        subcase=cell("subcase"), template=cell("template"),
                    ))
                except ValueError as exc:
                    raise TaskError(f"HANS file '{path}', data line {i + 1}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise TaskError(f"HANS file '{path}' is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise TaskError(f"HANS file '{path}' cannot be read ({exc})") from None
    if not rows:
        raise TaskError(f"HANS file '{path}' has no labelled rows")
    return rows


# ---- sampling (spec 4.1) --------------------------------------------------------------------
def sample_rows(rows: Sequence[dict], n: int, balance: bool, seed: int) -> list[dict]:
    """The sampled rows (copies) with `dataset_index` = position.

    n ≤ 0 or n ≥ len(rows): all rows in file order. Unbalanced: `random.Random(seed).sample(rows, n)`.
    Balanced: n//2 entailment rows, then n − n//2 non-entailment rows (each a seeded sample),
    concatenated and shuffled with the same generator; a TaskError if a label has too few rows.
    """
    rows = list(rows)
    rng = random.Random(seed)
    if n <= 0 or n >= len(rows):
        chosen = rows
    elif not balance:
        chosen = rng.sample(rows, n)
    else:
        pos = [r for r in rows if r["expected_label"] == "E"]
        neg = [r for r in rows if r["expected_label"] == "N"]
        n_pos, n_neg = n // 2, n - n // 2
        if len(pos) < n_pos or len(neg) < n_neg:
            raise TaskError(
                f"HANS_NUM_EXAMPLES={n} with HANS_BALANCE_LABELS on needs {n_pos} entailment and {n_neg} "
                f"non-entailment rows, but the data has {len(pos)} and {len(neg)}; lower HANS_NUM_EXAMPLES "
                "or set HANS_BALANCE_LABELS=0"
            )
        chosen = rng.sample(pos, n_pos) + rng.sample(neg, n_neg)
        rng.shuffle(chosen)
    return [{**r, "dataset_index": i} for i, r in enumerate(chosen)]


# ---- info (spec 4.2) ------------------------------------------------------------------------
def _field(row: Any, key: str) -> Any:
    """`row[key]` / `row.key`, None when absent or missing (NaN / pd.NA)."""
    value = row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)
    try:
        if value is None or bool(pd.isna(value)):
            return None
    except (TypeError, ValueError):
        pass
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_WORDS
    return bool(value)


def info_from_row(row: Any) -> dict:
    """The 14 `info` keys of a row (dict or namedtuple), cast to int/float/bool/str.

    Missing numeric/boolean fields are recomputed from the prompt's `P:`/`H:` lines; missing
    heuristic/subcase/template become "".
    """
    recomputed: dict | None = None
    info: dict[str, Any] = {}
    for key in INFO_KEYS:
        value = _field(row, key)
        if value is None and key not in _STR_KEYS:
            if recomputed is None:
                parts = split_prompt(_field(row, "prompt"))
                if parts is None:
                    raise TaskError(
                        f"HANS row has no '{key}' field and its prompt has no 'P: '/'H: ' lines to rebuild it from"
                    )
                recomputed = pair_statistics(*parts)
            value = recomputed[key]
        if key in _INT_KEYS:
            info[key] = int(value)
        elif key in _FLOAT_KEYS:
            info[key] = float(value)
        elif key in _BOOL_KEYS:
            info[key] = _as_bool(value)
        else:
            info[key] = "" if value is None else str(value)
    return info


# ---- seed features (spec 4.2; fixed so that all 11 run) -------------------------------------
def _seed(label: str, description: str, src: str) -> Feature:
    return Feature(label=label, description=description, python_src=src, origin="predefined")


def _flag_seed(label: str, fn: str, key: str, description: str) -> Feature:
    src = (
        f"def {fn}(prompt, info):\n"
        f"    return 1.0 if bool(info.get({key!r})) else 0.0\n"
    )
    return _seed(label, description, src)


def _value_seed(label: str, fn: str, key: str, description: str) -> Feature:
    """A seed returning the numeric `info[key]` (None when absent)."""
    src = (
        f"def {fn}(prompt, info):\n"
        f"    value = info.get({key!r})\n"
        f"    return None if value is None else float(value)\n"
    )
    return _seed(label, description, src)


def _heuristic_seed(label: str, fn: str, name: str) -> Feature:
    src = (
        f"def {fn}(prompt, info):\n"
        f"    return 1.0 if str(info.get('heuristic') or '').strip().lower() == {name!r} else 0.0\n"
    )
    return _seed(label, f"1 if the HANS heuristic of the pair is {name}, else 0.", src)


def _build_seed_features() -> list[Feature]:
    return [
        _value_seed("Lexical overlap ratio", "lexical_overlap_ratio", "lexical_overlap_ratio",
                    "Share of the hypothesis's distinct content words (articles removed) that also occur in the premise."),
        _flag_seed("Full lexical overlap", "full_lexical_overlap", "full_lexical_overlap",
                   "1 if every content word of the hypothesis occurs in the premise, else 0."),
        _flag_seed("Hypothesis is subsequence", "hypothesis_is_subsequence", "hypothesis_is_subsequence",
                   "1 if the hypothesis words appear in the premise in the same order (gaps allowed), else 0."),
        _value_seed("Premise length", "premise_length", "premise_num_words", "Number of word tokens in the premise."),
        _value_seed("Hypothesis length", "hypothesis_length", "hypothesis_num_words",
                    "Number of word tokens in the hypothesis."),
        _seed("Hypothesis shorter than premise",
              "1 if the hypothesis has fewer word tokens than the premise, else 0.",
              "def hypothesis_shorter_than_premise(prompt, info):\n"
              "    p = info.get('premise_num_words')\n"
              "    h = info.get('hypothesis_num_words')\n"
              "    if p is None or h is None:\n"
              "        return None\n"
              "    return 1.0 if h < p else 0.0\n"),
        _flag_seed("Premise has negation", "premise_has_negation", "premise_has_negation",
                   "1 if the premise contains no, not, never, none, nobody, nothing or neither, else 0."),
        _flag_seed("Hypothesis has negation", "hypothesis_has_negation", "hypothesis_has_negation",
                   "1 if the hypothesis contains no, not, never, none, nobody, nothing or neither, else 0."),
        _heuristic_seed("Lexical overlap heuristic", "lexical_overlap_heuristic", "lexical_overlap"),
        _heuristic_seed("Subsequence heuristic", "subsequence_heuristic", "subsequence"),
        _heuristic_seed("Constituent heuristic", "constituent_heuristic", "constituent"),
    ]


SEED_FEATURES: list[Feature] = _build_seed_features()
# The default answer length; `HansNliTask.MAX_NEW_TOKENS` reads HANS_MAX_NEW_TOKENS each time it is used.
MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS


# ---- the task -------------------------------------------------------------------------------
def _rows_expected_label(row: Any) -> str:
    expected = _field(row, "expected_label")
    if expected in ("E", "N"):
        return expected
    gold = _field(row, "gold_label")
    if gold is None:
        raise TaskError("HANS row has neither 'expected_label' nor 'gold_label'")
    try:
        return map_gold_label(gold)
    except ValueError as exc:
        raise TaskError(f"HANS row: {exc}") from None


def _group_accuracy(df: pd.DataFrame, column: str) -> dict:
    if column not in df.columns:
        return {}
    return {
        str(k): {"accuracy": float(g["is_correct"].astype(bool).mean()), "n": int(len(g))}
        for k, g in df.groupby(df[column].fillna("").astype(str), sort=True)
    }


class HansNliTask(TaskSpec):
    """HANS premise/hypothesis pairs answered E or N (spec §4)."""

    name = "hans_nli"
    SYSTEM_PROMPT = SYSTEM_PROMPT
    TOKENS_DICT_KEYS = TOKENS_DICT_KEYS
    SEED_FEATURES = SEED_FEATURES

    @property
    def MAX_NEW_TOKENS(self) -> int:  # type: ignore[override]  # read at use: HANS_MAX_NEW_TOKENS
        """One token (the label) under log-likelihood scoring, else HANS_MAX_NEW_TOKENS."""
        cfg = HansConfig.from_env()
        return 1 if cfg.scoring == "loglik" else cfg.max_new_tokens

    def answer_choices(self) -> AnswerChoices | None:
        """" E" / " N" scored by log-likelihood (HANS_SCORING=loglik, the default), else None."""
        return LABEL_CHOICES if HansConfig.from_env().scoring == "loglik" else None

    def config(self) -> HansConfig:
        return HansConfig.from_env()

    # ---- stage 1 ---------------------------------------------------------------------------
    def generation_stop_strings(self, args: Any = None, model_alias: str | None = None) -> tuple[str, ...]:
        """None: the 3-token budget is the stop, as in the original, so raw outputs match it.

        A literal "\n" stop would cut an answer that starts with a newline (`"\nE"`) to nothing;
        instead scoring reads the first non-blank line of the answer (`parse_predicted_label`).
        """
        return ()

    def load_rows(self, cfg: HansConfig | None = None, progress: bool = True) -> list[dict]:
        """Every labelled row of the source HANS_SOURCE selects (a HANS file or the offline generator)."""
        return load_source_rows(cfg or self.config(), progress=progress)[0]

    def build_prompts(self, args: argparse.Namespace | None = None, model_alias: str | None = None) -> list[dict]:
        """Sampled HANS rows (spec 4.1); `args.max_prompts > 0` replaces HANS_NUM_EXAMPLES."""
        cfg = self.config()
        progress = not bool(getattr(args, "no_progress", False))
        rows = self.load_rows(cfg, progress=progress)
        n = int(getattr(args, "max_prompts", 0) or 0) or cfg.num_examples
        return sample_rows(rows, n, cfg.balance_labels, cfg.seed)

    def assemble_cache(self, records: Sequence[dict], answers: Sequence[str], args: Any = None,
                       label_loglik: Sequence[Sequence[float]] | None = None) -> list[dict]:
        """Row fields + `raw_output`, `predicted_label`, `is_correct`, in record order.

        Under log-likelihood scoring also `answer_scoring` ("loglik"), `loglik_E`, `loglik_N` (per-token
        normalised) and `label_margin`: the expected label's score minus the other's (> 0 ⇔ correct)."""
        if len(records) != len(answers):
            raise ValueError(f"assemble_cache: {len(records)} records but {len(answers)} answers")
        if label_loglik is not None and len(label_loglik) != len(records):
            raise ValueError(f"assemble_cache: {len(records)} records but {len(label_loglik)} label scores")
        out: list[dict] = []
        for k, (rec, answer) in enumerate(zip(records, answers)):
            predicted = parse_predicted_label(answer)
            row = {**rec, "raw_output": answer, "predicted_label": predicted,
                   "is_correct": predicted is not None and predicted == rec["expected_label"],
                   "answer_scoring": "generate" if label_loglik is None else "loglik"}
            if label_loglik is not None:
                scores = dict(zip(LABEL_CHOICES.labels, map(float, label_loglik[k])))
                other = "N" if rec["expected_label"] == "E" else "E"
                row.update(loglik_E=scores["E"], loglik_N=scores["N"],
                           label_margin=scores[rec["expected_label"]] - scores[other])
            out.append(row)
        return out

    # ---- later stages ----------------------------------------------------------------------
    def load_dataset_from_cache(self, path: str) -> pd.DataFrame:
        """The stage-1 pickle (a list of row dicts) as a DataFrame; prompts stripped, `is_correct` bool."""
        data = load_pickle(path, what="HANS stage-1 cache")
        if not isinstance(data, (list, tuple)) or not all(isinstance(r, Mapping) for r in data):
            raise TaskError(
                f"HANS stage-1 cache '{path}' holds a {type(data).__name__}"
                f"{'' if not isinstance(data, (list, tuple)) else ' with non-dict items'}, expected a list of row dicts"
            )
        df = pd.DataFrame([dict(r) for r in data])
        for needed in ("prompt", "raw_output"):
            if needed not in df.columns:
                raise TaskError(f"HANS stage-1 cache '{path}': rows have no '{needed}' field")
        if "is_correct" not in df.columns:
            expected = [_rows_expected_label(r) for r in data]
            df["is_correct"] = [parse_predicted_label(a) == e for a, e in zip(df["raw_output"], expected)]
        df = df[df["prompt"].notna()].copy()
        df["prompt"] = df["prompt"].astype(str).str.strip()
        df = df[df["prompt"] != ""]
        df["is_correct"] = df["is_correct"].fillna(False).astype(bool)
        return df.reset_index(drop=True)

    def parse_prompt_row(self, row: Any) -> dict:
        """The 14 `info` keys of TOKENS_DICT_KEYS for a row (namedtuple or dict)."""
        return info_from_row(row)

    def is_answer_positive(self, rows: Sequence[Any], responses: Sequence[str]) -> list[bool]:
        """Whether each response states its row's expected label."""
        if len(rows) != len(responses):
            raise ValueError(f"is_answer_positive: {len(rows)} rows but {len(responses)} responses")
        return [parse_predicted_label(resp) == _rows_expected_label(r) for r, resp in zip(rows, responses)]

    def get_basic_statistics(self, df: pd.DataFrame) -> dict:
        """Generic stats plus label counts and accuracy by heuristic and subcase (spec 4.2 stats hook)."""
        stats = generic_dataset_stats(df, self.DEFAULT_TARGETS)
        correct = df["is_correct"].astype(bool) if "is_correct" in df.columns else pd.Series(dtype=bool)
        stats["n_examples"] = int(len(df))
        if "data_source" in df.columns and df["data_source"].notna().any():
            sources = sorted(str(x) for x in df["data_source"].dropna().unique())
            stats["data_source"] = sources[0] if len(sources) == 1 else sources
        if "answer_scoring" in df.columns and df["answer_scoring"].notna().any():
            modes = sorted(str(x) for x in df["answer_scoring"].dropna().unique())
            stats["answer_scoring"] = modes[0] if len(modes) == 1 else modes
        stats["accuracy"] = float(correct.mean()) if len(correct) else None
        if "expected_label" in df.columns:
            stats["label_counts"] = {str(k): int(v) for k, v in df["expected_label"].value_counts().sort_index().items()}
        if "predicted_label" in df.columns:
            pred = df["predicted_label"].where(df["predicted_label"].notna(), "None").astype(str)
            stats["predicted_label_counts"] = {str(k): int(v) for k, v in pred.value_counts().sort_index().items()}
        if "is_correct" in df.columns:
            stats["accuracy_by_heuristic"] = _group_accuracy(df, "heuristic")
            stats["accuracy_by_subcase"] = _group_accuracy(df, "subcase")
        return stats


TASK_SPEC = HansNliTask()
