"""Vectorised evaluation: written, parsed and evaluated rules equal a row-by-row float32 reference,
rule text selects exactly the rows XGBoost routes to a leaf, unknown columns, and the atom cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.rules.evaluation import RuleEvaluator, UnknownColumnError, apply_rule_to_features, evaluate, evaluate_many
from lib.rules.expressions import OPS, Atom, Combo, Literal, Rule
from lib.rules.language import format_expression, parse_expression, parse_literal, parse_rule

# ------------------------------------------------------------------ reference semantics (test only)

_PY_OPS = {
    "<": lambda x, t: x < t,
    "<=": lambda x, t: x <= t,
    ">": lambda x, t: x > t,
    ">=": lambda x, t: x >= t,
    "==": lambda x, t: x == t,
    "!=": lambda x, t: x != t,
}


def _f32(v: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(v)


def ref_atom(atom: Atom, table: dict) -> np.ndarray:
    """Row by row, in float32 scalars, IEEE NaN semantics."""
    t = _f32(atom.threshold)
    return np.array([bool(_PY_OPS[atom.op](_f32(v), t)) for v in table[atom.feature]], dtype=bool)


def ref_mask(expr, table: dict, n: int) -> np.ndarray:
    if isinstance(expr, Atom):
        return ref_atom(expr, table)
    if isinstance(expr, Rule):
        out = np.ones(n, dtype=bool)
        for a in expr.atoms:
            out &= ref_atom(a, table)
        return out
    if isinstance(expr, Literal):
        m = ref_mask(expr.rule, table, n)
        return ~m if expr.negated else m
    if isinstance(expr, Combo):
        out = np.zeros(n, dtype=bool)
        for lit in expr.literals:
            out |= ref_mask(lit, table, n)
        return out
    raise TypeError(expr)


# ------------------------------------------------------------------ strategies

FEATURES = ["a", "b_2", "x y", "3_digit_sum", "and", "TRUE", "c`d", "price($)"]

_special_values = st.sampled_from(
    [0.0, -0.0, 0.5, -0.5, 1.0, 0.7, 0.69, 1e-7, -1e-7, 1e-45, 3.4e38, -3.4e38, 1e39, 1e300, 1e-300,
     123456789.0, 0.30000000000000004, float("inf"), float("-inf"), float("nan")]
)
_values = st.one_of(
    _special_values,
    st.floats(width=32, allow_nan=False).map(float),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-5, 5).map(float),
)


@st.composite
def tables(draw):
    n = draw(st.integers(1, 25))
    cols = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=4, unique=True))
    pool = draw(st.lists(_values, min_size=1, max_size=8))  # small pool → duplicates and shared values
    table = {c: np.array(draw(st.lists(st.sampled_from(pool) | _values, min_size=n, max_size=n)), dtype=np.float64)
             for c in cols}
    return table, n


def _threshold_from(draw, column: np.ndarray) -> float:
    """A threshold taken from the data (boundary!), its float32 neighbours, or arbitrary."""
    finite = [float(v) for v in column if not np.isnan(_f32(v))]
    choice = draw(st.integers(0, 4))
    if finite and choice <= 2:
        v = _f32(draw(st.sampled_from(finite)))
        if choice == 1 and np.isfinite(v):
            v = np.nextafter(v, np.float32(np.inf))
        elif choice == 2 and np.isfinite(v):
            v = np.nextafter(v, np.float32(-np.inf))
        return float(v)
    if finite and choice == 3:
        return draw(st.sampled_from(finite))  # float64 data value, rounded to float32 by Atom
    return draw(st.floats(width=32, allow_nan=False).map(float))


@st.composite
def rules_for(draw, table):
    cols = list(table)
    atoms = []
    for _ in range(draw(st.integers(0, 4))):
        f = draw(st.sampled_from(cols))
        atoms.append(Atom(f, draw(st.sampled_from(OPS)), _threshold_from(draw, table[f])))
    return Rule(tuple(atoms))


@st.composite
def combos_for(draw, table):
    lits = draw(st.lists(st.tuples(rules_for(table), st.booleans()), min_size=0, max_size=4))
    return Combo(tuple(Literal(r, neg) for r, neg in lits))


# ------------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_write_parse_evaluate_equals_float32_reference(data):
    table, n = data.draw(tables())
    combo = data.draw(combos_for(table))
    frame = pd.DataFrame(table) if data.draw(st.booleans()) else table

    text = format_expression(combo)
    assert parse_expression(text) == combo
    expected = ref_mask(combo, table, n)
    assert np.array_equal(evaluate(text, frame), expected), text
    assert np.array_equal(evaluate(combo, frame), expected)

    for lit in combo.literals:
        lit_text = format_expression(lit)
        assert parse_literal(lit_text) == lit
        assert np.array_equal(evaluate(lit_text, frame), ref_mask(lit, table, n)), lit_text
        if not lit.negated:
            assert parse_rule(lit_text) == lit.rule
        canon = lit.rule.canonical()
        assert np.array_equal(evaluate(canon, frame), ref_mask(lit.rule, table, n)), (lit.rule, canon)
        assert canon.canonical() == canon

    exprs = [text] + [format_expression(lit) for lit in combo.literals] + list(combo.literals)
    many = evaluate_many(exprs, frame)
    assert many.shape == (n, len(exprs))
    for j, e in enumerate(exprs):
        assert np.array_equal(many[:, j], evaluate(e, frame))


# ------------------------------------------------------------------ ground truth: XGBoost routing


def _leaf_rules(trees: pd.DataFrame, leaf_op_yes: str = "<", leaf_op_no: str = ">="):
    """{(tree, leaf_node): Rule} for every root→leaf path of `trees_to_dataframe()`."""
    by_id = {row.ID: row for row in trees.itertuples(index=False)}
    out = {}

    def walk(node_id, atoms):
        row = by_id[node_id]
        if row.Feature == "Leaf":
            out[(row.Tree, row.Node)] = Rule(tuple(atoms))
            return
        walk(row.Yes, atoms + [Atom(row.Feature, leaf_op_yes, row.Split)])
        walk(row.No, atoms + [Atom(row.Feature, leaf_op_no, row.Split)])

    for t in sorted(trees.Tree.unique()):
        walk(f"{t}-0", [])
    return out


def _xgb_table():
    rng = np.random.default_rng(3)
    n = 120
    base = np.float32(0.3)
    near = np.array([np.nextafter(base, np.float32(1)), base, np.nextafter(base, np.float32(0))], dtype=np.float32)
    X = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "tight": rng.choice(near, n).astype(np.float64),  # neighbouring float32 values: split AT a data value
            "x y": rng.uniform(-2e-3, 2e-3, n),
            "k": rng.integers(0, 5, n).astype(float),
        }
    )
    at_or_above = X["tight"].to_numpy(np.float32) >= base
    y = ((at_or_above & (X["a"] > -0.5)) | (X["x y"] > 1.5e-3)).astype(int)
    return X, y


def test_rule_text_selects_exactly_the_rows_xgboost_routes_to_the_leaf():
    X, y = _xgb_table()
    model = xgb.XGBClassifier(n_estimators=3, max_depth=2, tree_method="exact", random_state=0, n_jobs=1)
    model.fit(X, y)
    booster = model.get_booster()
    trees = booster.trees_to_dataframe()
    leaves = booster.predict(xgb.DMatrix(X), pred_leaf=True).astype(int)
    rules = _leaf_rules(trees)
    assert len(rules) >= 6
    texts = {key: format_expression(rule) for key, rule in rules.items()}
    masks = evaluate_many(list(texts.values()), X)
    for j, ((tree, node), text) in enumerate(texts.items()):
        assert np.array_equal(masks[:, j], leaves[:, tree] == node), (tree, node, text)
        assert np.array_equal(evaluate(text, X), leaves[:, tree] == node)
    # every row reaches exactly one leaf per tree
    for tree in trees.Tree.unique():
        cols = [j for j, key in enumerate(texts) if key[0] == tree]
        assert (masks[:, cols].sum(axis=1) == 1).all()

    # the boundary case is really exercised: the original's `<=` / `>` text routes rows differently
    legacy = _leaf_rules(trees, "<=", ">")
    assert any(
        not np.array_equal(evaluate(rule, X), leaves[:, tree] == node) for (tree, node), rule in legacy.items()
    )


# ------------------------------------------------------------------ errors


def test_unknown_and_non_numeric_columns():
    df = pd.DataFrame({"digit_count": [1, 2], "digit_sum": [3, 4], "prompt": ["p", "q"]})
    with pytest.raises(UnknownColumnError, match=r"'digit_cnt'.*'digit_count'"):
        evaluate("digit_cnt < 1", df)
    with pytest.raises(UnknownColumnError, match=r"'zzz'.*available columns"):
        apply_rule_to_features("zzz < 1", df)
    with pytest.raises(ValueError, match="'prompt'.*not numeric"):
        evaluate("prompt < 1", df)
    assert issubclass(UnknownColumnError, LookupError) and issubclass(UnknownColumnError, ValueError)


def test_evaluator_caches_atoms_and_many_rules():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(500, 6)), columns=[f"f{i}" for i in range(6)])
    atoms = [Atom(f"f{i}", op, float(t)) for i in range(6) for op in ("<", ">=") for t in np.linspace(-2, 2, 9)]
    rules = [Rule(tuple(atoms[k] for k in rng.choice(len(atoms), 3, replace=False))) for _ in range(2000)]
    m = evaluate_many(rules, df)
    assert m.shape == (500, 2000)
    for j in (0, 17, 1999):
        assert np.array_equal(m[:, j], ref_mask(rules[j], {c: df[c].to_numpy() for c in df}, 500))
    ev = RuleEvaluator(df)
    ev.mask(rules[0])
    assert len(ev._atoms) == 3
