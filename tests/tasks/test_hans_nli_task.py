"""Tests of the HANS NLI task: TSV parsing, row fields, sampling, answer scoring, seeds, cache I/O, data errors.

Everything runs on `tests/data/hans_sample.tsv` (hand-written rows in the HANS format) or on
temporary files; nothing touches the network.
"""

from __future__ import annotations

import argparse
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from lib.core.files_and_cache import ArtifactError, atomic_write_pickle
from lib.features.filters import sanitize_column_names
from lib.tasks.base import TaskError, load_task, row_as_namedtuple
from lib.tasks import hans_nli_task as hn

SAMPLE = REPO / "tests" / "data" / "hans_sample.tsv"
HANS_ENV = ("HANS_TASK_SEED", "HANS_SPLIT", "HANS_NUM_EXAMPLES", "HANS_BALANCE_LABELS",
            "HANS_MAX_NEW_TOKENS", "HANS_CACHE_DIR", "HANS_LOCAL_FILE", "HANS_SCORING", "HANS_SOURCE")
HEADER = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
          "sentence1\tsentence2\tpairID\theuristic\tsubcase\ttemplate")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in HANS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return hn.read_hans_file(SAMPLE)


@pytest.fixture(scope="module")
def by_pair(rows) -> dict[str, dict]:
    return {r["pair_id"]: r for r in rows}


def write_tsv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


# ---- parsing ----------------------------------------------------------------------------------
def test_sample_file_parses_and_skips_unlabelled_rows(rows):
    assert len(rows) == 49  # 51 data lines, one `-` and one empty gold label skipped
    ids = {r["pair_id"] for r in rows}
    assert "ex48" not in ids and "ex50" not in ids and {"ex0", "ex47", "ex49"} <= ids
    assert Counter(r["expected_label"] for r in rows) == {"E": 25, "N": 24}
    assert Counter(r["heuristic"] for r in rows) == {"lexical_overlap": 19, "subsequence": 15, "constituent": 15}
    assert all(r["gold_label"] in ("entailment", "non-entailment") for r in rows)
    assert all(r["split"] == "validation" for r in rows)
    first = rows[0]
    assert first["example_id"] == "validation_0" and first["pair_id"] == "ex0"
    assert (first["heuristic"], first["subcase"], first["template"]) == (
        "lexical_overlap", "ln_subject/object_swap", "temp1")
    # example ids count data lines, skipped ones included
    assert [r["example_id"] for r in rows if r["pair_id"] == "ex49"] == ["validation_49"]


def test_row_has_exactly_the_spec_fields(rows):
    assert set(rows[0]) == {
        "example_id", "pair_id", "split", "premise", "hypothesis", "gold_label", "expected_label",
        "heuristic", "subcase", "template", "premise_num_words", "hypothesis_num_words",
        "premise_num_chars", "hypothesis_num_chars", "premise_content_words", "hypothesis_content_words",
        "lexical_overlap_ratio", "full_lexical_overlap", "hypothesis_is_subsequence",
        "premise_has_negation", "hypothesis_has_negation", "prompt",
    }


@pytest.mark.parametrize(
    "label, expected",
    [("entailment", "E"), ("Entailment ", "E"), ("non-entailment", "N"), ("non_entailment", "N"),
     ("nonentailment", "N"), ("non entailment", "N"), ("neutral", "N"), ("contradiction", "N")],
)
def test_gold_label_mapping(label, expected):
    assert hn.map_gold_label(label) == expected


def test_unknown_gold_label_names_file_and_line(tmp_path):
    p = write_tsv(tmp_path / "bad.tsv", HEADER, [
        "entailment\t-\t-\t-\t-\tThe cat slept.\tThe cat slept.\tex0\tlexical_overlap\tle\tt1",
        "maybe\t-\t-\t-\t-\tThe cat slept.\tThe dog slept.\tex1\tlexical_overlap\tln\tt1",
    ])
    with pytest.raises(TaskError, match=r"bad\.tsv.*line 2.*'maybe'"):
        hn.read_hans_file(p)


def test_header_fallback_names_and_missing_optional_columns(tmp_path):
    p = write_tsv(tmp_path / "alt.tsv", "label\tpremise\thypothesis", [
        "entailment\tThe cat and the dog slept.\tThe dog slept.",
        "-\tThe cat slept.\tThe dog slept.",
        "non-entailment\tThe cat saw the dog.\tThe dog saw the cat.",
    ])
    got = hn.read_hans_file(p, split="train")
    assert [r["pair_id"] for r in got] == ["train_0", "train_2"]  # <split>_<idx> without pairID
    assert [r["expected_label"] for r in got] == ["E", "N"]
    assert all(r["heuristic"] == r["subcase"] == r["template"] == "" for r in got)
    assert got[0]["split"] == "train"


def test_pair_id_column_alias(tmp_path):
    p = write_tsv(tmp_path / "alias.tsv", "gold_label\tsentence1\tsentence2\tpair_id",
                  ["entailment\tThe cat slept.\tThe cat slept.\tp-7"])
    assert hn.read_hans_file(p)[0]["pair_id"] == "p-7"


def test_missing_required_column_names_the_file(tmp_path):
    p = write_tsv(tmp_path / "nohyp.tsv", "gold_label\tsentence1", ["entailment\tThe cat slept."])
    with pytest.raises(TaskError, match=r"nohyp\.tsv.*sentence2 or hypothesis"):
        hn.read_hans_file(p)


def test_file_without_labelled_rows_is_an_error(tmp_path):
    p = write_tsv(tmp_path / "empty.tsv", HEADER, ["-\t-\t-\t-\t-\tA b.\tA b.\tex0\th\ts\tt"])
    with pytest.raises(TaskError, match="no labelled rows"):
        hn.read_hans_file(p)


# ---- tokens and row fields --------------------------------------------------------------------
def test_word_tokens():
    assert hn.word_tokens("The well-known lawyer's dog DIDN'T run, 3 times.") == [
        "the", "well-known", "lawyer's", "dog", "didn't", "run", "times"]
    # one optional hyphen/apostrophe join per token, as the spec words it
    assert hn.word_tokens("mother-in-law") == ["mother-in", "law"]
    assert hn.content_tokens(["a", "the", "an", "cat", "the"]) == ["cat"]


FIELDS = ("premise_num_words", "hypothesis_num_words", "premise_num_chars", "hypothesis_num_chars",
          "premise_content_words", "hypothesis_content_words", "lexical_overlap_ratio", "full_lexical_overlap",
          "hypothesis_is_subsequence", "premise_has_negation", "hypothesis_has_negation")


@pytest.mark.parametrize(
    "pair_id, expected",
    [
        # "The doctor saw the lawyer." / "The lawyer saw the doctor.": same words, other order
        ("ex0", (5, 5, 26, 26, 3, 3, 1.0, True, False, False, False)),
        # "... / The lawyer did not see the doctor.": {doctor, lawyer} of {lawyer, did, not, see, doctor}
        ("ex8", (5, 7, 26, 34, 3, 5, 0.4, False, False, False, True)),
        # "The secretaries were encouraged by the scientists." / "The secretaries encouraged the scientists."
        ("ex4", (7, 5, 50, 42, 5, 3, 1.0, True, True, False, False)),
        # "The actor who did not hire the secretary resigned." / "The secretary resigned."
        ("ex24", (9, 3, 50, 23, 7, 2, 1.0, True, True, True, False)),
        # "Happy professors mentioned the well-known lawyer." (hyphenated token)
        ("ex27", (6, 5, 49, 43, 5, 4, 1.0, True, True, False, False)),
        # "The senators paid the judge." / "The judge was paid.": 2 of 3 hypothesis content words
        ("ex28", (5, 4, 28, 19, 3, 3, 2 / 3, False, False, False, False)),
        # "The manager advised the student's father behind the bankers." (apostrophe token)
        ("ex30", (9, 6, 60, 41, 6, 4, 1.0, True, True, False, False)),
        # "The secretary believed that nobody saw the authors." / "Nobody saw the authors."
        ("ex39", (8, 4, 51, 23, 6, 3, 1.0, True, True, True, True)),
    ],
)
def test_row_fields_on_hand_checked_rows(by_pair, pair_id, expected):
    row = by_pair[pair_id]
    got = tuple(row[k] for k in FIELDS)
    assert got[:6] == expected[:6] and got[7:] == expected[7:]
    assert got[6] == pytest.approx(expected[6])
    assert row["premise_num_chars"] == len(row["premise"]) and row["hypothesis_num_chars"] == len(row["hypothesis"])


def test_pair_statistics_edge_cases():
    empty = hn.pair_statistics("The cat slept.", "")
    assert empty["lexical_overlap_ratio"] == 0.0 and not empty["full_lexical_overlap"]
    assert empty["hypothesis_is_subsequence"]  # the empty sequence is a subsequence of anything
    only_articles = hn.pair_statistics("The cat slept.", "The a an.")
    assert only_articles["lexical_overlap_ratio"] == 0.0 and only_articles["hypothesis_content_words"] == 0
    gap = hn.pair_statistics("No dog saw a very old cat.", "dog saw cat")
    assert gap["hypothesis_is_subsequence"] and gap["premise_has_negation"] and not gap["hypothesis_has_negation"]
    order = hn.pair_statistics("dog saw cat", "cat saw dog")
    assert not order["hypothesis_is_subsequence"] and order["full_lexical_overlap"]
    for word in ("no", "not", "never", "none", "nobody", "nothing", "neither"):
        assert hn.pair_statistics(f"It is {word} here.", "x")["premise_has_negation"]
    assert not hn.pair_statistics("It isn't notable.", "x")["premise_has_negation"]


def test_prompt_has_four_lines_and_reads_back(by_pair):
    row = by_pair["ex0"]
    lines = row["prompt"].split("\n")
    assert len(lines) == 4 and lines[0] == hn.INSTRUCTION
    assert lines[1:] == ["P: The doctor saw the lawyer.", "H: The lawyer saw the doctor.", "A:"]
    assert "E" in lines[0] and "N" in lines[0]
    assert hn.split_prompt(row["prompt"]) == (row["premise"], row["hypothesis"])
    assert hn.split_prompt("no such lines") is None


# ---- sampling ---------------------------------------------------------------------------------
def test_balanced_sampling_exact_halves_deterministic_and_shuffled(rows):
    a = hn.sample_rows(rows, 32, True, 42)
    b = hn.sample_rows(rows, 32, True, 42)
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b]
    assert Counter(r["expected_label"] for r in a) == {"E": 16, "N": 16}
    assert [r["dataset_index"] for r in a] == list(range(32))
    labels = "".join(r["expected_label"] for r in a)
    assert labels != "E" * 16 + "N" * 16  # shuffled after concatenation
    assert len({r["pair_id"] for r in a}) == 32
    c = hn.sample_rows(rows, 32, True, 7)
    assert [r["pair_id"] for r in c] != [r["pair_id"] for r in a]
    odd = hn.sample_rows(rows, 7, True, 42)
    assert Counter(r["expected_label"] for r in odd) == {"E": 3, "N": 4}  # n//2 E, n − n//2 N


def test_balanced_sampling_follows_the_spec_recipe(rows):
    rng = random.Random(5)
    pos = [r for r in rows if r["expected_label"] == "E"]
    neg = [r for r in rows if r["expected_label"] == "N"]
    want = rng.sample(pos, 5) + rng.sample(neg, 5)
    rng.shuffle(want)
    assert [r["pair_id"] for r in hn.sample_rows(rows, 10, True, 5)] == [r["pair_id"] for r in want]


def test_unbalanced_sampling(rows):
    got = hn.sample_rows(rows, 10, False, 3)
    assert [r["pair_id"] for r in got] == [r["pair_id"] for r in random.Random(3).sample(rows, 10)]
    assert [r["dataset_index"] for r in got] == list(range(10))


@pytest.mark.parametrize("n", [0, -5, 49, 1000])
def test_all_rows_when_n_is_not_positive_or_too_large(rows, n):
    got = hn.sample_rows(rows, n, True, 42)
    assert [r["pair_id"] for r in got] == [r["pair_id"] for r in rows]
    assert [r["dataset_index"] for r in got] == list(range(len(rows)))
    assert "dataset_index" not in rows[0]  # inputs are not modified


def test_too_few_rows_of_a_label_is_a_clear_error(rows):
    few = [r for r in rows if r["expected_label"] == "N"][:3] + [r for r in rows if r["expected_label"] == "E"]
    with pytest.raises(TaskError, match=r"needs 10 entailment and 10 non-entailment rows.*25 and 3.*HANS_BALANCE_LABELS=0"):
        hn.sample_rows(few, 20, True, 42)
    assert len(hn.sample_rows(few, 20, False, 42)) == 20


# ---- configuration and stage-1 prompts --------------------------------------------------------
def test_config_defaults_and_aliases(monkeypatch):
    cfg = hn.HansConfig.from_env({})
    assert (cfg.seed, cfg.split, cfg.num_examples, cfg.balance_labels, cfg.max_new_tokens, cfg.cache_dir,
            cfg.local_file) == (42, "validation", 1024, True, 3, "./cache/hans", "")
    for alias in ("valid", "dev", "eval", "evaluation", "VALIDATION"):
        assert hn.HansConfig.from_env({"HANS_SPLIT": alias}).split == "validation"
    for alias in ("train", "training"):
        assert hn.HansConfig.from_env({"HANS_SPLIT": alias}).split == "train"
    for off in ("0", "false", "No"):
        assert hn.HansConfig.from_env({"HANS_BALANCE_LABELS": off}).balance_labels is False
    assert hn.HansConfig.from_env({"HANS_BALANCE_LABELS": "1"}).balance_labels is True


@pytest.mark.parametrize(
    "env, message",
    [({"HANS_SPLIT": "test2"}, "HANS_SPLIT"), ({"HANS_NUM_EXAMPLES": "many"}, "HANS_NUM_EXAMPLES"),
     ({"HANS_BALANCE_LABELS": "maybe"}, "HANS_BALANCE_LABELS"), ({"HANS_MAX_NEW_TOKENS": "0"}, "HANS_MAX_NEW_TOKENS"),
     ({"HANS_TASK_SEED": "1.5"}, "HANS_TASK_SEED")],
)
def test_bad_config_values_name_the_variable(env, message):
    with pytest.raises(TaskError, match=message):
        hn.HansConfig.from_env(env)


def test_build_prompts_from_env_and_max_prompts_override(monkeypatch):
    monkeypatch.setenv("HANS_LOCAL_FILE", str(SAMPLE))
    monkeypatch.setenv("HANS_NUM_EXAMPLES", "12")
    recs = hn.TASK_SPEC.build_prompts(argparse.Namespace(max_prompts=0), model_alias=None)
    assert len(recs) == 12 and Counter(r["expected_label"] for r in recs) == {"E": 6, "N": 6}
    again = hn.TASK_SPEC.build_prompts(argparse.Namespace(max_prompts=0, seed=123))
    assert [r["prompt"] for r in again] == [r["prompt"] for r in recs]  # --seed does not matter
    assert len(hn.TASK_SPEC.build_prompts(argparse.Namespace(max_prompts=20))) == 20
    monkeypatch.setenv("HANS_TASK_SEED", "1")
    other = hn.TASK_SPEC.build_prompts(None)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in recs]
    monkeypatch.setenv("HANS_NUM_EXAMPLES", "0")
    assert len(hn.TASK_SPEC.build_prompts(None)) == 49


def test_max_new_tokens_and_stop_strings(monkeypatch):
    # Log-likelihood scoring (the default) answers with one label token.
    assert hn.TASK_SPEC.MAX_NEW_TOKENS == 1 and hn.TASK_SPEC.answer_choices() == hn.LABEL_CHOICES
    monkeypatch.setenv("HANS_SCORING", "generate")
    assert hn.TASK_SPEC.MAX_NEW_TOKENS == 3 == hn.MAX_NEW_TOKENS and hn.TASK_SPEC.answer_choices() is None
    monkeypatch.setenv("HANS_MAX_NEW_TOKENS", "5")
    assert hn.TASK_SPEC.MAX_NEW_TOKENS == 5
    monkeypatch.setenv("HANS_SCORING", "guess")
    with pytest.raises(TaskError, match="HANS_SCORING"):
        hn.TASK_SPEC.answer_choices()
    assert hn.TASK_SPEC.generation_stop_strings(argparse.Namespace(), None) == ()


def test_load_task_short_name():
    assert load_task("hans_nli") is hn.TASK_SPEC
    assert load_task("lib.tasks.hans_nli_task") is hn.TASK_SPEC


# ---- data file: local, cached, download failure -----------------------------------------------
def test_missing_local_file_is_a_task_error(monkeypatch, tmp_path):
    missing = tmp_path / "nope.tsv"
    monkeypatch.setenv("HANS_LOCAL_FILE", str(missing))
    with pytest.raises(TaskError, match=rf"HANS_LOCAL_FILE '{missing}' does not exist"):
        hn.TASK_SPEC.build_prompts(None)


def test_cached_split_file_is_used_without_download(monkeypatch, tmp_path):
    (tmp_path / "heuristics_train_set.txt").write_bytes(SAMPLE.read_bytes())
    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HANS_SPLIT", "training")
    monkeypatch.setattr(hn, "HANS_BASE_URL", "http://127.0.0.1:9/")
    recs = hn.TASK_SPEC.build_prompts(argparse.Namespace(max_prompts=4))
    assert len(recs) == 4 and all(r["split"] == "train" for r in recs)


@pytest.mark.parametrize("split, name", [("validation", "heuristics_evaluation_set.txt"),
                                         ("train", "heuristics_train_set.txt")])
def test_offline_download_failure_is_one_clear_error(monkeypatch, tmp_path, split, name):
    cache = tmp_path / "hans"
    monkeypatch.setenv("HANS_CACHE_DIR", str(cache))
    monkeypatch.setenv("HANS_SPLIT", split)
    monkeypatch.setenv("HANS_SOURCE", "download")  # the default (auto) never downloads
    monkeypatch.setattr(hn, "HANS_BASE_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    with pytest.raises(TaskError) as info:
        hn.TASK_SPEC.build_prompts(argparse.Namespace(no_progress=True))
    msg = str(info.value)
    assert "could not download" in msg and f"http://127.0.0.1:9/{name}" in msg and "HANS_LOCAL_FILE" in msg
    assert info.value.__suppress_context__  # no chained stack trace of the network error
    assert not any(cache.iterdir())  # no partial file left behind


def test_empty_cached_file_is_downloaded_again(monkeypatch, tmp_path):
    (tmp_path / "heuristics_evaluation_set.txt").write_bytes(b"")
    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hn, "HANS_BASE_URL", "http://127.0.0.1:9/")
    with pytest.raises(TaskError, match="could not download"):
        hn.resolve_data_file(hn.HansConfig.from_env(), progress=False)


# ---- HANS_SOURCE ------------------------------------------------------------------------------
def test_auto_source_without_a_file_uses_the_generator_and_never_the_network(monkeypatch, tmp_path):
    from lib.tasks.hans_templates import DATA_SOURCE

    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(hn, "HANS_BASE_URL", "http://127.0.0.1:9/")  # a download would fail loudly
    recs = hn.TASK_SPEC.build_prompts(argparse.Namespace(max_prompts=60, no_progress=True))
    assert len(recs) == 60 and Counter(r["expected_label"] for r in recs) == {"E": 30, "N": 30}
    assert {r["data_source"] for r in recs} == {DATA_SOURCE}
    assert {r["heuristic"] for r in recs} == {"lexical_overlap", "subsequence", "constituent"}
    assert not (tmp_path / "empty").exists()
    stats = hn.TASK_SPEC.get_basic_statistics(pd.DataFrame([{**r, "is_correct": True} for r in recs]))
    assert stats["data_source"] == DATA_SOURCE


def test_a_given_or_cached_file_wins_over_the_generator(monkeypatch, tmp_path):
    monkeypatch.setenv("HANS_LOCAL_FILE", str(SAMPLE))
    rows, source = hn.load_source_rows(hn.HansConfig.from_env(), progress=False)
    assert source.kind == "file" and source.description.startswith("file:hans_sample.tsv sha256:")
    assert len(rows) == 49 and {r["data_source"] for r in rows} == {source.description}
    monkeypatch.delenv("HANS_LOCAL_FILE")
    (tmp_path / "heuristics_evaluation_set.txt").write_bytes(SAMPLE.read_bytes())
    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path))
    cached = hn.load_source_rows(hn.HansConfig.from_env(), progress=False)[1]
    assert cached.description == source.description.replace("hans_sample.tsv", "heuristics_evaluation_set.txt")
    monkeypatch.setenv("HANS_SOURCE", "generated")  # forcing the generator ignores the cached file
    assert hn.load_source_rows(hn.HansConfig.from_env(), progress=False)[1].kind == "generated"


def test_source_file_without_a_file_and_a_bad_source_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HANS_SOURCE", "file")
    with pytest.raises(TaskError, match="HANS_SOURCE=file but no HANS file: set HANS_LOCAL_FILE"):
        hn.TASK_SPEC.build_prompts(None)
    monkeypatch.setenv("HANS_SOURCE", "internet")
    with pytest.raises(TaskError, match="HANS_SOURCE='internet'"):
        hn.HansConfig.from_env()


def test_generated_splits_are_fixed_sets_sampled_by_the_task_seed(monkeypatch, tmp_path):
    monkeypatch.setenv("HANS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HANS_NUM_EXAMPLES", "30")
    first = hn.TASK_SPEC.build_prompts(argparse.Namespace(no_progress=True))
    assert [r["prompt"] for r in hn.TASK_SPEC.build_prompts(argparse.Namespace(seed=7))] == [r["prompt"] for r in first]
    monkeypatch.setenv("HANS_TASK_SEED", "3")
    assert [r["prompt"] for r in hn.TASK_SPEC.build_prompts(None)] != [r["prompt"] for r in first]
    monkeypatch.setenv("HANS_SPLIT", "train")
    train = hn.TASK_SPEC.build_prompts(None)
    assert all(r["split"] == "train" and r["example_id"].startswith("train_gen_") for r in train)


def test_download_from_a_local_file_url_is_atomic(tmp_path):
    dest = tmp_path / "out" / "heuristics_evaluation_set.txt"
    got = hn.download_file(SAMPLE.resolve().as_uri(), dest, progress=False)
    assert got == dest and dest.read_bytes() == SAMPLE.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


# ---- scoring ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, expected",
    [("entailment", "E"), ("Entailment.", "E"), (" E", "E"), ("E", "E"), (" e\n", "E"), ("N", "N"),
     (" N.", "N"), ("not entailment", "N"), ("non-entailment", "N"), ("Non entailment", "N"),
     ("nonentailment", "N"), ("NON-ENTAILMENT.", "N"), ("It is not entailed", "N"), ("neutral", "N"),
     ("Contradiction", "N"), ("", None), ("   ", None), (None, None), ("maybe", None), ("yes", None),
     (" The lawyer never", None), ("e-mail", None), ("A: N", "N"), (" E or N", "N"),
     # only the first non-blank line counts: the model's continuation is ignored
     (" E\nN", "E"), ("\n N\nP: The", "N"), (" E\nP:", "E"), (" entailment\nnon-entailment", "E")],
)
def test_parse_predicted_label(answer, expected):
    assert hn.parse_predicted_label(answer) == expected


def test_is_answer_positive(by_pair):
    rows = [by_pair["ex0"], by_pair["ex9"], by_pair["ex9"], {"gold_label": "non-entailment", "prompt": "x"}]
    assert hn.TASK_SPEC.is_answer_positive(rows, [" N", " E", "maybe", "not entailment"]) == [True, True, False, True]
    with pytest.raises(ValueError, match="2 rows but 1 responses"):
        hn.TASK_SPEC.is_answer_positive(rows[:2], ["E"])
    with pytest.raises(TaskError, match="expected_label"):
        hn.TASK_SPEC.is_answer_positive([{"prompt": "x"}], ["E"])


# ---- cache round trip and info ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_rows(rows) -> list[dict]:
    recs = hn.sample_rows(rows, 12, True, 42)
    answers = [" E", " N", "entailment", "", " The lawyer", "neutral"] * 2
    return hn.TASK_SPEC.assemble_cache(recs, answers, None)


def test_assemble_cache_rows(cache_rows):
    assert len(cache_rows) == 12 and isinstance(cache_rows, list)
    r = cache_rows[0]
    assert r["raw_output"] == " E" and r["predicted_label"] == "E"
    assert r["is_correct"] is (r["expected_label"] == "E")
    assert [c["predicted_label"] for c in cache_rows[:6]] == ["E", "N", "E", None, None, "N"]
    assert all(c["is_correct"] is False for c in cache_rows if c["predicted_label"] is None)
    assert {"dataset_index", "prompt", "expected_label", "heuristic"} <= set(r)
    with pytest.raises(ValueError, match="12 records but 1 answers"):
        hn.TASK_SPEC.assemble_cache(cache_rows, ["E"], None)


def test_cache_round_trip(cache_rows, tmp_path):
    pkl = tmp_path / "llm_io_data.pkl"
    padded = [dict(r) for r in cache_rows]
    padded[0]["prompt"] = "  " + padded[0]["prompt"] + "\n"
    padded[1]["is_correct"] = 1  # loader casts to bool
    atomic_write_pickle(pkl, padded)
    df = hn.TASK_SPEC.load_dataset_from_cache(str(pkl))
    assert len(df) == 12 and df["is_correct"].dtype == bool
    assert df.loc[0, "prompt"] == cache_rows[0]["prompt"]
    assert df.loc[1, "is_correct"] is True or df.loc[1, "is_correct"] == True  # noqa: E712
    for col in ("raw_output", "predicted_label", "split", "dataset_index", "heuristic", "lexical_overlap_ratio"):
        assert col in df.columns
    for row, orig in zip(df.itertuples(index=False), cache_rows):
        info = hn.TASK_SPEC.parse_prompt_row(row)
        assert list(info) == [k.strip() for k in hn.TOKENS_DICT_KEYS.split(",")]
        assert info == {k: orig[k] for k in info}
        assert all(type(info[k]) is int for k in ("premise_num_words", "hypothesis_num_chars", "premise_content_words"))
        assert type(info["lexical_overlap_ratio"]) is float
        assert all(type(info[k]) is bool for k in ("full_lexical_overlap", "hypothesis_is_subsequence",
                                                   "premise_has_negation", "hypothesis_has_negation"))
        assert all(type(info[k]) is str for k in ("heuristic", "subcase", "template"))
    stats = hn.TASK_SPEC.get_basic_statistics(df)
    assert stats["n_examples"] == 12 and stats["label_counts"] == {"E": 6, "N": 6}
    assert stats["accuracy"] == pytest.approx(df["is_correct"].mean())
    assert stats["n_correct"] == int(df["is_correct"].sum())  # generic stats merged in
    for group in ("accuracy_by_heuristic", "accuracy_by_subcase"):
        assert sum(v["n"] for v in stats[group].values()) == 12
        assert all(set(v) == {"accuracy", "n"} for v in stats[group].values())


def test_basic_statistics_by_heuristic():
    df = pd.DataFrame({
        "prompt": list("abcde"), "expected_label": ["E", "N", "E", "N", "N"],
        "predicted_label": ["E", None, "N", "N", "E"], "is_correct": [True, False, False, True, False],
        "heuristic": ["lexical_overlap", "lexical_overlap", "subsequence", "constituent", "constituent"],
        "subcase": ["le_a", "ln_a", "se_a", "cn_a", "cn_a"],
    })
    stats = hn.TASK_SPEC.get_basic_statistics(df)
    assert stats["accuracy"] == pytest.approx(0.4) and stats["label_counts"] == {"E": 2, "N": 3}
    assert stats["accuracy_by_heuristic"] == {
        "constituent": {"accuracy": 0.5, "n": 2}, "lexical_overlap": {"accuracy": 0.5, "n": 2},
        "subsequence": {"accuracy": 0.0, "n": 1}}
    assert stats["accuracy_by_subcase"]["cn_a"] == {"accuracy": 0.5, "n": 2}
    assert stats["predicted_label_counts"] == {"E": 2, "N": 2, "None": 1}


def test_parse_prompt_row_rebuilds_missing_fields_from_the_prompt(by_pair):
    row = by_pair["ex8"]
    info = hn.TASK_SPEC.parse_prompt_row(row_as_namedtuple({"prompt": row["prompt"]}))
    assert info["lexical_overlap_ratio"] == pytest.approx(0.4) and info["hypothesis_has_negation"] is True
    assert info["premise_num_chars"] == 26 and info["heuristic"] == ""
    with pytest.raises(TaskError, match="P: "):
        hn.TASK_SPEC.parse_prompt_row({"prompt": "no premise here"})


def test_loader_rejects_other_pickles(tmp_path):
    bad = tmp_path / "arith.pkl"
    bad.write_bytes(pickle.dumps({"+": [("1+1=", 2, "2", True, True)]}))
    with pytest.raises(TaskError, match=rf"HANS stage-1 cache '{bad}' holds a dict"):
        hn.TASK_SPEC.load_dataset_from_cache(str(bad))
    bad.write_bytes(pickle.dumps([("a", "b")]))
    with pytest.raises(TaskError, match="non-dict items"):
        hn.TASK_SPEC.load_dataset_from_cache(str(bad))
    bad.write_bytes(pickle.dumps([{"raw_output": "E"}]))
    with pytest.raises(TaskError, match="'prompt'"):
        hn.TASK_SPEC.load_dataset_from_cache(str(bad))
    with pytest.raises(ArtifactError, match="does not exist"):
        hn.TASK_SPEC.load_dataset_from_cache(str(tmp_path / "missing.pkl"))


# ---- seed features ----------------------------------------------------------------------------
SEED_LABELS = [
    "Lexical overlap ratio", "Full lexical overlap", "Hypothesis is subsequence", "Premise length",
    "Hypothesis length", "Hypothesis shorter than premise", "Premise has negation", "Hypothesis has negation",
    "Lexical overlap heuristic", "Subsequence heuristic", "Constituent heuristic",
]


def test_seed_labels_exact():
    assert [f.label for f in hn.SEED_FEATURES] == SEED_LABELS
    assert all(f.origin == "predefined" for f in hn.SEED_FEATURES)
    assert hn.TASK_SPEC.SEED_FEATURES is hn.SEED_FEATURES


@pytest.mark.parametrize(
    "pair_id, expected",
    [
        ("ex0", [1.0, 1.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
        ("ex8", [0.4, 0.0, 0.0, 5.0, 7.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        ("ex24", [1.0, 1.0, 1.0, 9.0, 3.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        ("ex28", [2 / 3, 0.0, 0.0, 5.0, 4.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        ("ex39", [1.0, 1.0, 1.0, 8.0, 4.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]),
    ],
)
def test_seed_features_on_hand_checked_rows(by_pair, pair_id, expected):
    row = by_pair[pair_id]
    info = hn.TASK_SPEC.parse_prompt_row(row_as_namedtuple(row))
    got = [f(row["prompt"], info) for f in hn.SEED_FEATURES]
    assert got == pytest.approx(expected)


def test_seed_features_run_in_the_sandbox(rows):
    from lib.features.sandbox import FeatureSandbox

    infos = [hn.TASK_SPEC.parse_prompt_row(row_as_namedtuple(r)) for r in rows]
    with FeatureSandbox(n_workers=1, timeout_s=60.0, cpu_s=30.0) as sb:
        res = sb.evaluate(list(hn.SEED_FEATURES), [r["prompt"] for r in rows], infos)
    assert res.rejected == [] and [f.label for f in res.kept] == SEED_LABELS
    assert res.matrix.shape == (49, 11) and not pd.isna(res.matrix).any()
    direct = [[f(r["prompt"], i) for f in hn.SEED_FEATURES] for r, i in zip(rows, infos)]
    np.testing.assert_allclose(res.matrix, np.array(direct, dtype=float))


def test_seed_column_names_do_not_vanish_next_to_dataset_columns(cache_rows, tmp_path):
    pkl = tmp_path / "c.pkl"
    atomic_write_pickle(pkl, cache_rows)
    df = hn.TASK_SPEC.load_dataset_from_cache(str(pkl))
    names = sanitize_column_names(SEED_LABELS, reserved=[*df.columns, "row_id", "is_test", "split"])
    assert names == [
        "lexical_overlap_ratio_1", "full_lexical_overlap_1", "hypothesis_is_subsequence_1", "premise_length",
        "hypothesis_length", "hypothesis_shorter_than_premise", "premise_has_negation_1",
        "hypothesis_has_negation_1", "lexical_overlap_heuristic", "subsequence_heuristic", "constituent_heuristic",
    ]
    assert not set(names) & set(df.columns)


def test_system_prompt_and_tokens_keys():
    assert hn.TOKENS_DICT_KEYS == (
        "premise_num_words, hypothesis_num_words, premise_num_chars, hypothesis_num_chars, "
        "premise_content_words, hypothesis_content_words, lexical_overlap_ratio, full_lexical_overlap, "
        "hypothesis_is_subsequence, premise_has_negation, hypothesis_has_negation, heuristic, subcase, template")
    text = hn.SYSTEM_PROMPT.lower()
    for phrase in ("hans", "premise", "hypothesis", "lexical overlap", "subsequence", "constituent", "negation",
                   "longer"):
        assert phrase in text
    assert hn.TASK_SPEC.SYSTEM_PROMPT == hn.SYSTEM_PROMPT
