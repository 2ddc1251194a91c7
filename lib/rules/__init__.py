"""Layer 3: rules over prompt features — the rule data types (`expressions`), their exact text form
(`language`), vectorised evaluation, rule files, RuleSHAP and SHAP weights, rule metrics, OR-combos,
and the per-target extraction shared by stages 3 and 7. Imports layers 0-2.

Tests: `metrics` is covered by tests/rules/test_combos.py and test_ruleshap.py; `shap_importance` by
tests/rules/test_ruleshap.py; `extraction` by tests/cli/test_stage3_cli.py and
tests/pipeline/test_stage7_anchoring.py.
"""
