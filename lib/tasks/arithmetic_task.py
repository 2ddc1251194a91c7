"""Arithmetic task (spec §2): `a<op>b=` prompts, numeric answer scoring, `info` parse, seed features.

Scoring differs from the original on purpose (see docs/DEVIATIONS_arithmetic.md): answers are
compared numerically, divisions with an explicit rounding/truncation policy, and prompts with a
few-shot prefix are scored on their last query and on the first line of the answer.
Nothing here evaluates prompt text as code.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Sequence

import pandas as pd

from lib.core.files_and_cache import load_pickle
from lib.features.feature import Feature
from lib.tasks.subsample import stratified_subsample
from lib.tasks.base import TaskError, TaskSpec
from lib.tasks.arithmetic_seed_features import build_seed_features

__all__ = [
    "OPERATORS",
    "SYSTEM_PROMPT",
    "TOKENS_DICT_KEYS",
    "MAX_NEW_TOKENS",
    "SEED_FEATURES",
    "to_number",
    "extract_single_number",
    "query_expression",
    "has_few_shot_prefix",
    "parse_arithmetic_prompt",
    "answer_region",
    "true_result",
    "is_answer_correct",
    "is_pure_number",
    "ArithmeticTask",
    "TASK_SPEC",
]

OPERATORS: tuple[str, ...] = ("+", "-", "*", "/")
DEFAULT_OPERAND_RANGE: tuple[int, int] = (0, 300)

# Small embedded models almost never answer a raw `a+b=` (SmolLM2: 0 % on [0,300), 2 % on
# [0,30)). With this solved-example block and operands in [0,30) SmolLM2-135M answers
# ~17 % correctly and Gemma-3-270m ~31 %, so both classes of `is_correct` are populated.
FEW_SHOT_PREFIX = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
SMALL_MODEL_OPERAND_RANGE: tuple[int, int] = (0, 30)
MAX_NEW_TOKENS = 6
TOKENS_DICT_KEYS = "operator, operand_a, operand_b, len_a, len_b, digits_a, digits_b"

SYSTEM_PROMPT = (
    "You are a careful data analyst who studies when a language model gets arithmetic right. "
    "The model was asked to complete prompts of the form a+b=, a-b=, a*b= and a/b= and each answer "
    "was marked correct or incorrect. Propose short, testable features of a prompt whose value "
    "tends to be high (or present) when the answer is correct and low (or absent) when it is "
    "wrong, or the other way round. Each feature should capture a different idea from the "
    "others. Useful directions include the operator, the size of the operands and of the "
    "result, digit patterns, even and odd numbers, carries and borrows, divisibility, how the "
    "two operands compare in size, and whether values fall in particular ranges."
)

_SEPARATORS = re.compile(r"[\n;]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPERAND = r"[+-]?[0-9]+(?:\.[0-9]+)?"
_EXPRESSION = re.compile(rf"\s*({_OPERAND})\s*([-+*/%])\s*({_OPERAND})\s*=?\s*")
_OPERATOR_ALIASES = str.maketrans({"×": "*", "·": "*", "∙": "*", "x": "*", "X": "*", "÷": "/"})


# ---- number parsing (spec 2.1) -------------------------------------------------------------
def to_number(s: Any) -> int | float | None:
    """int(s), else float(s), else None: the whole text as one number, whitespace tolerated."""
    for conv in (int, float):
        try:
            return conv(s)
        except (TypeError, ValueError, OverflowError):
            continue
    return None


def _single_number_text(s: Any) -> str | None:
    """The text of the only signed int/decimal in s, or None when there are zero or several."""
    if not isinstance(s, str):
        return None
    matches = _NUMBER.findall(s)
    return matches[0] if len(matches) == 1 else None


def extract_single_number(s: Any) -> int | float | None:
    """The value of the only signed int/decimal in s (float if dotted), else None."""
    text = _single_number_text(s)
    if text is None:
        return None
    return float(text) if "." in text else int(text)


# ---- prompt parsing (spec 2.3) -------------------------------------------------------------
def query_expression(prompt: str) -> str:
    """The arithmetic query of a prompt: text after the last newline or ';' (few-shot prefixes), stripped."""
    text = str(prompt).rstrip()
    return _SEPARATORS.split(text)[-1].strip()


def has_few_shot_prefix(prompt: str) -> bool:
    """True when solved examples precede the query (a newline or ';' inside the stripped prompt)."""
    return _SEPARATORS.search(str(prompt).strip()) is not None


def _empty_info() -> dict:
    return {
        "operator": None, "operand_a": None, "operand_b": None, "a_int": None, "b_int": None,
        "len_a": None, "len_b": None, "digits_a": [], "digits_b": [], "sign_a": None, "sign_b": None,
    }


def parse_arithmetic_prompt(prompt: str) -> dict:
    """The `info` dict of a prompt's query (operator, operands, digit facts); all None when unparsable."""
    info = _empty_info()
    if not isinstance(prompt, str):
        return info
    m = _EXPRESSION.fullmatch(query_expression(prompt).translate(_OPERATOR_ALIASES))
    if m is None:
        return info
    text_a, op, text_b = m.groups()
    info["operator"] = op
    for suffix, text in (("a", text_a), ("b", text_b)):
        dotted = "." in text
        info[f"operand_{suffix}"] = float(text)
        info[f"{suffix}_int"] = None if dotted else int(text)
        info[f"len_{suffix}"] = sum(ch.isdigit() for ch in text)
        info[f"digits_{suffix}"] = [] if dotted else [int(ch) for ch in text if ch.isdigit()]
        info[f"sign_{suffix}"] = -1 if text.startswith("-") else 1
    return info


# ---- scoring (spec 2.1, with the fixes of spec 9) -----------------------------------------
def answer_region(prompt: str, answer: str) -> str:
    """The part of the answer that is scored: up to the first newline/';' after a few-shot prefix, else all."""
    answer = "" if answer is None else str(answer)
    if has_few_shot_prefix(prompt):
        return _SEPARATORS.split(answer, maxsplit=1)[0]
    return answer


def _exact_operand(info: Mapping, suffix: str) -> Fraction | None:
    """An operand as an exact rational: the parsed int, else the decimal the float was written as."""
    as_int = info.get(f"{suffix}_int")
    if as_int is not None:
        return Fraction(int(as_int))
    as_float = info.get(f"operand_{suffix}")
    if as_float is None:
        return None
    return Fraction(repr(float(as_float)))


def _exact_result(info: Mapping) -> Fraction | None:
    """The exact rational result of the parsed query, or None (unparsed, unknown op, division by 0)."""
    op = info.get("operator")
    a, b = _exact_operand(info, "a"), _exact_operand(info, "b")
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op in ("/", "%"):
        if b == 0:
            return None
        return a / b if op == "/" else a % b
    return None


def true_result(info: Mapping) -> int | float | None:
    """The true result of the query: an int for + - * % of integers, a float otherwise (/ is true division)."""
    exact = _exact_result(info)
    if exact is None:
        return None
    integers = info.get("a_int") is not None and info.get("b_int") is not None
    if integers and info.get("operator") != "/":
        return int(exact)
    return float(exact)


def _answer_value(region: str) -> tuple[Fraction, int] | None:
    """The number an answer region states, exactly, with its count of written decimal places."""
    text = region.strip()
    if to_number(text) is None:
        text = _single_number_text(region)
        if text is None:
            return None
    try:
        dec = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    if not dec.is_finite():
        return None
    exponent = dec.as_tuple().exponent
    return Fraction(dec), max(0, -int(exponent))


def _round_half_away(x: Fraction) -> int:
    """x rounded to the nearest integer, halves away from zero (round-half-up on magnitudes)."""
    magnitude = (abs(x.numerator) * 2 + x.denominator) // (2 * x.denominator)
    return magnitude if x >= 0 else -magnitude


def is_answer_correct(prompt: str, answer: str) -> bool:
    """Numeric correctness: equal to an integral truth, else the truth rounded or truncated to the answer's decimals."""
    truth = _exact_result(parse_arithmetic_prompt(prompt))
    if truth is None:
        return False
    parsed = _answer_value(answer_region(prompt, answer))
    if parsed is None:
        return False
    value, places = parsed
    if truth.denominator == 1:
        return value == truth
    scale = 10**places
    scaled_truth = truth * scale
    scaled_value = value * scale  # an integer: the answer has exactly `places` decimals
    return scaled_value in (int(scaled_truth), _round_half_away(scaled_truth))  # truncation, rounding


def is_pure_number(prompt: str, answer: str) -> bool:
    """True when the stripped answer region is exactly one number (it parses whole and equals its single match)."""
    text = answer_region(prompt, answer).strip()
    whole = to_number(text)
    if whole is None:
        return False
    single = extract_single_number(text)
    return single is not None and whole == single


# ---- the task ------------------------------------------------------------------------------
def _row_prompt(row: Any) -> str:
    """The `prompt` field of a dict or namedtuple row."""
    if isinstance(row, Mapping):
        return row["prompt"]
    return getattr(row, "prompt")


SEED_FEATURES: list[Feature] = build_seed_features()


class ArithmeticTask(TaskSpec):
    """Two-operand integer arithmetic over a grid of operands (spec §2)."""

    name = "arithmetic"
    MAX_NEW_TOKENS = MAX_NEW_TOKENS
    SYSTEM_PROMPT = SYSTEM_PROMPT
    TOKENS_DICT_KEYS = TOKENS_DICT_KEYS
    SEED_FEATURES = SEED_FEATURES

    # ---- stage 1 ---------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("arithmetic task")
        group.add_argument("--prompt_format", choices=["auto", "raw", "few_shot"], default="auto",
                           help="raw: `a+b=` as in the paper; few_shot: prefix of solved examples, one per "
                                "line, answer read up to the first newline; auto: few_shot for the embedded "
                                "small models, raw otherwise")
        group.add_argument("--operand_range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                           help="half-open operand range [LO, HI) (default: 0 300; 0 30 for embedded models)")

    def resolve_prompt_settings(self, args: Any, model_alias: str | None) -> tuple[str, tuple[int, int]]:
        """(few-shot prefix, operand range) after resolving `auto` defaults for the model."""
        from lib.models.resolution import EMBEDDED_MODELS

        small = model_alias in EMBEDDED_MODELS
        fmt = getattr(args, "prompt_format", None) or "auto"
        if fmt == "auto":
            fmt = "few_shot" if small else "raw"
        prefix = getattr(args, "few_shot_prefix", None)
        if prefix is None:
            prefix = FEW_SHOT_PREFIX if fmt == "few_shot" else ""
        rng = getattr(args, "operand_range", None)
        if rng is None:
            rng = SMALL_MODEL_OPERAND_RANGE if small else DEFAULT_OPERAND_RANGE
        return prefix, (int(rng[0]), int(rng[1]))

    def generation_stop_strings(self, args: Any, model_alias: str | None = None) -> tuple[str, ...]:
        """Few-shot prompts: the answer ends at the first newline (the model continues the list)."""
        prefix, _ = self.resolve_prompt_settings(args, model_alias)
        return ("\n",) if prefix else ()

    def build_prompts(self, args: argparse.Namespace | None, model_alias: str | None = None) -> list[dict]:
        """The operand grid in construction order (operators + - * /, a outer, b inner; '/' skips operand 0).

        Optional args: `operand_range` (lo, hi) half-open, default (0, 300); `few_shot_prefix`
        (prepended; must end with a newline or ';'); `max_prompts` (0 = all) with a seeded
        (`seed`, default 0) operator-stratified subsample.
        """
        prefix, (lo, hi) = self.resolve_prompt_settings(args, model_alias)
        if hi <= lo:
            raise ValueError(f"--operand_range: upper bound {hi} must exceed lower bound {lo}")
        if prefix and not prefix.rstrip(" \t").endswith(("\n", ";")):
            raise ValueError("few_shot_prefix must end with a newline or ';' so the query can be found")
        records: list[dict] = []
        for op in OPERATORS:
            for a in range(lo, hi):
                for b in range(lo, hi):
                    # Division skips operand 0 on both sides: [1,300)² by default, which gives
                    # the spec's count 3·300² + 299² = 359,401 prompts.
                    if op == "/" and (a == 0 or b == 0):
                        continue
                    records.append({"prompt": f"{prefix}{a}{op}{b}=", "operator": op})
        max_prompts = int(getattr(args, "max_prompts", 0) or 0)
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {max_prompts}")
        if max_prompts:
            seed = getattr(args, "seed", None)
            records = stratified_subsample(records, "operator", max_prompts, 0 if seed is None else int(seed))
        return records

    def assemble_cache(self, records: Sequence[dict], answers: Sequence[str], args: Any = None) -> dict:
        """Score answers into {operator: [(prompt, num_out, raw_answer, is_correct, is_pure), ...]} in + - * / order."""
        if len(records) != len(answers):
            raise ValueError(f"assemble_cache: {len(records)} records but {len(answers)} answers")
        groups: dict[str, list[tuple]] = {}
        for rec, answer in zip(records, answers):
            prompt = rec["prompt"]
            op = rec.get("operator") or parse_arithmetic_prompt(prompt)["operator"] or "?"
            region = answer_region(prompt, answer)
            groups.setdefault(op, []).append(
                (prompt, extract_single_number(region), answer,
                 is_answer_correct(prompt, answer), is_pure_number(prompt, answer))
            )
        order = [op for op in OPERATORS if op in groups] + [op for op in groups if op not in OPERATORS]
        return {op: groups[op] for op in order}

    # ---- later stages ----------------------------------------------------------------------
    def load_dataset_from_cache(self, path: str) -> pd.DataFrame:
        """The stage-1 pickle as a DataFrame (spec 2.2): one row per distinct non-empty prompt."""
        data = load_pickle(path, what="arithmetic stage-1 cache")
        if not isinstance(data, dict):
            raise TaskError(
                f"arithmetic stage-1 cache '{path}' holds a {type(data).__name__}, expected a dict "
                "operator -> list of (prompt, num_out, raw_output, is_correct, is_pure) tuples"
            )
        rows: list[dict] = []
        for op, entries in data.items():
            if not isinstance(entries, (list, tuple)):
                raise TaskError(
                    f"arithmetic stage-1 cache '{path}': entry for operator {op!r} is a "
                    f"{type(entries).__name__}, expected a list of 5-tuples"
                )
            for item in entries:
                if not isinstance(item, (list, tuple)) or len(item) < 5:
                    continue
                prompt, num_out, raw, correct, pure = item[:5]
                if prompt is None or (isinstance(prompt, float) and prompt != prompt):
                    continue
                prompt = str(prompt).strip()
                if not prompt:
                    continue
                rows.append({
                    "operator_group": op,
                    "prompt": prompt,
                    "num_out": None if num_out is None else float(num_out),
                    "raw_output": raw,
                    "is_correct": bool(correct),
                    "is_pure": bool(pure),
                })
        columns = ["operator_group", "prompt", "num_out", "raw_output", "is_correct", "is_pure"]
        df = pd.DataFrame(rows, columns=columns)
        df["num_out"] = df["num_out"].astype(float)
        df["is_correct"] = df["is_correct"].astype(bool)
        df["is_pure"] = df["is_pure"].astype(bool)
        return df.drop_duplicates(subset="prompt", keep="first").reset_index(drop=True)

    def parse_prompt_row(self, row: Any) -> dict:
        """The `info` dict of a row's prompt (row: namedtuple or dict with `prompt`)."""
        return parse_arithmetic_prompt(_row_prompt(row))

    def is_answer_positive(self, rows: Sequence[Any], responses: Sequence[str]) -> list[bool]:
        """is_answer_correct for each (row prompt, response) pair."""
        if len(rows) != len(responses):
            raise ValueError(f"is_answer_positive: {len(rows)} rows but {len(responses)} responses")
        return [is_answer_correct(_row_prompt(r), resp) for r, resp in zip(rows, responses)]


TASK_SPEC = ArithmeticTask()
