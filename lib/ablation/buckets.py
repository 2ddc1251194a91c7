"""Cross-circuit unit buckets of one stage-6 run (spec §7): catastrophic units and agonists.

Every singleton record updates them. A unit is *catastrophic* when ablating it alone sends both
slices out of the regime (positive: both accuracies 0); it is an *agonist* when it is not
catastrophic and its `max_effect` (UCB) reaches τ.
"""

from __future__ import annotations

from typing import Any

from lib.ablation.cha import is_agonist

__all__ = ["NeuronBuckets", "is_catastrophic", "unit_key"]


def unit_key(layer_label: str, uid: int) -> str:
    """`m27:277` style key."""
    return f"{layer_label}:{int(uid)}"


def is_catastrophic(record: dict, regime: str, tol: float) -> bool:
    """Both slices left the regime entirely (positive: accuracy ≤ tol; negative: ≥ 1 − tol)."""
    a, u = record["acc_after_knockout_on_associated"], record["acc_after_knockout_on_unrelated"]
    if regime == "positive":
        return a <= tol and u <= tol
    return a >= 1 - tol and u >= 1 - tol


def _compact(record: dict, circuit_id: int, layer_label: str, uid: int) -> dict:
    return {"circuit_id": circuit_id, "baseline_subset": record["baseline_subset"], "layer_label": layer_label,
            "neuron_id": int(uid), "max_effect": record["max_effect"], "max_effect_hat": record.get("max_effect_hat"),
            "accuracy_gap": record["accuracy_gap"],
            "accuracy_on_associated": record["acc_after_knockout_on_associated"],
            "accuracy_on_unrelated": record["acc_after_knockout_on_unrelated"]}


class NeuronBuckets:
    """The spec's bucket state, updated from singleton records in circuit order."""

    def __init__(self, tau: float, catastrophic_tol: float = 1e-12, catastrophic_n_runs: int = 3) -> None:
        self.tau = tau
        self.tol = catastrophic_tol
        self.n_runs = catastrophic_n_runs
        self.candidates: dict[str, dict] = {}
        self.confirmed: dict[str, dict] = {}
        self.not_always: dict[str, dict] = {}
        self.agonists: dict[str, dict] = {}

    def update(self, record: dict, circuit_id: int) -> None:
        """Fold one record in (records of groups larger than one are ignored)."""
        if record.get("group_size") != 1:
            return
        (layer_label, ids), = record["layers_neurons_dict"].items()
        uid = int(ids[0])
        key = unit_key(layer_label, uid)
        regime = record["baseline_subset"]
        cat = is_catastrophic(record, regime, self.tol)
        compact = _compact(record, circuit_id, layer_label, uid)
        if regime == "positive" and key not in self.confirmed and key not in self.not_always \
                and (cat or key in self.candidates):
            state = self.candidates.setdefault(key, {"n_trials": 0, "n_zero_zero": 0, "history": []})
            state["n_trials"] += 1
            state["n_zero_zero"] += int(cat)
            state["history"].append(compact)
            if state["n_trials"] >= self.n_runs:
                del self.candidates[key]
                (self.confirmed if state["n_zero_zero"] == state["n_trials"] else self.not_always)[key] = state
        if not cat and is_agonist(record, self.tau):
            eff = float(record["max_effect"])
            prev = self.agonists.get(key)
            best = max(eff, prev["best_abs_gap"]) if prev else eff
            self.agonists[key] = {"best_abs_gap": best, "best_max_effect": best, "last_record": compact}
            self.candidates.pop(key, None)

    def excluded(self) -> set[str]:
        """Units a later circuit skips when `--exclude_known_agonists` is on (the original's rule)."""
        return set(self.candidates) | set(self.confirmed) | set(self.agonists)

    def to_json(self) -> dict[str, Any]:
        return {"catastrophic_zero": {"candidates": self.candidates, "confirmed": self.confirmed,
                                      "not_always": self.not_always},
                "non_catastrophic_agonists": self.agonists}

    def stats(self) -> dict[str, Any]:
        return {"counts": {"catastrophic_zero_candidates": len(self.candidates),
                           "catastrophic_zero_confirmed": len(self.confirmed),
                           "catastrophic_zero_not_always": len(self.not_always),
                           "non_catastrophic_agonists": len(self.agonists)},
                "excluded_from_future_ablations": sorted(self.excluded())}
