"""The shared rule language: exact text round trips, float32 evaluation equal to XGBoost's own
routing, compatibility with the original's text, and the rule-file loaders."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib.core.files_and_cache import ArtifactError
from lib.rules.language import (
    OPS,
    And,
    Atom,
    Combo,
    Literal,
    Rule,
    RuleSyntaxError,
    format_expression,
    format_threshold,
    iter_atoms,
    parse_expression,
    parse_literal,
    parse_rule,
)
from lib.rules.evaluation import RuleEvaluator, UnknownColumnError, apply_rule_to_features, evaluate, evaluate_many
from lib.rules.rule_files import detect_prompt_col, find_rule_files, guess_filetype, load_rules

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


def test_from_split_and_canonical():
    assert Atom.from_split("f", 0.5, goes_left=True) == Atom("f", "<", 0.5)
    assert Atom.from_split("f", 0.5, goes_left=False) == Atom("f", ">=", 0.5)
    r = parse_rule("x < 5 & b > 1 & x < 3 & x <= 3 & x >= 1 & x > 1 & x >= 0 & b > 1 & a == 2 & a == 2")
    assert str(r.canonical()) == "a == 2 & b > 1 & x > 1 & x < 3"
    assert str(parse_rule("x <= 2 & x < 3").canonical()) == "x <= 2"
    assert str(parse_rule("x < 1").canonical()) == "x < 1"
    assert Rule().canonical() == Rule()


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


# ------------------------------------------------------------------ rule files


def test_load_rules_fallbacks_and_defaults(tmp_path):
    p = tmp_path / "optimal_rule_set_is_correct.csv"
    pd.DataFrame({"string_rule": ["a < 1", "NOT(b >= 2)"], "coefficient_sign": ["negative", "negative"]}).to_csv(p, index=False)
    df = load_rules(p)
    assert list(df.columns) == ["rule_id", "rule", "coefficient_sign", "component_type"]
    assert df["rule"].tolist() == ["a < 1", "NOT(b >= 2)"]
    assert df["rule_id"].tolist() == [0, 1]
    assert df["coefficient_sign"].tolist() == ["positive", "positive"]  # forced for fallback columns
    assert df["component_type"].tolist() == ["rule", "rule"]

    j = tmp_path / "rules.json"
    j.write_text(json.dumps({"rules": [{"rule_expression": "(x > 1) OR (y < 2)", "rule_id": 7}]}))
    df = load_rules(j)
    assert df.to_dict("records") == [
        {"rule_id": 7, "rule": "(x > 1) OR (y < 2)", "coefficient_sign": "positive", "component_type": "rule"}
    ]

    j2 = tmp_path / "plain.json"
    j2.write_text(json.dumps(["a < 1", "b >= 2"]))
    assert load_rules(j2)["rule"].tolist() == ["a < 1", "b >= 2"]

    r = tmp_path / "with_rule.csv"
    pd.DataFrame({"rule_id": [5], "rule": ["a < 1"], "coefficient_sign": ["negative"],
                  "component_type": ["linear"]}).to_csv(r, index=False)
    assert load_rules(r).iloc[0].to_dict() == {"rule_id": 5, "rule": "a < 1", "coefficient_sign": "negative",
                                              "component_type": "linear"}

    h = tmp_path / "header_only.csv"
    h.write_text("rule_index,is_negated,rule_expression\n")
    assert len(load_rules(h)) == 0


def test_load_rules_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ArtifactError, match=re.escape(str(missing))):
        load_rules(missing)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"something": ["a < 1"]}).to_csv(bad, index=False)
    with pytest.raises(ArtifactError, match=r"bad\.csv.*no rule column.*'something'"):
        load_rules(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ArtifactError, match="empty.csv"):
        load_rules(empty)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ArtifactError, match="broken.json"):
        load_rules(broken)


def test_find_rule_files_includes_pseudo_targets(tmp_path):
    for name in ["optimal_rule_set_is_correct.csv", "optimal_rule_set_test_selected_is_correct.csv",
                 "optimal_rule_set_all_fit_is_correct.csv", "optimal_rule_set_is_correct_fake.csv",
                 "optimal_rule_set_x.json", "association_rules_is_correct.csv", "optimal_rule_setx.csv"]:
        (tmp_path / name).write_text("rule\n")
    found = find_rule_files(tmp_path, "optimal_rule_set")
    assert [t for t, _ in found] == ["all_fit_is_correct", "is_correct", "is_correct_fake", "test_selected_is_correct"]
    assert all(p.parent == tmp_path and p.suffix == ".csv" for _, p in found)
    assert find_rule_files(tmp_path, "association_rules") == [("is_correct", tmp_path / "association_rules_is_correct.csv")]
    assert find_rule_files(tmp_path / "missing", "optimal_rule_set") == []


def test_small_helpers(tmp_path):
    assert detect_prompt_col(pd.DataFrame(columns=["x", "question", "text"])) == "text"
    assert detect_prompt_col(pd.DataFrame(columns=["Prompt"])) == "Prompt"
    assert detect_prompt_col(pd.DataFrame(columns=["x"])) is None
    assert guess_filetype("a/b.CSV") == "csv"
    assert guess_filetype("r.json") == "json"
    assert guess_filetype("r.jsonl") == "jsonl"
    assert guess_filetype("r.csv.gz") == "csv"
    odd = tmp_path / "rules.txt"
    odd.write_text('{"rules": []}')
    assert guess_filetype(odd) == "json"
    odd.write_text("rule\na < 1\n")
    assert guess_filetype(odd) == "csv"
