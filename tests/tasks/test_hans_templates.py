"""The offline HANS-style generator: every heuristic and subcase, balanced labels, its properties hold.

Ground truth is the definition of each heuristic (McCoy et al., 2019): lexical_overlap → every
hypothesis word is in the premise; subsequence → the hypothesis is a contiguous piece of the
premise; constituent → it is a whole clause of the premise. A subcase's label is fixed by its name.
"""

from __future__ import annotations

from collections import Counter

import pytest

from lib.tasks import hans_templates as ht
from lib.tasks.hans_nli_task import INFO_KEYS, split_prompt, word_tokens


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return ht.generate_hans_rows(900, seed=5)


def test_every_heuristic_and_subcase_with_balanced_labels(rows):
    assert len(ht.ALL_SUBCASES) == 30 and set(ht.ALL_SUBCASES) == {s for v in ht.SUBCASES.values() for s in v}
    assert Counter(r["subcase"] for r in rows) == {s: 30 for s in ht.ALL_SUBCASES}
    assert Counter(r["heuristic"] for r in rows) == {h: 300 for h in ht.HEURISTICS}
    assert Counter(r["expected_label"] for r in rows) == {"E": 450, "N": 450}
    for heuristic in ht.HEURISTICS:
        labels = Counter(r["expected_label"] for r in rows if r["heuristic"] == heuristic)
        assert labels == {"E": 150, "N": 150}, heuristic
    # any prefix is balanced to within one row
    for n in (1, 7, 31, 100):
        c = Counter(r["expected_label"] for r in rows[:n])
        assert abs(c["E"] - c["N"]) <= 1


def test_labels_follow_the_subcase_names(rows):
    for r in rows:
        assert r["expected_label"] == ("N" if r["subcase"][1] == "n" else "E")
        assert r["gold_label"] == ("non-entailment" if r["subcase"][1] == "n" else "entailment")
    with pytest.raises(ValueError, match="neither"):
        ht.subcase_label("lx_swap")


def _words(text: str) -> list[str]:
    return word_tokens(text)


def _contiguous(needle: list[str], hay: list[str]) -> bool:
    return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


def test_each_heuristic_holds_by_construction(rows):
    for r in rows:
        p, h = _words(r["premise"]), _words(r["hypothesis"])
        assert set(h) <= set(p), r  # every HANS pair has full lexical overlap
        assert r["full_lexical_overlap"]
        if r["heuristic"] in ("subsequence", "constituent"):
            assert _contiguous(h, p), r
            assert r["hypothesis_is_subsequence"]
        if r["heuristic"] == "constituent":  # a whole clause: the hypothesis ends a clause of the premise
            premise = r["premise"].rstrip(".").lower()
            hyp = r["hypothesis"].rstrip(".").lower()
            clauses = [c.strip() for c in premise.replace(", or ", ",").replace(", and ", ",").split(",")]
            assert any(c == hyp or c.endswith(" " + hyp) for c in clauses), r


def test_deterministic_unique_and_seed_dependent(rows):
    again = ht.generate_hans_rows(900, seed=5)
    assert again == rows
    pairs = [(r["premise"], r["hypothesis"]) for r in rows]
    assert len(set(pairs)) == len(pairs)
    other = ht.generate_hans_rows(900, seed=6)
    assert [(r["premise"], r["hypothesis"]) for r in other] != pairs
    # a shorter run is a prefix of a longer one: row i does not depend on how many follow
    assert ht.generate_hans_rows(45, seed=5) == rows[:45]


def test_rows_are_task_rows_with_prompts_and_info(rows):
    r = rows[0]
    assert r["data_source"] == ht.DATA_SOURCE and r["split"] == "validation"
    assert r["example_id"] == r["pair_id"] == "validation_gen_0"
    assert split_prompt(r["prompt"]) == (r["premise"], r["hypothesis"])
    assert all(k in r for k in INFO_KEYS)
    assert all(r["premise"][0].isupper() and r["premise"].endswith(".") for r in rows)


def test_full_hans_size_fits_the_vocabulary_and_bad_sizes_fail():
    for template in ht.TEMPLATES:
        per_subcase = len([t for t in ht.TEMPLATES if t.subcase == template.subcase])
        assert ht.template_capacity(template) * per_subcase >= ht.FULL_SIZE // 30, template.name
    with pytest.raises(ValueError, match="non-negative integer"):
        ht.generate_hans_rows(-1, seed=0)
    with pytest.raises(ValueError, match="cannot generate"):
        ht.generate_hans_rows(10_000_000, seed=0)
    assert ht.generate_hans_rows(0, seed=0) == []
