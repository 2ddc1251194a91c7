"""The choice lists are the single source the engine, attribution, layout and CLI parsers use."""

from __future__ import annotations

import pytest

from lib.core import choices


def test_the_users_of_each_list_share_it():
    from lib.ablation import interventions
    from lib.attribution import eap
    from lib.models import loading

    assert interventions.INTERVENTIONS is choices.INTERVENTIONS
    assert eap.INTERVENTIONS is choices.ATTRIBUTION_INTERVENTIONS
    assert set(loading.DTYPES) | {"auto"} == set(choices.DTYPES)


@pytest.mark.parametrize("name, want", [("mean-positional", "mean-positional"), ("mean-donor", "mean"),
                                        ("mean-donor-positional", "mean-positional"), ("zero", "zero")])
def test_stage5_intervention_names(name, want):
    assert choices.attribution_intervention_for(name) == want


def test_stage5_has_no_form_of_an_unknown_intervention():
    with pytest.raises(ValueError):
        choices.attribution_intervention_for("resample")
