"""Layer 0, the ground: atomic files that honour the umask, content-keyed caches, seeding, the
choice lists of the command line and the usage error. Imports nothing of lib/.

Tests: `errors` is covered by tests/test_layering.py and every CLI test that expects exit code 2;
`ray_runtime` by tests/ablation/test_sharded_sweep.py (a local 2-CPU runtime).
"""
