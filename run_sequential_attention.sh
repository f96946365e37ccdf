#!/usr/bin/env bash
# Train the sequential counter. Settings below are variables, overridable from the environment;
# extra flags are passed through to train_sequential_attention.py (see its --help).
#
#   ./run_sequential_attention.sh                                  # FSC-147 + Qwen2-VL-2B, one GPU
#   DATA_ROOT=/data/FSC147 LR=1e-4 ./run_sequential_attention.sh --max_steps 2000
#   NUM_GPUS=4 ./run_sequential_attention.sh                       # accelerate launch, one process per GPU
#   ./run_sequential_attention.sh --demo                           # tiny CPU demo (what `make demo` runs)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-/media/M2SSD/FSC147}
MODEL=${MODEL:-Qwen/Qwen2-VL-2B-Instruct}
MODEL_TYPE=${MODEL_TYPE:-simple}
BATCH_SIZE=${BATCH_SIZE:-2}
EPOCHS=${EPOCHS:-10}
LR=${LR:-5e-5}
OUTPUT_DIR=${OUTPUT_DIR:-runs/sequential_$(date +%Y%m%d_%H%M%S)}
WANDB_PROJECT=${WANDB_PROJECT:-sequential-counting}
NUM_GPUS=${NUM_GPUS:-1}  # > 1: accelerate launch --multi_gpu (BATCH_SIZE is per GPU)

# Demo: everything is generated locally; about 3 minutes on 2 CPU cores.
DEMO_DIR=${DEMO_DIR:-demo}
DEMO_STEPS=${DEMO_STEPS:-600}
DEMO_LR=${DEMO_LR:-3e-4}

demo() {
    if [[ ! -f "$DEMO_DIR/data/annotation_FSC147_384.json" ]]; then
        "$PYTHON" dataset_fsc147.py synth --out "$DEMO_DIR/data" --num_images 200 --max_objects 6 --seed 0
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
        --load_in_4bit --batch_size 8 --max_steps "$DEMO_STEPS" --lr "$DEMO_LR" --warmup_steps 30 \
        --min_pixels 3136 --max_pixels 50176 --eval_every 100 --save_every 300 --num_workers 1 \
        --eval_images 16 --max_count 20 \
        --output_dir "$out" --wandb_mode offline --wandb_project "$WANDB_PROJECT" "$@"
}

if [[ "${1:-}" == "--demo" ]]; then
    shift
    demo "$@"
    exit 0
fi

LAUNCH=("$PYTHON")
if (( NUM_GPUS > 1 )); then
    LAUNCH=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1
            --mixed_precision no --dynamo_backend no)
fi
exec "${LAUNCH[@]}" train_sequential_attention.py \
    --data_root "$DATA_ROOT" --model_name_or_path "$MODEL" --model_type "$MODEL_TYPE" \
    --batch_size "$BATCH_SIZE" --epochs "$EPOCHS" --lr "$LR" --load_in_4bit \
    --output_dir "$OUTPUT_DIR" --wandb_project "$WANDB_PROJECT" "$@"
