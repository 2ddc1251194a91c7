#!/usr/bin/env python3
"""Stage 5: rank MLP units per rule with neuron-level EAP / EAP-IG-inputs and write circuits for stage 6.

For every rule of `<rules_dir>/<rules_glob>_<target>.csv` (primary target), clean prompts are rows
the rule covers and corrupted prompts are paired rows it does not cover (stage-4 plan with
`--sampling_strategy plan`, else length-matched nearest neighbours). Each text is prompt + the
analysed model's answer (`raw_output`). Units are the coordinates of `blocks.{L}.hook_mlp_out`
(`m{L}:{id}`); scores, the top `--circuit_size` units and a faithfulness evaluation are written to
`<output_data_dir>/<target>/rule_<id>_<slug>/{scores.json, eval.json}` plus `manifest.json`.

Attribution metric (`--attribution_metric`): `answer_logprob` (default) = mean log-probability of
the clean answer tokens, whose gradient is non-zero at the clean input, so EAP works; `kl` = the
original's span KL to the clean logits (`--temporal_agg`), whose clean-point gradient is zero.
EAP-IG integrates at midpoints α = (k − 0.5)/m, m = `--max_ig_steps`.

Random pairing (`--sampling_strategy random`) matches each covered row with the nearest uncovered
row of equal prompt length by TF-IDF bag-of-token similarity (`--pair_similarity_metric`); the
original's MiniLM sentence embedder needs the model hub.

Accepted but unused: `--max_answer_tokens`, `--stop_regex` (as in the original), the spectral flags
except `--max_seq_len` (which caps text length), `--global_n_clusters`, `--cluster_base_subset`;
`--mlp_neurons_only` is implied (only MLP units are scored). Not supported, with an error: `--cluster_by_spectral`, `--circuit_level edge`, methods
other than EAP, EAP-IG(-inputs). A failing rule is recorded as status `error` (error.json) and the
stage exits 1 at the end unless `--keep_going`.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as build_config_parser, parse_config
from lib.pipeline.stage5_circuits import Stage5Config, run_stage5


def build_parser() -> argparse.ArgumentParser:
    """Flags of spec §3.1 (same names and defaults) plus --attribution_metric, --keep_going, --device, --dtype."""
    return build_config_parser(Stage5Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Stage5Config, argv, __doc__)
    with recorded_stage("stage5", cfg, lambda: [cfg.output_data_dir]):
        return run_stage5(cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
