#!/usr/bin/env python3
"""Stage 4: per rule, pick a small, well-spread set of associated rows and an equally long list of
unrelated rows, and save them as a JSON sampling plan for stages 5–7.

Reads `<features_scores_dir>/scores.csv` (TRAIN rows only, optionally one regime of the primary
target) and the primary target's rule file `<rules_dir>/<rules_glob>_<target>.csv`. Prompts are
represented by the analysed model's activation at `--rep_hook_name` (TransformerLens 4 bridge,
pooled over real tokens, cached per prompt in `--spectral_cache_dir`), reduced by PCA to
`--spectral_dim` unit vectors, and covered farthest-first (`--use_global_clusters`: one medoid per
global k-center cluster, then a random fill). Unrelated rows are either picked the same way or
matched 1:1 to the associated rows by nearest neighbour with a token-length tolerance
(`--pair_by_similarity_len_matched`). `--selection random` writes a control plan with uniform
random picks instead.

Every associated row satisfies its rule and no unrelated row does; a rule with fewer than
`--min_points_per_ablation` rows on either side is skipped with its reason. The pipeline passes
`--rules_glob optimal_rule_set` (the default prefix matches the original's, which finds nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as config_parser, parse_config


def build_parser() -> argparse.ArgumentParser:
    """Every flag of spec §2.1 plus --dtype, --selection and --no_progress."""
    from lib.pipeline.stage4_sampling import Stage4Config

    return config_parser(Stage4Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and write the plan; user errors propagate to `run_main`."""
    from lib.pipeline.stage4_sampling import Stage4Config, run_stage4

    cfg = parse_config(Stage4Config, argv, __doc__)
    # one entry per plan file: the discovery plan and the two anchoring plans share their folder
    with recorded_stage(f"stage4:{Path(cfg.output_path).name}", cfg, lambda: [Path(cfg.output_path).parent]):
        run_stage4(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
