"""Tests of the arithmetic task: number parsing, scoring policy, info parse, 86 seed features, cache I/O."""

from __future__ import annotations

import argparse
import pickle
from collections import namedtuple

import pandas as pd
import pytest

from lib.core.files_and_cache import ArtifactError
from lib.tasks.subsample import stratified_subsample
from lib.tasks.base import TaskError, load_task, row_as_namedtuple
from lib.tasks import arithmetic_task as at
from lib.tasks.arithmetic_seed_features import build_seed_features, make_closed_bins

FEATURES = {f.label: f for f in at.SEED_FEATURES}


def feat(label: str, prompt: str):
    return FEATURES[label](prompt, at.parse_arithmetic_prompt(prompt))


# ---- number helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [("7", 7), (" -7 \n", -7), ("2.5", 2.5), ("7.0", 7.0), ("1e3", 1000.0), ("seven", None),
     ("", None), ("7 8", None), (None, None)],
)
def test_to_number(text, expected):
    got = at.to_number(text)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "text, expected",
    [("The answer is 7", 7), ("-12.5 apples", -12.5), ("7, 8", None), ("none", None), ("", None),
     ("x=-3", -3), ("1e3", None)],
)
def test_extract_single_number(text, expected):
    got = at.extract_single_number(text)
    assert got == expected and type(got) is type(expected)


# ---- query / info parse -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, query",
    [("12+7=", "12+7="), ("3+5=8\n9-4=5\n6*7=42\n8/2=4\n12+7=", "12+7="), ("2+2=4; 3+3=", "3+3="),
     ("1+1=2\n 4*5 = \n", "4*5 ="), ("  9/3=  ", "9/3=")],
)
def test_query_expression(prompt, query):
    assert at.query_expression(prompt) == query


def test_parse_plain_prompt():
    assert at.parse_arithmetic_prompt("17+208=") == {
        "operator": "+", "operand_a": 17.0, "operand_b": 208.0, "a_int": 17, "b_int": 208,
        "len_a": 2, "len_b": 3, "digits_a": [1, 7], "digits_b": [2, 0, 8], "sign_a": 1, "sign_b": 1,
    }


@pytest.mark.parametrize(
    "prompt, op, a, b",
    [("3×4=", "*", 3, 4), ("8÷2=", "/", 8, 2), ("3 x 4 =", "*", 3, 4), ("3X4", "*", 3, 4),
     ("6·7=", "*", 6, 7), ("6∙7=", "*", 6, 7), (" 12 + 7 = ", "+", 12, 7), ("7%3=", "%", 7, 3),
     ("3--4=", "-", 3, -4), ("-3+-4=", "+", -3, -4), ("+3+4=", "+", 3, 4),
     ("1+1=2\n2*9=", "*", 2, 9)],
)
def test_parse_operators_and_spacing(prompt, op, a, b):
    info = at.parse_arithmetic_prompt(prompt)
    assert info["operator"] == op
    assert info["operand_a"] == float(a) and isinstance(info["operand_a"], float)
    assert info["operand_b"] == float(b) and isinstance(info["operand_b"], float)
    assert info["a_int"] == a and info["b_int"] == b


def test_parse_decimals_and_signs():
    info = at.parse_arithmetic_prompt("-12.5*3=")
    assert info["operand_a"] == -12.5 and info["a_int"] is None
    assert info["len_a"] == 3 and info["digits_a"] == [] and info["sign_a"] == -1
    assert info["operand_b"] == 3.0 and info["b_int"] == 3 and info["digits_b"] == [3] and info["sign_b"] == 1


@pytest.mark.parametrize("prompt", ["hello", "", "3+4+5=", "3+=", "3+4=7", "3 4=", "abc+1=", "1.+2=", None])
def test_parse_garbage(prompt):
    info = at.parse_arithmetic_prompt(prompt)
    assert info["digits_a"] == [] and info["digits_b"] == []
    assert all(v is None for k, v in info.items() if not k.startswith("digits"))
    assert set(info) == {"operator", "operand_a", "operand_b", "a_int", "b_int", "len_a", "len_b",
                         "digits_a", "digits_b", "sign_a", "sign_b"}


# ---- scoring ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, answer, expected",
    [
        # division policy: integer truth compared numerically, else rounding or truncation
        ("7/3=", "2", True), ("7/3=", "2.33", True), ("7/3=", "2.3", True), ("7/3=", "2.34", False),
        ("20/3=", "6.67", True), ("20/3=", "6.66", True), ("20/3=", "7", True), ("20/3=", "6.6", True),
        ("20/3=", "6.7", True), ("20/3=", "6.5", False), ("20/3=", "6.68", False),
        ("15/1=", "1", False), ("15/1=", "15", True), ("15/1=", "15.0", True), ("15/1=", "1.5", False),
        ("2/3=", "0", True), ("2/3=", "1", True), ("2/3=", "0.5", False), ("2/3=", "0.67", True),
        ("6/3=", "2", True), ("6/3=", "2.00", True), ("6/3=", "2.5", False),
        ("1/8=", "0.13", True), ("1/8=", "0.12", True), ("1/8=", "0.2", False), ("1/8=", "0.125", True),
        ("-7/2=", "-3.5", True), ("-7/2=", "-4", True), ("-7/2=", "-3", True), ("-7/2=", "4", False),
        ("5/0=", "0", False),
        # + - * : numeric equality
        ("3+4=", "7", True), ("3+4=", "7.0", True), ("3+4=", "+7", True), ("3+4=", "7.5", False), ("3+4=", "8", False),
        ("3-10=", "-7", True), ("3-10=", "7", False), ("0-0=", "-0", True), ("12*12=", "144", True),
        ("0.1+0.2=", "0.3", True), ("1.5*2=", "3", True),
        # extra text, number words, empty and whitespace
        ("3+4=", "The answer is 7", True), ("3+4=", "7, 8", False), ("3+4=", "seven", False),
        ("3+4=", "", False), ("3+4=", "   ", False), ("3+4=", "  7  ", True), ("3+4=", " 7\n", True),
        ("3+4=", "7\n5+3=8", False), ("garbage", "7", False), ("3+4=", None, False),
    ],
)
def test_is_answer_correct(prompt, answer, expected):
    assert at.is_answer_correct(prompt, answer) is expected


FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"


@pytest.mark.parametrize(
    "prompt, answer, expected",
    [(FEW_SHOT + "12+7=", "19\n5+3=8", True), (FEW_SHOT + "12+7=", " 19\n5+3=8", True),
     (FEW_SHOT + "12+7=", "19", True), (FEW_SHOT + "12+7=", "18\n19", False),
     (FEW_SHOT + "12+7=", "\n19", False), (FEW_SHOT + "20/3=", "6.67\n1+1=2", True),
     ("3+5=8; 12+7=", "19; 5+3=8", True), ("3+5=8; 12+7=", "19\n5+3=8", True),
     ("3+5=8;12+7=", "20; 19", False)],
)
def test_few_shot_scoring(prompt, answer, expected):
    assert at.is_answer_correct(prompt, answer) is expected


def test_answer_region():
    assert at.answer_region("12+7=", "19\n5+3=8") == "19\n5+3=8"
    assert at.answer_region("1+1=2\n12+7=", "19\n5+3=8") == "19"
    assert at.answer_region("1+1=2;12+7=", " 19;5") == " 19"
    assert at.answer_region("12+7=\n", "19\n5") == "19\n5"  # a trailing newline is no prefix


@pytest.mark.parametrize(
    "prompt, answer, expected",
    [("3+4=", "7", True), ("3+4=", " 7 ", True), ("3+4=", "7.0", True), ("3+4=", "-7", True),
     ("3+4=", "The answer is 7", False), ("3+4=", "7 8", False), ("3+4=", "", False),
     ("3+4=", "1e3", False), ("3+4=", "nan", False), ("1+1=2\n3+4=", "8\n5+3=8", True),
     ("3+4=", "8\n5+3=8", False)],
)
def test_is_pure_number(prompt, answer, expected):
    assert at.is_pure_number(prompt, answer) is expected


@pytest.mark.parametrize(
    "prompt, expected",
    [("3+4=", 7), ("3-10=", -7), ("12*12=", 144), ("6/3=", 2.0), ("7/2=", 3.5), ("5/0=", None),
     ("1.5*2=", 3.0), ("7%3=", 1), ("0.1+0.2=", 0.3), ("nope", None)],
)
def test_true_result(prompt, expected):
    got = at.true_result(at.parse_arithmetic_prompt(prompt))
    assert got == expected and type(got) is type(expected)


# ---- seed features: catalogue -----------------------------------------------------------------
OP_EDGES = [0, 25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 275, 300]
Q_EDGES = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
FIXED_LABELS = [
    "Operands equal", "Operator: Addition", "Operator: Subtraction", "Operator: Multiplication",
    "Operator: Division", "Same digit count", "Left has more digits", "Right has more digits",
    "Divides evenly (any order)", "GCD > 1", "Carry in addition", "Borrow in subtraction",
    "Division denominator is power of 10", "Operands share a digit", "Relative closeness ≤ 10%", "Same sign",
]
OP_BINS = list(zip(OP_EDGES[:-1], OP_EDGES[1:]))
Q_BINS = list(zip(Q_EDGES[:-1], Q_EDGES[1:]))
EXPECTED_LABELS = (
    FIXED_LABELS
    + [f"Result in [{lo},{hi}] ({tag})" for tag in ("add", "sub", "mul") for lo, hi in OP_BINS]
    + [f"{w} in [{lo},{hi}]" for w in ("op1", "op2") for lo, hi in OP_BINS]
    + [f"Division: q_int in [{lo},{hi}]" for lo, hi in Q_BINS]
)


def test_seed_feature_catalogue():
    labels = [f.label for f in at.SEED_FEATURES]
    assert len(labels) == 86 and len(set(labels)) == 86
    assert labels == EXPECTED_LABELS
    assert at.TASK_SPEC.SEED_FEATURES is at.SEED_FEATURES
    assert [f.label for f in build_seed_features()] == labels
    names = set()
    for f in at.SEED_FEATURES:
        assert f.origin == "predefined" and f.description
        assert f.python_src.startswith("def ") and "import" not in f.python_src
        f.compiled()
        assert f.python_src.startswith(f"def {f.fn_name}(prompt, info):")
        names.add(f.fn_name)
    assert len(names) == 86


def test_make_closed_bins():
    assert make_closed_bins(0, 300, 25) == OP_BINS
    assert make_closed_bins(0, 30, 3) == Q_BINS
    assert make_closed_bins(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        make_closed_bins(0, 10, 0)
    with pytest.raises(ValueError):
        make_closed_bins(5, 5, 1)


def test_every_feature_runs_on_a_prompt_sample():
    prompts = ["0+0=", "299*299=", "17-250=", "299/1=", "1/299=", "2.5+1=", "-3*4=", "x", "7/0=", "12.0+9="]
    for p in prompts:
        info = at.parse_arithmetic_prompt(p)
        for f in at.SEED_FEATURES:
            assert f(p, info) in (0.0, 1.0, None), (f.label, p)


# ---- seed features: the 16 fixed ones, hand-computed -----------------------------------------
FIXED_CASES = [
    ("Operands equal", "7+7=", 1.0), ("Operands equal", "7+8=", 0.0), ("Operands equal", "2.5*2.5=", 1.0),
    ("Operands equal", "hello", None),
    ("Operator: Addition", "1+2=", 1.0), ("Operator: Addition", "1-2=", 0.0), ("Operator: Addition", "abc", None),
    ("Operator: Subtraction", "5-3=", 1.0), ("Operator: Subtraction", "5+3=", 0.0),
    ("Operator: Multiplication", "4×5=", 1.0), ("Operator: Multiplication", "4*5=", 1.0),
    ("Operator: Multiplication", "4/5=", 0.0),
    ("Operator: Division", "8÷2=", 1.0), ("Operator: Division", "8*2=", 0.0), ("Operator: Division", "", None),
    ("Same digit count", "12+34=", 1.0), ("Same digit count", "1+23=", 0.0), ("Same digit count", "?", None),
    ("Left has more digits", "123-4=", 1.0), ("Left has more digits", "12-345=", 0.0),
    ("Left has more digits", "12-34=", 0.0), ("Left has more digits", "?", None),
    ("Right has more digits", "1*22=", 1.0), ("Right has more digits", "22*1=", 0.0),
    ("Right has more digits", "?", None),
    ("Divides evenly (any order)", "12/4=", 1.0), ("Divides evenly (any order)", "4*12=", 1.0),
    ("Divides evenly (any order)", "7+3=", 0.0), ("Divides evenly (any order)", "0+5=", 0.0),
    ("Divides evenly (any order)", "5-0=", 0.0), ("Divides evenly (any order)", "?", None),
    ("GCD > 1", "12+18=", 1.0), ("GCD > 1", "7+9=", 0.0), ("GCD > 1", "0+5=", 1.0), ("GCD > 1", "0+1=", 0.0),
    ("GCD > 1", "0+0=", 0.0), ("GCD > 1", "-4*6=", 1.0), ("GCD > 1", "2.5+5=", None), ("GCD > 1", "?", None),
    ("Carry in addition", "15+27=", 1.0), ("Carry in addition", "12+34=", 0.0), ("Carry in addition", "95+5=", 1.0),
    ("Carry in addition", "50+50=", 1.0), ("Carry in addition", "-15+27=", 1.0),
    ("Carry in addition", "12.0+9=", 1.0),  # integral float operand: the original's defect is fixed
    ("Carry in addition", "12.0+7=", 0.0), ("Carry in addition", "2.5+1=", None),
    ("Carry in addition", "15-27=", 0.0), ("Carry in addition", "?", None),
    ("Borrow in subtraction", "52-17=", 1.0), ("Borrow in subtraction", "57-12=", 0.0),
    ("Borrow in subtraction", "3-10=", 1.0), ("Borrow in subtraction", "100-1=", 1.0),
    ("Borrow in subtraction", "20.0-10=", 0.0), ("Borrow in subtraction", "9.5-1=", None),
    ("Borrow in subtraction", "52+17=", 0.0), ("Borrow in subtraction", "?", None),
    ("Division denominator is power of 10", "7/10=", 1.0), ("Division denominator is power of 10", "7/1=", 1.0),
    ("Division denominator is power of 10", "7/100=", 1.0), ("Division denominator is power of 10", "7/10.0=", 1.0),
    ("Division denominator is power of 10", "7/20=", 0.0), ("Division denominator is power of 10", "7/0.1=", 0.0),
    ("Division denominator is power of 10", "7/101=", 0.0),
    ("Division denominator is power of 10", "7/0=", None), ("Division denominator is power of 10", "7/-10=", None),
    ("Division denominator is power of 10", "7+10=", 0.0), ("Division denominator is power of 10", "?", None),
    ("Operands share a digit", "12+23=", 1.0), ("Operands share a digit", "12+34=", 0.0),
    ("Operands share a digit", "1.5+15=", 0.0), ("Operands share a digit", "?", None),
    ("Relative closeness ≤ 10%", "100-90=", 1.0), ("Relative closeness ≤ 10%", "100-89=", 0.0),
    ("Relative closeness ≤ 10%", "0+0=", 1.0), ("Relative closeness ≤ 10%", "30/27=", 1.0),
    ("Relative closeness ≤ 10%", "5+0=", 0.0), ("Relative closeness ≤ 10%", "?", None),
    ("Same sign", "3+4=", 1.0), ("Same sign", "-3+4=", 0.0), ("Same sign", "-3*-4=", 1.0), ("Same sign", "?", None),
]


@pytest.mark.parametrize("label, prompt, expected", FIXED_CASES)
def test_fixed_seed_features(label, prompt, expected):
    assert feat(label, prompt) == expected


def test_fixed_cases_cover_every_fixed_label_both_ways():
    for label in FIXED_LABELS:
        values = {exp for lab, _, exp in FIXED_CASES if lab == label}
        assert 1.0 in values and (0.0 in values or None in values), label


# ---- seed features: the 70 range bins ---------------------------------------------------------
def _bin_values(prefix: str, suffix: str, bins, prompt: str) -> dict[tuple[int, int], float | None]:
    return {(lo, hi): feat(f"{prefix}[{lo},{hi}]{suffix}", prompt) for lo, hi in bins}


# (tag, prompt, result, bins expected to hold 1.0); all other bins of that tag hold 0.0
RESULT_CASES = [
    ("add", "0+0=", [(0, 25)]), ("add", "12+0=", [(0, 25)]), ("add", "20+5=", [(0, 25), (25, 50)]),
    ("add", "13+13=", [(25, 50)]), ("add", "100+50=", [(125, 150), (150, 175)]),
    ("add", "150+150=", [(275, 300)]), ("add", "299+299=", []), ("add", "-3+1=", []),
    ("sub", "30-5=", [(0, 25), (25, 50)]), ("sub", "299-0=", [(275, 300)]), ("sub", "3-10=", []),
    ("sub", "5-5=", [(0, 25)]), ("sub", "260-60=", [(175, 200), (200, 225)]),
    ("mul", "5*5=", [(0, 25), (25, 50)]), ("mul", "10*30=", [(275, 300)]), ("mul", "17*17=", [(275, 300)]),
    ("mul", "299*2=", []), ("mul", "11*11=", [(100, 125)]), ("mul", "0*299=", [(0, 25)]),
    ("mul", "2.5*10=", [(0, 25), (25, 50)]),
]
OP_FOR_TAG = {"add": "+", "sub": "-", "mul": "*"}


@pytest.mark.parametrize("tag, prompt, hits", RESULT_CASES)
def test_result_bins(tag, prompt, hits):
    values = _bin_values("Result in ", f" ({tag})", OP_BINS, prompt)
    assert values == {b: (1.0 if b in hits else 0.0) for b in OP_BINS}
    for other in OP_FOR_TAG:  # result features of the other operators are undefined here
        if other != tag:
            assert set(_bin_values("Result in ", f" ({other})", OP_BINS, prompt).values()) == {None}


def test_result_bins_undefined_for_division_and_garbage():
    for tag in OP_FOR_TAG:
        for prompt in ("10/2=", "junk"):
            assert set(_bin_values("Result in ", f" ({tag})", OP_BINS, prompt).values()) == {None}


@pytest.mark.parametrize(
    "prompt, op1_hits, op2_hits",
    [("25+0=", [(0, 25), (25, 50)], [(0, 25)]),
     ("0/299=", [(0, 25)], [(275, 300)]),
     ("150*275=", [(125, 150), (150, 175)], [(250, 275), (275, 300)]),
     ("300-301=", [(275, 300)], []),
     ("-1+12.5=", [], [(0, 25)]),
     ("50-75=", [(25, 50), (50, 75)], [(50, 75), (75, 100)])],
)
def test_operand_bins(prompt, op1_hits, op2_hits):
    assert _bin_values("op1 in ", "", OP_BINS, prompt) == {b: (1.0 if b in op1_hits else 0.0) for b in OP_BINS}
    assert _bin_values("op2 in ", "", OP_BINS, prompt) == {b: (1.0 if b in op2_hits else 0.0) for b in OP_BINS}


def test_operand_bins_undefined_for_garbage():
    assert set(_bin_values("op1 in ", "", OP_BINS, "junk").values()) == {None}
    assert set(_bin_values("op2 in ", "", OP_BINS, "junk").values()) == {None}


@pytest.mark.parametrize(
    "prompt, hits",
    [("7/2=", [(0, 3), (3, 6)]), ("1/2=", [(0, 3)]), ("299/10=", [(27, 30)]), ("299/1=", []),
     ("60/2=", [(27, 30)]), ("62/2=", []), ("-7/2=", []), ("7.5/2.5=", [(0, 3), (3, 6)]),
     ("20/3=", [(3, 6), (6, 9)]), ("23/3=", [(6, 9)]), ("13/1=", [(12, 15)])],
)
def test_quotient_bins(prompt, hits):
    values = _bin_values("Division: q_int in ", "", Q_BINS, prompt)
    assert values == {b: (1.0 if b in hits else 0.0) for b in Q_BINS}


@pytest.mark.parametrize("prompt", ["7/0=", "7*2=", "junk"])
def test_quotient_bins_undefined(prompt):
    assert set(_bin_values("Division: q_int in ", "", Q_BINS, prompt).values()) == {None}


def test_range_cases_cover_every_range_label_both_ways():
    seen: dict[str, set] = {}
    prompts = [p for _, p, _ in RESULT_CASES] + ["25+0=", "0/299=", "150*275=", "50-75=", "7/2=", "299/10=",
                                               "60/2=", "20/3=", "13/1=", "10/2=", "junk"]
    extra = [f"{lo + 1}/1=" for lo, _ in Q_BINS] + [f"{lo + 1}+{lo + 1}=" for lo, _ in OP_BINS]
    extra += [f"{v}+0=" for v in range(1, 300, 25)] + [f"{v}-0=" for v in range(1, 300, 25)]
    extra += [f"{v}*1=" for v in range(1, 300, 25)]
    for p in prompts + extra:
        info = at.parse_arithmetic_prompt(p)
        for f in at.SEED_FEATURES[16:]:
            seen.setdefault(f.label, set()).add(f(p, info))
    for label, values in seen.items():
        assert 1.0 in values and (0.0 in values or None in values), label
    assert len(seen) == 70


# ---- task object ------------------------------------------------------------------------------
def test_task_attributes():
    assert at.TASK_SPEC.MAX_NEW_TOKENS == at.MAX_NEW_TOKENS == 6
    assert at.TASK_SPEC.TOKENS_DICT_KEYS == "operator, operand_a, operand_b, len_a, len_b, digits_a, digits_b"
    assert at.TASK_SPEC.SYSTEM_PROMPT == at.SYSTEM_PROMPT and len(at.SYSTEM_PROMPT) > 100
    assert load_task("arithmetic") is at.TASK_SPEC
    assert load_task("lib.tasks.arithmetic_task") is at.TASK_SPEC


def test_parse_prompt_row_and_is_answer_positive():
    row = {"prompt": "3+4=", "operator_group": "+", "is_correct": True}
    assert at.TASK_SPEC.parse_prompt_row(row_as_namedtuple(row)) == at.parse_arithmetic_prompt("3+4=")
    assert at.TASK_SPEC.parse_prompt_row(row)["operator"] == "+"
    Row = namedtuple("Row", "prompt")
    rows = [{"prompt": "3+4="}, {"prompt": "20/3="}, Row("3-10=")]
    assert at.TASK_SPEC.is_answer_positive(rows, ["7", "6.5", "-7"]) == [True, False, True]
    with pytest.raises(ValueError):
        at.TASK_SPEC.is_answer_positive(rows, ["7"])


def test_build_prompts_full_grid():
    recs = at.TASK_SPEC.build_prompts(None)
    assert len(recs) == 3 * 300 * 300 + 299 * 299 == 359_401
    assert recs[0] == {"prompt": "0+0=", "operator": "+"}
    assert recs[1]["prompt"] == "0+1=" and recs[300]["prompt"] == "1+0="
    assert recs[-1] == {"prompt": "299/299=", "operator": "/"}
    div = [r["prompt"] for r in recs if r["operator"] == "/"]
    assert div[0] == "1/1=" and len(div) == 299 * 299
    assert [r["operator"] for r in recs[::90_000]] == ["+", "-", "*", "/"]


def test_build_prompts_options():
    args = argparse.Namespace(operand_range=(0, 3), few_shot_prefix="1+1=2\n")
    recs = at.TASK_SPEC.build_prompts(args)
    assert len(recs) == 9 * 3 + 4
    assert recs[0]["prompt"] == "1+1=2\n0+0=" and at.query_expression(recs[0]["prompt"]) == "0+0="
    assert [r["prompt"] for r in recs if r["operator"] == "/"] == [f"1+1=2\n{a}/{b}=" for a in (1, 2) for b in (1, 2)]
    with pytest.raises(ValueError, match="few_shot_prefix"):
        at.TASK_SPEC.build_prompts(argparse.Namespace(few_shot_prefix="1+1=2"))
    with pytest.raises(ValueError, match="operand_range"):
        at.TASK_SPEC.build_prompts(argparse.Namespace(operand_range=(5, 5)))

    full = at.TASK_SPEC.build_prompts(argparse.Namespace(operand_range=(0, 10)))
    sub = at.TASK_SPEC.build_prompts(argparse.Namespace(operand_range=(0, 10), max_prompts=10, seed=3))
    assert sub == at.TASK_SPEC.build_prompts(argparse.Namespace(operand_range=(0, 10), max_prompts=10, seed=3))
    assert [r["operator"] for r in sub] == ["+"] * 3 + ["-"] * 3 + ["*"] * 2 + ["/"] * 2
    positions = [full.index(r) for r in sub]
    assert positions == sorted(positions)


# ---- cache round trip ---------------------------------------------------------------------------
def test_assemble_and_load_round_trip(tmp_path):
    records = [{"prompt": "3*4=", "operator": "*"}, {"prompt": "3+4=", "operator": "+"},
               {"prompt": "20/3=", "operator": "/"}, {"prompt": "3-10=", "operator": "-"},
               {"prompt": "1+1=2\n5+5=", "operator": "+"}]
    answers = ["12", "The answer is 8", "6.67", " -7 ", "10\n6+6=12"]
    cache = at.TASK_SPEC.assemble_cache(records, answers, argparse.Namespace())
    assert list(cache) == ["+", "-", "*", "/"]
    assert cache["+"] == [("3+4=", 8, "The answer is 8", False, False), ("1+1=2\n5+5=", 10, "10\n6+6=12", True, True)]
    assert cache["-"] == [("3-10=", -7, " -7 ", True, True)]
    assert cache["*"] == [("3*4=", 12, "12", True, True)]
    assert cache["/"] == [("20/3=", 6.67, "6.67", True, True)]

    path = tmp_path / "llm_io_data.pkl"
    path.write_bytes(pickle.dumps(cache))
    df = at.TASK_SPEC.load_dataset_from_cache(str(path))
    assert list(df.columns) == ["operator_group", "prompt", "num_out", "raw_output", "is_correct", "is_pure"]
    assert df["prompt"].tolist() == ["3+4=", "1+1=2\n5+5=", "3-10=", "3*4=", "20/3="]
    assert df["operator_group"].tolist() == ["+", "+", "-", "*", "/"]
    assert df["num_out"].tolist() == [8.0, 10.0, -7.0, 12.0, 6.67] and df["num_out"].dtype == float
    assert df["is_correct"].tolist() == [False, True, True, True, True] and df["is_correct"].dtype == bool
    assert df["is_pure"].tolist() == [False, True, True, True, True]
    assert df["raw_output"].tolist()[0] == "The answer is 8"


def test_assemble_cache_operator_order_and_mismatch():
    cache = at.TASK_SPEC.assemble_cache(
        [{"prompt": "2*2=", "operator": "*"}, {"prompt": "1+1=", "operator": "+"}], ["4", "x"], None
    )
    assert list(cache) == ["+", "*"]
    assert cache["+"][0] == ("1+1=", None, "x", False, False)
    with pytest.raises(ValueError):
        at.TASK_SPEC.assemble_cache([{"prompt": "1+1=", "operator": "+"}], [], None)


def test_load_skips_short_missing_and_duplicates(tmp_path):
    data = {
        "+": [(" 1+1= ", 2, "2", True, True), ("1+1=", 3, "3", False, True), ("2+2=",),
              (None, 1, "1", False, True), ("   ", 1, "1", False, True), ("2+3=", None, "no", 0, 0)],
        "/": [("1/2=", 0.5, "0.5", True, True, "extra")],
    }
    path = tmp_path / "c.pkl"
    path.write_bytes(pickle.dumps(data))
    df = at.TASK_SPEC.load_dataset_from_cache(path)
    assert df["prompt"].tolist() == ["1+1=", "2+3=", "1/2="]
    assert df["is_correct"].tolist() == [True, False, True]
    assert pd.isna(df["num_out"][1]) and df["num_out"][2] == 0.5


def test_load_empty_cache(tmp_path):
    path = tmp_path / "empty.pkl"
    path.write_bytes(pickle.dumps({}))
    df = at.TASK_SPEC.load_dataset_from_cache(str(path))
    assert len(df) == 0 and "is_correct" in df.columns


@pytest.mark.parametrize("payload", [[("1+1=", 2, "2", True, True)], "text", {"+": 5}])
def test_load_rejects_wrong_structure(tmp_path, payload):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(TaskError, match="bad.pkl"):
        at.TASK_SPEC.load_dataset_from_cache(str(path))


def test_load_rejects_corrupt_or_missing_file(tmp_path):
    path = tmp_path / "corrupt.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ArtifactError, match="corrupt.pkl"):
        at.TASK_SPEC.load_dataset_from_cache(str(path))
    with pytest.raises(ArtifactError, match="missing.pkl"):
        at.TASK_SPEC.load_dataset_from_cache(str(tmp_path / "missing.pkl"))


# ---- stratified_subsample ---------------------------------------------------------------------
def _records(sizes: dict[str, int]) -> list[dict]:
    recs = []
    for op, n in sizes.items():
        recs += [{"operator": op, "i": i} for i in range(n)]
    return recs


def test_stratified_subsample_shares_order_determinism():
    recs = _records({"+": 20, "-": 20, "*": 20, "/": 20})
    a = stratified_subsample(recs, "operator", 10, seed=7)
    assert a == stratified_subsample(recs, "operator", 10, seed=7)
    assert [r["operator"] for r in a] == ["+"] * 3 + ["-"] * 3 + ["*"] * 2 + ["/"] * 2
    idx = [recs.index(r) for r in a]
    assert idx == sorted(idx) and len(set(idx)) == 10
    others = [stratified_subsample(recs, "operator", 10, seed=s) for s in range(8, 12)]
    assert any(o != a for o in others)


def test_stratified_subsample_edges():
    recs = _records({"+": 1, "-": 10, "*": 10})
    got = stratified_subsample(recs, "operator", 9, seed=0)
    assert [r["operator"] for r in got].count("+") == 1 and len(got) == 9
    assert sorted([r["operator"] for r in got].count(op) for op in "-*") == [4, 4]
    assert stratified_subsample(recs, "operator", 21, seed=0) == recs
    assert stratified_subsample(recs, "operator", 500, seed=0) == recs
    assert stratified_subsample(recs, "operator", 0, seed=0) == []
    Rec = namedtuple("Rec", "operator i")
    nt = [Rec("+", 0), Rec("-", 0), Rec("+", 1), Rec("-", 1)]
    assert [r.operator for r in stratified_subsample(nt, "operator", 2, seed=1)] in (["+", "-"], ["-", "+"])
    with pytest.raises(ValueError):
        stratified_subsample(recs, "operator", -1, seed=0)
