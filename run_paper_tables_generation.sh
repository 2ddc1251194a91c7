#!/usr/bin/env bash
# Paper tables from a data tree (spec 7-11 §10): artifact check, make_paper_tables.py, then
# script 10's paired statistics on Table 2's long threshold sweep.
#
#   bash run_paper_tables_generation.sh [DATA_ROOT=./data] [OUT_DIR=./paper_tables] [options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-.env/bin/python}"
PROG="run_paper_tables_generation.sh"

usage() {
  cat <<'EOF2'
usage: bash run_paper_tables_generation.sh [DATA_ROOT] [OUT_DIR] [options]

  DATA_ROOT                        data tree (./data)
  OUT_DIR                          output folder (./paper_tables)
  --test-threshold T               HQ-T threshold (0.70)
  --all-fit-threshold T            HQ-F threshold (0.70)
  --sample-stat S                  script 10 per-unit statistic: mean|median|prop_ge_threshold|n_ge_threshold (mean)
  --n-boot N                       script 10 bootstrap resamples (10000)
  --stats-score-scope S            script 10 --score-scope: both|test|test_selected|all_fit (both)
  --min-rule-dataset-coverage F    coverage floor (env MIN_RULE_DATASET_COVERAGE, else 0.005)
  --compare                        also run script 8 over DATA_ROOT and script 9 per task folder
  --strict                         stop when check_artifacts.py reports missing artifacts
  -h, --help                       this help
Extra make_paper_tables.py options can follow '--'.
EOF2
}
die_usage() { echo "$PROG: error: $*" >&2; echo "(run 'bash $PROG --help' for the options)" >&2; exit 2; }
log() { echo "[tables] $*" >&2; }

DATA_ROOT=./data; OUT_DIR=./paper_tables; TEST_THR=0.70; ALL_FIT_THR=0.70; SAMPLE_STAT=mean; N_BOOT=10000
STATS_SCOPE=both; MIN_COV="${MIN_RULE_DATASET_COVERAGE:-0.005}"; COMPARE=0; STRICT=0; EXTRA=(); POS=()
num() { [[ "$2" =~ ^[0-9]*[.]?[0-9]+$ ]] || die_usage "$1 needs a number, got '$2'"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0;;
    --compare) COMPARE=1;;
    --strict) STRICT=1;;
    --) shift; EXTRA=("$@"); break;;
    --test-threshold|--all-fit-threshold|--sample-stat|--n-boot|--stats-score-scope|--min-rule-dataset-coverage)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"
      case "$1" in
        --test-threshold) num "$1" "$2"; TEST_THR="$2";;
        --all-fit-threshold) num "$1" "$2"; ALL_FIT_THR="$2";;
        --sample-stat) case "$2" in mean|median|prop_ge_threshold|n_ge_threshold) SAMPLE_STAT="$2";;
                         *) die_usage "--sample-stat: mean, median, prop_ge_threshold or n_ge_threshold";; esac;;
        --n-boot) [[ "$2" =~ ^[0-9]+$ ]] || die_usage "--n-boot needs an integer"; N_BOOT="$2";;
        --stats-score-scope) case "$2" in both|test|test_selected|all_fit) STATS_SCOPE="$2";;
                               *) die_usage "--stats-score-scope: both, test, test_selected or all_fit";; esac;;
        --min-rule-dataset-coverage) num "$1" "$2"; MIN_COV="$2";;
      esac; shift;;
    -*) die_usage "unknown option '$1'";;
    *) POS+=("$1");;
  esac
  shift
done
[ "${#POS[@]}" -le 2 ] || die_usage "at most two positional arguments (DATA_ROOT OUT_DIR)"
[ "${#POS[@]}" -lt 1 ] || DATA_ROOT="${POS[0]}"
[ "${#POS[@]}" -lt 2 ] || OUT_DIR="${POS[1]}"
[ -d "$DATA_ROOT" ] || { echo "$PROG: error: data root '$DATA_ROOT' does not exist" >&2; exit 2; }

run() {  # run NAME CMD...: stop with the step's name and exit code on failure
  local name="$1"; shift
  log "$name: $(printf '%q ' "$@")"
  local rc=0; "$@" || rc=$?
  [ "$rc" = 0 ] || { echo "$PROG: $name failed with exit code $rc" >&2; exit "$rc"; }
}

log "checking artifacts under $DATA_ROOT"
rc=0; "$PY" check_artifacts.py --data_root "$DATA_ROOT" --no_cache --quiet || rc=$?
if [ "$rc" = 1 ]; then
  [ "$STRICT" = 0 ] || { echo "$PROG: missing artifacts (see above); --strict stops here" >&2; exit 1; }
  log "some artifacts are missing: the tables that need them will be empty"
elif [ "$rc" != 0 ]; then
  echo "$PROG: check_artifacts.py failed with exit code $rc" >&2; exit "$rc"
fi

run "make_paper_tables.py" "$PY" make_paper_tables.py --data_root "$DATA_ROOT" --out_dir "$OUT_DIR" \
  --score_scopes test_selected,all_fit --table1_coverage_score_scope all_fit \
  --hq_test_threshold "$TEST_THR" --hq_all_fit_threshold "$ALL_FIT_THR" --min_rule_dataset_coverage "$MIN_COV" \
  "${EXTRA[@]}"

sweep="$OUT_DIR/table2_threshold_sweep_per_run_long.csv"
if [ -f "$sweep" ]; then
  run "script 10" "$PY" 10_compute_threshold_sweep_stats.py --csv "$sweep" --out_dir "$OUT_DIR/stats" \
    --data-root "$DATA_ROOT" --sample-size 0 --sample-stat "$SAMPLE_STAT" --n-boot "$N_BOOT" \
    --score-scope "$STATS_SCOPE" --primary_threshold "$TEST_THR" --primary_threshold_all_fit "$ALL_FIT_THR" \
    --min-rule-dataset-coverage "$MIN_COV"
else
  log "no $sweep; script 10 skipped"
fi

if [ "$COMPARE" = 1 ]; then
  run "script 8" "$PY" 8_compare_experiments.py --stats_path "$DATA_ROOT" --out_dir "$OUT_DIR/compare_experiments" \
    --rule_quality_metric mcc --best_mode tail@0.9 --min_rule_dataset_coverage "$MIN_COV"
  for task_dir in "$DATA_ROOT"/*/; do
    task="$(basename "$task_dir")"
    run "script 9 ($task)" "$PY" 9_compare_models.py --task_dir "${task_dir%/}" --out_dir "$OUT_DIR/compare_models/$task" \
      --tau 0.2 --eps 0.2 --min_rule_dataset_coverage "$MIN_COV"
  done
fi
log "done; tables in $OUT_DIR"
