#!/usr/bin/env bash
# Stages 1-7 of MechaRule for one task and one analysed model (spec 7-11 §3 and §10).
#
#   bash _run_pipeline.sh <task> <model> [options]        (bash _run_pipeline.sh --help)
#
# Every stage is skipped when its outputs already exist (--force / --from_stage rerun them; the stage
# scripts themselves reuse their valid per-item results). A failing stage stops the run with its exit
# code and names the stage. Run-mode folder names come from `python -m lib.runs.layout`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-.env/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || true)"
PROG="_run_pipeline.sh"

usage() {
  cat <<'EOF'
usage: bash _run_pipeline.sh <task> <model> [options]

  <task>   arithmetic | bon_jailbreaking | hans_nli   (module lib.tasks.<task>_task)
  <model>  Hugging Face id, local folder, .gguf file, or an embedded alias
           (smollm2-135m-instruct-q4_1, gemma-3-270m-q4_k_m)

Run mode (folder names as in spec 7-11 §3):
  --spectral_discovery_plan   stage-5 pairs from a stage-4 spectral plan (paper default: random pairs)
  --random_discovery          stage-5 random pairs (overrides a preset)
  --spectral_anchoring_plan   stage-6 prompts from stage-4 spectral plans (paper default: random)
  --random_anchoring          stage-6 random prompts (overrides a preset)
  --main                      = --spectral_discovery_plan --spectral_anchoring_plan --decode_only
                              (the MAIN run mode; the cpu and tiny presets imply it)
  --slow_anchoring            exhaustive single-unit ablation in stage 6 (default: CHA, "fast")
  --incorrect_rules           fake-target control (stage 3 --fake_targets ...)
  --spectral_splits           spectral clusters instead of rules (not supported: stage 5 refuses
                              --cluster_by_spectral; see docs/DEVIATIONS.md)
  --decode_only               intervene only at answer-producing positions (stages 5-7)
  --no_decode_only            hooks on every position (overrides a preset; HANS runs)
  --intervention NAME         stage 6/7 replacement (mean-positional); stage 5 gets the non-donor name
  --tau T                     τ = min flip rate, stage 6 --search_epsilon and stage 7 (0.2)
  --circuit_size M            stage-5 top-M units (100000)
  --circuit_level LEVEL       neuron | node (neuron)
  --mlp_neurons_only          pass --mlp_neurons_only to stages 5 and 6
  --include_zero_scores       pass --include_zero_scores to stage 5

Sizes and budgets (defaults = the paper setting, or the --preset's values):
  --preset NAME               paper (default) | cpu | tiny  (explicit options win over the preset)
  --max_prompts N             stage-1 seeded subsample (0 = all prompts of the task)
  --batch_size B              stage 1/6/7 batch size (256)
  --z_thresh Z                stage-2 MAD filter threshold; < 0 = off (-1)
  --feature_llm NAME          stage-2 feature LLM (gemma3:27b)
  --no_llm_features           stage 2 with the task's seed features only
  --max_circuits N            rules analysed by stages 5-6 (0 = all)
  --pairs_per_circuit N       stage-5 pairs per rule; also the discovery plan's min points (128)
  --discovery_clusters N      discovery plan k-center clusters (32)
  --ig_steps N                stage-5 EAP-IG steps m (3)
  --stage5_batch_size N       stage-5 pairs per forward/backward (1, as the original)
  --n_points N                stage-6 --n_associated/--n_unrelated and anchoring plan points (64)
  --anchoring_clusters N      anchoring plan clusters (16)
  --top_k_neurons K           stage-6 candidate budget per circuit (all)
  --last_k_layers K           stage 6 keeps only candidates of the last K MLP layers (all)
  --mean_pool N               --points_to_use_for_mean_ablation (256; 2048 for donor interventions)
  --stage7_max_points N       stage-7 --sampling_max_points (10000)
  --stage7_min_points N       stage-7 --sampling_min_points (64)
  --stage7_clusters N         stage-7 --global_n_clusters (64)
  --neuron_batch_size N       stage-7 units evaluated together (4)
  --n_estimators N            trees of the rule ensembles of stages 3 and 7 (500)
  --no_shap_in_xgb            stage 3 without --use_shap_in_xgb/--use_shap_in_lasso (on a few
                              hundred rows the SHAP weights can zero every feature: no rule at all)
  --num_threads N             torch/OpenMP threads per stage (0 = library default)
  --seed S                    seed of every stage (42)
  --device D / --dtype T      where/how the analysed model runs (auto / auto)

Roots and control:
  --data_root DIR             data root (env MECHARULE_DATA_ROOT, default data)
  --cache_root DIR            cache root (env MECHARULE_CACHE_ROOT, default cache)
  --force                     rerun every stage even when its outputs exist
  --from_stage N              rerun stages >= N (earlier ones only if their outputs are missing)
  --to_stage N                stop after stage N (7)
  --no_summary                do not print the summary at the end
  --dry_run                   print the stage commands without running them
  --print_paths               print NAME=path lines of this run's folders and plans, then exit
  -h, --help                  this help

Environment: PYTHON (interpreter, default .env/bin/python), MIN_RULE_DATASET_COVERAGE (0.005).

Presets:
  cpu   1024 prompts, seed features only, 16 pairs/rule (m=1), the top 1536 units/rule that lie
        in the last 4 MLP layers, 20+20 prompts per stage-6 slice at τ=0.3 (with 20 prompts a
        single flip already lifts the Clopper-Pearson bound above 0.2), 200 trees, stage 7 on
        <= 128 rows in 16 clusters, 2 threads: the embedded SmolLM2 in under 15 minutes on 2 cores.
  tiny  160 prompts, stage 3 without SHAP-weighted trees (30 trees), spectral discovery plan +
        random anchoring, 6 pairs, top 32 units, 6+6 prompts at τ=0.3, 2 rules, stage 7 on <= 48 rows,
        1 thread (the end-to-end test).
EOF
}

die_usage() { echo "$PROG: error: $*" >&2; echo "(run 'bash $PROG --help' for the options)" >&2; exit 2; }
log() { echo "[pipeline] $*" >&2; }

[ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; } && { usage; exit 0; }
[ $# -ge 2 ] || { usage >&2; exit 2; }
TASK="$1"; MODEL="$2"; shift 2
case "$TASK" in -*|"") die_usage "first argument must be the task, got '$TASK'";; esac
case "$MODEL" in -*|"") die_usage "second argument must be the model, got '$MODEL'";; esac

# ------------------------------------------------------------------ options ("" = not given)
PRESET=paper
DATA_ROOT="${MECHARULE_DATA_ROOT:-data}"; CACHE_ROOT="${MECHARULE_CACHE_ROOT:-cache}"
DISCOVERY=""; ANCHORING=""; FAST=1; FAKE=0; SPLIT=rule; DECODE_ONLY=""
INTERVENTION=mean-positional; TAU=""; CIRCUIT_SIZE=100000; CIRCUIT_LEVEL=neuron
MLP_ONLY=0; INCLUDE_ZERO=0; FEATURE_LLM=gemma3:27b; NO_LLM=""
MAX_PROMPTS=""; BATCH_SIZE=""; Z_THRESH=""; MAX_CIRCUITS=""; PAIRS=""; DISC_CLUSTERS=""; IG_STEPS=""
N_POINTS=""; ANCHOR_CLUSTERS=""; TOP_K=""; MEAN_POOL=""; S7_MAX=""; S7_MIN=""; S7_CLUSTERS=""
NEURON_BATCH=""; N_ESTIMATORS=""; S5_BATCH=""; LAST_K=""; SHAP_XGB=""; NUM_THREADS=""; SEED=42; DEVICE=auto; DTYPE=auto
FORCE=0; FROM_STAGE=1; TO_STAGE=7; SUMMARY=1; DRY_RUN=0; PRINT_PATHS=0

preset() {  # preset VAR VALUE: set VAR only when the user left it empty
  if [ -z "${!1}" ]; then printf -v "$1" '%s' "$2"; fi
}
need_val() { [ $# -ge 2 ] && [ -n "$2" ] || die_usage "option $1 needs a value"; }
is_int() { [[ "$1" =~ ^-?[0-9]+$ ]]; }
is_num() { [[ "$1" =~ ^-?[0-9]+([.][0-9]+)?([eE]-?[0-9]+)?$ ]]; }

while [ $# -gt 0 ]; do
  opt="$1"
  case "$opt" in
    -h|--help) usage; exit 0;;
    --spectral_discovery_plan) DISCOVERY=spectral;;
    --spectral_anchoring_plan) ANCHORING=spectral;;
    --random_discovery) DISCOVERY=random;;
    --random_anchoring) ANCHORING=random;;
    --no_decode_only) DECODE_ONLY=0;;
    --main) preset DISCOVERY spectral; preset ANCHORING spectral; preset DECODE_ONLY 1;;
    --slow_anchoring) FAST=0;;
    --incorrect_rules) FAKE=1;;
    --spectral_splits) SPLIT=spectral;;
    --decode_only) DECODE_ONLY=1;;
    --mlp_neurons_only) MLP_ONLY=1;;
    --include_zero_scores) INCLUDE_ZERO=1;;
    --no_llm_features) NO_LLM=1;;
    --no_shap_in_xgb) SHAP_XGB=0;;
    --force) FORCE=1;;
    --no_summary) SUMMARY=0;;
    --dry_run) DRY_RUN=1;;
    --print_paths) PRINT_PATHS=1;;
    --preset|--data_root|--cache_root|--intervention|--tau|--circuit_size|--circuit_level|--max_prompts|\
    --batch_size|--z_thresh|--feature_llm|--max_circuits|--pairs_per_circuit|--discovery_clusters|\
    --ig_steps|--n_points|--anchoring_clusters|--top_k_neurons|--mean_pool|--stage7_max_points|\
    --stage7_min_points|--stage7_clusters|--neuron_batch_size|--n_estimators|--num_threads|--seed|\
    --stage5_batch_size|--last_k_layers|\
    --device|--dtype|--from_stage|--to_stage)
      need_val "$@"; val="$2"; shift
      case "$opt" in
        --preset) PRESET="$val";;
        --data_root) DATA_ROOT="$val";;
        --cache_root) CACHE_ROOT="$val";;
        --intervention) INTERVENTION="$val";;
        --tau) is_num "$val" || die_usage "--tau needs a number, got '$val'"; TAU="$val";;
        --circuit_level) CIRCUIT_LEVEL="$val";;
        --feature_llm) FEATURE_LLM="$val";;
        --device) DEVICE="$val";;
        --dtype) DTYPE="$val";;
        --z_thresh) is_num "$val" || die_usage "--z_thresh needs a number, got '$val'"; Z_THRESH="$val";;
        *) is_int "$val" || die_usage "$opt needs an integer, got '$val'"
           case "$opt" in
             --circuit_size) CIRCUIT_SIZE="$val";; --max_prompts) MAX_PROMPTS="$val";;
             --batch_size) BATCH_SIZE="$val";; --max_circuits) MAX_CIRCUITS="$val";;
             --pairs_per_circuit) PAIRS="$val";; --discovery_clusters) DISC_CLUSTERS="$val";;
             --ig_steps) IG_STEPS="$val";; --n_points) N_POINTS="$val";;
             --anchoring_clusters) ANCHOR_CLUSTERS="$val";; --top_k_neurons) TOP_K="$val";;
             --mean_pool) MEAN_POOL="$val";; --stage7_max_points) S7_MAX="$val";;
             --stage7_min_points) S7_MIN="$val";; --stage7_clusters) S7_CLUSTERS="$val";;
             --neuron_batch_size) NEURON_BATCH="$val";; --n_estimators) N_ESTIMATORS="$val";;
             --stage5_batch_size) S5_BATCH="$val";; --last_k_layers) LAST_K="$val";;
             --num_threads) NUM_THREADS="$val";; --seed) SEED="$val";;
             --from_stage) FROM_STAGE="$val";; --to_stage) TO_STAGE="$val";;
           esac;;
      esac;;
    *) die_usage "unknown option '$opt'";;
  esac
  shift
done

# ------------------------------------------------------------------ presets, then the paper defaults
case "$PRESET" in
  paper) ;;
  cpu)
    preset DISCOVERY spectral; preset ANCHORING spectral; preset DECODE_ONLY 1
    preset MAX_PROMPTS 1024; preset BATCH_SIZE 128; preset NO_LLM 1; preset Z_THRESH -1
    preset MAX_CIRCUITS 0; preset PAIRS 16; preset DISC_CLUSTERS 8; preset IG_STEPS 1; preset S5_BATCH 16
    preset N_POINTS 20; preset ANCHOR_CLUSTERS 8; preset TOP_K 1536; preset LAST_K 4; preset MEAN_POOL 64
    preset TAU 0.3
    preset S7_MAX 128; preset S7_MIN 32; preset S7_CLUSTERS 16; preset NEURON_BATCH 8
    preset N_ESTIMATORS 200; preset NUM_THREADS 2;;
  tiny)
    preset DISCOVERY spectral; preset ANCHORING random; preset DECODE_ONLY 1
    preset MAX_PROMPTS 160; preset BATCH_SIZE 80; preset NO_LLM 1; preset Z_THRESH -1; preset SHAP_XGB 0
    preset MAX_CIRCUITS 2; preset PAIRS 6; preset DISC_CLUSTERS 4; preset IG_STEPS 1
    preset N_POINTS 6; preset ANCHOR_CLUSTERS 4; preset TOP_K 32; preset MEAN_POOL 32; preset TAU 0.3
    preset S7_MAX 48; preset S7_MIN 16; preset S7_CLUSTERS 8; preset NEURON_BATCH 8
    preset N_ESTIMATORS 30; preset NUM_THREADS 1; preset S5_BATCH 16;;
  *) die_usage "unknown --preset '$PRESET' (paper, cpu, tiny)";;
esac
preset DISCOVERY random; preset ANCHORING random; preset DECODE_ONLY 0
preset MAX_PROMPTS 0; preset BATCH_SIZE 256; preset NO_LLM 0; preset Z_THRESH -1; preset MAX_CIRCUITS 0
preset PAIRS 128; preset DISC_CLUSTERS 32; preset IG_STEPS 3; preset N_POINTS 64; preset ANCHOR_CLUSTERS 16
preset TAU 0.2; preset S7_MAX 10000; preset S7_MIN 64; preset S7_CLUSTERS 64; preset NEURON_BATCH 4
preset N_ESTIMATORS 500; preset NUM_THREADS 0; preset S5_BATCH 1; preset SHAP_XGB 1
case "$INTERVENTION" in *donor*) preset MEAN_POOL 2048;; *) preset MEAN_POOL 256;; esac
MIN_COV="${MIN_RULE_DATASET_COVERAGE:-0.005}"

# ------------------------------------------------------------------ validation
case "$INTERVENTION" in zero|mean|mean-positional|mean-donor|mean-donor-positional) ;;
  *) die_usage "--intervention must be zero, mean, mean-positional, mean-donor or mean-donor-positional";; esac
case "$CIRCUIT_LEVEL" in neuron|node) ;; *) die_usage "--circuit_level must be neuron or node";; esac
case "$DEVICE" in auto|cpu|cuda|mps) ;; *) die_usage "--device must be auto, cpu, cuda or mps";; esac
[[ "$FROM_STAGE" =~ ^[1-7]$ && "$TO_STAGE" =~ ^[1-7]$ ]] || die_usage "--from_stage/--to_stage must be 1..7"
[ "$FROM_STAGE" -le "$TO_STAGE" ] || die_usage "--from_stage is after --to_stage"
if [ "$SPLIT" = spectral ]; then
  [ "$FAKE" = 0 ] || die_usage "--spectral_splits excludes --incorrect_rules"
  die_usage "--spectral_splits is not supported: stage 5 has no --cluster_by_spectral mode (docs/DEVIATIONS.md)"
fi
for v in MAX_PROMPTS MAX_CIRCUITS NUM_THREADS; do [ "${!v}" -ge 0 ] || die_usage "${v,,} must be >= 0"; done
for v in BATCH_SIZE PAIRS DISC_CLUSTERS IG_STEPS N_POINTS ANCHOR_CLUSTERS MEAN_POOL S7_MAX S7_MIN \
         S7_CLUSTERS NEURON_BATCH N_ESTIMATORS CIRCUIT_SIZE S5_BATCH; do
  [ "${!v}" -ge 1 ] || die_usage "${v,,} must be >= 1"
done
[ -z "$TOP_K" ] || [ "$TOP_K" -ge 1 ] || die_usage "--top_k_neurons must be >= 1"
[ -z "$LAST_K" ] || [ "$LAST_K" -ge 1 ] || die_usage "--last_k_layers must be >= 1"
[ -n "$PY" ] || { echo "$PROG: error: no Python found (run setup.sh or set PYTHON)" >&2; exit 2; }

# ------------------------------------------------------------------ names and folders (one place: lib.runs.layout)
LAYOUT_OPTS=(--split rule --discovery_sampling "$DISCOVERY" --anchoring "$ANCHORING" --circuit_size "$CIRCUIT_SIZE"
             --intervention "$INTERVENTION" --tau "$TAU")
[ "$DECODE_ONLY" = 1 ] || LAYOUT_OPTS+=(--no_decode_only)
[ "$FAST" = 1 ] || LAYOUT_OPTS+=(--slow)
[ "$FAKE" = 0 ] || LAYOUT_OPTS+=(--fake_targets)
layout() { "$PY" -m lib.runs.layout "$1" "${LAYOUT_OPTS[@]}" --data_root "$DATA_ROOT" --cache_root "$CACHE_ROOT" \
             --task "$TASK" --model "$MODEL" "${@:2}"; }
RUN_MODE="$(layout run_mode)" || die_usage "could not compose the run mode"
MODEL_DIR="$(layout model_dir)"
CACHE_DIR="$(layout cache_dir)"
FEATURES_DIR="$(layout feature_report_dir)"
RULES_DIR="$MODEL_DIR/xai_analyses_results"
CIRCUITS_DIR="$(layout circuits_dir)"
BAG_DIR="$(layout bag_dir)"
NEURON_RULES_DIR="$(layout neuron_rules_dir)"
STATS_DIR="$(layout stats_dir)"
PKL="$CACHE_DIR/llm_io_data.pkl"
PLANS_DIR="$MODEL_DIR/sampling_plans"
TASK_MODULE="lib.tasks.${TASK}_task"
FAKE_SUFFIX=""; [ "$FAKE" = 0 ] || FAKE_SUFFIX="_fake_targets"
STAGE5_INTERVENTION="${INTERVENTION/donor-/}"; STAGE5_INTERVENTION="${STAGE5_INTERVENTION/-donor/}"

DISC_PLAN="$PLANS_DIR/spectral_sampling_plan${FAKE_SUFFIX}-n${PAIRS}-k${DISC_CLUSTERS}-seed${SEED}_for_circuit_discovery.json"
anchor_plan() { echo "$PLANS_DIR/spectral_sampling_plan${FAKE_SUFFIX}-n${N_POINTS}-k${ANCHOR_CLUSTERS}-seed${SEED}_for_anchoring_$1.json"; }
if [ "$PRINT_PATHS" = 1 ]; then
  printf '%s=%q\n' RUN_MODE "$RUN_MODE" MODEL_DIR "$MODEL_DIR" CACHE_DIR "$CACHE_DIR" FEATURES_DIR "$FEATURES_DIR" \
    RULES_DIR "$RULES_DIR" PKL "$PKL" CIRCUITS_DIR "$CIRCUITS_DIR" BAG_DIR "$BAG_DIR" \
    NEURON_RULES_DIR "$NEURON_RULES_DIR" STATS_DIR "$STATS_DIR" DISC_PLAN "$DISC_PLAN" \
    ANCHOR_PLAN_POSITIVE "$(anchor_plan positive)" ANCHOR_PLAN_NEGATIVE "$(anchor_plan negative)" \
    TASK_MODULE "$TASK_MODULE" TAU "$TAU" N_POINTS "$N_POINTS" BATCH_SIZE "$BATCH_SIZE" MEAN_POOL "$MEAN_POOL" \
    S7_MAX "$S7_MAX" S7_MIN "$S7_MIN" S7_CLUSTERS "$S7_CLUSTERS" NEURON_BATCH "$NEURON_BATCH" TOP_K "$TOP_K" LAST_K "$LAST_K" \
    NUM_THREADS "$NUM_THREADS" SEED "$SEED" DECODE_ONLY "$DECODE_ONLY" ANCHORING "$ANCHORING"
  exit 0
fi

# ------------------------------------------------------------------ running stages
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$NUM_THREADS" -gt 0 ]; then
  export OMP_NUM_THREADS="$NUM_THREADS" MKL_NUM_THREADS="$NUM_THREADS" OPENBLAS_NUM_THREADS="$NUM_THREADS"
fi
TIMINGS=()
T_START=$(date +%s)

wants() {  # wants N: true when stage N is not after --to_stage
  [ "$1" -le "$TO_STAGE" ]
}

TIMES_FILE="$(mktemp "${TMPDIR:-/tmp}/mecharule_times.XXXXXX")"
trap 'rm -f "$TIMES_FILE"' EXIT
child_cpu_now() {  # CHILD_CPU = user+sys CPU seconds of finished children ('times' must run in this shell)
  times > "$TIMES_FILE"
  CHILD_CPU=$(tail -n 1 "$TIMES_FILE" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] } printf "%.2f", t }')
}
run_stage() {  # run_stage N NAME CMD...: run, time, and stop the pipeline on failure
  local num="$1" name="$2"; shift 2
  log "stage $num ($name): $(printf '%q ' "$@")"
  if [ "$DRY_RUN" = 1 ]; then TIMINGS+=("$num|$name|dry-run"); return 0; fi
  local t0 c0 rc=0; t0=$(date +%s); child_cpu_now; c0="$CHILD_CPU"
  "$@" || rc=$?
  child_cpu_now
  local dt=$(( $(date +%s) - t0 )) cpu; cpu=$(awk -v a="$CHILD_CPU" -v b="$c0" 'BEGIN{printf "%.0f", a - b}')
  if [ "$rc" -ne 0 ]; then
    echo "$PROG: stage $num ($name) failed with exit code $rc after ${dt}s; stopping (task $TASK, model $MODEL)" >&2
    exit "$rc"
  fi
  TIMINGS+=("$num|$name|${dt}s|${cpu}s")
  log "stage $num ($name) done in ${dt}s (${cpu} CPU-s)"
}
skip_stage() {  # skip_stage N NAME REASON
  log "stage $1 ($2) skipped: $3 (use --force or --from_stage $1 to rerun)"
  TIMINGS+=("$1|$2|skipped")
}
must_rerun() {  # must_rerun N: --force, or N >= --from_stage when --from_stage was given
  [ "$FORCE" = 1 ] || { [ "$FROM_STAGE" -gt 1 ] && [ "$1" -ge "$FROM_STAGE" ]; }
}
have_glob() { compgen -G "$1" >/dev/null 2>&1; }

SPECTRAL_FLAGS=(--spectral_space hidden --rep_hook_name ln_final.hook_normalized --rep_pooling last --spectral_dim 32)
MODEL_FLAGS=(--device "$DEVICE" --dtype "$DTYPE")

log "task $TASK, model $MODEL, preset $PRESET, run mode $RUN_MODE"
log "data in $MODEL_DIR, cache in $CACHE_DIR"

# Stage 1: prompts and answers.
if wants 1; then
  if [ -f "$PKL" ] && [ -f "$FEATURES_DIR/dataset_stats.json" ] && ! must_rerun 1; then
    skip_stage 1 "prompts and answers" "$PKL exists"
    meta="${PKL%.pkl}.meta.json"
    if [ "$MAX_PROMPTS" -gt 0 ] && [ -f "$meta" ] && ! grep -q "\"n_prompts\": $MAX_PROMPTS," "$meta"; then
      log "note: $PKL was made with another prompt count than --max_prompts $MAX_PROMPTS (see $meta)"
    fi
  else
    cmd=("$PY" 1_generate_prompts_and_answers.py --ai_model "$MODEL" --task_module "$TASK_MODULE"
         --prompts_answers_pkl_file "$PKL" --batch_size "$BATCH_SIZE" --stats_json_out "$FEATURES_DIR"
         --seed "$SEED" --max_prompts "$MAX_PROMPTS" "${MODEL_FLAGS[@]}")
    must_rerun 1 && cmd+=(--regenerate)
    run_stage 1 "prompts and answers" "${cmd[@]}"
  fi
fi

# Stage 2: features (skipped when any *.csv exists in the feature report, as in the original).
if wants 2; then
  if have_glob "$FEATURES_DIR/*.csv" && ! must_rerun 2; then
    skip_stage 2 features "$FEATURES_DIR has a CSV"
  else
    cmd=("$PY" 2_generate_features.py --prompts_answers_pkl_file "$PKL" --features_scores_dir "$FEATURES_DIR"
         --cache_dir "$CACHE_DIR" --task_module "$TASK_MODULE" --seed "$SEED"
         --num_correct_example_prompts 32 --num_incorrect_example_prompts 32
         --drop_near_duplicate_features --near_duplicate_features_threshold 0.9999
         --drop_low_predictive_power_features --min_delta 0.2)
    if [ "$NO_LLM" = 1 ]; then cmd+=(--no_llm_feature_generation); else cmd+=(--ai_model "$FEATURE_LLM"); fi
    if awk -v z="$Z_THRESH" 'BEGIN{exit !(z >= 0)}'; then cmd+=(--drop_high_mad_variance_features --z_thresh "$Z_THRESH"); fi
    run_stage 2 features "${cmd[@]}"
  fi
fi

# Stage 3: rules (skipped when an optimal rule set of this kind exists).
if wants 3; then
  if [ "$FAKE" = 1 ]; then found=$(compgen -G "$RULES_DIR/optimal_rule_set_*_fake.csv" || true)
  else found=$(compgen -G "$RULES_DIR/optimal_rule_set_*.csv" | grep -v '_fake\.csv$' || true); fi
  if [ -n "$found" ] && ! must_rerun 3; then
    skip_stage 3 rules "$RULES_DIR has an optimal rule set"
  else
    cmd=("$PY" 3_extract_rules.py --features_scores_dir "$FEATURES_DIR" --rules_dir "$RULES_DIR"
         --task_module "$TASK_MODULE" --random_seed "$SEED" --npermutations 5
         --only_unique_datapoints_in_shap --n_estimators "$N_ESTIMATORS")
    [ "$SHAP_XGB" = 0 ] || cmd+=(--use_shap_in_xgb --use_shap_in_lasso)
    [ "$FAKE" = 0 ] || cmd+=(--fake_targets --fake_target_max_abs_corr 0.05 --fake_target_max_tries 500)
    run_stage 3 rules "${cmd[@]}"
  fi
fi

# A one-class target (stage 3 then writes header-only rule files) leaves nothing to localise.
if [ "$DRY_RUN" = 0 ] && [ "$TO_STAGE" -ge 4 ] && [ -d "$RULES_DIR" ]; then
  n_rules=0
  for f in "$RULES_DIR"/optimal_rule_set_*.csv; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in optimal_rule_set_test_selected_*|optimal_rule_set_all_fit_*) continue;; esac
    if [ "$FAKE" = 1 ]; then case "$f" in *_fake.csv) ;; *) continue;; esac
    else case "$f" in *_fake.csv) continue;; esac; fi
    n_rules=$((n_rules + $(tail -n +2 "$f" | grep -c . || true)))
  done
  if [ "$n_rules" = 0 ]; then
    echo "stage 3 found no rule to localise (see $RULES_DIR/rule_extraction_skipped_*.json); stopping after stage 3" >&2
    TO_STAGE=3
  fi
fi

# Stage 4: spectral sampling plans (discovery plan and/or one anchoring plan per regime).
FAKE_FLAG=(); [ "$FAKE" = 0 ] || FAKE_FLAG=(--fake_targets)
STAGE4_COMMON=(--features_scores_dir "$FEATURES_DIR" --rules_dir "$RULES_DIR" --rules_glob optimal_rule_set
               --ai_model "$MODEL" --task_module "$TASK_MODULE" --seed "$SEED" --use_global_clusters
               --compute_cover_stats --batch_size "$BATCH_SIZE" --spectral_cache_dir "$CACHE_ROOT/$TASK"
               "${SPECTRAL_FLAGS[@]}" "${MODEL_FLAGS[@]}" "${FAKE_FLAG[@]}")
if wants 4; then
  if [ "$DISCOVERY" = random ] && [ "$ANCHORING" = random ]; then
    skip_stage 4 "sampling plans" "random discovery and random anchoring need no plan"
  else
    if [ "$DISCOVERY" = spectral ]; then
      if [ -f "$DISC_PLAN" ] && ! must_rerun 4; then skip_stage 4 "discovery plan" "$DISC_PLAN exists"
      else
        run_stage 4 "discovery plan" "$PY" 4_spectral_sample_datapoints.py "${STAGE4_COMMON[@]}" \
          --baseline_subset all --pair_by_similarity_len_matched --pair_similarity_metric euclidean \
          --min_points_per_ablation "$PAIRS" --max_points_per_ablation "$PAIRS" \
          --global_n_clusters "$DISC_CLUSTERS" --output_path "$DISC_PLAN"
      fi
    fi
    if [ "$ANCHORING" = spectral ]; then
      for regime in positive negative; do
        plan="$(anchor_plan "$regime")"
        if [ -f "$plan" ] && ! must_rerun 4; then skip_stage 4 "anchoring plan ($regime)" "$plan exists"
        else
          run_stage 4 "anchoring plan ($regime)" "$PY" 4_spectral_sample_datapoints.py "${STAGE4_COMMON[@]}" \
            --baseline_subset "$regime" --min_points_per_ablation "$N_POINTS" --max_points_per_ablation "$N_POINTS" \
            --global_n_clusters "$ANCHOR_CLUSTERS" --output_path "$plan"
        fi
      done
    fi
  fi
fi

# Stage 5: candidate units by EAP-IG-inputs (resumable per rule).
if wants 5; then
  if [ -f "$CIRCUITS_DIR/manifest.json" ] && [ -f "$CIRCUITS_DIR/dataset_info.json" ] && ! must_rerun 5; then
    skip_stage 5 "circuit discovery" "$CIRCUITS_DIR/manifest.json exists"
  else
    cmd=("$PY" 5_discover_circuits.py --rules_dir "$RULES_DIR" --rules_glob optimal_rule_set
         --features_scores_dir "$FEATURES_DIR" --ai_model "$MODEL" --task_module "$TASK_MODULE"
         --method EAP-IG-inputs --intervention patching --absolute_value_attributions
         --circuit_level "$CIRCUIT_LEVEL" --circuit_size "$CIRCUIT_SIZE" --eval_intervention "$STAGE5_INTERVENTION"
         --points_to_use_for_mean_ablation "$MEAN_POOL" --temporal_agg mean --max_pairs_per_circuit "$PAIRS"
         --pair_similarity_metric euclidean --batch_size "$S5_BATCH" --max_ig_steps "$IG_STEPS"
         --max_n_of_rules_to_analyze "$MAX_CIRCUITS" --cache_dir "$CACHE_DIR" --seed "$SEED"
         --num_threads "$NUM_THREADS" --output_data_dir "$CIRCUITS_DIR" "${MODEL_FLAGS[@]}" "${FAKE_FLAG[@]}")
    [ "$DISCOVERY" = random ] || cmd+=(--sampling_strategy plan --sampling_plan_path "$DISC_PLAN")
    [ "$DECODE_ONLY" = 0 ] || cmd+=(--decode_only)
    [ "$MLP_ONLY" = 0 ] || cmd+=(--mlp_neurons_only)
    [ "$INCLUDE_ZERO" = 0 ] || cmd+=(--include_zero_scores)
    # --keep_going: a rule that fails (e.g. one the stage-4 plan skipped for too few rows) is recorded
    # with status "error" and the others go on; the stage fails below only when no rule is usable.
    run_stage 5 "circuit discovery" "${cmd[@]}" --keep_going
    if [ "$DRY_RUN" = 0 ]; then
      n_ok=$("$PY" -c 'import json, sys; print(sum(e.get("status") == "ok" for e in json.load(open(sys.argv[1]))))' \
             "$CIRCUITS_DIR/manifest.json")
      if [ "$n_ok" = 0 ]; then
        echo "$PROG: stage 5 (circuit discovery) produced no usable circuit (see $CIRCUITS_DIR/manifest.json);" \
             "stopping: lower --pairs_per_circuit or use more prompts" >&2
        exit 1
      fi
      log "stage 5: $n_ok usable circuit(s) in $CIRCUITS_DIR/manifest.json"
    fi
  fi
fi

# Stage 6: CHA (or exhaustive) per regime; one call for both regimes when no plan is needed.
stage6() {  # stage6 LABEL OUT_DIR SUBSET [PLAN]
  local label="$1" out="$2" subset="$3" plan="${4:-}"
  cmd=("$PY" 6_analyze_bag_of_rules.py --input_data_dir "$CIRCUITS_DIR" --output_data_dir "$out"
       --ai_model "$MODEL" --task_module "$TASK_MODULE" --seed "$SEED" --search_epsilon "$TAU"
       --n_associated "$N_POINTS" --n_unrelated "$N_POINTS" --points_to_use_for_mean_ablation "$MEAN_POOL"
       --intervention "$INTERVENTION" --batch_size "$BATCH_SIZE" --sign_split_first
       --baseline_subset "$subset" "${MODEL_FLAGS[@]}")
  [ "$FAST" = 0 ] || cmd+=(--fast_ablation)
  [ -z "$TOP_K" ] || cmd+=(--top_k_neurons "$TOP_K")
  [ -z "$LAST_K" ] || cmd+=(--last_k_layers "$LAST_K")
  [ "$DECODE_ONLY" = 0 ] || cmd+=(--decode_only)
  [ "$MLP_ONLY" = 0 ] || cmd+=(--mlp_neurons_only)
  [ -z "$plan" ] || cmd+=(--sampling_strategy plan --sampling_plan_path "$plan")
  run_stage 6 "$label" "${cmd[@]}"
}
stage6_done() { [ -f "$1/cost_summary.json" ] && [ -f "$1/neuron_buckets.json" ] && ! must_rerun 6; }
if wants 6; then
  if [ "$ANCHORING" = random ]; then
    if stage6_done "$BAG_DIR/positive_baseline" && stage6_done "$BAG_DIR/negative_baseline"; then
      skip_stage 6 "unit localisation" "$BAG_DIR has both regimes"
    else
      stage6 "unit localisation (both regimes)" "$BAG_DIR" all
    fi
  else
    for regime in positive negative; do
      out="$BAG_DIR/${regime}_baseline"
      if stage6_done "$out"; then skip_stage 6 "unit localisation ($regime)" "$out/cost_summary.json exists"; continue; fi
      stage6 "unit localisation ($regime)" "$out" "$regime" "$(anchor_plan "$regime")"
    done
  fi
fi

# Stage 7: neuron-anchored rules for every localised unit.
if wants 7; then
  if [ -f "$STATS_DIR/rule_combo_metrics_manifest.json" ] && [ -f "$STATS_DIR/flip_stats_global.json" ] \
     && ! must_rerun 7; then
    skip_stage 7 "neuron-anchored rules" "$STATS_DIR has its rule metrics"
  else
    cmd=("$PY" 7_refine_neuron_anchored_rules.py --circuit_agonists_path "$BAG_DIR"
         --features_scores_dir "$FEATURES_DIR" --rules_dir "$NEURON_RULES_DIR" --ai_model "$MODEL"
         --task_module "$TASK_MODULE" --search_epsilon "$TAU" --batch_size "$BATCH_SIZE"
         --neuron_batch_size "$NEURON_BATCH" --stats_dirname "$RUN_MODE" --seed "$SEED" --random_seed "$SEED"
         --use_spectral_sampling --sampling_max_points "$S7_MAX" --sampling_min_points "$S7_MIN"
         --global_n_clusters "$S7_CLUSTERS" "${SPECTRAL_FLAGS[@]}" --spectral_cache_dir "$CACHE_ROOT/$TASK"
         --points_to_use_for_mean_ablation "$MEAN_POOL" --intervention "$INTERVENTION"
         --extract_rules --only_unique_datapoints_in_shap --n_estimators "$N_ESTIMATORS" --summarize_rule_metrics
         --min_rule_dataset_coverage "$MIN_COV" --no_tqdm_batches "${MODEL_FLAGS[@]}")
    [ "$DECODE_ONLY" = 0 ] || cmd+=(--decode_only)
    run_stage 7 "neuron-anchored rules" "${cmd[@]}"
  fi
fi

# ------------------------------------------------------------------ timings and summary
T_TOTAL=$(( $(date +%s) - T_START ))
{
  echo "per-stage wall time (task $TASK, model $MODEL, preset $PRESET):"
  printf '  %-7s  %-34s %8s %8s\n' stage name wall CPU
  for t in "${TIMINGS[@]}"; do IFS='|' read -r n name dt cpu <<<"$t"; printf '  %-7s  %-34s %8s %8s\n' "$n" "$name" "$dt" "${cpu:-}"; done
  printf '  %-7s  %-34s %8s\n' total "" "${T_TOTAL}s"
} >&2
if [ "$DRY_RUN" = 0 ] && [ -d "$MODEL_DIR" ]; then
  {
    printf 'stage\tname\twall\tcpu\n'
    for t in "${TIMINGS[@]}"; do IFS='|' read -r n name dt cpu <<<"$t"; printf '%s\t%s\t%s\t%s\n' "$n" "$name" "$dt" "${cpu:-}"; done
    printf 'total\t%s\t%ss\t\n' "$PRESET" "$T_TOTAL"
  } > "$MODEL_DIR/pipeline_timings.tsv"
fi
if [ "$SUMMARY" = 1 ] && [ "$DRY_RUN" = 0 ]; then
  "$PY" -m lib.reporting.summary --task "$TASK" --model "$MODEL" --data_root "$DATA_ROOT" \
    --cache_root "$CACHE_ROOT" --run_mode "$RUN_MODE" --tau "$TAU" --min_rule_dataset_coverage "$MIN_COV"
fi
