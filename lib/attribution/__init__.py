"""Layer 3: candidate units by attribution — neuron-level EAP / EAP-IG over `hook_mlp_out`
(stage 5) and the circuit manifest that hands the ranked units to stage 6. Imports layers 0-2.

Tests: `manifest` is covered by tests/pipeline/test_stage5_circuits.py and tests/cli/test_stage5_cli.py.
"""
