"""Small, deterministic sampling helpers shared by prompt builders and later stages."""

from __future__ import annotations

import random
from typing import Any, Hashable, Mapping, Sequence

__all__ = ["stratified_subsample"]


def _group_key(record: Any, key: str) -> Hashable:
    """The stratum of one record: `record[key]` for mappings, else the attribute `key`."""
    if isinstance(record, Mapping):
        return record[key]
    return getattr(record, key)


def stratified_subsample(records: Sequence[Any], key: str, n: int, seed: int) -> list[Any]:
    """A seeded sample of `n` records with an equal share per stratum, kept in input order.

    Strata are the distinct values of `key`, in order of first appearance. Each stratum gets
    `n // k` records and the first `n % k` strata one more; a stratum smaller than its share
    gives all its records and the shortfall goes to the next strata (in order) that still
    have records, so exactly `min(n, len(records))` records come back. Within a stratum the
    records are drawn uniformly without replacement by `random.Random(seed)`. The result
    keeps the relative order of `records`; `n >= len(records)` returns all of them.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"stratified_subsample: n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"stratified_subsample: n must be >= 0, got {n}")
    records = list(records)
    if n >= len(records):
        return records
    if n == 0:
        return []

    groups: dict[Hashable, list[int]] = {}
    for idx, rec in enumerate(records):
        groups.setdefault(_group_key(rec, key), []).append(idx)
    members = list(groups.values())

    k = len(members)
    quotas = [min(n // k + (1 if g < n % k else 0), len(m)) for g, m in enumerate(members)]
    left = n - sum(quotas)
    while left > 0:  # hand the shortfall of small strata to strata with records to spare
        for g, m in enumerate(members):
            if left == 0:
                break
            if quotas[g] < len(m):
                quotas[g] += 1
                left -= 1

    rng = random.Random(seed)
    chosen: list[int] = []
    for m, q in zip(members, quotas):
        chosen.extend(m[i] for i in rng.sample(range(len(m)), q))
    chosen.sort()
    return [records[i] for i in chosen]
