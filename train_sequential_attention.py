"""Train the sequential counter: alternating done/not-done (cls) and next-object (reg) steps.

Tiny CPU run (synthetic data + tiny random Qwen2-VL through the real 4-bit + LoRA path; `make demo` instead trains
the tiny backbone in full: ./run_sequential_attention.sh --demo):
    python dataset_fsc147.py synth --out /tmp/data --num_images 200 --max_objects 6
    python tiny_qwen2vl.py --out /tmp/tiny-qwen2vl
    python train_sequential_attention.py --data_root /tmp/data --model_name_or_path /tmp/tiny-qwen2vl \
        --max_steps 600 --batch_size 8 --lr 3e-4 --warmup_steps 30 --min_pixels 3136 --max_pixels 50176 \
        --eval_images 16 --max_count 20 --device cpu --output_dir runs/tiny [--model_type attention]

One GPU, FSC-147 and Qwen2-VL-2B-Instruct (or ./run_sequential_attention.sh):
    python train_sequential_attention.py --data_root /path/FSC147 --batch_size 2 --epochs 10 \
        --lr 5e-5 --load_in_4bit

Several GPUs (data parallel: each process takes its slice of every global batch of
--batch_size x processes states; gradients are averaged every step; only rank 0 writes):
    accelerate launch --multi_gpu --num_processes 4 train_sequential_attention.py --data_root /path/FSC147 \
        --batch_size 2 --epochs 10 --load_in_4bit
Several CPU processes (gloo; how the tests check it): the same with --device cpu.

Writes OUTPUT_DIR/config.json, OUTPUT_DIR/metrics.jsonl, OUTPUT_DIR/checkpoint-<step>/, checkpoint-last/
and an offline W&B run under OUTPUT_DIR/wandb unless WANDB_API_KEY is set (then online).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cli import UsageError, arg, parse_config, write_json_atomic
from count_objects import PROTOCOLS, CountSettings
from dataset_fsc147 import (TARGET_STRATEGIES, FSC147Dataset, SyntheticTrainImages, collate_samples, object_size,
                            prepare_batch)
from checkpoints import TrainState, restore_training, resume_path, save_step_checkpoint, save_training_checkpoint
from model_loading import ModelConfig, build_model, device_of, model_inputs, validate_model_config
from model_sequential_simple import LossWeights, compute_loss
from parallel import (ProcessFailure, any_rank, average_gradients, barrier, describe_failure, exit_with_parent,
                      gather_to_rank0, init_distributed, install_stop_handlers, mean_over_processes, raise_if_any_failed,
                      rank_and_world, rng_state, shared_failures, sum_over_processes, sync_parameters)
from run_logging import MetricsLogger, grad_norm_tensor, log_overlays, log_step, print_grad_check, print_run_summary

logger = logging.getLogger("train")


@dataclass
class TrainConfig(ModelConfig):
    """The model's fields (ModelConfig: backbone, 4-bit, LoRA, heads, pixels, seed, device) plus these."""

    # data
    data_root: str = arg("", "FSC-147 root (images_384_VarV2/, annotation_FSC147_384.json, splits, classes)")
    train_split: str = arg("train", "split to train on")
    val_split: str = arg("val", "split for validation losses")
    max_train_images: int = arg(0, "use only N training images, a fixed sample spread over the classes (0: all)")
    near_done_fraction: float = arg(0.5, "fraction of not-done cls states with exactly one object left "
                                    "(k = N - 1) instead of uniform k (0: the seed's uniform k); validation states "
                                    "stay uniform")
    skip_fraction: float = arg(0.0, "fraction of not-done states (both modes) with misses: 1 to 3 objects before the "
                               "last counted one left unmarked, as the counting loop leaves the objects it skipped; "
                               "the next object is the first unmarked one (reading order only; validation states "
                               "have none)")
    mark_size_jitter: float = arg(0.0, "training marks are drawn with the radius times a factor in [1 - j, 1 + j], "
                                  "as the text-only protocol's own object-size estimate errs (0: exact)")
    negative_prompts: float = arg(0.0, "fraction of the done classification states whose prompt names another "
                                  "training class, absent from the image: done before anything is counted")
    object_map_focal: float = arg(0.0, "focal exponent of the dense 'unmarked object here' BCE: easy background tokens "
                                  "count less than hard ones, e.g. another shape of the named colour (0: plain BCE)")
    other_object_weight: float = arg(1.0, "weight of the dense object-map BCE at image tokens holding an object "
                                     "the prompt does not name (a distractor; every object for a negative "
                                     "prompt), where a counter overcounts; needs all_points in the annotations "
                                     "(1: the plain BCE)")
    class_loss: float = arg(0.0, "weight of an auxiliary loss: every image token holding an uncounted object predicts "
                            "the object's class among the training split's classes (0: off)")
    target_strategy: str = arg("reading_order", "which object is 'next': reading_order (single target, "
                               "rows top to bottom, left to right) or nearest (loss to the nearest uncounted object)")
    mark_jitter: float = arg(0.2, "marks (and the counted points the model is given) land up to this fraction of the "
                             "object size (exemplar boxes) from their objects, as the counting loop's imperfect points "
                             "do (0: the seed's exact marks)")
    synthetic_train: bool = arg(False, "train on fresh synthetic images (the generator settings in DATA_ROOT/"
                                "synth_config.json, written by `dataset_fsc147.py synth`) instead of the train split: "
                                "no image is seen twice; validation still uses DATA_ROOT's val split")
    synthetic_confusers: float = arg(0.0, "with --synthetic_train on a generator with distractors: the share of "
                                     "images whose other classes all share the named class's colour or shape (hard "
                                     "negatives, where it has such classes; 0: drawn from every training class)")
    # optimisation
    batch_size: int = arg(2, "counting states per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    epochs: int = arg(10, "passes over the training images (ignored when --max_steps > 0)")
    max_steps: int = arg(0, "optimizer steps to run (0: derived from --epochs)")
    max_minutes: float = arg(0.0, "also stop (evaluate, save) after this many minutes of training; the lr "
                             "schedule still spans --max_steps (0: no time limit)")
    lr: float = arg(5e-5, "learning rate, the same for every trainable parameter (LoRA, heads, token rows)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(0, "linear warmup steps")
    lr_schedule: str = arg("cosine", "cosine (decay to 10% after warmup) or constant")
    grad_clip: float = arg(1.0, "clip the global grad norm to this (0: no clipping)")
    # loop
    output_dir: str = arg("runs/sequential", "run folder: config.json, metrics.jsonl, checkpoints, wandb/")
    log_every: int = arg(1, "log training metrics every N optimizer steps")
    eval_every: int = arg(100, "validation losses every N optimizer steps (0: only at the end)")
    eval_states: int = arg(32, "fixed validation counting states per mode (cls and reg), from val images spread "
                           "over the classes")
    eval_images: int = arg(16, "val images counted with the full loop at each counting evaluation; best MAE -> "
                           "checkpoint-best (0: off)")
    count_every: int = arg(500, "count the --eval_images val images every N optimizer steps and at the end (0: at "
                           "every --eval_every evaluation); counting costs a forward per point, on a GPU as much as "
                           "the training between two --eval_every evaluations (RESULTS.md section 4)")
    eval_overlays: int = arg(4, "overlay images (predicted marks | ground truth) logged to W&B per evaluation")
    max_count: int = arg(200, "counting evaluation during training: stop an image after this many points (bounds "
                         "its time; evaluate_counting.py's own --max_count covers FSC-147's densest images)")
    done_threshold: float = arg(0.5, "counting loop: stop when sigmoid(done) exceeds this")
    protocol: str = arg("text", "counting evaluation: text (marks sized from the model's own object-size estimate) "
                        "or exemplar (from the val images' exemplar boxes)")
    save_every: int = arg(500, "write checkpoint-<step> every N optimizer steps (0: only at the end)")
    save_total_limit: int = arg(0, "keep only the newest N checkpoint-<step> folders (plus -last and -best; 0: all)")
    resume: str = arg("", "continue a run: 'latest' (OUTPUT_DIR/checkpoint-last) or a checkpoint folder")
    max_bad_steps: int = arg(10, "stop (after saving) after this many consecutive steps with a non-finite loss or gradient")
    grad_check_every: int = arg(50, "print the seed's gradient check every N steps of the first epoch")
    num_workers: int = arg(2, "DataLoader worker processes decoding images")
    wandb_project: str = arg("sequential-counting", "W&B project")
    wandb_mode: str = arg("", "online, offline or disabled (default: online if WANDB_API_KEY is set, else offline)")
    wandb_run_name: str = arg("", "W&B run name (default: the output folder's name)")


def validate_train_config(cfg: TrainConfig) -> list[str]:
    """Every problem with the config at once."""
    errors = validate_model_config(cfg)
    if not cfg.data_root:
        errors.insert(0, "--data_root is required")
    if cfg.target_strategy not in TARGET_STRATEGIES:
        errors.append(f"--target_strategy must be one of {TARGET_STRATEGIES}, got {cfg.target_strategy!r}")
    for name in ("batch_size", "grad_accum", "log_every", "eval_states"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("epochs", "max_steps", "warmup_steps", "eval_every", "count_every", "save_every", "num_workers",
                 "max_train_images", "grad_check_every", "eval_images", "eval_overlays", "save_total_limit"):
        if getattr(cfg, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.epochs == 0 and cfg.max_steps == 0:
        errors.append("one of --epochs or --max_steps must be > 0")
    if cfg.synthetic_train and cfg.max_steps == 0:
        errors.append("--synthetic_train makes new images without end: set --max_steps")
    if cfg.synthetic_train and (cfg.max_train_images or cfg.train_split != "train"):
        errors.append("--synthetic_train draws new images of the generator's training classes and reads no split: "
                      "--max_train_images and --train_split do not apply to it (drop them, or drop --synthetic_train)")
    if not 0 <= cfg.synthetic_confusers <= 1:
        errors.append(f"--synthetic_confusers must be in [0, 1], got {cfg.synthetic_confusers}")
    elif cfg.synthetic_confusers and not cfg.synthetic_train:
        errors.append("--synthetic_confusers draws the distractors of fresh synthetic images: it needs --synthetic_train")
    if not 0 <= cfg.mark_jitter <= 1:
        errors.append(f"--mark_jitter must be in [0, 1], got {cfg.mark_jitter}")
    for name in ("near_done_fraction", "skip_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            errors.append(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.skip_fraction > 0 and cfg.target_strategy != "reading_order":
        errors.append("--skip_fraction needs --target_strategy reading_order (nearest already marks random subsets)")
    if cfg.object_map_focal < 0 or cfg.class_loss < 0:
        errors.append("--object_map_focal and --class_loss must be >= 0")
    if cfg.other_object_weight <= 0:
        errors.append(f"--other_object_weight must be > 0, got {cfg.other_object_weight}")
    if cfg.other_object_weight != 1 and cfg.pointing != "token":
        errors.append("--other_object_weight needs --pointing token (it weights the object map over image tokens)")
    if cfg.class_loss > 0 and cfg.pointing != "token":
        errors.append("--class_loss needs --pointing token (it reads the image tokens)")
    if not 0 <= cfg.mark_size_jitter < 1 or not 0 <= cfg.negative_prompts <= 1:
        errors.append("--mark_size_jitter must be in [0, 1) and --negative_prompts in [0, 1]")
    if cfg.max_minutes < 0:
        errors.append(f"--max_minutes must be >= 0, got {cfg.max_minutes}")
    if not (0 < cfg.lr < 1):
        errors.append(f"--lr must be in (0, 1), got {cfg.lr}")
    if cfg.max_bad_steps < 1:
        errors.append(f"--max_bad_steps must be >= 1, got {cfg.max_bad_steps}")
    if cfg.max_count < 1:
        errors.append(f"--max_count must be >= 1, got {cfg.max_count}")
    if not 0 < cfg.done_threshold < 1:
        errors.append(f"--done_threshold must be in (0, 1), got {cfg.done_threshold}")
    if cfg.protocol not in PROTOCOLS:
        errors.append(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0:
        errors.append("--grad_clip and --weight_decay must be >= 0")
    if cfg.lr_schedule not in ("cosine", "constant"):
        errors.append(f"--lr_schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if cfg.wandb_mode not in ("", "online", "offline", "disabled"):
        errors.append(f"--wandb_mode must be online, offline or disabled, got {cfg.wandb_mode!r}")
    return errors


# ----------------------------------------------------------------------------- data


def build_data(cfg: TrainConfig):
    """Training and validation datasets (FSC147Dataset) of the configured splits."""
    val = FSC147Dataset(cfg.data_root, cfg.val_split)
    if cfg.synthetic_train:
        return SyntheticTrainImages(cfg.data_root, confusers=cfg.synthetic_confusers), val
    train = FSC147Dataset(cfg.data_root, cfg.train_split, max_images=cfg.max_train_images)
    return train, val


TOKEN_PIXELS = 28  # a merged image token's side in processed pixels (Qwen2-VL: 14-pixel patches, 2 x 2 merged)
OBJECT_TOKEN_SAMPLES = 64  # training images measured for --object_tokens (evenly spaced over the split)


def median_object_tokens(dataset, min_pixels: int, max_pixels: int, n: int = OBJECT_TOKEN_SAMPLES) -> float:
    """The training objects' median width in image tokens: the typical exemplar-box size (`object_size`) of up to
    `n` images spread over the dataset, in units of a merged token (28 processed pixels) after the processor's
    resize. Counting with --tiles auto zooms crops of denser images until their objects are about this wide."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    widths = []
    for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int):
        sample = dataset[int(i)]
        if sample is None:  # an unreadable image (counted by the dataset)
            continue
        width, height = sample.image.size
        _, resized_width = smart_resize(height, width, TOKEN_PIXELS, min_pixels, max_pixels)
        widths.append(object_size(sample.boxes, width, height) * resized_width / width / TOKEN_PIXELS)
    return round(float(np.median(widths)), 4) if widths else 0.0


def build_loader(cfg: TrainConfig, dataset, epoch: int, start_batch: int = 0, rank: int = 0,
                 world: int = 1) -> torch.utils.data.DataLoader:
    """Loader of raw samples in this epoch's shuffled order, from batch `start_batch` on (for resume).

    The order depends only on (seed, epoch), and the loader has its own generator, so creating it
    never draws from the global torch RNG (whose state a resumed run restores). With several
    processes, global batch b is order[b * G:(b + 1) * G] (G = batch_size x world) and process `rank`
    loads its own slice of it, so the processes see different images and together exactly what one
    process with --batch_size G would see.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    size = cfg.batch_size * world
    n_batches = max(1, len(dataset) // size)  # drop the last partial batch, keep at least one
    indices = [i for b in range(start_batch, n_batches)
               for i in order[b * size + rank * cfg.batch_size:b * size + (rank + 1) * cfg.batch_size]]
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, collate_fn=collate_samples,
                                       num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(epoch),
                                       worker_init_fn=exit_with_parent if cfg.num_workers else None)


def fixed_val_batches(cfg: TrainConfig, dataset) -> list:
    """The same validation counting states at every evaluation: cls and reg batches."""
    rng = np.random.default_rng(cfg.seed + 12345)
    samples = [s for s in (dataset[i] for i in dataset.subset_indices(cfg.eval_states, cfg.seed)) if s is not None]
    batches = []
    for mode in ("cls", "reg"):
        for i in range(0, len(samples), cfg.batch_size):
            batches.append(prepare_batch(samples[i:i + cfg.batch_size], mode, rng, cfg.target_strategy,
                                         jitter=cfg.mark_jitter))
    return batches


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(cfg: TrainConfig, model, total_steps: int):
    """AdamW with one learning rate for every trainable parameter, warmup + cosine/constant."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_mode(step: int) -> str:
    """Optimizer steps alternate: even steps classify done / not done, odd steps regress x, y."""
    return "cls" if step % 2 == 0 else "reg"


def loss_weights(cfg: TrainConfig) -> LossWeights:
    """The loss terms' weights the training config sets."""
    return LossWeights(object_map_focal=cfg.object_map_focal, other_objects=cfg.other_object_weight,
                       classes=cfg.class_loss)


def state_loss(outputs: dict, batch, device, parts: dict | None = None, weights: LossWeights | None = None,
               vocabulary: list[str] = ()) -> torch.Tensor:
    """`compute_loss` of a CountingBatch's targets for the model's outputs on it (class ids from `vocabulary`)."""
    class_ids = torch.tensor([vocabulary.index(c) if c in vocabulary else -1 for c in batch.class_names],
                             device=device) if vocabulary else None
    return compute_loss(outputs, batch.done.to(device), batch.targets.to(device), batch.target_mask.to(device),
                        batch.mode, remaining=batch.remaining, parts=parts,
                        object_sizes=torch.tensor(batch.object_sizes, device=device),
                        image_sizes=torch.tensor(batch.sizes, dtype=torch.float32, device=device),
                        class_ids=class_ids, weights=weights, others=batch.others or None)


def batch_loss(model, batch, device, parts: dict | None = None, weights: LossWeights | None = None
               ) -> tuple[torch.Tensor, dict]:
    """Forward one CountingBatch and its loss (`state_loss`); also the outputs."""
    outputs = model(model_inputs(model, batch, device), counted=batch.counted)
    return state_loss(outputs, batch, device, parts, weights, getattr(model, "class_vocabulary", ())), outputs


def train_step(cfg: TrainConfig, model, optimizer, scheduler, micro_batches: list, mode: str) -> dict:
    """One optimizer step over `micro_batches` (all of one mode). Returns loss, its terms and grad norms.

    Losses, terms and norms stay on the device until one read at the end (one host sync per step, plus the
    collectives with several processes)."""
    device = device_of(model)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_loss, n_states, terms = torch.zeros((), device=device), 0, {}
    hint = (f"batch {cfg.batch_size}: lower --max_pixels or --batch_size (and raise --grad_accum to keep the "
            "effective batch), or pass --gradient_checkpointing")
    with shared_failures(device, "forward and backward", oom_hint=hint):  # every process stops if one fails here
        for batch in micro_batches:
            parts = {}
            loss, _ = batch_loss(model, batch, device, parts, loss_weights(cfg))
            (loss / len(micro_batches)).backward()
            total_loss = total_loss + loss.detach() / len(micro_batches)
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + v / len(micro_batches)
            n_states += len(batch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = rank_and_world()[1]
    if world > 1:
        average_gradients(params)
        total_loss, n_states = mean_over_processes(device, total_loss), n_states * world
    names, norms = grad_norm_tensor(model)  # before clipping: what the loss actually sent to each module
    total = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    scalars = [torch.as_tensor(total_loss, device=device), total, *terms.values(), *norms]
    values = torch.stack([v.float() for v in scalars]).tolist()  # the step's one read back to the host
    total_loss, total = values[0], values[1]
    terms = dict(zip(terms, values[2:2 + len(terms)]))
    norms = dict(zip(names, values[2 + len(terms):]))
    finite = math.isfinite(total_loss) and math.isfinite(total)
    if finite:
        optimizer.step()
        scheduler.step()
    else:
        optimizer.zero_grad(set_to_none=True)  # skip the update: one bad batch must not poison the weights
    return {"loss": total_loss, "terms": terms, "grad_norms": norms, "grad_norm_total": total, "states": n_states,
            "finite": finite, "ids": [i for b in micro_batches for i in b.ids]}


@torch.no_grad()
def evaluate(cfg: TrainConfig, model, val_batches: list) -> dict:
    """Validation losses on fixed states: loss_cls, loss_reg, done accuracy, mean |xy error| to the target."""
    device = device_of(model)
    model.eval()
    sums = {"cls": [0.0, 0], "reg": [0.0, 0]}
    correct, total, abs_err = 0, 0, 0.0
    for batch in val_batches:
        loss, out = batch_loss(model, batch, device, weights=loss_weights(cfg))
        sums[batch.mode][0] += float(loss) * len(batch)
        sums[batch.mode][1] += len(batch)
        if batch.mode == "cls":
            correct += int(((out["done_logit"] > 0).float().cpu() == batch.done).sum())
            total += len(batch)
        else:
            pred = torch.stack([out["x"], out["y"]], -1).float().cpu().unsqueeze(1)  # (B, 1, 2)
            err = (pred - batch.targets).abs().mean(-1).masked_fill(~batch.target_mask, float("inf"))  # (B, M)
            abs_err += float(err.min(1).values.sum())  # to the nearest valid target, as the loss
    model.train()
    return {
        "val/loss_cls": sums["cls"][0] / max(1, sums["cls"][1]),
        "val/loss_reg": sums["reg"][0] / max(1, sums["reg"][1]),
        "val/done_acc": correct / max(1, total),
        "val/xy_abs_err": abs_err / max(1, sums["reg"][1]),
    }


def evaluate_counting_subset(cfg: TrainConfig, model, val_ds, run=None) -> dict:
    """The full counting loop on --eval_images val images (a fixed sample spread over the classes), shared
    by the processes (each counts its slice; rank 0 gathers): count MAE/RMSE/F1 (+ W&B overlays), and the
    MAE of always answering the training split's mean count on the same images. Rank 0 gets the results,
    the others {}."""
    from evaluate_counting import count_dataset, mean_count_baseline, overlay, summarize

    rank, world = rank_and_world()
    mine = val_ds.subset_indices(cfg.eval_images)[rank::world]
    start = time.perf_counter()
    settings = CountSettings(cfg.batch_size, cfg.done_threshold, cfg.max_count, cfg.protocol)
    with shared_failures(device_of(model), "counting evaluation"):  # a slice that fails stops every process
        records, _, samples, results = count_dataset(model, val_ds, settings, indices=mine, progress=False)
    records = gather_to_rank0(records)
    model.train()
    if rank != 0:
        return {}
    summary = summarize(records, time.perf_counter() - start)
    summary.update(mean_count_baseline(cfg.data_root, records, cfg.train_split))
    log_overlays(run, [overlay(s, r) for s, r in list(zip(samples, results))[:cfg.eval_overlays]],
                 [f"{s.id} {s.class_name}: pred {r.count} gt {len(s.points)}" for s, r in zip(samples, results)])
    result = {f"val/count_{k}": summary[k] for k in ("mae", "rmse", "nae", "f1", "n_capped", "n_images", "images_per_s",
                                                     "says_total", "object_size_rel_err") if summary.get(k) is not None}
    if "baseline_mean_mae" in summary:
        result["val/count_mae_mean_baseline"] = summary["baseline_mean_mae"]
    return result


# ----------------------------------------------------------------------------- the loop


class TrainingStopped(Exception):
    """Training cannot go on (too many bad steps); a checkpoint has been saved."""


def prepare_run(cfg: TrainConfig, rank: int, world: int):
    """Seeds, data, the run folder's config.json (rank 0) and the model (the same weights in every process).
    Returns (cfg, train_ds, val_ds, model); cfg gains the class head's vocabulary when --class_loss is on."""
    say = print if rank == 0 else (lambda *a, **k: None)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    train_ds, val_ds = build_data(cfg)
    if cfg.class_loss and not cfg.class_vocabulary:  # the class head's classes, saved with the config
        cfg = dataclasses.replace(cfg, class_vocabulary=json.dumps(train_ds.class_names))
    if not cfg.object_tokens:  # what --tiles auto aims crops at, saved with every checkpoint
        cfg = dataclasses.replace(cfg, object_tokens=median_object_tokens(train_ds, cfg.min_pixels, cfg.max_pixels))
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(cfg.output_dir, "config.json"), asdict(cfg))
    barrier()
    say("Config:\n" + "\n".join(f"  {k}: {v}" for k, v in asdict(cfg).items()))
    if world > 1 and len(train_ds) < cfg.batch_size * world:
        raise UsageError(f"{cfg.data_root}: split {cfg.train_split!r} has {len(train_ds)} usable images, fewer than one "
                         f"global batch ({cfg.batch_size} x {world} processes): some process would get no image. "
                         "Lower --batch_size or the number of processes")
    say(f"Data: {len(train_ds)} train images ({train_ds.num_skipped} skipped), "
        f"{len(val_ds)} val images ({val_ds.num_skipped} skipped)")
    model = build_model(cfg)
    sync_parameters(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"Model: {cfg.model_name_or_path} on {device_of(model)}, 4-bit={cfg.load_in_4bit}, {n_trainable:,} trainable "
        "parameters" + (f"; {world} processes, global batch {cfg.batch_size * world} x {cfg.grad_accum} accumulation"
                        if world > 1 else ""))
    return cfg, train_ds, val_ds, model


def planned_steps(cfg: TrainConfig, n_train: int, world: int) -> int:
    """Optimizer steps of the run: --max_steps, or --epochs passes over the training images."""
    batches_per_epoch = max(1, n_train // (cfg.batch_size * world))
    return cfg.max_steps or cfg.epochs * max(1, batches_per_epoch // cfg.grad_accum)


def count_bad_step(cfg: TrainConfig, state: TrainState, result: dict, model, optimizer, scheduler) -> None:
    """Track non-finite steps (their update was skipped); after --max_bad_steps in a row, save and stop."""
    from tqdm.auto import tqdm

    if result["finite"]:
        state.bad_steps = 0
        return
    state.bad_steps += 1
    state.total_bad_steps += 1
    if rank_and_world()[0] == 0:
        tqdm.write(f"step {state.step}: non-finite loss or gradient, update skipped ({state.bad_steps} in a row); "
                   f"images {', '.join(result['ids'])}")
    if state.bad_steps >= cfg.max_bad_steps:
        path = save_step_checkpoint(cfg, model, optimizer, scheduler, state)
        raise TrainingStopped(f"{state.bad_steps} consecutive steps had a non-finite loss or gradient (last images: "
                              f"{', '.join(result['ids'])}); saved {path}. See the README's debugging guide: lower "
                              "--lr, keep --grad_clip.")


def train(cfg: TrainConfig) -> dict:
    """The training loop. Returns a summary (steps, final metrics, paths, interrupted)."""
    import signal

    from tqdm.auto import tqdm

    rank, world = init_distributed(cfg.device)
    main_process = rank == 0  # the one that prints, evaluates and writes
    cfg, train_ds, val_ds, model = prepare_run(cfg, rank, world)
    device = device_of(model)
    total_steps = planned_steps(cfg, len(train_ds), world)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    val_batches = fixed_val_batches(cfg, val_ds) if main_process else []
    state = TrainState()
    if cfg.resume:
        path = resume_path(cfg)
        state = restore_training(cfg, path, model, optimizer, scheduler)
        if main_process:
            print(f"Resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    metrics = MetricsLogger(cfg, resume_step=state.step if cfg.resume else None, run_id=state.wandb_run_id,
                            enabled=main_process)
    state.wandb_run_id = metrics.run.id if metrics.run is not None else ""
    metrics.log(state.step, {"event": "resume" if cfg.resume else "start", "train_images": len(train_ds),
                             "val_images": len(val_ds), "train_skipped": train_ds.num_skipped,
                             "val_skipped": val_ds.num_skipped, "total_steps": total_steps,
                             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    stop, previous_handlers = install_stop_handlers()
    progress = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True, disable=not main_process)
    checked, last_eval = set(), {}
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else float("inf")
    out_of_time = False
    try:
        while state.step < total_steps and not stop["signal"] and not out_of_time:
            pending = []
            loader = build_loader(cfg, train_ds, state.epoch, state.batch_in_epoch, rank, world)
            for samples, failure in iterate_or_fail(loader):
                raise_if_any_failed(device, failure, f"step {state.step + 1}: reading images")
                state.batch_in_epoch += 1
                state.skipped_images += cfg.batch_size - len(samples) if len(train_ds) >= cfg.batch_size * world else 0
                if any_rank(device, not samples)[0]:  # a process with no readable image: every process skips the batch
                    continue
                mode = step_mode(state.step)
                rng = np.random.default_rng([cfg.seed, state.step, len(pending)])  # the same in every process
                with shared_failures(device, f"step {state.step + 1}: counting states"):
                    pending.append(prepare_batch(samples, mode, rng, cfg.target_strategy, offset=rank * cfg.batch_size,
                                                 jitter=cfg.mark_jitter, global_size=cfg.batch_size * world,
                                                 near_done=cfg.near_done_fraction, size_jitter=cfg.mark_size_jitter,
                                                 negatives=cfg.negative_prompts, class_pool=train_ds.class_names,
                                                 skip=cfg.skip_fraction))
                if len(pending) < cfg.grad_accum:
                    continue
                t0 = time.perf_counter()
                try:
                    result = train_step(cfg, model, optimizer, scheduler, pending, mode)
                except ProcessFailure as e:
                    raise ProcessFailure(f"step {state.step + 1}: {e}") from None
                pending = []
                state.step += 1
                elapsed = time.perf_counter() - t0
                log_step(cfg, metrics, state, mode, result, elapsed, scheduler, device, total_steps)
                count_bad_step(cfg, state, result, model, optimizer, scheduler)
                if main_process and state.epoch == 0 and result["finite"] and (
                        mode not in checked or (cfg.grad_check_every and state.step % cfg.grad_check_every == 0)):
                    checked.add(mode)
                    print_grad_check(mode, result["grad_norms"])
                progress.update(1)
                progress.set_postfix({f"loss_{mode}": f"{result['loss']:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"})
                out_of_time, signalled = any_rank(device, time.monotonic() > deadline, stop["signal"])
                if signalled and not stop["signal"]:
                    stop["signal"] = "a signal to another process"
                last = state.step == total_steps or out_of_time
                count_now = last or due(cfg.count_every or cfg.eval_every, state.step)
                if last or due(cfg.eval_every, state.step) or count_now:
                    last_eval = run_evaluation(cfg, model, optimizer, scheduler, state, val_batches, val_ds, metrics,
                                               count=count_now)
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                    path = save_step_checkpoint(cfg, model, optimizer, scheduler, state)
                    if main_process:
                        tqdm.write(f"saved {path}")
                if state.step >= total_steps or stop["signal"] or out_of_time:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    final = save_step_checkpoint(cfg, model, optimizer, scheduler, state)
    skipped = int(sum_over_processes(device, state.skipped_images)[0])  # every process's, every worker's
    end_event = {"event": "interrupted", "signal": stop["signal"]} if stop["signal"] else {"event": "end"}
    if out_of_time and main_process:
        end_event["stopped_by"] = f"--max_minutes {cfg.max_minutes}"
        tqdm.write(f"--max_minutes {cfg.max_minutes} reached at step {state.step} of {total_steps}")
    metrics.log(state.step, {**end_event, "skipped_images": skipped, "bad_steps": state.total_bad_steps, **last_eval})
    metrics.finish()
    return {"steps": state.step, "checkpoint": final, "output_dir": cfg.output_dir, "eval": last_eval, "rank": rank,
            "interrupted": stop["signal"], "bad_steps": state.total_bad_steps, "skipped_images": skipped}


def due(every: int, step: int) -> bool:
    """Whether a periodic event (every N optimizer steps, 0: never) falls on this step."""
    return every > 0 and step % every == 0


def run_evaluation(cfg, model, optimizer, scheduler, state: TrainState, val_batches, val_ds, metrics,
                   count: bool = True) -> dict:
    """Validation losses (rank 0); with `count`, counting on --eval_images val images (every process counts a
    slice) and checkpoint-best on a new best MAE. Returns the metrics on rank 0, {} elsewhere."""
    from tqdm.auto import tqdm

    count = count and cfg.eval_images > 0
    counting = evaluate_counting_subset(cfg, model, val_ds, metrics.run) if count else {}
    rng_states = gather_to_rank0([rng_state(device_of(model))]) if count else []
    result = {}
    with shared_failures(device_of(model), "evaluation"):  # rank 0's work; the others wait here, and stop with it
        if rank_and_world()[0] == 0:
            result = {**evaluate(cfg, model, val_batches), **counting}
            if count and result["val/count_mae"] < state.best_mae:
                state.best_mae = result["val/count_mae"]
                save_training_checkpoint(cfg, model, optimizer, scheduler, state, "checkpoint-best", rng_states)
                tqdm.write(f"new best val count MAE {state.best_mae:.3f}: saved checkpoint-best")
            metrics.log(state.step, {"event": "eval", **result})
            tqdm.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def iterate_or_fail(loader):
    """The loader's batches as (samples, None); if reading one raises, (None, the failure) once, then the end:
    the failure is shared with the other processes at the next agreement instead of leaving them waiting."""
    iterator = iter(loader)
    while True:
        try:
            samples = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            logger.exception("reading a training batch failed")
            yield None, describe_failure(e)
            return
        yield samples, None


def report(kind: str, error: BaseException) -> None:
    """Print why the run ended on a line of its own, in one write."""
    # With several processes, rank 0's progress bar (no newline yet) shares stderr with the others: a leading
    # newline keeps another process's message from landing at the end of the bar's line.
    lead = "\n" if rank_and_world()[1] > 1 else ""
    sys.stderr.write(f"{lead}{kind}: {error}\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__, validate_train_config)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = train(cfg)
    except UsageError as e:
        report("error", e)
        return 2
    except TrainingStopped as e:
        report("stopped", e)
        return 1
    except ProcessFailure as e:  # every process gets here with every failing process's message
        report("error", e)
        return 1
    finally:
        if rank_and_world()[1] > 1:
            torch.distributed.destroy_process_group()
    if summary["rank"] == 0:  # rank 0 reports
        print_run_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
