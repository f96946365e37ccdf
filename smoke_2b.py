"""Qwen2-VL-2B's architecture (random weights, nothing downloaded) through the project's real path: a smoke
run on any machine, and the prepared GPU check.

    python smoke_2b.py                                  # CPU: builds the random 2B model once, ~10-20 min
    python smoke_2b.py --device cuda --batch_size 2     # one training and one counting step on a GPU
    make gpu-check                                      # = python3 smoke_2b.py --gpu_check --output_dir runs/gpu_check
    WHEELS=/path/to/wheels make gpu-check               # installs missing packages (bitsandbytes) from there first

Builds Qwen2-VL-2B's architecture with random weights (`tiny_qwen2vl.py --full_size`, saved once under
--model_dir with `save_pretrained`), loads it back through `model_loading.build_model` exactly as training
does (4-bit NF4 language model, vision tower kept out of 4-bit unless --quantize_vision, LoRA, heads;
bf16 compute on a GPU), on FSC-147-sized 384 x 576 synthetic images.

Smoke run (default): one training step (`train_step`, reg mode) at --batch_size and one counting step, and
the model loaded a second time with the other --quantize_vision setting; writes OUTPUT_DIR/smoke.json
(image_tokens, seq_len, trainable_params, peak_rss_mb, peak_gpu_mb, load_s, train_step_s, count_step_s,
footprint_mb of both vision settings).

GPU check (--gpu_check; needs one CUDA GPU and stops with a message without one): on the Python that has
torch (no venv, no W&B), names any missing package (and installs it from --wheels when given), then times
--steps training steps at --batch_size with and without gradient checkpointing, the bare backbone forward +
backward on the same processed batch (the overhead ratio), and counting at batch 1 and 8; writes
OUTPUT_DIR/gpu.json with peak GPU memory, seconds per step, samples/s, counting images/s and the dtypes the
vision tower, the language model and the heads actually compute in (read with forward hooks), and the goals:
peak memory <= 8 GiB at batch 2 (checkpointing allowed), training step <= 1.3 x the bare forward + backward.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from cli import UsageError, arg, parse_config, write_json_atomic

# import name -> distribution name: what the check needs (no wandb, scipy or matplotlib)
REQUIRED = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
            "bitsandbytes": "bitsandbytes", "PIL": "pillow", "numpy": "numpy", "safetensors": "safetensors"}
GOAL_PEAK_GIB = 8.0
GOAL_STEP_RATIO = 1.3


@dataclass
class SmokeConfig:
    model_dir: str = arg("models/qwen2vl-2b-random", "where the random 2B model is saved (built when missing)")
    output_dir: str = arg("runs/smoke_2b", "folder for smoke.json (gpu.json with --gpu_check)")
    batch_size: int = arg(2, "counting states per training step")
    image_height: int = arg(384, "synthetic image height (FSC-147 stores 384-high images)")
    image_width: int = arg(576, "synthetic image width")
    min_pixels: int = arg(64 * 28 * 28, "processor lower bound (training's default)")
    max_pixels: int = arg(512 * 28 * 28, "processor upper bound (training's default)")
    quantize_vision: bool = arg(False, "the vision tower in 4-bit too (the run being measured)")
    compare_vision: bool = arg(True, "smoke run: also load with the other --quantize_vision setting and report both "
                               "footprints")
    pointing: str = arg("token", "pointing of the heads (regress or token)")
    gradient_checkpointing: bool = arg(False, "smoke run: recompute activations in backward")
    device: str = arg("auto", "auto, cpu or cuda")
    precision: str = arg("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32 (bf16 on CPU gives a "
                         "GPU's parameter footprint, with emulated, slow bf16 matmuls)")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    gpu_check: bool = arg(False, "the prepared GPU check (see above) instead of the smoke run: writes gpu.json")
    steps: int = arg(5, "GPU check: timed training steps (and bare forward + backward) per setting, after one warm-up")
    count_steps: int = arg(8, "GPU check: forwards per image when timing counting (8 images at batch 1 and 8)")
    wheels: str = arg("", "a folder of wheels to install missing packages from, offline (e.g. bitsandbytes)")
    require_gpu: bool = arg(True, "GPU check: stop without a CUDA GPU (--no-require_gpu runs the same measurements "
                            "on CPU, which is how the tests check the script)")


def validate(cfg: SmokeConfig) -> list[str]:
    errors = []
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.count_steps < 1:
        errors.append("--batch_size, --steps and --count_steps must be >= 1")
    if min(cfg.image_height, cfg.image_width) < 64:
        errors.append("--image_height and --image_width must be >= 64")
    if cfg.wheels and not os.path.isdir(cfg.wheels):
        errors.append(f"--wheels {cfg.wheels!r} is not a folder")
    return errors


# ----------------------------------------------------------------------------- environment


def missing_packages() -> list[str]:
    """Distribution names of the REQUIRED packages that cannot be imported here."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def install_wheels(folder: str, dists: list[str], target: str) -> None:
    """pip-install `dists` from a folder of wheels, offline, into `target` (put first on sys.path): no
    system site-packages is touched, and nothing is fetched."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", "--find-links",
           folder, "--target", target, *dists]
    print("Installing " + ", ".join(dists) + f" from {folder} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"installing {', '.join(dists)} from {folder} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    sys.path.insert(0, target)
    importlib.invalidate_caches()


def check_environment(cfg: SmokeConfig) -> None:
    """Every required package importable (installed from --wheels when given), and a GPU for the GPU check."""
    missing = missing_packages()
    if missing and cfg.wheels:
        install_wheels(cfg.wheels, missing, os.path.join(cfg.output_dir, "site-packages"))
        missing = missing_packages()
    if missing:
        raise UsageError(f"missing packages: {', '.join(missing)}. Install them, or pass a folder of their wheels "
                         "(WHEELS=DIR make gpu-check, or --wheels DIR)")
    import torch

    if cfg.gpu_check and cfg.require_gpu and not torch.cuda.is_available():
        raise UsageError("the GPU check needs a CUDA GPU, and torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): run it where one is")


# ----------------------------------------------------------------------------- shared


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


def samples(cfg: SmokeConfig, n: int):
    """FSC-147-sized synthetic images with 10 to 30 objects."""
    import numpy as np

    from dataset_fsc147 import synth_sample
    from synthetic_fsc147 import SynthConfig

    synth = SynthConfig(image_height=cfg.image_height, min_width=cfg.image_width, max_width=cfg.image_width,
                        min_objects=10, max_objects=30)
    rng = np.random.default_rng(0)
    return [synth_sample(rng, synth, ("red circles", "circle", "red"), f"smoke-{i}.jpg") for i in range(n)]


def train_config(cfg: SmokeConfig, model_dir: str):
    """Training's config for the smoke run and the check: the real recipe's 4-bit NF4 + LoRA path."""
    from train_sequential_attention import TrainConfig

    return TrainConfig(data_root="-", model_name_or_path=model_dir, load_in_4bit=True, quantize_vision=cfg.quantize_vision,
                       pointing=cfg.pointing, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, lora_dropout=0.0,
                       batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing, device=cfg.device,
                       precision=cfg.precision, lr=5e-5)


def first_batch(cfg: SmokeConfig, model):
    """The training batch (reg states) and its processed inputs on the model's device."""
    import numpy as np

    from dataset_fsc147 import prepare_batch
    from model_loading import device_of, model_inputs

    batch = prepare_batch(samples(cfg, cfg.batch_size), "reg", np.random.default_rng(0))
    return batch, model_inputs(model, batch, device_of(model))


# ----------------------------------------------------------------------------- smoke run


def run(cfg: SmokeConfig) -> dict:
    import gc

    import torch

    from count_objects import count_objects
    from dataset_fsc147 import mark_radius
    from model_loading import build_model, device_of
    from train_sequential_attention import TrainConfig, build_optimizer, train_step

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = ensure_model(cfg)
    tcfg = train_config(cfg, model_dir)
    start = time.perf_counter()
    model = build_model(tcfg)
    load_s = time.perf_counter() - start
    device = device_of(model)
    batch, inputs = first_batch(cfg, model)
    grid = inputs["image_grid_thw"][0].tolist()
    image_tokens = int(grid[0] * grid[1] * grid[2] // model.merge_size ** 2)
    optimizer, scheduler = build_optimizer(tcfg, model, total_steps=10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step = train_step(tcfg, model, optimizer, scheduler, [batch], "reg")
    train_step_s = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    sample = samples(cfg, 1)[0]
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
        "device": str(device), "threads": torch.get_num_threads(), "compute_dtype": str(model.compute_dtype),
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


# ----------------------------------------------------------------------------- GPU check


def observed_dtypes(model, inputs) -> dict:
    """The dtypes a forward actually produces: a vision block's qkv, the language model's first q_proj, the
    last hidden states and the heads' outputs (forward hooks)."""
    import torch

    seen, hooks = {}, []
    for name, module in model.backbone.named_modules():
        for key, suffix in (("vision_qkv", "visual.blocks.0.attn.qkv"),
                            ("language_model_q_proj", "language_model.layers.0.self_attn.q_proj")):
            if name.endswith(suffix) and key not in seen:
                hooks.append(module.register_forward_hook(
                    lambda m, a, out, key=key: seen.setdefault(key, str(out.dtype)) and None))
    with torch.no_grad():
        hidden = model.encode(inputs)
        out = model(inputs)
    for h in hooks:
        h.remove()
    return {**seen, "last_hidden_state": str(hidden.dtype), "done_logit": str(out["done_logit"].dtype),
            "vision_weights": str(next(p for n, p in model.backbone.named_parameters() if ".visual." in n).dtype)}


def timed(fn, steps: int, device) -> dict:
    """Seconds per call of fn over `steps` calls after one warm-up, and the peak GPU memory of all of them."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"s_per_step": seconds, "peak_gib": peak}


def set_checkpointing(model, on: bool) -> None:
    base = model.backbone.get_base_model()
    if on:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()


def run_gpu_check(cfg: SmokeConfig) -> dict:
    import torch

    from count_objects import count_objects
    from model_loading import build_model, device_of
    from train_sequential_attention import build_optimizer, train_step

    started = time.perf_counter()
    model_dir = ensure_model(cfg)
    build_s = time.perf_counter() - started
    tcfg = train_config(cfg, model_dir)  # checkpointing is switched on and off on the loaded model below
    start = time.perf_counter()
    model = build_model(tcfg)
    load_s = time.perf_counter() - start
    device = device_of(model)
    batch, inputs = first_batch(cfg, model)
    optimizer, scheduler = build_optimizer(tcfg, model, total_steps=10**6)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = train_step(tcfg, model, optimizer, scheduler, [batch], "reg")
        if not out["finite"]:
            raise RuntimeError(f"non-finite training step: loss {out['loss']}")

    def bare():  # the backbone alone on the processed batch: no processor, marks, heads, loss terms or AdamW
        for p in params:
            p.grad = None
        model.encode(inputs).float().mean().backward()

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "torch": torch.__version__, "build_s": build_s, "load_s": load_s, "batch_size": cfg.batch_size,
              "image_size": [cfg.image_width, cfg.image_height], "seq_len": int(inputs["input_ids"].shape[1]),
              "trainable_params": sum(p.numel() for p in params),
              "compute_dtypes": observed_dtypes(model, inputs), "footprint_gib": footprint_mb(model) / 1024}
    model.train()
    for name, checkpointing in (("no_checkpointing", False), ("gradient_checkpointing", True)):
        set_checkpointing(model, checkpointing)
        train = timed(step, cfg.steps, device)
        plain = timed(bare, cfg.steps, device)
        result[name] = {"train_step_s": train["s_per_step"], "samples_per_s": cfg.batch_size / train["s_per_step"],
                        "peak_gib": train["peak_gib"], "bare_forward_backward_s": plain["s_per_step"],
                        "bare_peak_gib": plain["peak_gib"], "step_over_bare": train["s_per_step"] / plain["s_per_step"]}
    set_checkpointing(model, False)
    images = samples(cfg, 8)
    for b in (1, 8):
        run_count = lambda: count_objects(model, [s.image for s in images], [s.class_name for s in images], batch_size=b,
                                          done_threshold=1.0, max_count=cfg.count_steps, protocol="text",
                                          duplicate_guard=False)
        seconds = timed(run_count, 1, device)["s_per_step"]
        result[f"count_batch_{b}"] = {"images_per_s": len(images) / seconds,
                                      "forwards_per_s": len(images) * cfg.count_steps / seconds}
    result["count_batch_8_over_1"] = result["count_batch_8"]["images_per_s"] / result["count_batch_1"]["images_per_s"]
    peaks = [result[k]["peak_gib"] for k in ("no_checkpointing", "gradient_checkpointing")]
    best_ratio = min(result[k]["step_over_bare"] for k in ("no_checkpointing", "gradient_checkpointing"))
    result["goals"] = {
        f"peak_gib <= {GOAL_PEAK_GIB} at batch {cfg.batch_size} (checkpointing allowed)":
            None if peaks[0] is None else min(peaks) <= GOAL_PEAK_GIB,
        f"train step <= {GOAL_STEP_RATIO} x bare forward + backward": best_ratio <= GOAL_STEP_RATIO,
    }
    result["total_s"] = time.perf_counter() - started
    result["config"] = asdict(cfg)
    return result


def print_result(result: dict, title: str) -> None:
    print(f"\n{title}")
    for key, value in result.items():
        if key != "config":
            print(f"  {key:26s} {json.dumps(value) if isinstance(value, dict) else value}")


def main(argv=None) -> int:
    cfg = parse_config(SmokeConfig, argv, __doc__, validate)
    print("Config:\n" + "\n".join(f"  {k}: {v}" for k, v in asdict(cfg).items()), flush=True)
    try:
        check_environment(cfg)
        result = run_gpu_check(cfg) if cfg.gpu_check else run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "gpu.json" if cfg.gpu_check else "smoke.json")
    write_json_atomic(path, result)
    print_result(result, "GPU check, Qwen2-VL-2B architecture (random weights)" if cfg.gpu_check
                 else "Qwen2-VL-2B architecture (random weights), " + result["device"])
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
