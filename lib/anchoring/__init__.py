"""Layer 4: neuron-anchored rules (stage 7) — candidate units from stage-6 buckets, evaluation
rows, flip columns from the batched engine, flip statistics, per-unit rule fits and coverage plots.
Imports layers 0-3.

Tests: every module here is exercised by tests/pipeline/test_stage7_anchoring.py (planted unit,
held-out TEST integrity, batched == one-at-a-time flip counts, summary files, coverage PDFs).
"""
