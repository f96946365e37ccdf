"""Benchmark batched counting: images/s at several batch sizes, in one run, as ratios to batch 1.

    python bench_counting.py                                   # tiny model, synthetic images, CPU
    python bench_counting.py --checkpoint RUN/checkpoint-best --data_root /path/FSC147 --batch_sizes 1,8,32

Every image runs exactly --steps counting steps (the done threshold set out of reach, the duplicate guard off),
so each batch size does the same work. Without --checkpoint it builds a tiny random Qwen2-VL and synthetic
data in a temp folder (4-bit, as trained). Prints a markdown table; --out FILE also writes it as JSON.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from count_objects import count_objects
from cli import UsageError, arg, parse_config
from dataset_fsc147 import FSC147Dataset, write_synthetic_fsc147
from synthetic_fsc147 import SynthConfig
from model_loading import ModelConfig, build_model, load_checkpoint


@dataclass
class BenchConfig:
    checkpoint: str = arg("", "checkpoint to benchmark (default: a fresh tiny model)")
    data_root: str = arg("", "FSC-147 root for the images (default: synthetic)")
    split: str = arg("val", "split the images come from")
    batch_sizes: str = arg("1,4,8", "comma-separated batch sizes")
    num_images: int = arg(16, "images counted per batch size")
    steps: int = arg(8, "counting steps per image")
    repeats: int = arg(3, "timed runs per batch size; the fastest is reported (less noise from other load)")
    max_pixels: int = arg(224 * 224, "processor upper bound on image pixels (tiny model only)")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    device: str = arg("auto", "auto, cpu or cuda")
    out: str = arg("", "also write the results as JSON here")


def validate(cfg: BenchConfig) -> list[str]:
    errors = []
    try:
        sizes = [int(b) for b in cfg.batch_sizes.split(",")]
        if not sizes or min(sizes) < 1:
            errors.append("--batch_sizes must be positive integers")
    except ValueError:
        errors.append(f"--batch_sizes must be comma-separated integers, got {cfg.batch_sizes!r}")
    if cfg.num_images < 1 or cfg.steps < 1 or cfg.repeats < 1:
        errors.append("--num_images, --steps and --repeats must be >= 1")
    return errors


def run_bench(cfg: BenchConfig, workdir: str) -> list[dict]:
    """images/s per batch size on the same images."""
    if cfg.checkpoint:
        model, _ = load_checkpoint(cfg.checkpoint, device=cfg.device)
    else:
        from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

        model_dir = build_tiny_qwen2vl(TinyConfig(out=f"{workdir}/tiny"))
        model = build_model(ModelConfig(model_name_or_path=model_dir, min_pixels=3136,
                                        max_pixels=cfg.max_pixels, device=cfg.device, lora_dropout=0.0))
    data_root = cfg.data_root
    if not data_root:
        data_root = f"{workdir}/data"
        write_synthetic_fsc147(SynthConfig(out=data_root, num_images=max(5, cfg.num_images * 5), seed=0))
    ds = FSC147Dataset(data_root, cfg.split)
    samples = [s for s in (ds[i] for i in ds.subset_indices(cfg.num_images)) if s is not None]
    images, names = [s.image for s in samples], [s.class_name for s in samples]
    # The same work at every batch size: the done threshold out of reach and the duplicate guard off, since an
    # untrained model points at counted objects and the guard would stop such images early (measured: 5 of 8
    # images of a fresh tiny model stopped within 8 steps). smoke_2b.py's GPU check counts the same way.
    count = functools.partial(count_objects, model, images, names, done_threshold=1.0, max_count=cfg.steps,
                              duplicate_guard=False)
    count(batch_size=2)  # warm-up
    rows = []
    for b in [int(x) for x in cfg.batch_sizes.split(",")]:
        elapsed = float("inf")
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            results = count(batch_size=b)
            elapsed = min(elapsed, time.perf_counter() - start)
            if any(r.steps != cfg.steps for r in results):
                raise RuntimeError(f"batch {b}: an image ran {min(r.steps for r in results)} counting steps, not "
                                   f"{cfg.steps}: the batch sizes would not do the same work")
        rows.append({"batch_size": b, "images": len(images), "steps_per_image": cfg.steps,
                     "seconds": elapsed, "images_per_s": len(images) / elapsed})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_first"] = row["images_per_s"] / base
    return rows


def main(argv=None) -> int:
    cfg = parse_config(BenchConfig, argv, __doc__, validate)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-counting-") as workdir:
            rows = run_bench(cfg, workdir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nbatched counting, {rows[0]['images']} images x {cfg.steps} steps, best of {cfg.repeats}, {device}")
    print(f"| batch size | images/s | ratio to batch {rows[0]['batch_size']} |\n|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['images_per_s']:.2f} | {row['ratio_to_first']:.2f}x |")
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({"config": asdict(cfg), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
