"""Training checkpoints: the state a resumed run needs besides the weights (`TrainState`), writing
checkpoint-<step>, checkpoint-last and checkpoint-best (rank 0 writes, atomically, through
`model_loading.save_checkpoint`), pruning old ones, and restoring a run from one.

A checkpoint folder holds the trained weights (LoRA adapter or full backbone, heads, token rows), config.json and
training_state.pt: optimizer, scheduler, every process's RNG states and the counters below. Loaded with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields

import torch

from cli import UsageError
from model_loading import STATE_FILE, device_of, load_weights, save_checkpoint
from parallel import gather_to_rank0, rank_and_world, rng_state, set_rng_state, shared_failures

logger = logging.getLogger("train")


@dataclass
class TrainState:
    """Where training is: everything besides the weights that a resumed run needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches consumed in this epoch
    best_mae: float = float("inf")  # best val count MAE so far (checkpoint-best)
    skipped_images: int = 0  # images that failed to load during training
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    total_bad_steps: int = 0
    wandb_run_id: str = ""


def save_training_checkpoint(cfg, model, optimizer, scheduler, state: TrainState, name: str,
                             rng_states: list[dict]) -> str:
    """OUTPUT_DIR/<name>/: the model's checkpoint plus the training state a resumed run needs (rank 0 writes;
    `rng_states` holds every process's RNG states, from `gather_to_rank0(rng_state(...))`)."""
    training_state = {**asdict(state), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "rng": rng_states[0], "rng_per_rank": rng_states}
    return save_checkpoint(model, cfg, os.path.join(cfg.output_dir, name), training_state)


def save_step_checkpoint(cfg, model, optimizer, scheduler, state: TrainState) -> str:
    """checkpoint-<step> and checkpoint-last (rank 0 writes, the others wait); prune to --save_total_limit."""
    path = os.path.join(cfg.output_dir, f"checkpoint-{state.step}")
    rng_states = gather_to_rank0([rng_state(device_of(model))])
    with shared_failures(device_of(model), f"saving {path}"):  # a failed write on rank 0 stops every process
        if rank_and_world()[0] == 0:
            for name in (f"checkpoint-{state.step}", "checkpoint-last"):
                save_training_checkpoint(cfg, model, optimizer, scheduler, state, name, rng_states)
            if cfg.save_total_limit:
                steps = sorted(int(d.split("-", 1)[1]) for d in os.listdir(cfg.output_dir)
                               if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit())
                for old in steps[:-cfg.save_total_limit]:
                    shutil.rmtree(os.path.join(cfg.output_dir, f"checkpoint-{old}"), ignore_errors=True)
    return path


def resume_path(cfg) -> str:
    path = os.path.join(cfg.output_dir, "checkpoint-last") if cfg.resume == "latest" else cfg.resume
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume {cfg.resume}: no {STATE_FILE} in {path!r}")
    return path


def rng_for_rank(saved: dict, rank: int, world: int) -> dict:
    """The RNG states a process resumes from: its own, or rank 0's when the checkpoint has another process count."""
    per_rank = saved.get("rng_per_rank", [saved["rng"]])
    if len(per_rank) == world:
        return per_rank[rank]
    logger.warning("resuming %d processes from a checkpoint of %d: every process starts from rank 0's RNG state",
                   world, len(per_rank))
    return per_rank[0]


def restore_training(cfg, path: str, model, optimizer, scheduler) -> TrainState:
    """Load adapter, heads, optimizer, scheduler, RNG states and the step counters from a checkpoint."""
    load_weights(model, path)
    saved = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(rng_for_rank(saved, *rank_and_world()), device_of(model))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        old = json.load(f)
    changed = [k for k, v in asdict(cfg).items() if k in old and old[k] != v and k not in ("resume", "output_dir")]
    if changed:
        logger.warning("resuming with changed settings: %s", ", ".join(f"{k}={old[k]!r}->{getattr(cfg, k)!r}" for k in changed))
    return TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
