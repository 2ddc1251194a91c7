#!/usr/bin/env bash
# The experiment grid (spec 7-11 §10): tasks × models × run modes through _run_pipeline.sh, then
# script 8 and script 9 per task, script 8 over everything and script 10 on the aggregated sweep.
#
#   bash run_mecharule_experiments.sh                    # the paper grid (GPU machine)
#   bash run_mecharule_experiments.sh --embedded         # arithmetic × the two embedded models, CPU preset
#   bash run_mecharule_experiments.sh --tasks arithmetic --models Qwen/Qwen2-1.5B-Instruct --runs main,fake
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-.env/bin/python}"
PROG="run_mecharule_experiments.sh"

usage() {
  cat <<'EOF'
usage: bash run_mecharule_experiments.sh [options] [-- extra _run_pipeline.sh options]

  --tasks LIST        comma list (arithmetic,bon_jailbreaking,hans_nli)
  --models LIST       comma list (Qwen/Qwen2-1.5B-Instruct,Qwen/Qwen2-7B-Instruct,EleutherAI/gpt-j-6B)
  --runs LIST         comma list of run roles, in order
                      (main,random_anchor,spectral_split,fake,bruteforce; spectral_split is
                      skipped with a note: stage 5 has no spectral-cluster mode)
  --embedded          tasks=arithmetic, models = the two embedded GGUF models, preset cpu,
                      runs=main,random_anchor,fake
  --preset NAME       passed to _run_pipeline.sh (paper | cpu | tiny; default paper)
  --data_root DIR     (env MECHARULE_DATA_ROOT, default data)
  --cache_root DIR    (env MECHARULE_CACHE_ROOT, default cache)
  --out_dir DIR       comparison outputs of scripts 8-10 (default comparisons)
  --keep_going        continue with the next run when one fails (exit 1 at the end)
  --no_compare        skip scripts 8-10
  --dry_run           print the commands only
  -h, --help          this help
EOF
}
die_usage() { echo "$PROG: error: $*" >&2; echo "(run 'bash $PROG --help' for the options)" >&2; exit 2; }
log() { echo "[grid] $*" >&2; }

TASKS="arithmetic,bon_jailbreaking,hans_nli"
MODELS="Qwen/Qwen2-1.5B-Instruct,Qwen/Qwen2-7B-Instruct,EleutherAI/gpt-j-6B"
RUNS="main,random_anchor,spectral_split,fake,bruteforce"
PRESET=paper
DATA_ROOT="${MECHARULE_DATA_ROOT:-data}"; CACHE_ROOT="${MECHARULE_CACHE_ROOT:-cache}"; OUT_DIR=comparisons
KEEP_GOING=0; COMPARE=1; DRY_RUN=0; EXTRA=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0;;
    --embedded) TASKS=arithmetic; MODELS="smollm2-135m-instruct-q4_1,gemma-3-270m-q4_k_m"; PRESET=cpu
                RUNS="main,random_anchor,fake";;
    --keep_going) KEEP_GOING=1;;
    --no_compare) COMPARE=0;;
    --dry_run) DRY_RUN=1;;
    --) shift; EXTRA=("$@"); break;;
    --tasks|--models|--runs|--preset|--data_root|--cache_root|--out_dir)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"
      case "$1" in
        --tasks) TASKS="$2";; --models) MODELS="$2";; --runs) RUNS="$2";; --preset) PRESET="$2";;
        --data_root) DATA_ROOT="$2";; --cache_root) CACHE_ROOT="$2";; --out_dir) OUT_DIR="$2";;
      esac; shift;;
    *) die_usage "unknown option '$1'";;
  esac
  shift
done
IFS=',' read -r -a TASK_LIST <<<"$TASKS"
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
IFS=',' read -r -a RUN_LIST <<<"$RUNS"
for r in "${RUN_LIST[@]}"; do
  case "$r" in main|random_anchor|spectral_split|fake|bruteforce) ;; *) die_usage "unknown run role '$r'";; esac
done

# Per (task, model) settings of the original grid: batch size, MAD z-threshold, circuits analysed.
pair_opts() {
  local task="$1" model="$2" batch=32 z=-1 circuits=1
  if [ "$task" = arithmetic ]; then
    batch=256
    case "$model" in
      Qwen/Qwen2-1.5B-Instruct) z=10;;
      Qwen/*) z=10; circuits=5;;
      EleutherAI/gpt-j-6B) z=5; circuits=5;;
    esac
  elif [ "$task" = bon_jailbreaking ] && [ "$model" = Qwen/Qwen2-7B-Instruct ]; then
    batch=256
  fi
  if [ "$PRESET" = paper ]; then
    echo "--batch_size $batch --z_thresh $z --max_circuits $circuits"
  fi
}
run_opts() {  # run role → _run_pipeline.sh switches
  case "$1" in
    main) echo "--main";;
    random_anchor) echo "--main --random_anchoring";;
    fake) echo "--main --incorrect_rules";;
    bruteforce) echo "--main --slow_anchoring --max_circuits 1";;
    spectral_split) echo "--spectral_splits --random_discovery --random_anchoring";;
  esac
}

run() {
  log "$(printf '%q ' "$@")"
  [ "$DRY_RUN" = 1 ] || "$@"
}

FAILED=0
for task in "${TASK_LIST[@]}"; do
  for model in "${MODEL_LIST[@]}"; do
    for role in "${RUN_LIST[@]}"; do
      if [ "$role" = spectral_split ]; then
        log "skipping spectral_split for $task × $model: not supported (stage 5 has no spectral-cluster mode)"
        continue
      fi
      # shellcheck disable=SC2046  # word splitting of the option strings is intended
      args=($(run_opts "$role") $(pair_opts "$task" "$model"))
      [ "$task" != hans_nli ] || args+=(--no_decode_only)
      [ "$PRESET" != paper ] || args+=(--mlp_neurons_only)
      cmd=(bash _run_pipeline.sh "$task" "$model" --preset "$PRESET" --data_root "$DATA_ROOT"
           --cache_root "$CACHE_ROOT" --no_summary "${args[@]}" "${EXTRA[@]}")
      if ! run "${cmd[@]}"; then
        FAILED=1
        echo "$PROG: run '$role' of $task × $model failed" >&2
        [ "$KEEP_GOING" = 1 ] || exit 1
      fi
    done
  done
  if [ "$COMPARE" = 1 ] && [ -d "$DATA_ROOT/$task" -o "$DRY_RUN" = 1 ]; then
    run "$PY" 8_compare_experiments.py --stats_path "$DATA_ROOT/$task" --out_dir "$OUT_DIR/$task/compare_experiments" \
      --rule_quality_metric mcc --best_mode tail@0.9 --thr_min 0.70 --thr_max 0.99 --thr_step 0.01 || FAILED=1
    run "$PY" 9_compare_models.py --task_dir "$DATA_ROOT/$task" --out_dir "$OUT_DIR/$task/compare_models" \
      --tau 0.2 --eps 0.2 || FAILED=1
  fi
done
if [ "$COMPARE" = 1 ]; then
  run "$PY" 8_compare_experiments.py --stats_path "$DATA_ROOT" --out_dir "$OUT_DIR/all" \
    --rule_quality_metric mcc --best_mode tail@0.9 --thr_min 0.70 --thr_max 0.99 --thr_step 0.01 || FAILED=1
  sweep="$OUT_DIR/all/aggregated_by_task/threshold_sweep_all_tasks_all_llms.csv"
  if [ -f "$sweep" ] || [ "$DRY_RUN" = 1 ]; then
    run "$PY" 10_compute_threshold_sweep_stats.py --csv "$sweep" --out_dir "$OUT_DIR/all/stats" || FAILED=1
  else
    log "no $sweep (script 8 found one stats folder or none); script 10 skipped"
  fi
fi
[ "$FAILED" = 0 ] || { echo "$PROG: some runs or comparisons failed (see above)" >&2; exit 1; }
log "done; comparisons under $OUT_DIR"
