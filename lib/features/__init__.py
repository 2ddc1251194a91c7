"""Layer 1: prompt features — the feature record, LLM feature proposals, the sandbox that runs
proposed feature code, feature filters and the TRAIN/TEST split. Imports only lib.core.

Tests: `feature` is covered by tests/features/test_sandbox.py and test_llm_proposals.py.
"""
