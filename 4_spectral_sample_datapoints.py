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

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    """Every flag of spec §2.1 plus --dtype, --selection and --no_progress."""
    from lib.pipeline.feature_table import REGIMES
    from lib.models.loading import add_model_arguments
    from lib.pipeline.stage4_sampling import SELECTIONS
    from lib.sampling.spectral import add_spectral_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features_scores_dir", required=True, help="folder with scores.csv (stage 2)")
    p.add_argument("--rules_dir", required=True, help="rule folder (stage 3's xai_analyses_results)")
    p.add_argument("--rules_glob", default="association_rules_*.csv",
                   help="rule-file prefix: files <prefix>_<target>.csv; the pipeline passes optimal_rule_set")
    p.add_argument("--fake_targets", action="store_true", help="use the <target>_fake rule file")
    p.add_argument("--ai_model", required=True, help="analysed model (hub id, folder, .gguf or embedded alias)")
    p.add_argument("--ai_model_cache_dir", default=None, help="model cache folder")
    p.add_argument("--use_global_clusters", action="store_true",
                   help="k-center cluster all rows once and pick one medoid per cluster, then fill at random")
    p.add_argument("--global_n_clusters", type=int, default=256, help="number of global k-center clusters")
    p.add_argument("--coverage_radius", type=float, default=0.5,
                   help="L2 radius of the greedy cover (only sets stopped_reason and cover stats)")
    p.add_argument("--max_points_per_ablation", type=int, default=512, help="max selected rows (= pairs) per rule")
    p.add_argument("--min_points_per_ablation", type=int, default=32,
                   help="a rule needs this many rows on both sides; max is raised to it if smaller")
    p.add_argument("--batch_size", type=int, default=16, help="representation batch size")
    p.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same plan")
    p.add_argument("--output_path", required=True, help="plan JSON path (parents created)")
    p.add_argument("--baseline_subset", choices=REGIMES, default="all",
                   help="rows kept: all, primary target True (positive) or False (negative)")
    p.add_argument("--pair_by_similarity_len_matched", action="store_true",
                   help="match each associated row to its nearest unrelated row within --pair_len_tolerance")
    p.add_argument("--pair_len_tolerance", type=int, default=0, help="max |token length difference| in pairing")
    p.add_argument("--pair_similarity_metric", default="cosine",
                   help="pairing distance: cosine, euclidean or any SciPy cdist metric name")
    p.add_argument("--compute_cover_stats", action="store_true", help="add coverage statistics to the plan")
    p.add_argument("--stats_sample_size", type=int, default=200000,
                   help="subsample size for distance quantiles (<= 0: exact)")
    p.add_argument("--stats_chunk_size", type=int, default=8192, help="row chunk for nearest-center search")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    add_spectral_arguments(p)
    add_model_arguments(p)
    p.add_argument("--selection", choices=SELECTIONS, default="spectral",
                   help="spectral: coverage picks (default); random: uniform random control plan")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, naming the flag."""
    from lib.sampling.spectral import check_pair_metric, check_spectral_arguments

    check_spectral_arguments(args)
    for flag in ("global_n_clusters", "max_points_per_ablation", "min_points_per_ablation", "batch_size",
                 "stats_chunk_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.pair_len_tolerance < 0:
        raise UsageError(f"--pair_len_tolerance must be >= 0, got {args.pair_len_tolerance}")
    if not args.coverage_radius >= 0:
        raise UsageError(f"--coverage_radius must be >= 0, got {args.coverage_radius}")
    check_pair_metric(args.pair_similarity_metric)
    if args.selection == "random":
        for flag in ("use_global_clusters", "pair_by_similarity_len_matched"):
            if getattr(args, flag):
                raise UsageError(f"--selection random picks both sides uniformly at random; drop --{flag}")


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and write the plan; user errors propagate to `run_main`."""
    args = build_parser().parse_args(argv)
    check_args(args)

    from lib.pipeline.stage4_sampling import run_stage4

    run_stage4(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
