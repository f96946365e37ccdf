"""Cost benchmarks, every ratio measured within one run on the same model, batch and images.

    python bench_speed.py                         # tiny random Qwen2-VL, synthetic images, CPU (~2 min)
    python bench_speed.py --out speed.json --batch_size 8 --repeats 20

1. Training step overhead: `train_sequential_attention.train_step` (processor inputs, heads, loss, grad
   norms, clipping, AdamW) vs a bare forward + backward of the same LoRA Qwen2-VL on the same processed
   batch. Also the step without the processor call, which a DataLoader worker could take over.
2. Data pipeline, per sample: image loading, marks + counting states (`prepare_batch`) and the
   processor, vs the processor alone on the same images; and loader throughput at --num_workers 0 and 2
   against the rate at which training steps consume samples.
3. Counting: images/s at batch 1, 4, 8 (bench_counting.py).
The Qwen2-VL-2B GPU figures (memory, step time) need a GPU; this script does not estimate them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cli import UsageError, arg, parse_config
from dataset_fsc147 import FSC147Dataset, prepare_batch, write_synthetic_fsc147
from synthetic_fsc147 import SynthConfig
from model_loading import build_model, device_of, model_inputs
from train_sequential_attention import TrainConfig, build_loader, build_optimizer, train_step


@dataclass
class SpeedConfig:
    batch_size: int = arg(8, "counting states per training step")
    repeats: int = arg(10, "timed repetitions of each measurement; the median is reported")
    num_images: int = arg(64, "synthetic images (the data pipeline measurements read them all)")
    max_pixels: int = arg(224 * 224, "processor upper bound on image pixels")
    load_in_4bit: bool = arg(True, "4-bit NF4 backbone + LoRA, as trained")
    counting: bool = arg(True, "also run the counting benchmark (batch 1, 4, 8)")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    out: str = arg("", "also write the results as JSON here")


def validate(cfg: SpeedConfig) -> list[str]:
    errors = [f"--{n} must be >= 1" for n in ("batch_size", "repeats") if getattr(cfg, n) < 1]
    if cfg.num_images < 2 * cfg.batch_size:
        errors.append("--num_images must be at least 2 x --batch_size")
    return errors


def median_time(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_step(cfg: SpeedConfig, tcfg: TrainConfig, model, samples) -> dict:
    """Project train_step vs bare forward + backward of the backbone on the same processed batch."""
    batch = prepare_batch(samples[:cfg.batch_size], "reg", np.random.default_rng(0))
    device = device_of(model)
    optimizer, scheduler = build_optimizer(tcfg, model, total_steps=10**6)
    inputs = model_inputs(model, batch, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def bare():
        for p in params:
            p.grad = None
        model.encode(inputs).float().mean().backward()  # the backbone alone, in its compute dtype

    def project():
        train_step(tcfg, model, optimizer, scheduler, [batch], "reg")

    def project_without_processor():
        real = model.build_inputs
        model.build_inputs = lambda images, names: inputs  # what a worker-side processor would hand over
        try:
            train_step(tcfg, model, optimizer, scheduler, [batch], "reg")
        finally:
            model.build_inputs = real

    model.train()
    t_bare = median_time(bare, cfg.repeats)
    t_project = median_time(project, cfg.repeats)
    t_no_proc = median_time(project_without_processor, cfg.repeats)
    return {"bare_forward_backward_s": t_bare, "train_step_s": t_project, "train_step_without_processor_s": t_no_proc,
            "ratio": t_project / t_bare, "ratio_without_processor": t_no_proc / t_bare,
            "states_per_s": cfg.batch_size / t_project}


def bench_data(cfg: SpeedConfig, tcfg: TrainConfig, model, ds) -> dict:
    """Per-sample cost of loading, marks + states, processor; and loader throughput per --num_workers."""
    n = (len(ds) // cfg.batch_size) * cfg.batch_size
    samples = [ds[i] for i in range(n)]
    batches = [samples[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    rng = np.random.default_rng(0)
    t_load = median_time(lambda: [ds[i] for i in range(n)], max(1, cfg.repeats // 5)) / n
    t_states = median_time(lambda: [prepare_batch(b, "cls", rng) for b in batches], cfg.repeats) / n
    states = [prepare_batch(b, "cls", rng) for b in batches]
    t_proc_marked = median_time(lambda: [model.build_inputs(s.images, s.class_names) for s in states], cfg.repeats) / n
    t_proc = median_time(lambda: [model.build_inputs([x.image for x in b], [x.class_name for x in b])
                                  for b in batches], cfg.repeats) / n
    loader = {}
    for workers in (0, 2):
        wcfg = TrainConfig(**{**asdict(tcfg), "num_workers": workers})

        def drain():
            for _ in build_loader(wcfg, ds, epoch=0):
                pass

        loader[workers] = n / median_time(drain, max(1, cfg.repeats // 5))
    return {"load_s_per_sample": t_load, "states_s_per_sample": t_states, "processor_s_per_sample": t_proc,
            "processor_on_marked_s_per_sample": t_proc_marked,
            "states_plus_processor_over_processor": (t_states + t_proc_marked) / t_proc,
            "load_states_processor_over_processor": (t_load + t_states + t_proc_marked) / t_proc,
            "loader_samples_per_s": {str(k): v for k, v in loader.items()}}


def run(cfg: SpeedConfig, workdir: str) -> dict:
    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    data_root = f"{workdir}/data"
    write_synthetic_fsc147(SynthConfig(out=data_root, num_images=int(cfg.num_images / 0.6) + 1, seed=0))
    model_dir = build_tiny_qwen2vl(TinyConfig(out=f"{workdir}/tiny"))
    tcfg = TrainConfig(data_root=data_root, model_name_or_path=model_dir, min_pixels=3136, max_pixels=cfg.max_pixels,
                       load_in_4bit=cfg.load_in_4bit, lora_dropout=0.0, batch_size=cfg.batch_size, device="cpu",
                       num_workers=0)
    model = build_model(tcfg)
    ds = FSC147Dataset(data_root, "train", max_images=cfg.num_images)
    samples = [ds[i] for i in range(cfg.batch_size)]
    result = {"step": bench_step(cfg, tcfg, model, samples), "data": bench_data(cfg, tcfg, model, ds)}
    if cfg.counting:
        from bench_counting import BenchConfig as CountingConfig, run_bench

        result["counting"] = run_bench(CountingConfig(max_pixels=cfg.max_pixels, device="cpu"), workdir)
    return result


def report(cfg: SpeedConfig, r: dict) -> str:
    s, d = r["step"], r["data"]
    lines = [f"CPU, {torch.get_num_threads()} threads, tiny random Qwen2-VL ({'4-bit + LoRA' if cfg.load_in_4bit else 'LoRA'}),"
             f" batch {cfg.batch_size}, median of {cfg.repeats}", "",
             "| training step | seconds | ratio to bare |", "|---|---|---|",
             f"| bare forward + backward (same processed batch) | {s['bare_forward_backward_s']:.4f} | 1.00x |",
             f"| train_step (processor, heads, loss, clip, AdamW) | {s['train_step_s']:.4f} | {s['ratio']:.2f}x |",
             f"| train_step, inputs already processed | {s['train_step_without_processor_s']:.4f} | "
             f"{s['ratio_without_processor']:.2f}x |", "",
             "| data pipeline, per sample | ms |", "|---|---|",
             f"| load (decode JPEG, parse points) | {1000 * d['load_s_per_sample']:.2f} |",
             f"| marks + counting state (prepare_batch) | {1000 * d['states_s_per_sample']:.2f} |",
             f"| processor, unmarked images | {1000 * d['processor_s_per_sample']:.2f} |",
             f"| processor, marked images | {1000 * d['processor_on_marked_s_per_sample']:.2f} |",
             "", f"marks + states + processor / processor alone: {d['states_plus_processor_over_processor']:.2f}x; "
             f"with loading: {d['load_states_processor_over_processor']:.2f}x",
             f"loader samples/s: num_workers 0: {d['loader_samples_per_s']['0']:.0f}, "
             f"num_workers 2: {d['loader_samples_per_s']['2']:.0f}; training consumes {s['states_per_s']:.0f} states/s"]
    if "counting" in r:
        lines += ["", "| counting batch size | images/s | ratio to batch 1 |", "|---|---|---|"]
        lines += [f"| {c['batch_size']} | {c['images_per_s']:.2f} | {c['ratio_to_first']:.2f}x |" for c in r["counting"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(SpeedConfig, argv, __doc__, validate)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-speed-") as workdir:
            result = run(cfg, workdir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + report(cfg, result))
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({"config": asdict(cfg), "date": time.strftime("%Y-%m-%d"), **result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
