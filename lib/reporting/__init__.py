"""Layer 4: reporting over finished runs — comparisons of experiments and models (scripts 8-9),
threshold sweeps and sensitivity (10-11), paper tables, the artifact check, the pipeline summary,
formatting, statistics and plots. Imports layers 0-3.

Tests: scripts 8-11 and their modules (`compare_experiments`, `compare_models`, `threshold_sweeps`,
`sensitivity`, `formatting`, `plots`) by tests/cli/test_compare_scripts.py; `artifact_check` by
tests/cli/test_check_artifacts.py; `summary` by tests/cli/test_run_pipeline.py.
"""
