"""Synthetic counting benchmark: does the sequential counter learn, and which variant learns best?

Builds a synthetic dataset in the FSC-147 layout and a tiny random Qwen2-VL, trains every variant from
scratch with the same seed, data and budget (the project's own training loop), then counts the held-out
test images with the full sequential loop (draw marks, predict, add the point, until done).

    python bench_learning.py --output_dir runs/bench_learning --steps 300          # a quick look (CPU)
    python bench_learning.py --output_dir runs/bench_learning --steps 9000 --minutes 20 \\
        --variants mean,attention --near_done_fraction 1.0 --tune_threshold 0.5,0.6,0.7,0.8,0.9   # 20-min run

Variants (--variants, comma-separated): a model type with optional suffixes, or the mean baseline:
  mean                 always predict the training split's mean count (rounded for exact accuracy)
  simple, attention    model type, regression pointing (x_head/y_head regress x, y), reading_order targets
  ...-token            token pointing: choose the image token holding the next object (cross-entropy),
                       sub-token offset, dense "unmarked object here" map, done sees that evidence
  ...-nearest          nearest-uncounted targets (any uncounted object is right) instead of reading order
  ...-before           the prompt naming the class before the image (--prompt_position before)
  ...-film             the class query scales each image token's features (--class_binding film)
  e.g. simple, simple-token, attention, attention-token, attention-token-nearest, simple-token-before-film

Attention variants train once per --attention_modules set, one row set each (the table's modules column): e.g.
--attention_modules memory,memory+foveation,memory+foveation+cross_attention adds the modules back one at a time,
the seed's plan; beside simple-token (no module) it is the module table of RESULTS.md (`make bench-dense-modules`).

Each trained variant counts the test images under every --protocol: text (marks sized from the model's
own object-size estimate, no exemplar boxes) and/or exemplar (sized from the exemplar boxes); one row
each. With --distractors, rows also report says_total (counted every object, of every class) and
points_on_other_class (the share of predicted points on another class's object); every row has per_class
(images, exact, MAE, bias per named class) in results.json.

Backbones (--backbone, comma-separated, rows side by side): random (a tiny random Qwen2-VL built from --seed:
perception learnt from scratch while counting), pretrained (--pretrained_dir, built once by `make
tiny-pretrained`: a stand-in for a pretrained VLM that knows classes, names and marks but not counting) and
pretrained-strict (--pretrained_strict_dir, `make tiny-pretrained-strict`: never shown the compositional
split's val and test pairs).

Each backbone is trained as --finetune says (comma-separated, rows side by side): lora4bit (4-bit NF4 + LoRA,
the README's recipe, with the training script's defaults: rank 16, alpha 32, the language model's projections,
vision tower frozen and kept out of 4-bit), lora (the same LoRA on a full-precision backbone) or full (every
backbone weight trains: a random backbone has nothing pretrained for LoRA to protect). --lora_vision and
--lora_r change the LoRA rows.

Writes OUTPUT_DIR/results.json, results.md (table) and learning.png (training losses and val count MAE
per variant), plus data/, model/ and one training run folder per variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from cli import UsageError, arg, parse_config, write_json_atomic
from count_objects import PROTOCOLS, CountSettings, parse_points_per_step
from tiles import parse_tiles, tiles_errors
from dataset_fsc147 import FSC147Dataset, write_synthetic_fsc147
from evaluate_counting import parse_thresholds
from synthetic_fsc147 import SynthConfig, validate_synth
from model_sequential_attention import ATTENTION_MODULES
from train_sequential_attention import TrainConfig

VARIANT_MODELS = ("simple", "attention")
FINETUNES = ("lora4bit", "lora", "full")
BACKBONES = ("random", "pretrained", "pretrained-strict")
TINY_FIELDS = ("vision_width", "vision_depth", "text_width", "text_layers", "bpe_vocab")  # must match a pretrained one
VARIANT_SUFFIXES = ("token", "nearest", "before", "film")
FULL_MODULES = "+".join(ATTENTION_MODULES)  # the attention model's default: every module
TEXT_LORA = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VISION_LORA = "qkv,proj,fc1,fc2"  # Qwen2-VL vision blocks (attention qkv/proj, MLP fc1/fc2)


@dataclass
class BenchConfig:
    output_dir: str = arg("runs/bench_learning", "folder for data/, model/, one run per variant and the results")
    variants: str = arg("mean,simple-token",
                        "comma-separated variants: mean, or simple/attention with optional -token and -nearest "
                        "suffixes (e.g. attention-token)")
    steps: int = arg(1000, "optimizer steps per trained variant (the lr schedule spans them)")
    minutes: float = arg(0.0, "also stop each variant after this many minutes of training (0: no limit)")
    seed: int = arg(0, "seed for data, tiny-model weights, heads and training order")
    train_seed: int = arg(-1, "seed of the training alone (heads' and adapters' init, which fresh training images in "
                          "which order, which val images pick checkpoint-best), the classes, test images and random "
                          "backbone staying --seed's: rows across train seeds give the bench's training noise; "
                          "-1: --seed")
    # data
    num_images: int = arg(1500, "synthetic images over all splits (60% train, 20% val, 20% test)")
    min_objects: int = arg(1, "fewest objects per image")
    max_objects: int = arg(10, "most objects per image")
    image_size: int = arg(112, "synthetic image height; widths are drawn in [size, 1.25 * size]")
    max_image_size: int = arg(0, "heights drawn in [--image_size, this] (widths in [--image_size, 1.25 x this]; 0: "
                              "every image --image_size high)")
    pixel_scale: float = arg(1.0, "the processor encodes every image at this many times its size (min_pixels = "
                             "(scale x side)^2): 2 gives a 224 px image 4x the image tokens, so objects of half a token "
                             "in dense scenes become a token wide (cost: ~4x the tokens per forward)")
    num_classes: int = arg(0, "object classes (shape + colour) of --class_split shared or disjoint (0: 6); compositional "
                           "uses the whole --num_colours x --num_colours grid (leave this at 0)")
    num_colours: int = arg(6, "with --class_split compositional: colours and shapes of the grid")
    background: str = arg("textured", "textured (gradient, noise, stripes or speckle) or plain (one colour) backgrounds")
    fresh_images: bool = arg(False, "train on freshly generated images (same generator; never the same image twice) "
                             "instead of the fixed training split")
    class_split: str = arg("shared", "shared (test images show classes seen in training, in unseen layouts), "
                           "disjoint (disjoint classes per split, as FSC-147) or compositional (test classes are "
                           "colour + shape pairs never seen in training; every colour and shape is)")
    distractors: int = arg(0, "each image also holds objects of 1 to K other classes, unannotated")
    distractor_objects: int = arg(6, "objects per distractor class: 1 to this many")
    confusers: float = arg(0.0, "with --fresh_images and --distractors: the share of training images whose other "
                           "classes all share the named class's colour or shape (hard negatives; val and test "
                           "images unchanged; 0: drawn from every training class)")
    distinct_colours: bool = arg(False, "every class has its own colour (the colour word tells classes apart)")
    min_gap: float = arg(4.0, "pixels between neighbouring objects' edges (0: touching)")
    protocol: str = arg("text", "comma-separated counting protocols, one result row each: text (marks sized from "
                        "the model's own estimate) and/or exemplar (from the exemplar boxes)")
    points_per_step: str = arg("1", "comma-separated counting modes, one result row each: 1 (one point per forward), "
                               "N, or auto (every confident, well-separated point per forward)")
    tiles: str = arg("1", "comma-separated tile modes for the test and beyond sets, one row each per "
                     "--points_per_step mode: N (N x N crops) or auto (from the model's own size estimate; 1 where "
                     "the objects look as large as training's)")
    beyond_objects: str = arg("", "MIN,MAX: also count a second test set with this many objects per image, beyond the "
                              "training range (its own rows, test_set 'beyond'; empty: none)")
    beyond_size_scale: float = arg(1.0, "object size x this in the beyond-the-training-range test set")
    large_objects: str = arg("", "MIN,MAX: also count a test set at FSC-147's scale ('large'), e.g. 100,400 objects "
                             "per image on --large_image_size images, counted with --large_tiles (empty: none)")
    large_image_size: str = arg("448,768", "MIN,MAX: the large test set's image heights (widths up to 1.25 x MAX)")
    large_tiles: str = arg("auto", "comma-separated tile modes for the large test set, one row each: N (N x N "
                           "crops) or auto (from the model's own size estimate); the other test sets use 1")
    large_points_per_step: str = arg("auto", "comma-separated --points_per_step modes for the large test set (one "
                                     "point per forward costs hundreds of forwards per image there)")
    large_images: int = arg(50, "test images of the large set")
    # tiny model
    vision_width: int = arg(128, "tiny vision encoder width (multiple of 64)")
    vision_depth: int = arg(2, "tiny vision encoder blocks")
    text_width: int = arg(128, "tiny language model width (multiple of 64)")
    text_layers: int = arg(2, "tiny language model layers")
    bpe_vocab: int = arg(400, "tiny tokenizer's BPE vocabulary (>= 600: every colour and shape word is one token, as in "
                         "a real tokenizer; 400 splits them into fragments)")
    # training (passed to train_sequential_attention.py)
    backbone: str = arg("random", "comma-separated backbones, rows side by side: random, pretrained (--pretrained_dir) "
                        "and/or pretrained-strict (--pretrained_strict_dir)")
    pretrained_dir: str = arg("models/tiny-pretrained", "the pretrained stand-in (`make tiny-pretrained`)")
    pretrained_strict_dir: str = arg("models/tiny-pretrained-strict", "the strict stand-in (`make "
                                     "tiny-pretrained-strict`)")
    finetune: str = arg("lora4bit", "comma-separated, rows side by side: lora4bit (4-bit NF4 backbone + LoRA), lora "
                        "(full-precision backbone + LoRA) "
                        "or full (every backbone weight trains)")
    lora_vision: bool = arg(False, "LoRA also on the vision encoder (qkv, proj, fc1, fc2; 'proj' also matches the "
                            "patch embedding), not only the language model (the training script's targets)")
    lora_r: int = arg(16, "LoRA rank (alpha = 2 x rank; the training script's defaults: 16, 32)")
    lora_dropout: float = arg(TrainConfig.lora_dropout, "dropout on the LoRA rows' adapter inputs (default: the "
                              "training script's); on CPU the masks cost about a fifth of a vision-LoRA step, but 0 counted "
                              "bench-unseen's unseen pairs at 0.633 against 0.803 (RESULTS.md 1d)")
    batch_size: int = arg(8, "counting states per optimizer step")
    lr: float = arg(3e-4, "learning rate (one for every trainable parameter)")
    lora_lr: float = arg(0.0, "learning rate of the LoRA rows (--finetune lora4bit or lora; 0: --lr); each training run "
                         "still has one rate for every trainable parameter")
    warmup_steps: int = arg(100, "linear warmup steps")
    lr_schedule: str = arg("cosine", "cosine or constant")
    near_done_fraction: float = arg(0.5, "fraction of not-done cls states with one object left (k = N - 1)")
    skip_fraction: float = arg(0.0, "fraction of not-done states with 1 to 3 objects before the last counted one "
                               "left unmarked (train_sequential_attention.py --skip_fraction)")
    mark_jitter: float = arg(0.2, "training marks land up to this fraction of the object size from their objects")
    mark_size_jitter: float = arg(0.0, "training marks' radius times a factor in [1 - j, 1 + j] (text-protocol errors)")
    negative_prompts: float = arg(0.0, "fraction of done classification states naming a training class the image lacks")
    object_map_focal: float = arg(0.0, "focal exponent of the dense object-map BCE (0: plain BCE)")
    other_object_weight: float = arg(1.0, "object-map BCE weight at tokens holding an object the prompt does not "
                                     "name (distractors; 1: plain BCE)")
    class_loss: float = arg(0.0, "weight of the auxiliary per-token class cross-entropy (0: off)")
    token_context: int = arg(0, "token-pointing variants: a k x k convolution over the image-token grid on the "
                             "pointer's features (odd k, e.g. 3; 0: none)")
    attention_dim: int = arg(128, "width of the attention model's modules")
    attention_modules: str = arg(FULL_MODULES, "module sets of the attention variants, comma-separated, one "
                                 "trained run each (rows side by side, the seed's plan of adding them back one at a "
                                 "time): modules joined by '+' from memory, foveation, cross_attention, reasoning")
    head_hidden: int = arg(128, "hidden width of x_head, y_head, done_head")
    eval_every: int = arg(250, "validation losses and val count MAE every N steps (the curves)")
    eval_images: int = arg(40, "val images counted at each evaluation; the best MAE gives checkpoint-best")
    # counting evaluation
    test_images: int = arg(0, "test images counted at the end (0: the whole test split)")
    max_count: int = arg(20, "counting loop: stop an image after this many points")
    done_threshold: float = arg(0.5, "counting loop: stop when sigmoid(done) exceeds this (see --tune_threshold)")
    tune_threshold: str = arg("", "comma-separated done thresholds tried on the val split, once per "
                              "points-per-forward mode; each mode's test rows are counted at the one with its lowest "
                              "val MAE, a tie going to the one nearest --done_threshold (empty: use --done_threshold)")
    num_workers: int = arg(0, "DataLoader workers per training run (0: decode in the training process)")


def validate(cfg: BenchConfig) -> list[str]:
    """Every problem with the config at once."""
    from model_loading import lora_dropout_errors, token_context_errors

    errors = []
    for name in parse_variants(cfg.variants):
        model, *suffixes = name.split("-")
        if name != "mean" and (model not in VARIANT_MODELS or any(x not in VARIANT_SUFFIXES for x in suffixes)):
            errors.append(f"--variants: unknown {name!r}; use mean, or simple / attention with optional "
                          "-token and -nearest suffixes")
    if not parse_variants(cfg.variants):
        errors.append("--variants must name at least one variant")
    sets = parse_variants(cfg.attention_modules)
    unknown = sorted({m for s in sets for m in s.split("+") if m not in ATTENTION_MODULES})
    if not sets or unknown:
        errors.append(f"--attention_modules: unknown {unknown or 'empty list'}; list sets of "
                      f"{', '.join(ATTENTION_MODULES)} joined by '+', e.g. memory,memory+foveation")
    if not parse_variants(cfg.finetune) or any(f not in FINETUNES for f in parse_variants(cfg.finetune)):
        errors.append(f"--finetune must list some of {', '.join(FINETUNES)}, got {cfg.finetune!r}")
    errors += backbone_errors(cfg)
    if cfg.background not in ("textured", "plain"):
        errors.append(f"--background must be textured or plain, got {cfg.background!r}")
    if not 0.25 <= cfg.pixel_scale <= 4:
        errors.append(f"--pixel_scale must be in [0.25, 4], got {cfg.pixel_scale}")
    if not parse_variants(cfg.protocol) or any(p not in PROTOCOLS for p in parse_variants(cfg.protocol)):
        errors.append(f"--protocol must list some of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    errors += validate_synth(synth_config(cfg))
    try:
        [parse_points_per_step(m) for m in parse_variants(cfg.points_per_step)]
        if cfg.beyond_objects:
            low, high = beyond_range(cfg)
            errors += [] if 1 <= low <= high else ["--beyond_objects needs 1 <= MIN <= MAX"]
    except ValueError:
        errors.append(f"--points_per_step must list positive numbers or auto, got {cfg.points_per_step!r}; "
                      f"--beyond_objects must be MIN,MAX, got {cfg.beyond_objects!r}")
    errors += [e for m in parse_variants(cfg.tiles) for e in tiles_errors(m)]
    if cfg.large_objects:
        try:
            (low, high), (small, big) = parse_range(cfg.large_objects), parse_range(cfg.large_image_size)
            errors += [] if 1 <= low <= high and 64 <= small <= big else [
                "--large_objects needs 1 <= MIN <= MAX and --large_image_size 64 <= MIN <= MAX"]
            [parse_points_per_step(m) for m in parse_variants(cfg.large_points_per_step)]
        except ValueError:
            errors.append(f"--large_objects and --large_image_size must be MIN,MAX and --large_points_per_step "
                          f"numbers or auto, got {cfg.large_objects!r}, {cfg.large_image_size!r}, "
                          f"{cfg.large_points_per_step!r}")
        errors += [e for m in parse_variants(cfg.large_tiles) for e in tiles_errors(m)]
        errors += [] if cfg.large_images >= 1 else ["--large_images must be >= 1"]
    for name in ("mark_jitter", "skip_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            errors.append(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.other_object_weight <= 0:
        errors.append(f"--other_object_weight must be > 0, got {cfg.other_object_weight}")
    if not 0 <= cfg.confusers <= 1:
        errors.append(f"--confusers must be in [0, 1], got {cfg.confusers}")
    elif cfg.confusers and not (cfg.fresh_images and cfg.distractors):
        errors.append("--confusers picks the other classes of fresh training images: it needs --fresh_images and "
                      "--distractors")
    if cfg.steps < 1:
        errors.append(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.minutes < 0:
        errors.append(f"--minutes must be >= 0, got {cfg.minutes}")
    if cfg.train_seed < -1:
        errors.append(f"--train_seed must be >= 0 (or -1: --seed), got {cfg.train_seed}")
    if cfg.num_images < 5:
        errors.append(f"--num_images must be >= 5, got {cfg.num_images}")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        errors.append("need 1 <= --min_objects <= --max_objects")
    if cfg.image_size < 64:
        errors.append(f"--image_size must be >= 64, got {cfg.image_size}")
    for name in ("vision_width", "text_width"):
        if getattr(cfg, name) % 64 or getattr(cfg, name) <= 0:
            errors.append(f"--{name} must be a positive multiple of 64")
    for name in ("batch_size", "lora_r", "eval_images", "max_count", "vision_depth", "text_layers"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1")
    if cfg.eval_every < 0 or cfg.test_images < 0 or cfg.warmup_steps < 0 or cfg.num_workers < 0:
        errors.append("--eval_every, --test_images, --warmup_steps and --num_workers must be >= 0")
    if not 0 < cfg.lr < 1 or not 0 <= cfg.lora_lr < 1:
        errors.append(f"--lr must be in (0, 1) and --lora_lr in [0, 1), got {cfg.lr}, {cfg.lora_lr}")
    errors += lora_dropout_errors(cfg.lora_dropout) + token_context_errors(cfg.token_context)
    try:
        if not all(0 < t < 1 for t in parse_thresholds(cfg.tune_threshold) + [cfg.done_threshold]):
            errors.append("--done_threshold and --tune_threshold values must be in (0, 1)")
    except ValueError:
        errors.append(f"--tune_threshold must be comma-separated numbers, got {cfg.tune_threshold!r}")
    return errors


def parse_variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def backbone_errors(cfg: BenchConfig) -> list[str]:
    """Unknown backbones, and pretrained ones that are not built or were built with other tiny-model widths."""
    names = parse_variants(cfg.backbone)
    if not names or any(b not in BACKBONES for b in names):
        return [f"--backbone must list some of {', '.join(BACKBONES)}, got {cfg.backbone!r}"]
    errors = []
    for name in names:
        if name == "random":
            continue
        folder = backbone_dir(cfg, name)
        target = "tiny-pretrained" + ("-strict" if name == "pretrained-strict" else "")
        if not os.path.isfile(os.path.join(folder, "pretrain.json")):
            errors.append(f"--backbone {name}: no pretrained stand-in in {folder!r} (no pretrain.json): run `make {target}`")
            continue
        with open(os.path.join(folder, "tiny_config.json"), encoding="utf-8") as f:
            tiny = json.load(f)
        other = [f"--{k} {getattr(cfg, k)} (the model has {tiny[k]})" for k in TINY_FIELDS if tiny.get(k) != getattr(cfg, k)]
        if other:
            errors.append(f"--backbone {name}: {folder} was built with other tiny-model settings: " + ", ".join(other))
    return errors


def backbone_dir(cfg: BenchConfig, backbone: str) -> str:
    return {"pretrained": cfg.pretrained_dir, "pretrained-strict": cfg.pretrained_strict_dir}[backbone]


def finetune_label(cfg: BenchConfig, finetune: str) -> str:
    """The finetune column of a row: "+vision" on LoRA rows whose adapters reach the vision tower too."""
    return finetune + ("+vision" if cfg.lora_vision and finetune != "full" else "")


def module_sets(cfg: BenchConfig, variant: str) -> list[str]:
    """The attention-module sets a variant trains once each ('memory+foveation'); [''] for the simple model."""
    return parse_variants(cfg.attention_modules) if variant.split("-")[0] == "attention" else [""]


def run_name(variant: str, backbone: str, finetune: str, modules: str = "") -> str:
    """The run folder of one trained row set, under OUTPUT_DIR (an attention variant's module set named unless it
    is every module)."""
    named = f"@{modules}" if modules and modules != FULL_MODULES else ""
    return f"{variant}{named}_{backbone}_{finetune}"


def parse_range(text: str) -> tuple[int, int]:
    """'MIN,MAX' -> (MIN, MAX); ValueError otherwise."""
    low, high = (int(v) for v in text.split(","))
    return low, high


def beyond_range(cfg) -> tuple[int, int]:
    return parse_range(cfg.beyond_objects)


# ----------------------------------------------------------------------------- setup


def processor_side(cfg: BenchConfig) -> int:
    """Image side the processor resizes to: the largest --image_size times --pixel_scale, rounded up to Qwen2-VL's
    28-pixel merged patches (max_pixels is twice its square, so no image is shrunk)."""
    return 28 * math.ceil(cfg.pixel_scale * max(cfg.image_size, cfg.max_image_size) / 28)


def synth_config(cfg: BenchConfig) -> SynthConfig:
    """The generator settings of the benchmark's data (its written splits and its fresh training images)."""
    return SynthConfig(out=os.path.join(cfg.output_dir, "data"), num_images=cfg.num_images, seed=cfg.seed,
                       min_objects=cfg.min_objects, max_objects=cfg.max_objects, image_height=cfg.image_size,
                       max_height=cfg.max_image_size, min_width=cfg.image_size,
                       max_width=round(1.25 * max(cfg.image_size, cfg.max_image_size)),
                       num_classes=cfg.num_classes or (0 if cfg.class_split == "compositional" else 6),
                       class_split=cfg.class_split, num_shapes=cfg.num_colours, num_colours=cfg.num_colours,
                       background=cfg.background, distractors=cfg.distractors,
                       distractor_objects=cfg.distractor_objects, distinct_colours=cfg.distinct_colours,
                       min_gap=cfg.min_gap)


def build_bench_data(cfg: BenchConfig) -> str:
    """Synthetic FSC-147 under OUTPUT_DIR/data (reused when it was written with the same settings)."""
    synth = synth_config(cfg)
    return _reuse_or_build(synth.out, asdict(synth), lambda: write_synthetic_fsc147(synth))


def build_beyond_data(cfg: BenchConfig) -> str | None:
    """The beyond-the-training-range test set under OUTPUT_DIR/beyond: the same generator and classes with
    --beyond_objects objects and --beyond_size_scale sizes; its test split has --test_images images."""
    if not cfg.beyond_objects:
        return None
    low, high = beyond_range(cfg)
    n_test = cfg.test_images or round(0.2 * cfg.num_images)
    synth = dataclasses.replace(synth_config(cfg), out=os.path.join(cfg.output_dir, "beyond"), min_objects=low,
                                max_objects=high, size_scale=cfg.beyond_size_scale, num_images=5 * n_test)
    return _reuse_or_build(synth.out, asdict(synth), lambda: write_synthetic_fsc147(synth))


def build_large_data(cfg: BenchConfig) -> str | None:
    """The test set at FSC-147's scale under OUTPUT_DIR/large: --large_objects objects per image on images
    --large_image_size pixels high; its test split has --large_images images."""
    if not cfg.large_objects:
        return None
    (low, high), (small, big) = parse_range(cfg.large_objects), parse_range(cfg.large_image_size)
    synth = dataclasses.replace(synth_config(cfg), out=os.path.join(cfg.output_dir, "large"), min_objects=low,
                                max_objects=high, image_height=small, max_height=big, min_width=small,
                                max_width=round(1.25 * big), num_images=5 * cfg.large_images)
    return _reuse_or_build(synth.out, asdict(synth), lambda: write_synthetic_fsc147(synth))


def build_bench_model(cfg: BenchConfig) -> str:
    """Tiny random Qwen2-VL under OUTPUT_DIR/model (reused when built with the same settings)."""
    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    side = processor_side(cfg)
    tiny = TinyConfig(out=os.path.join(cfg.output_dir, "model"), seed=cfg.seed, vision_width=cfg.vision_width,
                      vision_depth=cfg.vision_depth, text_width=cfg.text_width, text_layers=cfg.text_layers,
                      bpe_vocab=cfg.bpe_vocab,
                      min_pixels=side * side, max_pixels=2 * side * side)
    return _reuse_or_build(tiny.out, asdict(tiny), lambda: build_tiny_qwen2vl(tiny))


def _reuse_or_build(folder: str, settings: dict, build) -> str:
    stamp = os.path.join(folder, "bench_settings.json")
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == settings:
                return folder
    build()
    write_json_atomic(stamp, settings)
    return folder


def train_config(cfg: BenchConfig, variant: str, data_root: str, model_dir: str, backbone: str = "random",
                 finetune: str | None = None, modules: str = "") -> TrainConfig:
    """The training run of one variant: same data, seed and budget as every other variant (finetune: the first
    of --finetune unless given; modules: the attention model's, '+'-joined, the first set unless given)."""
    finetune = finetune or parse_variants(cfg.finetune)[0]
    modules = modules or module_sets(cfg, variant)[0] or FULL_MODULES
    side = processor_side(cfg)
    targets = TEXT_LORA + ("," + VISION_LORA if cfg.lora_vision else "")
    model_type, *suffixes = variant.split("-")
    return TrainConfig(
        data_root=data_root, model_name_or_path=model_dir,
        output_dir=os.path.join(cfg.output_dir, run_name(variant, backbone, finetune, modules)),
        model_type=model_type, attention_modules=modules.replace("+", ","),
        pointing="token" if "token" in suffixes else "regress",
        target_strategy="nearest" if "nearest" in suffixes else "reading_order",
        prompt_position="before" if "before" in suffixes else "after",
        class_binding="film" if "film" in suffixes else "add",
        finetune="full" if finetune == "full" else "lora", synthetic_train=cfg.fresh_images,
        synthetic_confusers=cfg.confusers,
        mark_jitter=cfg.mark_jitter, mark_size_jitter=cfg.mark_size_jitter, negative_prompts=cfg.negative_prompts,
        object_map_focal=cfg.object_map_focal, other_object_weight=cfg.other_object_weight, class_loss=cfg.class_loss,
        token_context=cfg.token_context if "token" in suffixes else 0,
        load_in_4bit=finetune == "lora4bit", lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout, lora_target_modules=targets, attention_dim=cfg.attention_dim,
        head_hidden=cfg.head_hidden,
        min_pixels=side * side, max_pixels=2 * side * side, batch_size=cfg.batch_size, max_steps=cfg.steps,
        max_minutes=cfg.minutes, lr=cfg.lora_lr if finetune != "full" and cfg.lora_lr else cfg.lr, warmup_steps=cfg.warmup_steps, lr_schedule=cfg.lr_schedule,
        near_done_fraction=cfg.near_done_fraction, skip_fraction=cfg.skip_fraction,
        seed=cfg.seed if cfg.train_seed < 0 else cfg.train_seed, log_every=1, eval_every=cfg.eval_every,
        count_every=0, eval_states=32,
        eval_images=cfg.eval_images,
        eval_overlays=0, max_count=cfg.max_count, done_threshold=cfg.done_threshold, save_every=0,
        protocol=parse_variants(cfg.protocol)[0],
        grad_check_every=0, num_workers=cfg.num_workers, device="cpu", wandb_mode="disabled",
    )


# ----------------------------------------------------------------------------- variants


def exact_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean(pred == gt))


def run_mean_baseline(cfg: BenchConfig, data_root: str, tests: dict[str, FSC147Dataset]) -> list[dict]:
    """Always the training mean, on the same test images: MAE/RMSE of the mean, exact accuracy of it rounded."""
    train = FSC147Dataset(data_root, "train")
    mean = float(np.mean([len(e["points"]) for e in train.entries]))
    rows = []
    for test_set, test in tests.items():
        entries = [test.entries[i] for i in test.subset_indices(cfg.test_images)]  # the images count_dataset counts
        gt = np.array([len(e["points"]) for e in entries], dtype=np.float64)
        row = {"variant": "mean", "backbone": "-", "finetune": "-", "status": "ok", "protocol": "-", "test_set": test_set,
               "train_mean_count": mean,
               "mae": float(np.abs(gt - mean).mean()), "rmse": float(math.sqrt(((gt - mean) ** 2).mean())),
               "nae": float(np.mean(np.abs(gt - mean) / gt)), "bias": float(np.mean(mean - gt)),
               "exact_acc": exact_accuracy(np.full_like(gt, np.round(mean)), gt),
               "within_1": float(np.mean(np.abs(gt - np.round(mean)) <= 1)), "mean_gt": float(gt.mean()),
               "n_images": len(gt)}
        totals = [len(e["all_points"]) for e in entries if len(e.get("all_points", ())) > len(e["points"])]
        if totals:  # over the images that hold other classes' objects, as evaluate_counting.says_total
            row["says_total"] = float(np.mean(np.round(mean) == np.array(totals)))
            row["n_with_distractors"] = len(totals)
        rows.append(row)
    return rows


def results_file(test_set: str, protocol: str, mode: str, tiles: str = "1") -> str:
    return (f"{test_set}_results_{protocol}" + ("" if mode == "1" else f"_pps-{mode}")
            + ("" if tiles == "1" else f"_tiles-{tiles}") + ".json")


def counting_modes(cfg: BenchConfig, test_set: str) -> list[tuple[str, str]]:
    """(points_per_step, tiles) modes a test set is counted with: every pair of --points_per_step and --tiles, the
    large set its own (--large_points_per_step, --large_tiles)."""
    if test_set == "large":
        return [(m, t) for m in parse_variants(cfg.large_points_per_step) for t in parse_variants(cfg.large_tiles)]
    return [(m, t) for m in parse_variants(cfg.points_per_step) for t in parse_variants(cfg.tiles)]


def count_rows(cfg: BenchConfig, variant: str, tcfg: TrainConfig, checkpoint: str, data_root: str,
               tests: dict[str, FSC147Dataset]) -> list[dict]:
    """Count the test images with a trained checkpoint: one result row per --protocol, test set and counting mode
    (`counting_modes`: --points_per_step x --tiles, and for the large set its own modes and tiles). The done threshold is
    chosen on val (untiled) under each protocol and points-per-forward mode, as `evaluate_counting.py` chooses it:
    a threshold suits the mode it was chosen in (several points per forward stop at other done probabilities)."""
    from evaluate_counting import count_dataset, pick_threshold
    from model_loading import load_checkpoint
    from train_sequential_attention import evaluate, fixed_val_batches

    model, trained = load_checkpoint(checkpoint, device="cpu")
    val = FSC147Dataset(data_root, "val")
    # Done accuracy and |xy error| on 64 val images' counting states, marks sized from the exemplar boxes as in
    # training: one figure per variant, whatever the protocol of the counting rows below.
    states = evaluate(tcfg, model, fixed_val_batches(dataclasses.replace(tcfg, eval_states=64), val))
    rows = []
    for protocol in parse_variants(cfg.protocol):
        def count(ds, t, mode, bar, tiles="1", max_count=cfg.max_count):
            settings = CountSettings(8, t, max_count, protocol, parse_points_per_step(mode), tiles=parse_tiles(tiles),
                                     object_tokens=trained.object_tokens)
            return count_dataset(model, ds, settings, max_images=cfg.test_images, progress=bar)

        tuned = {}  # points-per-forward mode -> (threshold, val MAE per threshold)

        def threshold_for(mode):
            if not cfg.tune_threshold:
                return cfg.done_threshold, {}
            if mode not in tuned:  # calibrated on val, never on test
                maes = {t: count(val, t, mode, False)[1]["mae"] for t in parse_thresholds(cfg.tune_threshold)}
                tuned[mode] = pick_threshold(maes, cfg.done_threshold), maes
            return tuned[mode]

        for test_set, test in tests.items():
            # The large set's counts go past the training range's --max_count.
            cap = max(cfg.max_count, 2 * parse_range(cfg.large_objects)[1]) if test_set == "large" else cfg.max_count
            for mode, tiles in counting_modes(cfg, test_set):
                threshold, val_maes = threshold_for(mode)
                records, counting, _, _ = count(test, threshold, mode, True, tiles, cap)
                name = results_file(test_set, protocol, mode, tiles)
                write_json_atomic(os.path.join(tcfg.output_dir, name), {"summary": counting, "images": records})
                pred = np.array([r["pred_count"] for r in records])
                gt = np.array([r["gt_count"] for r in records])
                rows.append({
                    "variant": variant, "status": "ok", "protocol": protocol, "points_per_step": mode, "tiles": tiles,
                    "test_set": test_set, "model_type": tcfg.model_type, "target_strategy": tcfg.target_strategy,
                    "pointing": tcfg.pointing, "prompt_position": tcfg.prompt_position,
                    "class_binding": tcfg.class_binding, "checkpoint": checkpoint, "results_file": name,
                    "exact_acc": exact_accuracy(pred, gt), "bias": float(np.mean(pred - gt)),
                    **{k: counting[k] for k in ("mae", "rmse", "nae", "within_1", "mean_gt", "forwards_per_image",
                                                "mean_tiles", "precision", "recall", "f1", "n_capped",
                                                "n_stopped_on_duplicates",
                                                "n_images", "says_total", "n_with_distractors", "object_size_rel_err",
                                                "points_on_other_class", "n_points_on_other_class", "per_class")
                       if counting.get(k) is not None},
                    "val_states_done_acc": states["val/done_acc"], "val_states_xy_abs_err": states["val/xy_abs_err"],
                    "done_threshold": threshold, "object_tokens": trained.object_tokens, "val_mae_per_threshold": {str(t): m for t, m in val_maes.items()},
                })
    return rows


class BenchStopped(Exception):
    """A variant's training was stopped by a signal: the benchmark stops, no table of a shorter run is written."""


def run_variant(cfg: BenchConfig, variant: str, data_root: str, model_dir: str, tests: dict[str, FSC147Dataset],
                backbone: str, finetune: str, modules: str = "") -> list[dict]:
    """Train one variant (with one attention-module set) on one backbone, then count the test split with its
    checkpoint-best (lowest val count MAE)."""
    from train_sequential_attention import train

    tcfg = train_config(cfg, variant, data_root, model_dir, backbone, finetune, modules)
    which = {"variant": variant, "attention_modules": modules or None, "backbone": backbone,
             "finetune": finetune_label(cfg, finetune),
             "run_dir": run_name(variant, backbone, finetune, modules)}
    start = time.perf_counter()
    try:
        summary = train(tcfg)
    except (UsageError, RuntimeError, ValueError) as e:  # a failed variant is a result too
        return [{**which, "status": f"failed: {type(e).__name__}: {e}"}]
    train_s = time.perf_counter() - start
    if summary.get("interrupted"):  # Ctrl-C or SIGTERM: the user stops the benchmark, not just this variant
        raise BenchStopped(f"{which['run_dir']}: training stopped by {summary['interrupted']} at step "
                           f"{summary['steps']} of {cfg.steps} (checkpoint saved in {tcfg.output_dir})")
    checkpoint = os.path.join(tcfg.output_dir, "checkpoint-best")
    if not os.path.isdir(checkpoint):
        checkpoint = os.path.join(tcfg.output_dir, "checkpoint-last")
    return [{**row, **which, "steps": summary["steps"], "train_minutes": train_s / 60}
            for row in count_rows(cfg, variant, tcfg, checkpoint, data_root, tests)]


# ----------------------------------------------------------------------------- report


def read_curves(run_dir: str) -> dict:
    """Training losses per step and val count MAE per evaluation, from metrics.jsonl."""
    curves = {"cls": [], "reg": [], "val_mae": []}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return curves
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("event") == "eval" and "val/count_mae" in r:
                curves["val_mae"].append((r["step"], r["val/count_mae"]))
            elif r.get("event") is None:
                for mode in ("cls", "reg"):
                    if f"loss_{mode}" in r:
                        curves[mode].append((r["step"], r[f"loss_{mode}"]))
    return curves


def plot_curves(cfg: BenchConfig, results: list[dict], path: str) -> None:
    """learning.png: smoothed loss_cls, loss_reg and val count MAE per step, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in dict.fromkeys(r["run_dir"] for r in results if "run_dir" in r):  # one line per run, whatever its rows
        curves = read_curves(os.path.join(cfg.output_dir, run))
        variant = run.replace("_", " ")
        for ax, key in zip(axes, ("cls", "reg", "val_mae")):
            if not curves[key]:
                continue
            steps, values = map(np.array, zip(*curves[key]))
            if key != "val_mae" and len(values) > 20:
                window = max(1, len(values) // 25)
                values = np.convolve(values, np.ones(window) / window, mode="valid")
                steps = steps[window - 1:]
            ax.plot(steps, values, label=variant, marker="o" if key == "val_mae" else None)
    mean = next((r for r in results if r["variant"] == "mean"), None)
    if mean:
        axes[2].axhline(mean["mae"], color="grey", linestyle="--", label="mean baseline (test)")
    for ax, title in zip(axes, ("training loss_cls (BCE, smoothed)", "training loss_reg (MSE, smoothed)",
                                "val count MAE (full counting loop)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_error_by_count(cfg: BenchConfig, results: list[dict], path: str) -> None:
    """error_by_count.png: the relative error mean |pred - gt| / gt and the bias mean pred - gt against the true
    count (bins of 5, log count axis so that 10 and 400 objects both show), one line per trained row (variant,
    protocol, points per step, test set); tiled rows dashed, each row its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    trained = [r for r in results if "results_file" in r]
    colours = plt.get_cmap("tab20")
    for i, r in enumerate(trained):
        images = json.load(open(os.path.join(cfg.output_dir, r["run_dir"], r["results_file"])))["images"]
        gt = np.array([im["gt_count"] for im in images])
        err = np.array([im["pred_count"] for im in images]) - gt
        which = (gt - 1) // 5  # each image's bin
        bins = sorted(set(which))
        centres = [5 * b + 3 for b in bins]
        tiled = r.get("tiles", "1") != "1"
        label = (f"{r['run_dir'].replace('_', ' ')} {r['protocol']} {r['points_per_step']}/step {r['test_set']}"
                 + (f" tiles {r['tiles']}" if tiled else ""))
        style = {"marker": "o", "markersize": 3, "label": label, "color": colours(i % 20),
                 "linestyle": "--" if tiled else "-"}
        axes[0].plot(centres, [np.mean(np.abs(err[which == b]) / gt[which == b]) for b in bins], **style)
        axes[1].plot(centres, [err[which == b].mean() for b in bins], **style)
    for ax, title in zip(axes, ("mean |pred - gt| / gt by true count", "mean pred - gt by true count")):
        ax.set_title(title)
        ax.set_xlabel("objects in the image (bins of 5, log scale)")
        ax.set_xscale("log")
    axes[1].axhline(0, color="grey", linewidth=0.5)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(results: list[dict]) -> str:
    cols = [("variant", "variant", "{}"), ("attention_modules", "modules", "{}"), ("backbone", "backbone", "{}"),
            ("finetune", "finetune", "{}"),
            ("protocol", "protocol", "{}"), ("points_per_step", "points/step", "{}"),
            ("tiles", "tiles", "{}"), ("test_set", "test set", "{}"), ("steps", "steps", "{}"),
            ("train_minutes", "train min", "{:.1f}"),
            ("exact_acc", "exact acc", "{:.3f}"), ("mae", "MAE", "{:.3f}"), ("rmse", "RMSE", "{:.3f}"),
            ("nae", "NAE", "{:.3f}"), ("within_1", "within 1", "{:.3f}"), ("mean_gt", "mean gt", "{:.1f}"),
            ("forwards_per_image", "forwards/img", "{:.1f}"), ("bias", "mean pred - gt", "{:+.2f}"),
            ("says_total", "says total", "{:.3f}"), ("points_on_other_class", "pts on other class", "{:.3f}"),
            ("object_size_rel_err", "size err", "{:.3f}"),
            ("f1", "loc F1", "{:.3f}"), ("val_states_done_acc", "done acc (val states)", "{:.3f}"),
            ("done_threshold", "threshold", "{}"), ("n_capped", "capped", "{}"),
            ("status", "status", "{}")]
    per_variant = {"val_states_done_acc"}  # one figure per trained run: shown on its first row only
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    seen = set()
    for r in results:
        run = r.get("run_dir", r["variant"])
        shown = {k: r[k] for k, _, _ in cols if r.get(k) is not None and not (k in per_variant and run in seen)}
        seen.add(run)
        lines.append("| " + " | ".join(fmt.format(shown[k]) if k in shown else "-" for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(BenchConfig, argv, __doc__, validate)
    print("Config:\n" + "\n".join(f"  {k}: {v}" for k, v in asdict(cfg).items()))
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(cfg.output_dir, "config.json"), asdict(cfg))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        data_root, beyond = build_bench_data(cfg), build_beyond_data(cfg)
        tests = {"test": FSC147Dataset(data_root, "test")}
        if beyond:
            tests["beyond"] = FSC147Dataset(beyond, "test")
        if cfg.large_objects:
            tests["large"] = FSC147Dataset(build_large_data(cfg), "test")
        variants = parse_variants(cfg.variants)
        results = run_mean_baseline(cfg, data_root, tests) if "mean" in variants else []
        for backbone in parse_variants(cfg.backbone):  # every (backbone, finetune, variant): the same data and budget
            model_dir = build_bench_model(cfg) if backbone == "random" else backbone_dir(cfg, backbone)
            for finetune in parse_variants(cfg.finetune):
                for variant in (v for v in variants if v != "mean"):
                    for modules in module_sets(cfg, variant):
                        print(f"\n=== {run_name(variant, backbone, finetune, modules)} ===")
                        rows = run_variant(cfg, variant, data_root, model_dir, tests, backbone, finetune, modules)
                        results += rows
                        print(json.dumps(rows, indent=1))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BenchStopped as e:
        print(f"\nstopped: {e}. No results.json or results.md written for this run; the rows finished before it are "
              "printed above.", file=sys.stderr)
        return 130
    report = {"config": asdict(cfg), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cpu_threads": _threads(), "results": results}
    write_json_atomic(os.path.join(cfg.output_dir, "results.json"), report)
    table = markdown_table(results)
    with open(os.path.join(cfg.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"Test split: {results[0].get('n_images', '?')} held-out images, {cfg.min_objects}-{cfg.max_objects} "
                f"objects; {cfg.finetune}; {cfg.steps} steps (max {cfg.minutes or '-'} min) per variant.\n\n{table}\n")
    plot_curves(cfg, results, os.path.join(cfg.output_dir, "learning.png"))
    plot_error_by_count(cfg, results, os.path.join(cfg.output_dir, "error_by_count.png"))
    print("\n" + table)
    print(f"\nWrote {os.path.join(cfg.output_dir, 'results.json')}, results.md, learning.png and error_by_count.png")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
