"""The held-out `is_test` split of stage 2 (spec 5.9): strata from k-means clusters × target.

Clustering the standardised (PCA-reduced) feature space and stratifying on cluster and
target keeps the test set spread over the input space. The k back-off is bounded: when
even k = 2 leaves a cluster smaller than the minimum stratum, one stratum is used.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

__all__ = ["TEST_SHARE", "make_test_split"]

TEST_SHARE = 0.20


def _cluster_strata(X: np.ndarray, seed: int, min_stratum: int) -> np.ndarray:
    """Cluster labels with every cluster ≥ min_stratum rows, or all zeros if impossible."""
    n = X.shape[0]
    if X.shape[1] == 0:
        return np.zeros(n, dtype=int)
    Z = StandardScaler().fit_transform(np.nan_to_num(X, nan=0.0))
    Z = np.nan_to_num(Z, nan=0.0)
    if Z.shape[1] > 10:
        Z = PCA(n_components=0.95, svd_solver="full", random_state=seed).fit_transform(Z)
    k_cap = min(200, max(2, n // 5))
    k = int(np.clip(n // 8, 2, k_cap))
    while True:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=2048, n_init="auto")
        labels = km.fit_predict(Z)
        if np.bincount(labels, minlength=k).min() >= min_stratum:
            return labels
        if k == 2:
            return np.zeros(n, dtype=int)
        k = max(2, int(math.floor(0.8 * k)))


def make_test_split(X: np.ndarray, y: np.ndarray, seed: int, test_share: float = TEST_SHARE) -> np.ndarray:
    """Boolean `is_test` mask: ~test_share of rows, stratified by cluster and primary target."""
    n = X.shape[0]
    is_test = np.zeros(n, dtype=bool)
    if n == 0:
        return is_test
    rng = np.random.default_rng(seed)
    if n < 10:
        is_test[rng.permutation(n)[: max(1, round(test_share * n))]] = True
        return is_test
    min_stratum = math.ceil(1 / test_share)
    strata = 2 * _cluster_strata(X, seed, min_stratum) + np.asarray(y, dtype=int)
    idx = np.arange(n)
    try:
        _, test_idx = train_test_split(idx, test_size=test_share, random_state=seed, stratify=strata)
    except ValueError:  # a stratum with a single row
        _, test_idx = train_test_split(idx, test_size=test_share, random_state=seed)
    is_test[test_idx] = True
    return is_test
