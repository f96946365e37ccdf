"""What a run reports: metrics.jsonl + W&B, gradient norms and the seed's gradient check, loss trends, the
end-of-run summary."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict

import numpy as np
import torch


class MetricsLogger:
    """metrics.jsonl (one JSON object per event, each with `step`) + W&B."""

    def __init__(self, cfg, resume_step: int | None = None, run_id: str = "", enabled: bool = True):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.enabled = enabled  # False on every process but rank 0: one metrics file, one W&B run
        self.run = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Events logged after the checkpoint we resume from will be logged again: drop them.
            with open(self.path, encoding="utf-8") as f:
                keep = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        self.run = init_wandb(cfg, run_id)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def log_overlays(run, images: list, captions: list[str]) -> None:
    """Counting overlays (predicted marks | ground truth) to W&B with the next logged step; none without a run."""
    if run is None or not images:
        return
    import wandb

    run.log({"val/overlays": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, commit=False)


def init_wandb(cfg, run_id: str = ""):
    """W&B run in the run folder; offline unless WANDB_API_KEY is set or --wandb_mode says otherwise."""
    mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.output_dir)),
                      dir=cfg.output_dir, mode=mode, config=asdict(cfg), id=run_id or None,
                      resume="allow" if run_id else None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def grad_norm_tensor(model) -> tuple[list[str], torch.Tensor]:
    """The module groups' names and the L2 norms of their gradients as one tensor (0 for a group with no
    gradient), computed on the device without reading anything back to the host."""
    names, norms = [], []
    for name, params in model.module_groups().items():
        grads = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        names.append(name)
        norms.append(torch.stack(grads).sum().sqrt() if grads else None)
    device = next((n.device for n in norms if n is not None), torch.device("cpu"))
    return names, torch.stack([n if n is not None else torch.zeros((), device=device) for n in norms])


def grad_norms(model) -> dict[str, float]:
    """L2 norm of the gradient of each module group (0.0 when it got none), with one host sync for all of them."""
    names, norms = grad_norm_tensor(model)
    return dict(zip(names, norms.tolist()))


def grad_verdict(norm: float) -> str:
    """The seed's thresholds: > 0.1 good, < 1e-3 vanishing, 0 disconnected."""
    if norm == 0.0:
        return "DISCONNECTED"
    if norm < 1e-3:
        return "vanishing"
    return "good" if norm > 0.1 else "ok"


def print_grad_check(mode: str, norms: dict[str, float]) -> None:
    """The seed's first-epoch check, one line per module that this step's loss reaches."""
    from tqdm.auto import tqdm

    other_heads = {"x_head", "y_head"} if mode == "cls" else {"done_head"}  # get no gradient this step
    lines = [f"[Gradient Check - {'Classification' if mode == 'cls' else 'Regression'}]"]
    lines += [f"  {name}: {norm:.4f}  ({grad_verdict(norm)})" for name, norm in norms.items() if name not in other_heads]
    tqdm.write("\n".join(lines))


def loss_trend(metrics_path: str) -> dict[str, tuple[float, float]]:
    """Mean training loss over the first and the last fifth of logged steps, per mode."""
    losses = {"cls": [], "reg": []}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for mode in losses:
                if f"loss_{mode}" in record and record.get("event") is None:
                    losses[mode].append(record[f"loss_{mode}"])
    trend = {}
    for mode, values in losses.items():
        if len(values) >= 5:
            fifth = len(values) // 5
            trend[mode] = (float(np.mean(values[:fifth])), float(np.mean(values[-fifth:])))
    return trend


def print_run_summary(summary: dict) -> None:
    """What a finished (or interrupted) run prints: steps, skips, loss trends, validation, where things are."""
    out = os.path.abspath(summary["output_dir"])
    checkpoint = os.path.abspath(summary["checkpoint"])
    if summary["interrupted"]:
        print(f"\nInterrupted by {summary['interrupted']} at step {summary['steps']}; saved {checkpoint}.")
        print(f"Continue with the same flags plus --resume latest (or --resume {checkpoint}).")
        return
    print(f"\nDone: {summary['steps']} steps"
          f" ({summary['skipped_images']} images skipped, {summary['bad_steps']} steps skipped for non-finite values).")
    print(f"  run folder:  {out}")
    print(f"  metrics:     {os.path.join(out, 'metrics.jsonl')}")
    for mode, (first, last) in loss_trend(os.path.join(out, "metrics.jsonl")).items():
        print(f"  loss_{mode}:    first fifth of steps {first:.4f} -> last fifth {last:.4f}"
              f" ({'lower' if last < first else 'NOT lower'})")
    if summary["eval"]:
        print("  validation:  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
        if "val/count_mae_mean_baseline" in summary["eval"]:
            mae, base = summary["eval"]["val/count_mae"], summary["eval"]["val/count_mae_mean_baseline"]
            print(f"  counting:    val count MAE {mae:.3f} vs {base:.3f} for always answering the training mean count"
                  f" ({'better' if mae < base else 'NOT better'})")
    print(f"  checkpoints: {checkpoint} and {os.path.join(out, 'checkpoint-last')}")
    if os.path.isdir(os.path.join(out, "checkpoint-best")):
        print(f"  best:        {os.path.join(out, 'checkpoint-best')} (lowest val count MAE)")
    if os.path.isdir(os.path.join(out, "wandb")):
        print(f"  W&B run:     {os.path.join(out, 'wandb')} (offline runs: `wandb sync {os.path.join(out, 'wandb')}/offline-run-*`)")


def log_step(cfg, metrics, state, mode: str, result: dict, elapsed: float, scheduler, device,
             total_steps: int) -> None:
    """One metrics.jsonl record (and W&B point) for an optimizer step: its loss and terms, gradient norms per
    module, lr, throughput, peak memory, skipped images and bad steps (every --log_every steps, the last step and
    every non-finite one)."""
    if state.step % cfg.log_every and state.step != total_steps and result["finite"]:
        return
    record = {"epoch": state.epoch, "mode": mode, f"loss_{mode}": result["loss"],
              **{f"loss/{k}": v for k, v in result["terms"].items()},
              **{f"grad_norm/{k}": v for k, v in result["grad_norms"].items()},
              "grad_norm/total": result["grad_norm_total"], "lr": scheduler.get_last_lr()[0],
              "samples_per_s": result["states"] / elapsed, "peak_mem_mb": peak_memory_mb(device),
              "skipped_images": state.skipped_images, "bad_steps": state.total_bad_steps}
    if not result["finite"]:
        record.update({"event": "bad_step", "image_ids": result["ids"]})
    metrics.log(state.step, record)
