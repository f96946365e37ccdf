"""Pretrain the tiny Qwen2-VL into a stand-in for a pretrained VLM: it learns what Qwen2-VL-2B knows before any
counting training (which class is where, the class names, reading the numbered marks drawn on an image) and
nothing about counting.

    python pretrain_tiny.py --out models/tiny-pretrained                 # = make tiny-pretrained (~18-50 min, 2 cores)
    python pretrain_tiny.py --out models/tiny-pretrained-strict --strict # = make tiny-pretrained-strict
    python pretrain_tiny.py --out /tmp/pt --steps 20 --eval_images 8     # a quick look
    python pretrain_tiny.py --probe cnn --steps 1500                     # is the shape target learnable? (~11 min)

The benchmarks train a tiny Qwen2-VL; from random weights its vision tower must learn to see shapes, colours and
marks while it learns to count, which a pretrained Qwen2-VL-2B already does. This script gives the tiny model that
knowledge first, on fresh synthetic scenes (`synthetic_fsc147.synth_scene`, every class of the 8 x 8 colour x
shape grid, 0 to many objects, the benchmarks' image size, its own seed), with four objectives read from the last
hidden states (the heads are dropped afterwards; only the backbone is saved):

  class    every image token: the colour and the shape of the object that covers it, or background (two
           cross-entropies over 8 + 1: a pair is both right; unseen pairs are made of seen colours and shapes)
  marks    numbered marks drawn at random places with random numbers (1 to 60, not in any order); every image
           token: does it hold a mark's centre (binary cross-entropy), and on those, the number (cross-entropy)
  ground   the prompt names a class ("Find the red rings."), present or not: every image token scores whether it
           shows that class, from the prompt's last token (binary cross-entropy), as a pointer would
  present  is the named class in the image (binary cross-entropy on the prompt's last token)

--vision_heads W adds colour and shape heads on the vision tower's output (the merged image tokens), weight W.

Never in a target: a count or a number of objects, marks on objects in counting or reading order, done.
`tests/test_pretrain.py` checks both on generated batches.

--strict leaves out of pretraining the colour + shape pairs that `make bench-unseen` holds out for val and test
(its compositional split: every colour and every shape is still shown), for "does counting transfer to a pair the
backbone never saw named together".

--probe cnn trains, instead of the tiny Qwen2-VL, a small CNN (five stride-2 blocks down to one cell per image
token) on the same scenes and the same per-token shape targets, and prints its held-out shape accuracy: whether
the target can be learnt from the pixels at all, so a low score of the stand-in is the tiny vision tower's limit,
not the target's. It saves nothing.

Saves OUT with `save_pretrained` (loads through `from_pretrained` exactly as Qwen2-VL-2B does), tiny_config.json,
and pretrain.json: the config, the steps, the time, the training curve and the held-out scores on scenes of
another seed. Written to OUT.partial first and renamed, so a stopped run leaves no half model at OUT.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import arg, parse_config, write_json_atomic
from dataset_fsc147 import draw_marks, radius_for_size
from synthetic_fsc147 import (COLOURS, SHAPES, SynthClass, SynthConfig, class_of, confuser_classes, synth_scene,
                              synth_split_classes)

ALL_CLASSES: list[SynthClass] = [class_of(shape, colour) for colour in COLOURS for shape in SHAPES]  # 64
COLOUR_INDEX = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0: background
SHAPE_INDEX = {s: i + 1 for i, s in enumerate(SHAPES)}
CLASS_BY_NAME = {c[0]: c for c in ALL_CLASSES}
CLASS_PARTS = {name: (COLOUR_INDEX[colour], SHAPE_INDEX[shape]) for name, shape, colour in ALL_CLASSES}
MAX_MARK_LABEL = 60  # marks show numbers 1..60, drawn in no order
PROMPT = "Find the {class_name}."
EVAL_SEED_OFFSET = 100_003  # held-out scenes: another generator seed
EVAL_DENSITIES = [3, 10, 10, 20, 40]  # the held-out scenes' densities, whatever --densities trains on (comparable)
TOKEN_PX = 28  # an image token of Qwen2-VL: a 14 px patch, 2 x 2 merged
SPARSE_DENSITIES = [10]  # the benchmarks' scenes (1 to 10 objects of a class, about a token wide or more)


@dataclass
class PretrainConfig:
    out: str = arg("models/tiny-pretrained", "folder for the pretrained model (save_pretrained) and pretrain.json")
    strict: bool = arg(False, "leave out the compositional split's val and test pairs (bench-unseen's held-out classes)")
    strict_seed: int = arg(0, "with --strict: the benchmark seed whose compositional split is held out")
    strict_colours: int = arg(6, "with --strict: the compositional grid's size (bench-unseen's --num_colours)")
    seed: int = arg(1234, "pretraining's own seed (weights and scenes; no benchmark image is a pretraining image)")
    steps: int = arg(10000, "optimizer steps (10,000: 18 min on 2 fast cores, ~50 on the slowest seen; 4,000 left "
                     "shape at 0.49 and bench-distractors at 0.800 against 0.69 and 0.853, RESULTS.md 1d)")
    minutes: float = arg(90.0, "safety cap, well above the steps' time: stop after this many minutes (pretrain.json "
                         "says so; a stopped build is not the default's weights)")
    batch_size: int = arg(8, "scenes per step")
    lr: float = arg(6e-4, "AdamW learning rate, every weight (full training of the tiny backbone and the heads)")
    warmup_steps: int = arg(100, "linear warmup steps, then cosine decay to 10%")
    image_size: int = arg(224, "scene height; widths in [size, 1.25 x size] (the benchmarks' images)")
    densities: str = arg("3,10,10,20,40", "per scene, the most objects of one class is drawn from this list (then 0 to "
                         "that many; sparse scenes have larger objects, a 224 px scene of 40 has objects under a token)")
    distractors: int = arg(3, "other classes per scene: 0 to this many")
    confusers: float = arg(0.25, "share of scenes whose other classes share the named class's colour or shape, and "
                           "whose absent query looks like a present class but for one part (hard negatives; 0: any "
                           "class, the build before 2026-12-06; 0.5 at 4,000 steps lowered every held-out score; 0.25 "
                           "at 10,000 raised grounding precision on plain scenes, lowered it on confuser scenes, and "
                           "counted bench-unseen's unseen pairs at 0.67-0.83 over three seeds against 0.54-0.70 over two, "
                           "RESULTS.md 1d)")
    probe: str = arg("", "cnn: train a small CNN on the per-token shape targets instead (prints its held-out shape "
                     "accuracy, saves nothing); empty: pretrain the stand-in")
    shape_weight: float = arg(5.0, "weight of the per-token shape loss in the sum (the others weigh 1; 1 learnt no shape)")
    ground_weight: float = arg(1.0, "weight of the per-token \"shows the named class\" loss in the sum (the grounding "
                               "that counting an unseen pair leans on; 5 raised its recall and lowered its "
                               "precision, RESULTS.md 1d)")
    vision_heads: float = arg(0.0, "weight of a second pair of colour and shape losses read straight from the vision "
                              "tower's output (the merged image tokens the language model receives; the shape one "
                              "times --shape_weight): supervises the part the README's LoRA recipe freezes; 0: none "
                              "(1 did not raise shape at 1,000 steps, RESULTS.md 1d)")
    mark_fraction: float = arg(0.6, "share of scenes with random numbered marks drawn on them")
    max_marks: int = arg(12, "most marks on a scene")
    eval_images: int = arg(200, "held-out scenes scored at the end")
    log_every: int = arg(100, "print and record the training losses every N steps")
    # the tiny model (the benchmarks' defaults)
    vision_width: int = arg(128, "tiny vision encoder width (multiple of 64)")
    vision_depth: int = arg(2, "tiny vision encoder blocks")
    text_width: int = arg(128, "tiny language model width (multiple of 64)")
    text_layers: int = arg(2, "tiny language model layers")
    bpe_vocab: int = arg(400, "tiny tokenizer's BPE vocabulary")


def validate(cfg: PretrainConfig) -> list[str]:
    errors = []
    for name in ("steps", "batch_size", "eval_images", "log_every", "max_marks"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1")
    if cfg.probe not in ("", "cnn"):
        errors.append(f"--probe must be cnn or empty, got {cfg.probe!r}")
    if cfg.shape_weight <= 0:
        errors.append("--shape_weight must be > 0")
    if cfg.ground_weight <= 0:
        errors.append("--ground_weight must be > 0")
    if cfg.vision_heads < 0:
        errors.append(f"--vision_heads must be >= 0, got {cfg.vision_heads}")
    if not 0 < cfg.lr < 1 or cfg.minutes <= 0 or cfg.warmup_steps < 0:
        errors.append("--lr must be in (0, 1), --minutes > 0 and --warmup_steps >= 0")
    if not 0 <= cfg.confusers <= 1:
        errors.append(f"--confusers must be in [0, 1], got {cfg.confusers}")
    if cfg.image_size < 64 or not 0 <= cfg.mark_fraction <= 1 or cfg.distractors < 0:
        errors.append("need --image_size >= 64, --mark_fraction in [0, 1], --distractors >= 0")
    try:
        if not parse_densities(cfg.densities) or min(parse_densities(cfg.densities)) < 1:
            errors.append(f"--densities must list numbers >= 1, got {cfg.densities!r}")
    except ValueError:
        errors.append(f"--densities must be comma-separated numbers, got {cfg.densities!r}")
    if cfg.max_marks > MAX_MARK_LABEL:
        errors.append(f"--max_marks must be <= {MAX_MARK_LABEL}")
    for name in ("vision_width", "text_width"):
        if getattr(cfg, name) % 64 or getattr(cfg, name) <= 0:
            errors.append(f"--{name} must be a positive multiple of 64")
    return errors


# ----------------------------------------------------------------------------- scenes and targets


def held_out_pairs(cfg: PretrainConfig) -> list[SynthClass]:
    """The val and test classes of the compositional split a benchmark with --seed strict_seed draws."""
    n = cfg.strict_colours
    synth = SynthConfig(class_split="compositional", num_colours=n, num_shapes=n, seed=cfg.strict_seed)
    split = synth_split_classes(synth, np.random.default_rng(cfg.strict_seed))
    return split["val"] + split["test"]


def pretraining_classes(cfg: PretrainConfig) -> list[SynthClass]:
    """Every colour x shape pair, less the held-out ones with --strict."""
    held = set(held_out_pairs(cfg)) if cfg.strict else set()
    return [c for c in ALL_CLASSES if c not in held]


@dataclass
class Example:
    """One pretraining scene: the image (marks drawn), what is in it, and the class its prompt names."""

    image: object
    objects: list  # (cx, cy, radius, class name) of every object
    marks: list  # (x, y, label) of every mark drawn: random places, random numbers
    query: str  # the class the prompt names
    present: bool  # the named class is in the image
    prompt_before: bool  # the prompt before the image (else after)
    mark_radius: int = 0


def parse_densities(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def make_example(rng: np.random.Generator, cfg: PretrainConfig, classes: list[SynthClass],
                 densities: list[int] | None = None, confusers: float | None = None) -> Example:
    """A fresh scene of 0 to many objects of up to 1 + --distractors classes, maybe marked, and its query; the most
    objects of a class drawn from `densities` (default --densities); with probability `confusers` (default
    --confusers) a hard scene: the other classes share the named class's colour or shape."""
    named = classes[int(rng.integers(len(classes)))]
    most = int(rng.choice(densities or parse_densities(cfg.densities)))
    share = cfg.confusers if confusers is None else confusers
    # Drawn only when asked for, so that --confusers 0 keeps the earlier builds' scenes draw for draw.
    hard = share > 0 and bool(rng.random() < share)
    synth = SynthConfig(min_objects=0, max_objects=most, image_height=cfg.image_size, min_width=cfg.image_size,
                        max_width=round(1.25 * cfg.image_size), background=str(rng.choice(["plain", "textured"])),
                        distractors=int(rng.integers(0, cfg.distractors + 1)), distractor_objects=max(1, most // 2),
                        min_gap=float(rng.choice([1.0, 4.0])))
    scene = synth_scene(rng, synth, named, confuser_classes(named, classes) if hard else classes)
    image, marks, radius = scene.image, [], 0
    if rng.random() < cfg.mark_fraction:
        k = int(rng.integers(1, cfg.max_marks + 1))
        width, height = image.size
        xy = rng.uniform([0, 0], [width - 1, height - 1], size=(k, 2))  # anywhere: not on objects, in no order
        labels = [int(v) for v in rng.choice(np.arange(1, MAX_MARK_LABEL + 1), size=k, replace=False)]
        size = 2 * float(np.median([o[2] for o in scene.objects])) if scene.objects else rng.uniform(12, 40)
        radius = radius_for_size(size * float(rng.uniform(0.7, 1.3)))
        image = draw_marks(image, xy, labels=labels, radius=radius)
        marks = [(float(x), float(y), label) for (x, y), label in zip(xy, labels)]
    present_names = {o[3] for o in scene.objects}
    if rng.random() < 0.5 and present_names:
        query = sorted(present_names)[int(rng.integers(len(present_names)))]
    else:
        absent = [c[0] for c in classes if c[0] not in present_names]
        if hard and present_names:  # an absent class that looks like a present one but for its shape or colour
            near = {c[0] for name in present_names for c in confuser_classes(CLASS_BY_NAME[name], classes)}
            absent = [name for name in absent if name in near] or absent
        query = absent[int(rng.integers(len(absent)))]
    return Example(image, scene.objects, marks, query, query in present_names, bool(rng.random() < 0.5), radius)


def token_targets(example: Example, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Per image token (row-major on the rows x cols merged grid): the colour and shape of the object covering its
    centre (0: background), the number of the mark whose centre lies in it (0: none), and whether it shows the
    named class; and whether the named class is in the image."""
    width, height = example.image.size
    gx, gy = np.meshgrid((np.arange(cols) + 0.5) / cols * width, (np.arange(rows) + 0.5) / rows * height)
    owner = np.full((rows, cols), -1)  # the object each token shows, -1: background
    nearest = np.full((rows, cols), np.inf)
    for i, (ox, oy, r, _) in enumerate(example.objects):  # tokens whose centre an object covers
        d = np.hypot(gx - ox, gy - oy)
        inside = (d <= r) & (d < nearest)
        owner[inside], nearest[inside] = i, d[inside]
    for i, (ox, oy, _, _) in enumerate(example.objects):  # an object smaller than a token: the token holding its centre
        row, col = min(rows - 1, int(oy / height * rows)), min(cols - 1, int(ox / width * cols))
        if owner[row, col] < 0:
            owner[row, col] = i
    # Per object, then one more entry for the background (owner -1 indexes the last).
    colour = np.array([CLASS_PARTS[name][0] for *_, name in example.objects] + [0], dtype=np.int64)
    shape = np.array([CLASS_PARTS[name][1] for *_, name in example.objects] + [0], dtype=np.int64)
    named = np.array([name == example.query for *_, name in example.objects] + [False], dtype=np.float32)
    marks = np.zeros((rows, cols), dtype=np.int64)
    for x, y, label in example.marks:
        marks[min(rows - 1, int(y / height * rows)), min(cols - 1, int(x / width * cols))] = label
    flat = owner.reshape(-1)
    return {"colour": torch.from_numpy(colour[flat]), "shape": torch.from_numpy(shape[flat]),
            "mark": torch.from_numpy(marks.reshape(-1)), "ground": torch.from_numpy(named[flat]),
            "present": torch.tensor(float(example.present))}


# ----------------------------------------------------------------------------- model


class PretrainHeads(nn.Module):
    """The pretraining objectives' heads on the backbone's last hidden states (dropped after pretraining)."""

    def __init__(self, hidden: int, key_dim: int = 64, vision: bool = False):
        super().__init__()
        self.colour_head = nn.Linear(hidden, len(COLOURS) + 1)  # background + every colour
        self.shape_head = nn.Linear(hidden, len(SHAPES) + 1)  # background + every shape
        self.mark_head = nn.Linear(hidden, 1)  # a mark's centre here
        self.number_head = nn.Linear(hidden, MAX_MARK_LABEL)  # its number, 1..60
        self.query = nn.Linear(hidden, key_dim)  # the prompt's last token -> what to look for
        self.key = nn.Linear(hidden, key_dim)  # each image token -> what it shows
        self.present_head = nn.Linear(hidden, 1)
        self.scale = 1.0 / math.sqrt(key_dim)
        self.vision = vision
        if vision:  # created only when asked for, so that the default build's heads start from the same draws
            self.vision_colour_head = nn.Linear(hidden, len(COLOURS) + 1)
            self.vision_shape_head = nn.Linear(hidden, len(SHAPES) + 1)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor,
                visual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens (N, H) of one image, last (H,), visual (N, H) the vision tower's merged output for the same tokens
        (with vision heads) -> colour (N, 9), shape (N, 9), mark (N,), number (N, 60), ground (N,), present (), and
        vision_colour, vision_shape (N, 9)."""
        out = {"colour": self.colour_head(tokens), "shape": self.shape_head(tokens),
               "mark": self.mark_head(tokens)[:, 0], "number": self.number_head(tokens),
               "ground": self.key(tokens) @ self.query(last) * self.scale, "present": self.present_head(last)[0]}
        if self.vision and visual is not None:
            out |= {"vision_colour": self.vision_colour_head(visual), "vision_shape": self.vision_shape_head(visual)}
        return out


def prompt_text(processor, example: Example) -> str:
    parts = [{"type": "image"}, {"type": "text", "text": PROMPT.format(class_name=example.query)}]
    messages = [{"role": "user", "content": parts[::-1] if example.prompt_before else parts}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def forward(backbone, heads: PretrainHeads, processor, examples: list[Example]):
    """Outputs and targets per example: [(outputs, targets)]."""
    inputs = processor(text=[prompt_text(processor, e) for e in examples], images=[e.image for e in examples],
                       return_tensors="pt", padding=True)
    output = backbone.model(**inputs, use_cache=False, output_hidden_states=heads.vision)
    hidden = output.last_hidden_state  # (B, T, H)
    # The language model's input embeddings: at the image tokens, the vision tower's merged output.
    embedded = output.hidden_states[0] if heads.vision else None  # (B, T, H)
    mask = inputs["attention_mask"]  # (B, T)
    last = (mask * torch.arange(mask.shape[1])).argmax(1)  # the prompt's last token, whichever side is padded
    merge = backbone.config.vision_config.spatial_merge_size
    pairs = []
    for i, example in enumerate(examples):
        image = inputs["input_ids"][i] == backbone.config.image_token_id  # (T,)
        _, h, w = (int(v) for v in inputs["image_grid_thw"][i])
        targets = token_targets(example, h // merge, w // merge)
        visual = embedded[i, image] if embedded is not None else None  # (N_i, H)
        pairs.append((heads(hidden[i, image], hidden[i, last[i]], visual), targets))
    return pairs


def losses(pairs, shape_weight: float = 1.0, vision_weight: float = 0.0,
           ground_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Each objective's loss, averaged over the examples (the shape loss times shape_weight, the ground loss times
    ground_weight; with vision heads, their colour loss plus shape_weight times their shape loss, times
    vision_weight, as "vision")."""
    terms = {"colour": 0.0, "shape": 0.0, "mark": 0.0, "number": 0.0, "ground": 0.0, "present": 0.0}
    for out, tgt in pairs:
        if "vision_colour" in out:
            terms["vision"] = terms.get("vision", 0.0) + vision_weight * (
                F.cross_entropy(out["vision_colour"], tgt["colour"])
                + shape_weight * F.cross_entropy(out["vision_shape"], tgt["shape"]))
        terms["colour"] = terms["colour"] + F.cross_entropy(out["colour"], tgt["colour"])
        terms["shape"] = terms["shape"] + shape_weight * F.cross_entropy(out["shape"], tgt["shape"])
        marked = tgt["mark"] > 0
        # A mark's centre is in about one token of a hundred: its positives weigh as much as all the negatives.
        weight = torch.where(marked, max(1.0, float((~marked).sum()) / max(1, int(marked.sum()))), 1.0)
        terms["mark"] = terms["mark"] + F.binary_cross_entropy_with_logits(out["mark"], marked.float(), weight=weight)
        if marked.any():
            terms["number"] = terms["number"] + F.cross_entropy(out["number"][marked], tgt["mark"][marked] - 1)
        terms["ground"] = terms["ground"] + ground_weight * F.binary_cross_entropy_with_logits(out["ground"], tgt["ground"])
        terms["present"] = terms["present"] + F.binary_cross_entropy_with_logits(out["present"], tgt["present"])
    return {k: v / len(pairs) for k, v in terms.items()}


@dataclass
class Scores:
    """Held-out tallies: correct / total per measure."""

    counts: dict = field(default_factory=dict)

    def add(self, name: str, correct, total) -> None:
        c, t = self.counts.get(name, (0, 0))
        self.counts[name] = (c + int(correct), t + int(total))

    def result(self) -> dict:
        return {name: (c / t if t else None) for name, (c, t) in self.counts.items()} | {
            f"n_{name}": t for name, (_, t) in self.counts.items()}


def add_class_scores(scores: Scores, out: dict, tgt: dict, prefix: str = "") -> None:
    """Per-token shape and class (colour and shape both right) accuracy on the tokens that show an object."""
    colour, shape, obj = out["colour"].argmax(-1), out["shape"].argmax(-1), tgt["colour"] > 0
    right_shape = shape == tgt["shape"]
    scores.add(f"{prefix}token_shape_acc", right_shape[obj].sum(), obj.sum())
    scores.add(f"{prefix}token_class_acc", ((colour == tgt["colour"]) & right_shape)[obj].sum(), obj.sum())


def add_ground_scores(scores: Scores, out: dict, tgt: dict, prefix: str = "") -> None:
    """The named class's tokens found (recall, precision) and its presence answered."""
    ground, pos = out["ground"] > 0, tgt["ground"] > 0
    scores.add(f"{prefix}ground_recall", (ground & pos).sum(), pos.sum())
    scores.add(f"{prefix}ground_precision", (ground & pos).sum(), ground.sum())
    scores.add(f"{prefix}present_acc", (out["present"] > 0) == bool(tgt["present"]), 1)


def held_out_scenes(cfg: PretrainConfig, classes: list[SynthClass]) -> dict[str, list[Example]]:
    """The held-out scenes (other seeds than training's), by score prefix: "" at the default densities, "sparse_"
    with at most 10 objects of a class (the benchmarks' sizes), both without confusers whatever --confusers trains
    on (comparable across builds), and "confuser_": sparse scenes whose other classes all share the named class's
    colour or shape (bench-distractors' difficulty); --eval_images of each."""
    scenes = {}
    sets = (("", EVAL_DENSITIES, 0.0), ("sparse_", SPARSE_DENSITIES, 0.0), ("confuser_", SPARSE_DENSITIES, 1.0))
    for k, (prefix, densities, confusers) in enumerate(sets):
        rng = np.random.default_rng(cfg.seed + (k + 1) * EVAL_SEED_OFFSET)
        scenes[prefix] = [make_example(rng, cfg, classes, densities, confusers) for _ in range(cfg.eval_images)]
    return scenes


@torch.no_grad()
def evaluate(cfg: PretrainConfig, backbone, heads, processor, classes) -> dict:
    """Scores on --eval_images held-out scenes (another seed, the default densities whatever --densities trains on):
    per-token colour, shape and class (both right) accuracy on object tokens (and shape and class on as many sparse
    scenes, `sparse_`: at most 10 objects of a class, the benchmarks' sizes), background kept as background, marks
    found (recall) and seen where none is (false alarms), numbers read on mark tokens, the named class's tokens
    found, presence answered; and class, grounding and presence on sparse scenes of confusers (`confuser_`)."""
    backbone.eval()
    scores = Scores()
    scenes = held_out_scenes(cfg, classes)
    examples = scenes[""]
    for prefix in ("sparse_", "confuser_"):  # class recognition where objects are the benchmarks' size
        for start in range(0, len(scenes[prefix]), cfg.batch_size):
            for out, tgt in forward(backbone, heads, processor, scenes[prefix][start:start + cfg.batch_size]):
                add_class_scores(scores, out, tgt, prefix)
                if "vision_shape" in out:  # what the vision tower alone tells (the part LoRA leaves frozen)
                    add_class_scores(scores, {"colour": out["vision_colour"], "shape": out["vision_shape"]}, tgt,
                                     f"vision_{prefix}")
                if prefix == "confuser_":
                    add_ground_scores(scores, out, tgt, prefix)
    for start in range(0, len(examples), cfg.batch_size):
        for out, tgt in forward(backbone, heads, processor, examples[start:start + cfg.batch_size]):
            colour, shape, obj = out["colour"].argmax(-1), out["shape"].argmax(-1), tgt["colour"] > 0
            scores.add("token_colour_acc", (colour == tgt["colour"])[obj].sum(), obj.sum())
            add_class_scores(scores, out, tgt)
            scores.add("background_acc", ((colour == 0) & (shape == 0))[~obj].sum(), (~obj).sum())
            found, marked = out["mark"] > 0, tgt["mark"] > 0
            scores.add("mark_recall", (found & marked).sum(), marked.sum())
            scores.add("mark_false_alarm", (found & ~marked).sum(), (~marked).sum())
            number = out["number"].argmax(-1) + 1
            scores.add("mark_number_acc", (number[marked] == tgt["mark"][marked]).sum(), marked.sum())
            add_ground_scores(scores, out, tgt)
    backbone.train()
    result = scores.result()
    for prefix in ("", "confuser_"):
        p, r = result.get(f"{prefix}ground_precision"), result.get(f"{prefix}ground_recall")
        result[f"{prefix}ground_f1"] = 2 * p * r / (p + r) if p and r else 0.0
    return result


PROBE_CELL = 32  # px per image token for the probe (five stride-2 blocks; the targets are fractions of the image)


class ShapeProbe(nn.Module):
    """A small CNN: an image of rows x cols cells of PROBE_CELL px -> shape logits per cell (background + 8)."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 64, 96, 128, 128]
        blocks = []
        for i, o in zip(widths, widths[1:]):  # five stride-2 blocks: 32 px -> 1 cell
            blocks += [nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU(),
                       nn.Conv2d(o, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(), nn.Conv2d(128, len(SHAPES) + 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (3, rows * PROBE_CELL, cols * PROBE_CELL) -> (rows * cols, 9), row-major like the image tokens."""
        return self.net(image[None])[0].flatten(1).T


def probe_example(example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's input (the image resized to the stand-in's token grid, PROBE_CELL px a cell) and shape targets."""
    width, height = example.image.size
    rows, cols = max(1, round(height / TOKEN_PX)), max(1, round(width / TOKEN_PX))
    image = example.image.convert("RGB").resize((cols * PROBE_CELL, rows * PROBE_CELL))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return pixels, token_targets(example, rows, cols)["shape"]


def probe_cnn(cfg: PretrainConfig) -> dict:
    """Train ShapeProbe for --steps on fresh scenes; per-token shape accuracy on the held-out scenes of evaluate()."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    classes, probe = pretraining_classes(cfg), ShapeProbe()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    for _ in tqdm(range(cfg.steps), desc="probe cnn", dynamic_ncols=True):
        pairs = [probe_example(make_example(rng, cfg, classes)) for _ in range(cfg.batch_size)]
        loss = sum(F.cross_entropy(probe(x), y) for x, y in pairs) / len(pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    probe.eval()
    scores = Scores()
    with torch.no_grad():
        for prefix, examples in held_out_scenes(cfg, classes).items():  # the scenes evaluate() scores the stand-in on
            for example in examples:
                x, y = probe_example(example)
                obj = y > 0
                scores.add(f"{prefix}token_shape_acc", (probe(x).argmax(-1) == y)[obj].sum(), obj.sum())
    return {"held_out_scores": scores.result(), "train_minutes": (time.monotonic() - start) / 60}


# ----------------------------------------------------------------------------- run


def build(cfg: PretrainConfig):
    """The tiny random Qwen2-VL (the benchmarks' widths, this run's seed), its processor at the benchmarks'
    resolution, and the heads."""
    from model_loading import use_matmul_patch_embedding
    from tiny_qwen2vl import TinyConfig, build_model, build_processor, build_tokenizer

    tiny = TinyConfig(out=cfg.out, seed=cfg.seed, vision_width=cfg.vision_width, vision_depth=cfg.vision_depth,
                      text_width=cfg.text_width, text_layers=cfg.text_layers, bpe_vocab=cfg.bpe_vocab)
    side = TOKEN_PX * math.ceil(cfg.image_size / TOKEN_PX)  # bench_learning.processor_side: no image is shrunk
    tiny.min_pixels, tiny.max_pixels = side * side, 2 * side * side
    tokenizer = build_tokenizer(tiny)
    processor = build_processor(tiny, tokenizer)
    torch.manual_seed(cfg.seed)
    backbone = build_model(tiny, tokenizer).train()
    use_matmul_patch_embedding(backbone)  # as the counting scripts load it: the same function, 13% faster steps
    heads = PretrainHeads(backbone.config.text_config.hidden_size, vision=cfg.vision_heads > 0)
    return tiny, processor, backbone, heads


def lr_factor(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(cfg: PretrainConfig) -> dict:
    """Train, score the held-out scenes, save the backbone to OUT (atomically). Returns pretrain.json's content."""
    from tqdm.auto import tqdm

    tiny, processor, backbone, heads = build(cfg)
    classes = pretraining_classes(cfg)
    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    rng = np.random.default_rng(cfg.seed)
    curve, window, stopped_by = [], [], None
    start = time.monotonic()
    bar = tqdm(range(cfg.steps), desc="pretrain", dynamic_ncols=True)
    step = 0
    for step in bar:
        if time.monotonic() - start > 60 * cfg.minutes:
            stopped_by = f"--minutes {cfg.minutes} at step {step}"
            break
        examples = [make_example(rng, cfg, classes) for _ in range(cfg.batch_size)]
        terms = losses(forward(backbone, heads, processor, examples), shape_weight=cfg.shape_weight,
                       vision_weight=cfg.vision_heads, ground_weight=cfg.ground_weight)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            curve.append({"step": step + 1, **mean})
            bar.set_postfix({k: f"{v:.3f}" for k, v in mean.items()})
            window = []
    else:
        step = cfg.steps
    bar.close()
    train_s = time.monotonic() - start
    scores = evaluate(cfg, backbone, heads, processor, classes)
    report = {"config": asdict(cfg), "steps": step, "train_minutes": train_s / 60, "stopped_by": stopped_by,
              "classes": len(classes), "held_out_pairs": [c[0] for c in held_out_pairs(cfg)] if cfg.strict else [],
              "held_out_scores": scores, "curve": curve, "threads": torch.get_num_threads(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    save(cfg, tiny, processor, backbone, report)
    return report


def save(cfg: PretrainConfig, tiny, processor, backbone, report: dict) -> None:
    """OUT.partial/ (model, processor, tiny_config.json, pretrain.json), then renamed to OUT."""
    partial = cfg.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    backbone.eval().save_pretrained(partial)
    processor.save_pretrained(partial)
    write_json_atomic(os.path.join(partial, "tiny_config.json"), {**asdict(tiny), "out": cfg.out})
    write_json_atomic(os.path.join(partial, "pretrain.json"), report)
    shutil.rmtree(cfg.out, ignore_errors=True)
    os.replace(partial, cfg.out)


def print_scores(scores: dict) -> None:
    for key, value in scores.items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")


def main(argv=None) -> int:
    cfg = parse_config(PretrainConfig, argv, __doc__, validate)
    print("Config:\n" + "\n".join(f"  {k}: {v}" for k, v in asdict(cfg).items()), flush=True)
    if cfg.probe == "cnn":
        report = probe_cnn(cfg)
        print(f"\nCNN probe, {cfg.steps} steps in {report['train_minutes']:.1f} min; held-out per-token shape accuracy:")
        print_scores(report["held_out_scores"])
        return 0
    report = pretrain(cfg)
    print("\nHeld-out scenes (seed {}):".format(cfg.seed + EVAL_SEED_OFFSET))
    print_scores(report["held_out_scores"])
    print(f"\n{report['steps']} steps in {report['train_minutes']:.1f} min"
          + (f" (stopped by {report['stopped_by']})" if report["stopped_by"] else "") + f"; saved {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
