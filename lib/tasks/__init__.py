"""Layer 2: the task interface (`base.TaskSpec`), the answering loop every task's stage-1 cache
uses, seeded subsampling, and the tasks: each `lib.tasks.<name>_task` exports `TASK_SPEC`.
Imports lib.core and layer 1 (models, features, runs).

Tests: `arithmetic_seed_features` and `subsample` are covered by tests/tasks/test_arithmetic_task.py.
"""
