"""Layer 1: the run-folder layout (names of every stage's folders), run manifests, finding run folders,
checked CSV/JSON reading, reading a run's results back, and the export of results. Imports only lib.core.

Tests: `checked_io` is covered by tests/runs/test_results.py (bad inputs name the file and column);
`export` by tests/cli/test_compare_scripts.py (clean_results_for_export.py).
"""
