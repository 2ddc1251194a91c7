"""The held-out split: share, stratification, determinism, and termination on hard inputs."""

from __future__ import annotations

import numpy as np

from lib.features.split import make_test_split


def test_share_and_target_stratification():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4))
    y = (rng.random(500) < 0.3).astype(int)
    t = make_test_split(X, y, seed=3)
    assert abs(t.mean() - 0.2) < 0.01
    assert abs(y[t].mean() - y[~t].mean()) < 0.05


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 15)), rng.integers(0, 2, 300)
    assert (make_test_split(X, y, 7) == make_test_split(X, y, 7)).all()
    assert (make_test_split(X, y, 7) != make_test_split(X, y, 8)).any()


def test_terminates_when_no_clustering_has_large_enough_clusters():
    X = np.array([[0.0]] * 11 + [[1e6]])  # one far outlier: every k ≥ 2 isolates it
    y = np.array([0, 1] * 6)
    t = make_test_split(X, y, seed=0)
    assert t.sum() == 3


def test_tiny_and_featureless_inputs():
    assert make_test_split(np.zeros((4, 0)), np.array([0, 1, 0, 1]), 0).sum() == 1
    assert make_test_split(np.zeros((0, 3)), np.array([]), 0).size == 0
    t = make_test_split(np.zeros((50, 0)), np.array([0, 1] * 25), 0)
    assert t.sum() == 10
