"""Smoke test of the full-size Qwen2-VL-2B architecture through the project's real path, nothing downloaded.

    python smoke_2b.py                                  # CPU: builds the random 2B model once, ~10-20 min
    python smoke_2b.py --device cuda --batch_size 2     # on a GPU
    python smoke_2b.py --gradient_checkpointing         # the same with activation checkpointing

Builds Qwen2-VL-2B's architecture with random weights (`tiny_qwen2vl.py --full_size`, saved once under
--model_dir with `save_pretrained`), loads it back through `model_loading.build_model` exactly as
training does (4-bit NF4 language model, vision tower kept out of 4-bit unless --quantize_vision, LoRA,
heads), then runs one training step (`train_step`, reg mode) at --batch_size on FSC-147-sized
384 x 576 synthetic images and one counting step (`count_objects`, one forward). Also loads the model
a second time with the other --quantize_vision setting and reports both memory footprints.

Prints a summary and writes OUTPUT_DIR/smoke.json: image_tokens (merged image tokens per image at the
processor bounds), seq_len, trainable_params, peak_rss_mb, peak_gpu_mb, load_s, train_step_s,
count_step_s, footprint_mb (both vision settings) and the settings used.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cli import UsageError, arg, parse_config, write_json_atomic
from count_objects import count_objects
from dataset_fsc147 import Sample, mark_radius, prepare_batch, synth_sample
from synthetic_fsc147 import SynthConfig
from model_loading import build_model, device_of, model_inputs
from train_sequential_attention import TrainConfig, build_optimizer, train_step


@dataclass
class SmokeConfig:
    model_dir: str = arg("models/qwen2vl-2b-random", "where the random 2B model is saved (built when missing)")
    output_dir: str = arg("runs/smoke_2b", "folder for smoke.json")
    batch_size: int = arg(2, "counting states in the training step")
    image_height: int = arg(384, "synthetic image height (FSC-147 stores 384-high images)")
    image_width: int = arg(576, "synthetic image width")
    min_pixels: int = arg(64 * 28 * 28, "processor lower bound (training's default)")
    max_pixels: int = arg(512 * 28 * 28, "processor upper bound (training's default)")
    quantize_vision: bool = arg(False, "the vision tower in 4-bit too (the run being measured)")
    compare_vision: bool = arg(True, "also load with the other --quantize_vision setting and report both footprints")
    pointing: str = arg("token", "pointing of the heads (regress or token)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    device: str = arg("auto", "auto, cpu or cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")


def validate(cfg: SmokeConfig) -> list[str]:
    errors = []
    if cfg.batch_size < 1:
        errors.append("--batch_size must be >= 1")
    if min(cfg.image_height, cfg.image_width) < 64:
        errors.append("--image_height and --image_width must be >= 64")
    return errors


def ensure_model(cfg: SmokeConfig) -> str:
    """The random 2B model under --model_dir, built and saved once."""
    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    if not os.path.isfile(os.path.join(cfg.model_dir, "config.json")):
        print(f"Building the random Qwen2-VL-2B into {cfg.model_dir} (once; ~4.4 GB in bf16)...", flush=True)
        build_tiny_qwen2vl(TinyConfig(out=cfg.model_dir, full_size=True, max_pixels=cfg.max_pixels))
    return cfg.model_dir


def footprint_mb(model) -> float:
    """Bytes held by the model's parameters and buffers (4-bit weights count as packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def samples(cfg: SmokeConfig) -> list[Sample]:
    """FSC-147-sized synthetic images with 10 to 30 objects."""
    synth = SynthConfig(image_height=cfg.image_height, min_width=cfg.image_width, max_width=cfg.image_width,
                        min_objects=10, max_objects=30)
    rng = np.random.default_rng(0)
    return [synth_sample(rng, synth, ("red circles", "circle", "red"), f"smoke-{i}.jpg") for i in range(cfg.batch_size)]


def run(cfg: SmokeConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = ensure_model(cfg)
    tcfg = TrainConfig(data_root="-", model_name_or_path=model_dir, load_in_4bit=True, quantize_vision=cfg.quantize_vision,
                       pointing=cfg.pointing, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, lora_dropout=0.0,
                       batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing, device=cfg.device,
                       lr=5e-5)
    start = time.perf_counter()
    model = build_model(tcfg)
    load_s = time.perf_counter() - start
    device = device_of(model)
    batch = prepare_batch(samples(cfg), "reg", np.random.default_rng(0))
    inputs = model_inputs(model, batch, device)
    grid = inputs["image_grid_thw"][0].tolist()
    image_tokens = int(grid[0] * grid[1] * grid[2] // model.merge_size ** 2)
    optimizer, scheduler = build_optimizer(tcfg, model, total_steps=10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step = train_step(tcfg, model, optimizer, scheduler, [batch], "reg")
    train_step_s = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    sample = samples(cfg)[0]
    start = time.perf_counter()  # one forward: the threshold is out of reach and the cap is one point
    count_objects(model, [sample.image], [sample.class_name], batch_size=1, done_threshold=0.9999, max_count=1,
                  mark_radii=[mark_radius(*sample.image.size, sample.boxes)], protocol="exemplar")
    count_step_s = time.perf_counter() - start
    footprint = {("vision_4bit" if cfg.quantize_vision else "vision_not_4bit"): footprint_mb(model)}
    result = {
        "image_tokens": image_tokens, "seq_len": int(inputs["input_ids"].shape[1]),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_s": load_s, "train_step_s": train_step_s, "count_step_s": count_step_s,
        "train_loss": step["loss"], "train_step_finite": step["finite"], "peak_gpu_mb": peak_gpu,
        "device": str(device), "threads": torch.get_num_threads(),
    }
    if cfg.compare_vision:
        del model, optimizer, scheduler, step
        gc.collect()
        other = build_model(TrainConfig(**{**asdict(tcfg), "quantize_vision": not cfg.quantize_vision}))
        footprint["vision_4bit" if not cfg.quantize_vision else "vision_not_4bit"] = footprint_mb(other)
        del other
        gc.collect()
    result["footprint_mb"] = footprint
    if len(footprint) == 2:
        result["vision_not_4bit_extra_mb"] = footprint["vision_not_4bit"] - footprint["vision_4bit"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, both loads
    result["config"] = asdict(cfg)
    return result


def main(argv=None) -> int:
    cfg = parse_config(SmokeConfig, argv, __doc__, validate)
    print("Config:\n" + "\n".join(f"  {k}: {v}" for k, v in asdict(cfg).items()), flush=True)
    try:
        result = run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "smoke.json")
    write_json_atomic(path, result)
    print("\nQwen2-VL-2B architecture (random weights), " + result["device"])
    for key in ("image_tokens", "seq_len", "trainable_params", "load_s", "train_step_s", "count_step_s",
                "peak_rss_mb", "peak_gpu_mb", "footprint_mb", "vision_not_4bit_extra_mb", "train_loss"):
        value = result.get(key)
        print(f"  {key:26s} {json.dumps(value) if isinstance(value, dict) else value}")
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
