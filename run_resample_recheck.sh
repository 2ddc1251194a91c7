#!/usr/bin/env bash
# Intervention re-check (spec 7-11 §10): rerun stage 6 and stage 7 of the MAIN run with the
# mean-donor intervention and compare the two runs' flip statistics and HQ rules.
#
#   bash run_resample_recheck.sh                                        # arithmetic × Qwen2-7B (paper)
#   bash run_resample_recheck.sh --model smollm2-135m-instruct-q4_1 --preset cpu
# Needs the MAIN run of the same task and model (bash _run_pipeline.sh <task> <model> --main ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-.env/bin/python}"
PROG="run_resample_recheck.sh"

usage() {
  cat <<'EOF2'
usage: bash run_resample_recheck.sh [options] [-- extra _run_pipeline.sh options naming the MAIN run]

  --task NAME         (arithmetic)
  --model NAME        (Qwen/Qwen2-7B-Instruct)
  --intervention I    candidate intervention (mean-donor)
  --mean_pool N       mean/donor pool of the re-check (8192)
  --preset NAME       preset of the MAIN run (paper); sizes (points, batch, top-k) follow it
  --data_root DIR     (env MECHARULE_DATA_ROOT, default data)
  --cache_root DIR    (env MECHARULE_CACHE_ROOT, default cache)
  --out_root DIR      (intervention_shift)
  --dry_run           print the commands only
  -h, --help          this help
EOF2
}
die_usage() { echo "$PROG: error: $*" >&2; echo "(run 'bash $PROG --help' for the options)" >&2; exit 2; }
log() { echo "[resample] $*" >&2; }

TASK=arithmetic; MODEL=Qwen/Qwen2-7B-Instruct; CAND=mean-donor; POOL=8192; PRESET=paper; OUT_ROOT=intervention_shift
DATA_ROOT="${MECHARULE_DATA_ROOT:-data}"; CACHE_ROOT="${MECHARULE_CACHE_ROOT:-cache}"; DRY_RUN=0; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0;;
    --dry_run) DRY_RUN=1;;
    --) shift; EXTRA=("$@"); break;;
    --task|--model|--intervention|--mean_pool|--preset|--data_root|--cache_root|--out_root)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"
      case "$1" in
        --task) TASK="$2";; --model) MODEL="$2";; --intervention) CAND="$2";; --mean_pool) POOL="$2";;
        --preset) PRESET="$2";; --data_root) DATA_ROOT="$2";; --cache_root) CACHE_ROOT="$2";; --out_root) OUT_ROOT="$2";;
      esac; shift;;
    *) die_usage "unknown option '$1'";;
  esac
  shift
done
case "$CAND" in mean|mean-donor|mean-donor-positional|zero) ;; *) die_usage "--intervention must be mean-donor, mean-donor-positional, mean or zero";; esac
[[ "$POOL" =~ ^[0-9]+$ ]] || die_usage "--mean_pool needs an integer"

# Folders and sizes of the MAIN run, from the driver (names are composed in lib.runs.layout only).
eval "$(bash _run_pipeline.sh "$TASK" "$MODEL" --main --preset "$PRESET" --data_root "$DATA_ROOT" \
          --cache_root "$CACHE_ROOT" "${EXTRA[@]}" --print_paths)"
[ "$ANCHORING" = spectral ] || die_usage "the re-check reruns the MAIN (spectral anchoring) run"
DONOR_BAG="${BAG_DIR}-${CAND}"
DONOR_RULES="${NEURON_RULES_DIR}_${CAND}"
BASE_STATS="$STATS_DIR"
CAND_STATS="$DONOR_RULES/stats/$RUN_MODE"
if [ "$DRY_RUN" = 0 ]; then
  for f in "$CIRCUITS_DIR/manifest.json" "$ANCHOR_PLAN_POSITIVE" "$ANCHOR_PLAN_NEGATIVE" "$BASE_STATS"; do
    [ -e "$f" ] || { echo "$PROG: error: '$f' is missing; run the MAIN pipeline first:" \
                       "bash _run_pipeline.sh $TASK $MODEL --main --preset $PRESET" >&2; exit 1; }
  done
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ "$NUM_THREADS" = 0 ] || export OMP_NUM_THREADS="$NUM_THREADS" MKL_NUM_THREADS="$NUM_THREADS"
DEC=(); [ "$DECODE_ONLY" = 0 ] || DEC=(--decode_only)
TOPK=(); [ -z "$TOP_K" ] || TOPK=(--top_k_neurons "$TOP_K"); [ -z "$LAST_K" ] || TOPK+=(--last_k_layers "$LAST_K")

step() {  # step NAME CMD...
  local name="$1"; shift
  log "$name: $(printf '%q ' "$@")"
  [ "$DRY_RUN" = 1 ] && return 0
  local rc=0; "$@" || rc=$?
  [ "$rc" = 0 ] || { echo "$PROG: $name failed with exit code $rc" >&2; exit "$rc"; }
}

for regime in positive negative; do
  plan="$ANCHOR_PLAN_POSITIVE"; [ "$regime" = positive ] || plan="$ANCHOR_PLAN_NEGATIVE"
  out="$DONOR_BAG/${regime}_baseline"
  if [ -f "$out/cost_summary.json" ]; then log "stage 6 ($regime) skipped: $out/cost_summary.json exists"; continue; fi
  step "stage 6 ($regime, $CAND)" "$PY" 6_analyze_bag_of_rules.py --input_data_dir "$CIRCUITS_DIR" \
    --output_data_dir "$out" --ai_model "$MODEL" --task_module "$TASK_MODULE" --seed "$SEED" \
    --search_epsilon "$TAU" --n_associated "$N_POINTS" --n_unrelated "$N_POINTS" \
    --points_to_use_for_mean_ablation "$POOL" --intervention "$CAND" --batch_size "$BATCH_SIZE" \
    --sign_split_first --fast_ablation --baseline_subset "$regime" --sampling_strategy plan \
    --sampling_plan_path "$plan" "${DEC[@]}" "${TOPK[@]}"
done
step "stage 7 ($CAND)" "$PY" 7_refine_neuron_anchored_rules.py --circuit_agonists_path "$DONOR_BAG" \
  --features_scores_dir "$FEATURES_DIR" --rules_dir "$DONOR_RULES" --ai_model "$MODEL" \
  --task_module "$TASK_MODULE" --search_epsilon "$TAU" --batch_size "$BATCH_SIZE" \
  --neuron_batch_size "$NEURON_BATCH" --stats_dirname "$RUN_MODE" --seed "$SEED" --random_seed "$SEED" \
  --use_spectral_sampling --sampling_max_points "$S7_MAX" --sampling_min_points "$S7_MIN" \
  --global_n_clusters "$S7_CLUSTERS" --spectral_space hidden --rep_hook_name ln_final.hook_normalized \
  --rep_pooling last --spectral_dim 32 --spectral_cache_dir "$CACHE_ROOT/$TASK" \
  --points_to_use_for_mean_ablation "$POOL" --intervention "$CAND" --extract_rules \
  --only_unique_datapoints_in_shap --summarize_rule_metrics \
  --min_rule_dataset_coverage "${MIN_RULE_DATASET_COVERAGE:-0.005}" --no_tqdm_batches "${DEC[@]}"

SHIFT_OUT="$OUT_ROOT/$TASK/${MODEL//\//__}/mean-positional_vs_${CAND}"
if [ ! -f summarize_intervention_shift.py ]; then
  log "summarize_intervention_shift.py is not part of this repository yet; comparison skipped."
  log "baseline run: $BASE_STATS"; log "candidate run: $CAND_STATS"
  exit 0
fi
for scope in test_selected all_fit; do
  sub="$SHIFT_OUT"; [ "$scope" = test_selected ] || sub="$SHIFT_OUT/all_fit"
  step "shift summary ($scope)" "$PY" summarize_intervention_shift.py --baseline_dir "$BASE_STATS" \
    --candidate_dir "$CAND_STATS" --output_dir "$sub" --output_csv "$sub/intervention_shift_merged.csv" \
    --baseline_label mean-positional --candidate_label "$CAND" --task_name "$TASK" --model_name "$MODEL" \
    --hq_score_scope "$scope"
done
log "done; comparison under $SHIFT_OUT"
