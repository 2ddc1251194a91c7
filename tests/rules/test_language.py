"""The rule text syntax: exact threshold and text round trips, the written format, compatibility with
the original's text, and syntax errors that name the position."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.rules.evaluation import apply_rule_to_features, evaluate
from lib.rules.expressions import And, Atom, Combo, Literal, Rule
from lib.rules.language import (
    RuleSyntaxError,
    format_expression,
    format_threshold,
    iter_atoms,
    parse_expression,
    parse_rule,
)


def _f32(v: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(v)


# ------------------------------------------------------------------ properties


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False))
def test_threshold_text_round_trips_float32(v):
    text = format_threshold(v)
    assert _f32(float(text)) == _f32(v)
    atom = Atom("x", "<", v)
    assert parse_expression(format_expression(atom)) == Combo((Literal(Rule((atom,))),))


def test_threshold_text_round_trips_random_bit_patterns():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 2**32, size=10_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    vals = np.concatenate([vals[~np.isnan(vals)], np.array([np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                                                           np.float32(1e-45), np.float32(16777217)])])
    for v in vals:
        text = format_threshold(float(v))
        assert np.float32(float(text)) == v, (v, text)
        assert parse_rule(f"x < {text}").atoms[0].threshold == float(v)


def test_number_format_examples():
    assert format_threshold(0.7) == "0.7"  # float32(0.7), not 0.699999988
    assert format_threshold(-2.5) == "-2.5"
    assert format_threshold(3.0) == "3"
    assert format_threshold(-0.0) == "0"
    assert format_threshold(1e-7) == "1e-07"
    assert format_threshold(1.5e20) == "1.5e+20"
    assert format_threshold(123456789.0) == "1.2345679e+08"
    assert format_threshold(1e39) == "inf"
    assert format_threshold(0.30000001192092896) == "0.3"


def test_text_format_examples():
    rule = Rule((Atom("a", "<", 0.7), Atom("x y", ">=", -3)))
    combo = Combo((Literal(rule), Literal(Rule((Atom("b", "<", 1e-7),)), negated=True)))
    assert format_expression(combo) == "(a < 0.7 & `x y` >= -3) OR (NOT(b < 1e-07))"
    assert str(rule) == "a < 0.7 & `x y` >= -3"
    assert str(Combo()) == "FALSE"
    assert str(Rule()) == "TRUE"
    assert str(Literal(Rule(), negated=True)) == "NOT(TRUE)"
    assert str(Atom("c`d", "!=", 1)) == "`c``d` != 1"
    assert str(Atom("3_digit_sum", "<", 1)) == "`3_digit_sum` < 1"
    assert str(Atom("and", "<", 1)) == "`and` < 1"
    assert parse_expression("(TRUE) OR (NOT(TRUE))") == Combo((Literal(Rule()), Literal(Rule(), True)))


# ------------------------------------------------------------------ the original's text


def _pandas_mask(text: str, df: pd.DataFrame) -> np.ndarray:
    """How the original applied rule text (test-only reference)."""
    t = re.sub(r"\s+", " ", text)
    t = re.sub(r"\bAND\b", "&", t, flags=re.I)
    t = re.sub(r"\bOR\b", "|", t, flags=re.I)
    t = re.sub(r"\bNOT\b", "~", t, flags=re.I)
    return df.index.isin(df.query(t).index)


ORIGINAL_TEXTS = [
    "a <= 0.69 & b > 1",
    "NOT(a <= 2)",
    "(x > 1) OR (NOT(y <= 0.5))",
    "(a <= 0.69 & b > 1) OR (NOT(x <= -0.5 & y > 0.12))",
    "p AND q",
    "p and not q",
    "a <= 0.69 AND b > 1 OR x > 1",
    "a <= 0.69 & (b > 1 | x > 1)",
    "~(a > 0.5) | y <= 1e-3",
    "  a   <=   0.7   &b>-1.25  ",
    "a <= 0.00",
]


@pytest.mark.parametrize("text", ORIGINAL_TEXTS)
def test_original_format_matches_pandas(text):
    rng = np.random.default_rng(7)
    n = 400
    df = pd.DataFrame(
        {
            # two-decimal values incl. exactly the thresholds used above: float32 and float64 agree here
            "a": rng.integers(-300, 300, n) / 100,
            "b": rng.integers(-300, 300, n) / 100,
            "x": rng.integers(-300, 300, n) / 100,
            "y": rng.integers(-300, 300, n) / 100,
            "p": rng.random(n) < 0.5,
            "q": rng.random(n) < 0.5,
        }
    )
    df.loc[:20, "a"] = 0.69
    df.loc[21:40, "b"] = 1.0
    got = apply_rule_to_features(text, df)
    want = _pandas_mask(text, df)
    assert 0 < want.sum() < n
    assert np.array_equal(got, want)
    assert np.array_equal(apply_rule_to_features(text, df, direction="NEGATIVE"), ~want)
    assert np.array_equal(apply_rule_to_features(text, df, direction="Positive"), want)


def test_constants_and_shapes():
    df = pd.DataFrame({"a": [1.0, 2.0, np.nan]})
    assert not evaluate("FALSE", df).any()
    assert evaluate("TRUE", df).all()
    assert isinstance(parse_expression("FALSE"), Combo) and parse_expression("FALSE") == Combo()
    # NaN: comparisons false, != true, NOT complements
    assert evaluate("a < 5", df).tolist() == [True, True, False]
    assert evaluate("a != 1", df).tolist() == [False, True, True]
    assert evaluate("NOT(a < 5)", df).tolist() == [False, False, True]
    # non-combo text gives a general tree
    e = parse_expression("(a < 1 | a > 1.5) & a < 3")
    assert isinstance(e, And)
    assert evaluate(e, df).tolist() == [False, True, False]
    assert [a.feature for a in iter_atoms(parse_expression("(a<1) OR (NOT(b<2 & c>3))"))] == ["a", "b", "c"]
    # number op feature, signs, exponents, inf, unquoted names with symbols when columns are known
    assert parse_rule("-1.5e0 < a") == Rule((Atom("a", ">", -1.5),))
    assert parse_rule("a < +inf & a > -INF") == Rule((Atom("a", "<", np.inf), Atom("a", ">", -np.inf)))
    assert parse_rule("x y <= 1", columns=["x y"]) == Rule((Atom("x y", "<=", 1),))
    assert parse_rule("3_digit_sum <= 0.5") == Rule((Atom("3_digit_sum", "<=", 0.5),))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "text, pos",
    [("a <", 3), ("a < 1 &", 7), ("(a < 1", 6), ("a < 1)", 5), ("a $ 1", 2), ("`abc", 0), ("", 0),
     ("a < nan", 4), ("a < < 1", 4), ("() OR a < 1", 1)],
)
def test_syntax_errors_name_position_and_text(text, pos):
    with pytest.raises(RuleSyntaxError) as info:
        parse_expression(text)
    assert info.value.position == pos
    assert info.value.text == text
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)
