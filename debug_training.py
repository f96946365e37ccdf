"""Check gradient flow and loss direction before spending GPU hours (the seed's debugging guide).

    python debug_training.py --tiny                                   # fresh tiny model + synthetic data, CPU
    python debug_training.py --data_root /path/FSC147 --load_in_4bit  # the real model, same flags as training
    python debug_training.py --data_root DIR --model_name_or_path DIR --lr 3e-4 --batch_size 8

Checks, on one fixed batch of counting states (a cls and a reg batch):
  normalisation   pixel -> [-1, 1] -> pixel round trip; image corners map to -1 and +1
  forward         x, y, done_logit have shape (B,), are finite, x and y lie in [-2, 2]
  gradients       norm per module (x_head, y_head, done_head, token_embeddings, lora) after one backward of
                  loss_cls + loss_reg: > 0.1 good, < 1e-3 vanishing, 0 disconnected; FAIL below 1e-4
  loss direction  loss after one AdamW step at --lr is lower than before (dropout off, same batch)
  done signal     done probabilities vary across the batch (not a constant)
  not stuck       predictions are not all at (-1, -1) (the original failure) or all at one point
Prints a PASS/FAIL table and exits 1 on any FAIL (2 on a usage error).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from cli import UsageError, arg, parse_config
from dataset_fsc147 import FSC147Dataset, denormalize_points, normalize_points, prepare_batch, write_synthetic_fsc147
from model_loading import build_model, device_of, model_inputs
from run_logging import grad_norms, grad_verdict
from synthetic_fsc147 import SynthConfig
from train_sequential_attention import TrainConfig, build_optimizer, loss_weights, state_loss, validate_train_config

GRAD_FAIL_BELOW = 1e-4


@dataclass
class DebugConfig(TrainConfig):
    tiny: bool = arg(False, "build a tiny random Qwen2-VL and a synthetic dataset in a temp folder and check those")


def validate_debug_config(cfg: DebugConfig) -> list[str]:
    """Training-config problems; --data_root is not needed with --tiny."""
    return [e for e in validate_train_config(dataclasses.replace(cfg, data_root=cfg.data_root or "x"))
            if not (cfg.tiny and e.startswith("--data_root"))] + (
        [] if cfg.tiny or cfg.data_root else ["--data_root is required (or pass --tiny)"])


def setup_tiny(cfg: DebugConfig, workdir: str) -> DebugConfig:
    """Write a tiny model and a small synthetic dataset into workdir; point the config at them."""
    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    model_dir = build_tiny_qwen2vl(TinyConfig(out=f"{workdir}/tiny-qwen2vl", seed=cfg.seed))
    write_synthetic_fsc147(SynthConfig(out=f"{workdir}/data", num_images=20, max_objects=6, seed=cfg.seed))
    return dataclasses.replace(cfg, model_name_or_path=model_dir, data_root=f"{workdir}/data",
                               min_pixels=56 * 56, max_pixels=224 * 224, batch_size=max(cfg.batch_size, 4))


class Report:
    """Collects (check, PASS/FAIL, detail) rows and prints them as a table."""

    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append((name, ok, detail))
        return ok

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print("\n" + "check".ljust(width) + "  result  detail")
        for name, ok, detail in self.rows:
            print(f"{name.ljust(width)}  {'PASS' if ok else 'FAIL'}    {detail}")
        failed = [r[0] for r in self.rows if not r[1]]
        print(f"\n{len(self.rows) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))

    @property
    def ok(self) -> bool:
        return all(r[1] for r in self.rows)


def check_normalisation(report: Report) -> None:
    """Round trip and corner mapping of the coordinate normalisation."""
    w, h = 577, 384
    pts = np.array([[0, 0], [w, h], [w / 2, h / 2], [12.5, 301.25]], dtype=np.float32)
    norm = normalize_points(pts, w, h)
    back = denormalize_points(norm, w, h)
    err = float(np.abs(back - pts).max())
    corners = np.allclose(norm[0], [-1, -1]) and np.allclose(norm[1], [1, 1]) and np.allclose(norm[2], [0, 0])
    report.add("normalisation round trip", err < 1e-3 and corners, f"max error {err:.2e} px, corners -> +-1: {corners}")


def total_loss(cfg: DebugConfig, model, inputs: dict, batches: dict) -> tuple[torch.Tensor, dict]:
    """loss_cls + loss_reg on the fixed batches, with the loss terms and weights training uses (`loss_weights`:
    --object_map_focal, --class_loss); also returns the outputs per mode."""
    device = device_of(model)
    outs, loss = {}, 0.0
    for mode, batch in batches.items():
        out = model(inputs[mode], counted=batch.counted)
        outs[mode] = out
        loss = loss + state_loss(out, batch, device, weights=loss_weights(cfg),
                                 vocabulary=getattr(model, "class_vocabulary", ()))
    return loss, outs


def run_checks(cfg: DebugConfig) -> Report:
    report = Report()
    check_normalisation(report)
    torch.manual_seed(cfg.seed)
    dataset = FSC147Dataset(cfg.data_root, cfg.train_split, max_images=max(cfg.batch_size, 2) * 2)
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None][:cfg.batch_size]
    rng = np.random.default_rng(cfg.seed)
    batches = {mode: prepare_batch(samples, mode, rng, cfg.target_strategy) for mode in ("cls", "reg")}
    if cfg.class_loss and not cfg.class_vocabulary:  # the class head's classes, as training sets them
        cfg = dataclasses.replace(cfg, class_vocabulary=json.dumps(dataset.class_names))
    model = build_model(cfg)
    model.eval()  # no dropout: the loss before and after the step is measured on the same function
    device = device_of(model)
    inputs = {mode: model_inputs(model, b, device) for mode, b in batches.items()}

    loss, outs = total_loss(cfg, model, inputs, batches)
    n = len(samples)
    for mode, out in outs.items():
        shapes = all(tuple(out[k].shape) == (n,) for k in ("x", "y", "done_logit"))
        finite = all(bool(torch.isfinite(out[k]).all()) for k in ("x", "y", "done_logit"))
        in_range = bool((out["x"].abs() <= 2).all() and (out["y"].abs() <= 2).all())
        report.add(f"forward ({mode})", shapes and finite and in_range,
                   f"shapes (B={n},): {shapes}, finite: {finite}, x/y in [-2, 2]: {in_range}")

    optimizer, _ = build_optimizer(dataclasses.replace(cfg, warmup_steps=0), model, total_steps=1)
    optimizer.zero_grad()
    loss.backward()
    print("\nGradient norm per module (loss_cls + loss_reg, first backward):")
    for name, norm in grad_norms(model).items():
        print(f"  {name:18s} {norm:10.6f}  {grad_verdict(norm)}")
        report.add(f"gradient {name}", norm >= GRAD_FAIL_BELOW and math.isfinite(norm),
                   f"{norm:.6f} ({grad_verdict(norm)}; FAIL below {GRAD_FAIL_BELOW:g})")
    optimizer.step()
    with torch.no_grad():
        after, _ = total_loss(cfg, model, inputs, batches)
    before, after = loss.item(), after.item()
    report.add("loss direction", after < before, f"{before:.6f} -> {after:.6f} after one step at lr {cfg.lr:g}")

    out_cls = outs["cls"]
    probs = torch.sigmoid(out_cls["done_logit"]).detach()
    report.add("done signal varies", float(probs.std()) > 1e-6 and n > 1,
               f"p(done) min {float(probs.min()):.4f} max {float(probs.max()):.4f} std {float(probs.std()):.2e}")
    xy = torch.cat([torch.stack([o["x"], o["y"]], -1) for o in outs.values()]).detach()
    stuck_corner = bool(((xy + 1).abs() < 0.05).all())
    one_point = float(xy.std(0).max()) < 1e-6
    report.add("predictions not stuck", not stuck_corner and not one_point,
               f"mean ({float(xy[:, 0].mean()):+.3f}, {float(xy[:, 1].mean()):+.3f}), std {float(xy.std(0).max()):.2e}, "
               f"all at (-1, -1): {stuck_corner}")
    return report


def main(argv=None) -> int:
    cfg = parse_config(DebugConfig, argv, __doc__, validate_debug_config)
    try:
        with tempfile.TemporaryDirectory(prefix="debug-training-") as workdir:
            if cfg.tiny:
                cfg = setup_tiny(cfg, workdir)
            report = run_checks(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.print()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
