"""Layer 5, the top: one driver per stage (`stageN_*.py`, each with its typed `StageNConfig`), the
config framework, the CLI plumbing, the shared feature table and the pipeline runner (`run.py`).
May import every package below it; nothing in lib/ imports it.

Tests: `cli`, `stage1_answers`, `stage2_features`, `stage3_rules` by tests/cli/test_stage{1,2,3}_cli.py;
`config` by tests/pipeline/test_config.py; `presets` (the presets as data) by tests/pipeline/test_run.py.
`spectral_options` (the shared spectral flags) by tests/pipeline/test_stage_configs_5_7.py and tests/cli/test_stage4_cli.py.
"""
