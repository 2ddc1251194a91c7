"""An offline generator of HANS-style NLI pairs (our own vocabulary and templates).

HANS (McCoy, Pavlick & Linzen 2019, "Right for the Wrong Reasons") is built from templates over a
small vocabulary: three heuristics (lexical_overlap, subsequence, constituent), each with five
entailment and five non-entailment subcases, 30 subcases with balanced labels. The real files need
a download; this module writes pairs of the same kind without one, so the HANS task runs offline
(`HANS_SOURCE=generated`, or `auto` when no file is present).

Nothing here is taken from the HANS repository: the word lists and the templates are ours, written
in the spirit of the paper. Each template makes its heuristic's property true by construction:
- lexical_overlap: every hypothesis word occurs in the premise;
- subsequence: the hypothesis is a contiguous word sequence of the premise;
- constituent: the hypothesis is a whole clause of the premise (so also contiguous).
The label depends on the subcase only: ln_/sn_/cn_ → non-entailment, le_/se_/ce_ → entailment.

`generate_hans_rows(n, seed)` is deterministic for (n, seed) (one `random.Random(seed)`, no global
state), cycles through the 30 subcases (E and N alternate, so any n is balanced within one row and
one row per subcase), and never repeats a (premise, hypothesis) pair. Rows are built with
`hans_nli_task.make_row`, so they have the fields of rows read from a HANS file, plus `data_source`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from lib.tasks.hans_nli_task import make_row

__all__ = [
    "GENERATOR_VERSION",
    "DATA_SOURCE",
    "HEURISTICS",
    "SUBCASES",
    "ALL_SUBCASES",
    "FULL_SIZE",
    "Template",
    "TEMPLATES",
    "subcase_label",
    "template_capacity",
    "generate_hans_rows",
]

GENERATOR_VERSION = "mecharule-hans-v1"
DATA_SOURCE = "generated:" + GENERATOR_VERSION
# The real HANS evaluation set: 1,000 pairs per subcase.
FULL_SIZE = 30_000
MAX_RANDOM_TRIES = 200  # random draws per row before falling back to the template's unused pairs

HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")
# Per heuristic: the five non-entailment subcases, then the five entailment subcases (HANS's names).
SUBCASES: dict[str, tuple[str, ...]] = {
    "lexical_overlap": (
        "ln_subject/object_swap", "ln_preposition", "ln_relative_clause", "ln_passive", "ln_conjunction",
        "le_relative_clause", "le_around_prepositional_phrase", "le_around_relative_clause",
        "le_conjunction", "le_passive",
    ),
    "subsequence": (
        "sn_NP/S", "sn_PP_on_subject", "sn_relative_clause_on_subject", "sn_past_participle", "sn_NP/Z",
        "se_conjunction", "se_adjective", "se_understood_object", "se_relative_clause_on_obj", "se_PP_on_obj",
    ),
    "constituent": (
        "cn_embedded_under_if", "cn_after_if_clause", "cn_embedded_under_verb", "cn_disjunction", "cn_adverb",
        "ce_embedded_under_since", "ce_after_since_clause", "ce_embedded_under_verb", "ce_conjunction",
        "ce_adverb",
    ),
}


def subcase_label(subcase: str) -> str:
    """The gold label a subcase name implies: `?n_…` → non-entailment, `?e_…` → entailment."""
    kind = subcase[1:3]
    if kind == "n_":
        return "non-entailment"
    if kind == "e_":
        return "entailment"
    raise ValueError(f"subcase {subcase!r} is neither a ?n_ nor a ?e_ subcase")


def _cycle_order() -> tuple[str, ...]:
    """The 30 subcases in generation order: for each rank, ln le sn se cn ce (N and E alternate)."""
    order: list[str] = []
    for rank in range(5):
        for heuristic in HEURISTICS:
            order += [SUBCASES[heuristic][rank], SUBCASES[heuristic][rank + 5]]
    return tuple(order)


ALL_SUBCASES: tuple[str, ...] = _cycle_order()
_HEURISTIC_OF: dict[str, str] = {s: h for h, subs in SUBCASES.items() for s in subs}

# ---- vocabulary (ours) -------------------------------------------------------------------------
NOUNS = ("doctor", "lawyer", "senator", "artist", "student", "manager", "author", "secretary", "judge",
         "banker", "professor", "athlete", "president", "scientist", "tourist", "actor")
# Transitive verbs whose past tense is also their passive participle (so passives reuse the word).
TRANSITIVE = ("advised", "helped", "thanked", "called", "recommended", "contacted", "supported",
              "introduced", "encouraged", "avoided", "admired", "paid", "mentioned", "visited", "stopped")
INTRANSITIVE = ("slept", "danced", "ran", "shouted", "resigned", "waited", "laughed", "arrived", "smiled",
                "traveled")
PREPOSITIONS = ("near", "behind", "beside")
ADJECTIVES = ("happy", "famous", "young", "old", "tall", "quiet", "clever", "busy")
PLACES = ("office", "school", "library", "hospital", "museum", "park")
# Verbs taking a noun phrase or a clause (garden path of sn_NP/S).
NP_S_VERBS = ("believed", "knew", "forgot", "remembered", "suspected")
# Optionally transitive verbs: the object can be dropped (se_understood_object, sn_NP/Z).
UNDERSTOOD_OBJECT_VERBS = ("paid", "called", "visited", "helped", "watched", "left")
NP_Z_VERBS = ("left", "called", "visited", "moved", "paid", "helped", "watched", "stopped")
NP_Z_SUBORDINATORS = ("before", "after", "while", "because", "although")
# Verbs whose participle starts a reduced relative ("the doctor paid in the office" = who was paid).
PARTICIPLE_VERBS = ("paid", "helped", "taught", "served", "called")
NONFACTIVE_VERBS = ("believed", "thought", "hoped", "claimed", "assumed", "suspected")
FACTIVE_VERBS = ("knew", "learned", "realized", "noticed", "remembered")
CONDITIONALS = ("if", "unless")
FACTIVE_SUBORDINATORS = ("since", "because", "although", "after")
NONFACTIVE_ADVERBS = ("perhaps", "probably", "maybe", "supposedly", "hopefully", "possibly")
FACTIVE_ADVERBS = ("certainly", "clearly", "definitely", "obviously", "undoubtedly")


def _plural(noun: str) -> str:
    return noun[:-1] + "ies" if noun.endswith("y") else noun + "s"


# ---- templates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A premise/hypothesis pattern: `{n0}`… distinct nouns (`{p0}`… their plurals) and word slots.

    Patterns are lower case without the final period; `fill` capitalises and adds it.
    """

    name: str
    subcase: str
    premise: str
    hypothesis: str
    n_nouns: int
    slots: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def heuristic(self) -> str:
        return _HEURISTIC_OF[self.subcase]

    @property
    def label(self) -> str:
        return subcase_label(self.subcase)

    def fill(self, nouns: tuple[str, ...], words: tuple[str, ...]) -> tuple[str, str]:
        """(premise, hypothesis) for these nouns and one word per slot."""
        values = {f"n{i}": n for i, n in enumerate(nouns)}
        values.update({f"p{i}": _plural(n) for i, n in enumerate(nouns)})
        values.update({name: w for (name, _), w in zip(self.slots, words)})
        return _sentence(self.premise.format(**values)), _sentence(self.hypothesis.format(**values))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _t(name: str, subcase: str, premise: str, hypothesis: str, n_nouns: int, **slots: tuple[str, ...]) -> Template:
    return Template(name, subcase, premise, hypothesis, n_nouns, tuple(slots.items()))


TV, IV = TRANSITIVE, INTRANSITIVE
TEMPLATES: tuple[Template, ...] = (
    # lexical_overlap, non-entailment
    _t("temp_ln_swap_1", "ln_subject/object_swap", "the {n0} {v} the {n1}", "the {n1} {v} the {n0}", 2, v=TV),
    _t("temp_ln_preposition_1", "ln_preposition", "the {n0} {prep} the {n1} {v} the {n2}",
       "the {n2} {v} the {n1}", 3, prep=PREPOSITIONS, v=TV),
    _t("temp_ln_relative_clause_1", "ln_relative_clause", "the {n0} who {v1} the {n1} {v2} the {n2}",
       "the {n2} {v2} the {n1}", 3, v1=TV, v2=TV),
    _t("temp_ln_passive_1", "ln_passive", "the {n0} was {v} by the {n1}", "the {n0} {v} the {n1}", 2, v=TV),
    _t("temp_ln_conjunction_1", "ln_conjunction", "the {n0} and the {n1} {v} the {n2}",
       "the {n2} {v} the {n1}", 3, v=TV),
    # lexical_overlap, entailment
    _t("temp_le_relative_clause_1", "le_relative_clause", "the {n0} who the {n1} {v1} {v2} the {n2}",
       "the {n1} {v1} the {n0}", 3, v1=TV, v2=TV),
    _t("temp_le_around_pp_1", "le_around_prepositional_phrase", "the {n0} {prep} the {n1} {v} the {n2}",
       "the {n0} {v} the {n2}", 3, prep=PREPOSITIONS, v=TV),
    _t("temp_le_around_rc_1", "le_around_relative_clause", "the {n0} who {v1} the {n1} {v2} the {n2}",
       "the {n0} {v2} the {n2}", 3, v1=TV, v2=TV),
    _t("temp_le_conjunction_1", "le_conjunction", "the {n0} and the {n1} {v} the {n2}",
       "the {n1} and the {n0} {v} the {n2}", 3, v=TV),
    _t("temp_le_passive_1", "le_passive", "the {n0} was {v} by the {n1}", "the {n1} {v} the {n0}", 2, v=TV),
    # subsequence, non-entailment
    _t("temp_sn_np_s_1", "sn_NP/S", "the {n0} {vs} the {n1} {v} the {n2}", "the {n0} {vs} the {n1}", 3,
       vs=NP_S_VERBS, v=TV),
    _t("temp_sn_pp_on_subject_1", "sn_PP_on_subject", "the {n0} {prep} the {n1} {iv}", "the {n1} {iv}", 2,
       prep=PREPOSITIONS, iv=IV),
    _t("temp_sn_rc_on_subject_1", "sn_relative_clause_on_subject", "the {n0} who {v} the {n1} {iv}",
       "the {n1} {iv}", 2, v=TV, iv=IV),
    _t("temp_sn_past_participle_1", "sn_past_participle", "the {n0} {vp} in the {place} {iv}",
       "the {n0} {vp} in the {place}", 1, vp=PARTICIPLE_VERBS, place=PLACES, iv=IV),
    _t("temp_sn_np_z_1", "sn_NP/Z", "{sub} the {n0} {vz} the {n1} {iv}", "the {n0} {vz} the {n1}", 2,
       sub=NP_Z_SUBORDINATORS, vz=NP_Z_VERBS, iv=IV),
    # subsequence, entailment
    _t("temp_se_conjunction_1", "se_conjunction", "the {n0} and the {n1} {iv}", "the {n1} {iv}", 2, iv=IV),
    _t("temp_se_conjunction_2", "se_conjunction", "the {n0} and the {n1} {v} the {n2}", "the {n1} {v} the {n2}",
       3, v=TV),
    _t("temp_se_adjective_1", "se_adjective", "{adj} {p0} {v} the {n1}", "{p0} {v} the {n1}", 2,
       adj=ADJECTIVES, v=TV),
    _t("temp_se_understood_object_1", "se_understood_object", "the {n0} {vo} the {n1}", "the {n0} {vo}", 2,
       vo=UNDERSTOOD_OBJECT_VERBS),
    _t("temp_se_rc_on_obj_1", "se_relative_clause_on_obj", "the {n0} {v1} the {n1} who {v2} the {n2}",
       "the {n0} {v1} the {n1}", 3, v1=TV, v2=TV),
    _t("temp_se_pp_on_obj_1", "se_PP_on_obj", "the {n0} {v} the {n1} {prep} the {n2}", "the {n0} {v} the {n1}",
       3, v=TV, prep=PREPOSITIONS),
    # constituent, non-entailment
    _t("temp_cn_embedded_under_if_1", "cn_embedded_under_if", "{cond} the {n0} {iv}, the {n1} {v} the {n2}",
       "the {n0} {iv}", 3, cond=CONDITIONALS, iv=IV, v=TV),
    _t("temp_cn_after_if_clause_1", "cn_after_if_clause", "{cond} the {n0} {iv}, the {n1} {v} the {n2}",
       "the {n1} {v} the {n2}", 3, cond=CONDITIONALS, iv=IV, v=TV),
    _t("temp_cn_embedded_under_verb_1", "cn_embedded_under_verb", "the {n0} {vn} that the {n1} {iv}",
       "the {n1} {iv}", 2, vn=NONFACTIVE_VERBS, iv=IV),
    _t("temp_cn_disjunction_1", "cn_disjunction", "the {n0} {iv1}, or the {n1} {iv2}", "the {n0} {iv1}", 2,
       iv1=IV, iv2=IV),
    _t("temp_cn_disjunction_2", "cn_disjunction", "the {n0} {iv1}, or the {n1} {iv2}", "the {n1} {iv2}", 2,
       iv1=IV, iv2=IV),
    _t("temp_cn_adverb_1", "cn_adverb", "{adv} the {n0} {v} the {n1}", "the {n0} {v} the {n1}", 2,
       adv=NONFACTIVE_ADVERBS, v=TV),
    # constituent, entailment
    _t("temp_ce_embedded_under_since_1", "ce_embedded_under_since", "{sub} the {n0} {iv}, the {n1} {v} the {n2}",
       "the {n0} {iv}", 3, sub=FACTIVE_SUBORDINATORS, iv=IV, v=TV),
    _t("temp_ce_after_since_clause_1", "ce_after_since_clause", "{sub} the {n0} {iv}, the {n1} {v} the {n2}",
       "the {n1} {v} the {n2}", 3, sub=FACTIVE_SUBORDINATORS, iv=IV, v=TV),
    _t("temp_ce_embedded_under_verb_1", "ce_embedded_under_verb", "the {n0} {vf} that the {n1} {iv}",
       "the {n1} {iv}", 2, vf=FACTIVE_VERBS, iv=IV),
    _t("temp_ce_conjunction_1", "ce_conjunction", "the {n0} {iv1}, and the {n1} {iv2}", "the {n0} {iv1}", 2,
       iv1=IV, iv2=IV),
    _t("temp_ce_conjunction_2", "ce_conjunction", "the {n0} {iv1}, and the {n1} {iv2}", "the {n1} {iv2}", 2,
       iv1=IV, iv2=IV),
    _t("temp_ce_adverb_1", "ce_adverb", "{adv} the {n0} {v} the {n1}", "the {n0} {v} the {n1}", 2,
       adv=FACTIVE_ADVERBS, v=TV),
)
_BY_SUBCASE: dict[str, tuple[Template, ...]] = {
    s: tuple(t for t in TEMPLATES if t.subcase == s) for s in ALL_SUBCASES
}
assert all(_BY_SUBCASE.values()) and len(TEMPLATES) == sum(map(len, _BY_SUBCASE.values()))


def template_capacity(template: Template) -> int:
    """How many distinct fillings a template has (ordered distinct nouns × every slot's words)."""
    return math.perm(len(NOUNS), template.n_nouns) * math.prod(len(words) for _, words in template.slots)


# ---- generation --------------------------------------------------------------------------------
def _plan(n: int) -> list[Template]:
    """The template of each row: subcases cycle in ALL_SUBCASES order; a subcase's templates rotate."""
    plan: list[Template] = []
    for i in range(n):
        templates = _BY_SUBCASE[ALL_SUBCASES[i % len(ALL_SUBCASES)]]
        plan.append(templates[(i // len(ALL_SUBCASES)) % len(templates)])
    return plan


def _check_capacity(plan: list[Template]) -> None:
    for template, need in Counter(plan).items():
        have = template_capacity(template)
        if need > have:
            raise ValueError(
                f"cannot generate {len(plan)} unique HANS-style pairs: subcase {template.subcase} "
                f"(template {template.name}) needs {need} but its vocabulary gives {have}"
            )


def _all_fillings(template: Template) -> Iterator[tuple[str, str]]:
    words = [w for _, w in template.slots]
    for nouns in itertools.permutations(NOUNS, template.n_nouns):
        for chosen in itertools.product(*words):
            yield template.fill(nouns, chosen)


class _PairDrawer:
    """Random unused pairs of each template: rejection draws, then a shuffled pool of what is left."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[tuple[str, str]] = set()
        self.pools: dict[str, list[tuple[str, str]]] = {}

    def _random(self, template: Template) -> tuple[str, str]:
        nouns = tuple(self.rng.sample(NOUNS, template.n_nouns))
        return template.fill(nouns, tuple(self.rng.choice(words) for _, words in template.slots))

    def _from_pool(self, template: Template) -> tuple[str, str] | None:
        if template.name not in self.pools:
            pool = [p for p in _all_fillings(template) if p not in self.seen]
            self.rng.shuffle(pool)
            self.pools[template.name] = pool
        pool = self.pools[template.name]
        while pool:
            pair = pool.pop()
            if pair not in self.seen:
                return pair
        return None

    def draw(self, template: Template) -> tuple[str, str]:
        pair: tuple[str, str] | None = None
        if template.name not in self.pools:
            for _ in range(MAX_RANDOM_TRIES):
                candidate = self._random(template)
                if candidate not in self.seen:
                    pair = candidate
                    break
        if pair is None:
            pair = self._from_pool(template)
        if pair is None:
            raise ValueError(f"the vocabulary has no unused pair left for template {template.name}")
        self.seen.add(pair)
        return pair


def generate_hans_rows(n: int, seed: int, split: str = "validation") -> list[dict]:
    """`n` unique HANS-style rows, deterministic for (n, seed), balanced over the 30 subcases.

    Row i has subcase `ALL_SUBCASES[i % 30]` (n = 30·k gives k per subcase; otherwise subcase counts
    and E/N counts differ by at most 1), `example_id` = `pair_id` = `<split>_gen_<i>`, and
    `data_source` = DATA_SOURCE. A ValueError when n < 0 or the vocabulary cannot give n unique pairs.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"generate_hans_rows: n must be a non-negative integer, got {n!r}")
    plan = _plan(n)
    _check_capacity(plan)
    drawer = _PairDrawer(random.Random(seed))
    rows: list[dict] = []
    for i, template in enumerate(plan):
        premise, hypothesis = drawer.draw(template)
        row = make_row(premise, hypothesis, template.label, split=split, example_id=f"{split}_gen_{i}",
                       pair_id=f"{split}_gen_{i}", heuristic=template.heuristic, subcase=template.subcase,
                       template=template.name)
        row["data_source"] = DATA_SOURCE
        rows.append(row)
    return rows
