"""The rule data types: atoms from XGBoost splits and the canonical form of a rule."""

from __future__ import annotations

from lib.rules.expressions import Atom, Rule
from lib.rules.language import parse_rule


def test_from_split_and_canonical():
    assert Atom.from_split("f", 0.5, goes_left=True) == Atom("f", "<", 0.5)
    assert Atom.from_split("f", 0.5, goes_left=False) == Atom("f", ">=", 0.5)
    r = parse_rule("x < 5 & b > 1 & x < 3 & x <= 3 & x >= 1 & x > 1 & x >= 0 & b > 1 & a == 2 & a == 2")
    assert str(r.canonical()) == "a == 2 & b > 1 & x > 1 & x < 3"
    assert str(parse_rule("x <= 2 & x < 3").canonical()) == "x <= 2"
    assert str(parse_rule("x < 1").canonical()) == "x < 1"
    assert Rule().canonical() == Rule()
