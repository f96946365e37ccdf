#!/usr/bin/env bash
# Train the sequential counter. Settings below are variables, overridable from the environment;
# extra flags are passed through to train_sequential_attention.py (see its --help).
#
#   DATA_ROOT=/data/FSC147 MODEL=/models/Qwen2-VL-2B-Instruct ./run_sequential_attention.sh   # one GPU
#   DATA_ROOT=/data/FSC147 ./run_sequential_attention.sh --resume latest      # go on where the last run stopped
#   DATA_ROOT=/data/FSC147 LR=1e-4 ./run_sequential_attention.sh --max_steps 2000
#   DATA_ROOT=/data/FSC147 NUM_GPUS=4 ./run_sequential_attention.sh           # accelerate launch, one process per GPU
#   ./run_sequential_attention.sh --demo                                       # tiny CPU demo (what `make demo` runs)
#   ./run_sequential_attention.sh --help                                       # these variables and their values
set -euo pipefail
cd "$(dirname "$0")"

# Variables (environment overrides each):
if [[ -z "${PYTHON:-}" ]]; then  # the project's .venv (made by `make test` / `make demo`) when there is one
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATA_ROOT=${DATA_ROOT:-}         # required: the FSC-147 folder (images_384_VarV2/, annotation_FSC147_384.json, ...)
MODEL=${MODEL:-Qwen/Qwen2-VL-2B-Instruct}  # a local folder of the weights, or the hub id (needs the hub)
MODEL_TYPE=${MODEL_TYPE:-simple}  # simple or attention
# The recipe that counts on the synthetic benchmark (RESULTS.md): choose the image token holding the next
# object, marks jittered as the counting loop's are, half the not-done states one object from done.
POINTING=${POINTING:-token}
MARK_JITTER=${MARK_JITTER:-0.2}
NEAR_DONE=${NEAR_DONE:-0.5}
# Which object is "next": nearest (any uncounted object; the marked ones are random subsets) or reading_order (the
# seed's: rows top to bottom). FSC-147's images are dense (7 to 3,731 objects, mean 56), where nearest targets
# counted far better on dense synthetic scenes (RESULTS.md 1c); counting then commits every confident point per
# forward by default (count_objects.py --points_per_step checkpoint).
TARGETS=${TARGETS:-nearest}
BATCH_SIZE=${BATCH_SIZE:-2}       # counting states per step (per GPU)
EPOCHS=${EPOCHS:-10}
LR=${LR:-5e-5}
OUTPUT_DIR=${OUTPUT_DIR:-runs/sequential}  # the same folder every time, so `--resume latest` finds the last run
WANDB_PROJECT=${WANDB_PROJECT:-sequential-counting}
NUM_GPUS=${NUM_GPUS:-1}           # > 1: accelerate launch --multi_gpu (BATCH_SIZE is per GPU)
VARIABLES=(PYTHON DATA_ROOT MODEL MODEL_TYPE POINTING MARK_JITTER NEAR_DONE TARGETS BATCH_SIZE EPOCHS LR OUTPUT_DIR
           WANDB_PROJECT NUM_GPUS DEMO_DIR DEMO_STEPS DEMO_LR)

# Demo: everything is generated locally, and it runs on the CPU (--device cpu) wherever it is started, so it
# prints the same numbers everywhere. Easy images (1 to 3 objects on plain backgrounds, 112 px), fresh ones at
# every step, and the tiny random backbone trained in full (LoRA on random weights learns too slowly to show in
# a few minutes; the 4-bit QLoRA path is in the tests and the benchmarks).
DEMO_DIR=${DEMO_DIR:-demo}
DEMO_STEPS=${DEMO_STEPS:-1000}
DEMO_LR=${DEMO_LR:-6e-4}

demo() {
    if [[ ! -f "$DEMO_DIR/data/synth_config.json" ]]; then
        rm -rf "$DEMO_DIR/data"
        "$PYTHON" dataset_fsc147.py synth --out "$DEMO_DIR/data" --num_images 200 --max_objects 3 --seed 0 \
            --image_height 112 --min_width 112 --max_width 140 --num_classes 6 --shared_classes --background plain
    fi
    if [[ ! -f "$DEMO_DIR/tiny-qwen2vl/config.json" ]]; then
        "$PYTHON" tiny_qwen2vl.py --out "$DEMO_DIR/tiny-qwen2vl" --seed 0
    fi
    local out=runs/demo args=("$@") i
    for ((i = 0; i < ${#args[@]} - 1; i++)); do  # a passed --output_dir replaces runs/demo
        [[ "${args[i]}" == --output_dir ]] && out=${args[i + 1]}
    done
    rm -rf "$out"  # the demo starts fresh, and only its own run folder goes
    "$PYTHON" train_sequential_attention.py \
        --data_root "$DEMO_DIR/data" --model_name_or_path "$DEMO_DIR/tiny-qwen2vl" --model_type "$MODEL_TYPE" \
        --pointing token --finetune full --no-load_in_4bit --synthetic_train --mark_jitter 0.2 \
        --near_done_fraction 0.5 --head_hidden 128 --batch_size 8 --max_steps "$DEMO_STEPS" --lr "$DEMO_LR" \
        --warmup_steps 20 --min_pixels 12544 --max_pixels 25088 --eval_every 250 --count_every 0 --save_every 500 \
        --num_workers 0 --eval_images 40 --max_count 6 --seed 0 \
        --device cpu --output_dir "$out" --wandb_mode offline --wandb_project "$WANDB_PROJECT" "$@"
}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "Variables (set in the environment; current values):"
    local v
    for v in "${VARIABLES[@]}"; do printf '  %-14s %s\n' "$v" "${!v}"; done
    echo
    echo "Flags after the variables go to train_sequential_attention.py ($PYTHON train_sequential_attention.py --help)."
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    usage
    exit 0
fi
if [[ "${1:-}" == "--demo" ]]; then
    shift
    demo "$@"
    exit 0
fi
if [[ -z "$DATA_ROOT" ]]; then
    echo "error: set DATA_ROOT to the FSC-147 folder, e.g. DATA_ROOT=/data/FSC147 $0 (see $0 --help)" >&2
    exit 2
fi
missing=()
for f in images_384_VarV2 annotation_FSC147_384.json Train_Test_Val_FSC_147.json ImageClasses_FSC147.txt; do
    [[ -e "$DATA_ROOT/$f" ]] || missing+=("$f")
done
if (( ${#missing[@]} )); then
    echo "error: DATA_ROOT=$DATA_ROOT is not an FSC-147 folder: it lacks ${missing[*]}" >&2
    exit 2
fi

LAUNCH=("$PYTHON")
if (( NUM_GPUS > 1 )); then
    LAUNCH=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1
            --mixed_precision no --dynamo_backend no)
fi
exec "${LAUNCH[@]}" train_sequential_attention.py \
    --data_root "$DATA_ROOT" --model_name_or_path "$MODEL" --model_type "$MODEL_TYPE" \
    --pointing "$POINTING" --mark_jitter "$MARK_JITTER" --near_done_fraction "$NEAR_DONE" --target_strategy "$TARGETS" \
    --batch_size "$BATCH_SIZE" --epochs "$EPOCHS" --lr "$LR" --load_in_4bit \
    --output_dir "$OUTPUT_DIR" --wandb_project "$WANDB_PROJECT" "$@"
