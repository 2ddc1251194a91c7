"""The engine as a sequential tester on the embedded SmolLM2: per-prompt flips and margin drops equal
the engine's own answers and scores, prompt ranges add up to the whole slice, and the sequential
effect CHA on the real model finds planted units and nothing else in their layers."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ablation.engine import AblationEngine, ReplacementValues
from lib.ablation.engine_tester import EngineSequentialTester
from lib.ablation.sequential_cha import SequentialSettings, run_sequential_cha
from lib.tasks.base import load_task
from tests.planted import PLANTED, planted_model

ARITH = load_task("lib.tasks.arithmetic_task")
FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"


@pytest.fixture(scope="module")
def slices(smollm2):
    """Two slices of 8 few-shot additions the unmodified model answers correctly."""
    eng = AblationEngine(smollm2, 4, batch_size=64, stop_strings=("\n",))
    cands = [FEW_SHOT + f"{a}+{b}=" for a in range(2, 12) for b in (3, 5, 11, 20)]
    answers = eng.generate(eng.prepare(cands), [None])[0]
    ok = [p for p, f in zip(cands, ARITH.is_answer_positive([{"prompt": p} for p in cands], answers)) if f]
    assert len(ok) >= 16, f"only {len(ok)} correct prompts"
    return [(ok[:8], [{"prompt": p} for p in ok[:8]]), (ok[8:16], [{"prompt": p} for p in ok[8:16]])]


GROUPS = [{29: list(range(0, 576, 3))}, {28: [5, 9, 100]}, {27: list(range(200))}]


def test_flips_and_effects_are_the_engines_and_ranges_add_up(smollm2, slices):
    eng = AblationEngine(smollm2, 4, batch_size=32, stop_strings=("\n",))
    tester = EngineSequentialTester(eng, ARITH, slices, ReplacementValues("zero"), "positive")
    assert all(b.all() for b in tester.base_positive), "the slices hold correctly answered prompts"
    whole = tester(GROUPS, 0, 8)
    parts = [tester(GROUPS, 0, 3), tester(GROUPS, 3, 8)]
    for g, group in enumerate(GROUPS):
        for s in range(2):
            np.testing.assert_array_equal(whole[g][s].flips, np.concatenate([p[g][s].flips for p in parts]))
            np.testing.assert_allclose(whole[g][s].effects, np.concatenate([p[g][s].effects for p in parts]), atol=1e-4)
            prompts, rows = slices[s]
            prep = eng.prepare(prompts)
            answers, scores = eng.generate_scored(prep, [group], ReplacementValues("zero"), targets=tester.reference_tokens[s])
            flips = ~np.asarray(ARITH.is_answer_positive(rows, answers[0]))
            np.testing.assert_array_equal(whole[g][s].flips, flips)
            np.testing.assert_allclose(whole[g][s].effects, tester.base_margins[s] - scores[0].margin.numpy(), atol=1e-4)
    assert any(whole[g][s].flips.any() for g in range(len(GROUPS)) for s in range(2)), "some group must flip a prompt"


def test_sequential_cha_on_the_real_model_finds_the_planted_units(smollm2, slices):
    space = {10: list(range(0, 64)) + [201], 20: list(range(40, 104))}
    assert all(u in space[L] for L, ids in PLANTED.items() for u in ids)
    with planted_model(smollm2):
        eng = AblationEngine(smollm2, 4, batch_size=256, stop_strings=("\n",))
        tester = EngineSequentialTester(eng, ARITH, slices, ReplacementValues("zero"), "positive")
        recs, cost = run_sequential_cha(space, tester, 8, tuple(tester.base_margins), "positive",
                                        SequentialSettings(tau=0.2, n_start=4), np.random.default_rng(0))
    found = {(int(next(iter(r["layers_neurons_dict"]))[1:]), next(iter(r["layers_neurons_dict"].values()))[0])
             for r in recs if r.get("is_agonist")}
    assert found == {(L, u) for L, ids in PLANTED.items() for u in ids}
    assert cost["evaluations"] > 0  # cost at scale is the benchmark's business; 129 units and 8 prompts are too few


def test_effect_cha_recalls_partial_effect_units_of_the_real_model_like_the_exhaustive_reference(smollm2):
    """Planted units whose ablation breaks the answer only after a generated "2" (about half of the
    associated prompts, none of the unrelated ones), inside SmolLM2's own fragile units: the exhaustive
    reference calls exactly them high-impact, the effect CHA recalls both and nothing else, and
    knocking them out removes the behaviour where random same-size sets of the layer do not."""
    from lib.ablation.interventions import estimate_replacements
    from lib.ablation.knockout import knockout_validation
    from lib.ablation.recall import high_impact_units, recall_report, singleton_agonists
    from lib.ablation.sequential_cha import run_sequential_exhaustive

    eng = AblationEngine(smollm2, 4, batch_size=256, stop_strings=("\n",))
    cands = [FEW_SHOT + f"{a}+{b}=" for a in range(10, 19) for b in range(1, 19)]
    answers = eng.generate(eng.prepare(cands), [None])[0]
    ok = [(p, a) for p, a, f in zip(cands, answers, ARITH.is_answer_positive([{"prompt": p} for p in cands], answers)) if f]
    with_2 = [p for p, a in ok if "2" in a.strip()[:-1]]  # a "2" that is not the answer's last digit
    without = [p for p, a in ok if "2" not in a]
    assert len(with_2) >= 8 and len(without) >= 24, (len(with_2), len(without))
    assoc, unrel = with_2[:8] + without[:8], without[8:24]
    slices = [(assoc, [{"prompt": p} for p in assoc]), (unrel, [{"prompt": p} for p in unrel])]
    gate = smollm2.tokenizer("2", add_special_tokens=False)["input_ids"]
    assert len(gate) == 1
    planted = {29: [33, 201]}
    space = {29: list(range(24)) + [33, 201]}
    st = SequentialSettings(tau=0.2, n_start=8)
    means = estimate_replacements(eng, [p for p, _ in ok[-24:]], "mean-positional", space)  # of the unplanted model
    with planted_model(smollm2, planted, gate_token=gate[0]):
        tester = EngineSequentialTester(eng, ARITH, slices, means, "positive")
        assert all(b.all() for b in tester.base_positive)
        reference, ref_cost = run_sequential_exhaustive(space, tester, 16, st)
        hi = high_impact_units(reference)
        assert set(hi) == {(29, 33), (29, 201)}, hi
        assert all(0.3 <= rate < 1.0 for rate in hi.values())  # partial effects, not 1.0
        recs, cost = run_sequential_cha(space, tester, 16, tuple(tester.base_margins), "positive", st,
                                        np.random.default_rng(4))
        report = recall_report(hi, singleton_agonists(recs, st.tau), st.tau)
        assert report["recall"] == 1.0 and report["precision"] == 1.0
        # (on 26 units the background groups cost more than they save; the savings on large spaces
        # are checked in tests/ablation/test_sequential_cha.py and tests/pipeline/test_stage6_cha.py)
        assert cost["evaluations"] > 0 and ref_cost["evaluations"] == 26
        ko = knockout_validation(tester, planted, space, 16, tuple(tester.base_margins), 20, np.random.default_rng(0))
    assert ko["removal_associated"] >= 0.4 and ko["random_removal_associated_mean"] <= 0.1
    assert ko["removal_unrelated"] <= 0.1
