"""Layer 3: the batched ablation engine (G groups x P prompts per forward pass, shared prompt
cache, per-row masks), replacement values (mean, positional, donor), CHA group testing, and the
agonist buckets of stage 6. Imports layers 0-2.

Tests: `interventions` is covered by tests/ablation/test_engine.py; `buckets` by
tests/pipeline/test_stage6_cha.py (stage 6 writes and checks neuron_buckets.json).
"""
