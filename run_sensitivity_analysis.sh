#!/usr/bin/env bash
# Sensitivity runs (spec 7-11 §10): one factor at a time around MAIN (circuit size M, τ), then
# script 11 per (task, model) into <out_root>/sensitivity_summary/<task>/<org__model>/.
#
#   bash run_sensitivity_analysis.sh                      # paper: {arithmetic, bon_jailbreaking} × Qwen2-1.5B
#   bash run_sensitivity_analysis.sh --embedded           # arithmetic × SmolLM2, CPU preset, M ∈ {4000, 8000}
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-.env/bin/python}"
PROG="run_sensitivity_analysis.sh"

usage() {
  cat <<'EOF2'
usage: bash run_sensitivity_analysis.sh [options] [-- extra _run_pipeline.sh options]

  --tasks LIST        comma list (arithmetic,bon_jailbreaking)
  --models LIST       comma list (Qwen/Qwen2-1.5B-Instruct)
  --sizes LIST        circuit sizes M besides the MAIN 100000 (25000,80000; 80000 adds
                      --include_zero_scores, as the original's "200000" run)
  --taus LIST         τ values besides the MAIN 0.2 (0.3,0.4,0.5)
  --baseline_M N      effective M of the MAIN run for script 11 (43008 = 28 × 1536, Qwen2-1.5B)
  --embedded          arithmetic × smollm2-135m-instruct-q4_1, preset cpu, sizes 4000,8000,
                      baseline_M 17280 (= 30 × 576)
  --preset NAME       passed to _run_pipeline.sh (paper)
  --data_root DIR     (env MECHARULE_DATA_ROOT, default data)
  --cache_root DIR    (env MECHARULE_CACHE_ROOT, default cache)
  --out_root DIR      paper tables root (paper_tables)
  --keep_going        continue after a failed run (exit 1 at the end)
  --dry_run           print the commands only
  -h, --help          this help
Environment: SENSITIVITY_SCORE_SCOPE (all_fit) = script 11's --score_scope.
EOF2
}
die_usage() { echo "$PROG: error: $*" >&2; echo "(run 'bash $PROG --help' for the options)" >&2; exit 2; }
log() { echo "[sensitivity] $*" >&2; }

TASKS="arithmetic,bon_jailbreaking"; MODELS="Qwen/Qwen2-1.5B-Instruct"; SIZES="25000,80000"; TAUS="0.3,0.4,0.5"
BASELINE_M=43008; PRESET=paper; OUT_ROOT=paper_tables
DATA_ROOT="${MECHARULE_DATA_ROOT:-data}"; CACHE_ROOT="${MECHARULE_CACHE_ROOT:-cache}"
KEEP_GOING=0; DRY_RUN=0; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0;;
    --embedded) TASKS=arithmetic; MODELS=smollm2-135m-instruct-q4_1; PRESET=cpu; SIZES="4000,8000"; BASELINE_M=17280;;
    --keep_going) KEEP_GOING=1;;
    --dry_run) DRY_RUN=1;;
    --) shift; EXTRA=("$@"); break;;
    --tasks|--models|--sizes|--taus|--baseline_M|--preset|--data_root|--cache_root|--out_root)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"
      case "$1" in
        --tasks) TASKS="$2";; --models) MODELS="$2";; --sizes) SIZES="$2";; --taus) TAUS="$2";;
        --baseline_M) BASELINE_M="$2";; --preset) PRESET="$2";; --data_root) DATA_ROOT="$2";;
        --cache_root) CACHE_ROOT="$2";; --out_root) OUT_ROOT="$2";;
      esac; shift;;
    *) die_usage "unknown option '$1'";;
  esac
  shift
done
IFS=',' read -r -a TASK_LIST <<<"$TASKS"; IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
IFS=',' read -r -a SIZE_LIST <<<"$SIZES"; IFS=',' read -r -a TAU_LIST <<<"$TAUS"
[[ "$BASELINE_M" =~ ^[0-9]+$ ]] || die_usage "--baseline_M needs an integer"
for m in "${SIZE_LIST[@]}"; do [[ "$m" =~ ^[0-9]+$ ]] || die_usage "--sizes needs integers, got '$m'"; done
for t in "${TAU_LIST[@]}"; do [[ "$t" =~ ^[0-9]*[.]?[0-9]+$ ]] || die_usage "--taus needs numbers, got '$t'"; done

run() { log "$(printf '%q ' "$@")"; [ "$DRY_RUN" = 1 ] || "$@"; }
FAILED=0
pipeline() {  # pipeline TASK MODEL OPTIONS...: one MAIN-like run
  local task="$1" model="$2"; shift 2
  local extra=(); [ "$task" != hans_nli ] || extra+=(--no_decode_only)
  [ "$PRESET" != paper ] || extra+=(--mlp_neurons_only)
  if ! run bash _run_pipeline.sh "$task" "$model" --main --preset "$PRESET" --data_root "$DATA_ROOT" \
         --cache_root "$CACHE_ROOT" --no_summary "${extra[@]}" "$@" "${EXTRA[@]}"; then
    FAILED=1; echo "$PROG: run $* of $task × $model failed" >&2
    [ "$KEEP_GOING" = 1 ] || exit 1
  fi
}

for task in "${TASK_LIST[@]}"; do
  for model in "${MODEL_LIST[@]}"; do
    pipeline "$task" "$model"                                   # MAIN (the baseline of every factor)
    for m in "${SIZE_LIST[@]}"; do
      if [ "$m" = 80000 ]; then pipeline "$task" "$model" --circuit_size "$m" --include_zero_scores
      else pipeline "$task" "$model" --circuit_size "$m"; fi
    done
    for t in "${TAU_LIST[@]}"; do pipeline "$task" "$model" --tau "$t"; done
    stats_root="$("$PY" -m lib.runs.layout stats_root --data_root "$DATA_ROOT" --task "$task" --model "$model")"
    out="$OUT_ROOT/sensitivity_summary/$task/${model//\//__}"
    run "$PY" 11_summarize_sensitivity_analysis.py --stats_root "$stats_root" --out_dir "$out" \
      --baseline_M "$BASELINE_M" --baseline_tau 0.2 --score_scope "${SENSITIVITY_SCORE_SCOPE:-all_fit}" \
      --quality_thresholds 0.50 0.60 0.70 0.75 0.80 0.85 || FAILED=1
  done
done
[ "$FAILED" = 0 ] || { echo "$PROG: some runs or summaries failed (see above)" >&2; exit 1; }
log "done; summaries under $OUT_ROOT/sensitivity_summary"
