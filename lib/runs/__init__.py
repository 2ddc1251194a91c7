"""Layer 1: the run-folder layout (names of every stage's folders), run manifests, reading a run's
results back, and the export of results. Imports only lib.core.

Tests: `export` is covered by tests/cli/test_compare_scripts.py (clean_results_for_export.py).
"""
