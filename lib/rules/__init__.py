"""Layer 3: rules over prompt features — the rule language (types and exact text form), vectorised
evaluation, rule files, RuleSHAP and SHAP weights, rule metrics, OR-combos, and the per-target
extraction shared by stages 3 and 7. Imports layers 0-2.

Tests: `evaluation` and `rule_files` are covered by tests/rules/test_language.py (parse, evaluate and
load round trips); `metrics` by tests/rules/test_combos.py and test_ruleshap.py; `shap_importance`
by tests/rules/test_ruleshap.py; `extraction` by tests/cli/test_stage3_cli.py and
tests/pipeline/test_stage7_anchoring.py.
"""
