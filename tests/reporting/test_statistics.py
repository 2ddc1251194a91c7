"""lib.reporting.statistics: Holm adjustment, exact sign test and sign-flip test on hand-computed cases."""

from __future__ import annotations

import pytest

from lib.reporting.statistics import holm, sign_test_p, signflip_test


def test_statistics_helpers():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    p, n, pos, neg = sign_test_p([1, 2, -1, 0, 3])
    assert (n, pos, neg) == (4, 3, 1) and p == pytest.approx(5 / 16)
    p_flip, mode = signflip_test([1.0, 2.0, 3.0])
    assert mode == "exact" and p_flip == pytest.approx(1 / 8)
