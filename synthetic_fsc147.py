"""The synthetic scene generator: classes (colour + shape), their split over train/val/test, and images
with the named objects, optional distractor objects of other classes, on plain or textured backgrounds.

It draws scenes only; `dataset_fsc147.py synth` writes them in the FSC-147 layout and
`dataset_fsc147.SyntheticTrainImages` serves fresh ones for training:

    python dataset_fsc147.py synth --out data/synth --num_images 200 --seed 0
    python dataset_fsc147.py synth --out data/mixed --distractors 2 --class_split compositional
    python dataset_fsc147.py synth --out data/dense --min_objects 10 --max_objects 60 --min_gap 1

What FSC-147 asks of a counter, and the flag that puts it into the synthetic data:
  --distractors K                each image also holds objects of 1 to K other classes (1 to
                                 --distractor_objects each, the same size as the named objects, no
                                 overlap); annotations describe only the named class, and `all_points`
                                 lists every object, so evaluation can tell "counted the class" from
                                 "counted everything".
  --class_split compositional    classes are colour + shape pairs; the val and test classes are pairs
                                 never shown in training, while every colour and every shape is.
  --class_split disjoint|shared  disjoint classes per split (as FSC-147), or every split uses them all.
  --min_objects/--max_objects, --min_gap
                                 dense scenes: fewer objects are drawn larger (photos of a few things are
                                 taken closer up), many are drawn small, down to touching (--min_gap 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from cli import arg

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "hexagon": "hexagons", "cross": "crosses", "ring": "rings"}
CLASS_SPLITS = ("disjoint", "shared", "compositional")
# The compositional grid takes the first --num_shapes / --num_colours of these: the most distinct first
# (a rotated square is close to a diamond, and a small hexagon to a circle; purple to blue).
GRID_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
GRID_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
BACKGROUND_DISTANCE = 100  # a plain background differs from every object colour in the image by this (L1)

DEFAULT_NUM_CLASSES = 12  # --num_classes 0 with --class_split disjoint or shared
SynthClass = tuple[str, str, str]  # (class name, shape, colour), e.g. ("red stars", "star", "red")


@dataclass
class SynthConfig:
    out: str = arg("data/synth", "folder to write the FSC-147 layout into")
    num_images: int = arg(200, "images over all splits (60% train, 20% val, 20% test)")
    seed: int = arg(0, "random seed: the same seed gives the same files")
    min_objects: int = arg(1, "fewest objects of the named class in an image")
    max_objects: int = arg(10, "most objects of the named class in an image")
    image_height: int = arg(384, "image height in pixels (FSC-147 stores images 384 pixels high)")
    max_height: int = arg(0, "heights are drawn uniformly in [image_height, max_height] (0: all image_height)")
    min_width: int = arg(384, "image widths are drawn uniformly in [min_width, max_width]")
    max_width: int = arg(576, "widest image")
    num_classes: int = arg(0, f"classes (colour + shape) of --class_split disjoint (split 50/25/25 over train/val/test) "
                           f"or shared (0: {DEFAULT_NUM_CLASSES}); compositional takes the whole --num_colours x "
                           "--num_colours grid, so leave it at 0 there")
    distinct_colours: bool = arg(False, "every class has a colour of its own (at most 8 classes): the colour word alone "
                                 "tells the named class from the others")
    shared_classes: bool = arg(False, "the same as --class_split shared (kept for existing scripts)")
    background: str = arg("textured", "textured (gradient, noise, stripes or speckle) or plain (one colour)")
    class_split: str = arg("disjoint", "disjoint (as FSC-147), shared (every split uses every class) or compositional")
    num_shapes: int = arg(6, "with --class_split compositional: the grid's shapes (circle, square, triangle, star, cross, ring, diamond, hexagon: the first N)")
    num_colours: int = arg(6, "with --class_split compositional: the grid's colours (red, blue, green, yellow, white, black, orange, purple: the first N)")
    distractors: int = arg(0, "each image also holds objects of 1 to K other classes (0: the named class only)")
    distractor_objects: int = arg(6, "objects per distractor class: 1 to this many")
    min_gap: float = arg(4.0, "pixels between the edges of neighbouring objects (0: they may touch)")
    size_scale: float = arg(1.0, "object radius x this (e.g. 0.6 for objects smaller than training showed)")


def validate_synth(cfg: SynthConfig) -> list[str]:
    """Every problem with a SynthConfig."""
    errors = []
    if cfg.num_images < 5:
        errors.append(f"--num_images must be >= 5 (each split needs an image), got {cfg.num_images}")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        errors.append(f"need 1 <= --min_objects <= --max_objects, got {cfg.min_objects}, {cfg.max_objects}")
    if cfg.max_objects > 400:
        errors.append("--max_objects above 400 cannot be placed without overlap")
    if cfg.image_height < 64 or not 64 <= cfg.min_width <= cfg.max_width:
        errors.append("need --image_height >= 64 and 64 <= --min_width <= --max_width")
    if cfg.max_height and cfg.max_height < cfg.image_height:
        errors.append("--max_height must be 0 or >= --image_height")
    if cfg.background not in ("textured", "plain"):
        errors.append(f"--background must be textured or plain, got {cfg.background!r}")
    if cfg.class_split not in CLASS_SPLITS:
        errors.append(f"--class_split must be one of {', '.join(CLASS_SPLITS)}, got {cfg.class_split!r}")
    elif cfg.shared_classes and cfg.class_split == "compositional":
        errors.append("--shared_classes and --class_split compositional contradict each other: pick one")
    if cfg.class_split == "compositional":
        for name, most in (("num_shapes", len(GRID_SHAPES)), ("num_colours", len(GRID_COLOURS))):
            if not 3 <= getattr(cfg, name) <= most:
                errors.append(f"--{name} must be in [3, {most}] (val and test each take one pair per colour), "
                              f"got {getattr(cfg, name)}")
        if cfg.num_shapes != cfg.num_colours:
            errors.append("--num_shapes and --num_colours must be equal: val and test each hold one pair per "
                          "colour and per shape")
        if cfg.num_classes not in (0, cfg.num_colours * cfg.num_shapes):
            errors.append(f"--num_classes {cfg.num_classes}: --class_split compositional uses every pair of its "
                          f"--num_colours x --num_shapes grid ({cfg.num_colours * cfg.num_shapes}); leave --num_classes "
                          "at 0 and set the grid's size with --num_colours and --num_shapes")
        if cfg.distinct_colours:
            errors.append("--distinct_colours cannot hold with --class_split compositional: its grid gives every "
                          "colour to several shapes (that is what it tests)")
    elif not 3 <= num_classes_of(cfg) <= (len(COLOURS) if cfg.distinct_colours else len(SHAPES) * len(COLOURS)):
        errors.append(f"--num_classes must be in [3, {len(SHAPES) * len(COLOURS)}] ([3, {len(COLOURS)}] with "
                      "--distinct_colours)")
    if cfg.distractors < 0 or cfg.distractor_objects < 1:
        errors.append("--distractors must be >= 0 and --distractor_objects >= 1")
    if cfg.min_gap < 0 or not 0.2 <= cfg.size_scale <= 3:
        errors.append("--min_gap must be >= 0 and --size_scale in [0.2, 3]")
    return errors


# ----------------------------------------------------------------------------- classes


def num_classes_of(cfg: SynthConfig) -> int:
    """The number of classes of a disjoint or shared split (--num_classes, 0 for the default)."""
    return cfg.num_classes or DEFAULT_NUM_CLASSES


def class_of(shape: str, colour: str) -> SynthClass:
    return (f"{colour} {PLURALS[shape]}", shape, colour)


def synth_classes(num_classes: int, rng: np.random.Generator, distinct_colours: bool = False) -> list[SynthClass]:
    """Distinct (class name, shape, colour) triples drawn from every colour x shape pair (with distinct_colours:
    no two share a colour)."""
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    picks = [int(i) for i in rng.permutation(len(combos))]
    if distinct_colours:
        picks = [i for n, i in enumerate(picks) if combos[i][0] not in {combos[j][0] for j in picks[:n]}]
    return [class_of(combos[i][1], combos[i][0]) for i in picks[:num_classes]]


def compositional_classes(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, list[SynthClass]]:
    """A colour x shape grid split so that val and test pairs are never shown in training.

    After shuffling both axes, val takes the diagonal (colour i, shape i) and test the next one
    (colour i, shape i + 1): each holds every colour and every shape once, and training holds the other
    n^2 - 2n pairs, so every colour and every shape appears in training n - 2 times, never in a val or
    test pair.
    """
    n = cfg.num_colours
    colours = [GRID_COLOURS[i] for i in rng.permutation(n)]
    shapes = [GRID_SHAPES[i] for i in rng.permutation(n)]
    val = [class_of(shapes[i], colours[i]) for i in range(n)]
    test = [class_of(shapes[(i + 1) % n], colours[i]) for i in range(n)]
    held = set(val) | set(test)
    train = [class_of(s, c) for c in colours for s in shapes if class_of(s, c) not in held]
    return {"train": train, "val": val, "test": test}


def synth_split_classes(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, list[SynthClass]]:
    """The classes named in each split's images."""
    if cfg.class_split == "compositional":
        return compositional_classes(cfg, rng)
    n = num_classes_of(cfg)
    classes = synth_classes(n, rng, cfg.distinct_colours)
    if cfg.shared_classes or cfg.class_split == "shared":
        return {split: classes for split in ("train", "val", "test")}
    n_train_cls = max(1, n // 2)
    n_val_cls = max(1, (n - n_train_cls) // 2)
    return {"train": classes[:n_train_cls], "val": classes[n_train_cls:n_train_cls + n_val_cls],
            "test": classes[n_train_cls + n_val_cls:]}


def confuser_classes(named: SynthClass, classes: list[SynthClass]) -> list[SynthClass]:
    """The classes other than `named` that share its colour or its shape (told apart only by the other)."""
    return [c for c in classes if c != named and (c[1] == named[1] or c[2] == named[2])]


def distractor_pools(split_classes: dict[str, list[SynthClass]]) -> dict[str, list[SynthClass]]:
    """The classes that may appear unnamed in each split's images: the training classes, plus the split's
    own (so training images never show a val or test class, and test images mix seen and unseen ones)."""
    train = split_classes["train"]
    return {split: list(dict.fromkeys(train + classes)) for split, classes in split_classes.items()}


# ----------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius r centred at (cx, cy)."""
    def ring(n, radii, offset=0.0):
        return [(cx + radii[i % len(radii)] * math.cos(angle + offset + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(angle + offset + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "star":
        return ring(10, [r, 0.45 * r], -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "cross":
        w = 0.35 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, colour, cx, cy, r, angle):
    outline = tuple(max(0, v - 90) for v in colour)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline, width=max(1, int(r / 8)))
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=colour, outline=outline)


def _textured_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A colour gradient plus low-frequency noise and stripes or speckle."""
    base = rng.integers(60, 200, size=3).astype(np.float32)
    other = rng.integers(60, 200, size=3).astype(np.float32)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    img = base * (1 - t) + other * t + np.zeros((height, 1, 1), np.float32)
    coarse = rng.normal(0, 18, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    coarse = np.kron(coarse, np.ones((32, 32, 1), np.float32))[:height, :width]
    img += coarse
    kind = rng.integers(3)
    if kind == 1:  # stripes
        period = rng.integers(8, 40)
        yy = np.arange(height)[:, None, None]
        img += 12 * np.sin(2 * np.pi * yy / period).astype(np.float32)
    elif kind == 2:  # speckle
        img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _plain_background(rng: np.random.Generator, width: int, height: int, colours) -> Image.Image:
    """One colour at least BACKGROUND_DISTANCE (sum of channel differences) from every object colour;
    the most distant of 100 draws if none is."""
    best, best_distance = None, -1
    for _ in range(100):
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        distance = min(sum(abs(a - b) for a, b in zip(fill, colour)) for colour in colours)
        if distance > best_distance:
            best, best_distance = fill, distance
        if distance >= BACKGROUND_DISTANCE:
            break
    return Image.new("RGB", (width, height), best)


@dataclass
class Scene:
    """One synthetic image and what is in it."""

    image: Image.Image
    points: list  # [[x, y], ...] centres of the named class's objects
    boxes: list  # exemplar boxes (four corners each) around the first three named objects
    all_points: list  # centres of every object, named and distractor
    distractor_classes: list  # names of the other classes in the image
    objects: list = field(default_factory=list)  # every object drawn: (cx, cy, radius, class name)


def _place(rng, width, height, radius, count, placed, gap) -> list:
    """Up to `count` new non-overlapping discs (cx, cy, r) among `placed`; an object that finds no room
    in 200 tries is left out (annotations list only what was drawn)."""
    new, taken = [], list(placed)
    for _ in range(count):
        for _attempt in range(200):
            # low + (high - low) * rng.random() is rng.uniform(low, high) draw for draw, bit for bit, at a fifth of
            # the cost: dense scenes try thousands of places, and pretraining draws a scene per example.
            r = radius * (0.85 + (1.15 - 0.85) * rng.random())
            cx = (r + 2) + ((width - r - 2) - (r + 2)) * rng.random()
            cy = (r + 2) + ((height - r - 2) - (r + 2)) * rng.random()
            for px, py, pr in taken:
                if (cx - px) ** 2 + (cy - py) ** 2 <= (r + pr + gap) ** 2:
                    break
            else:  # clear of every disc
                new.append((cx, cy, r))
                taken.append((cx, cy, r))
                break
    return new


def synth_scene(rng: np.random.Generator, cfg: SynthConfig, cls: SynthClass, pool: list[SynthClass] = ()) -> Scene:
    """One image: N objects of `cls` and, with --distractors, objects of 1..K other classes from `pool`.

    Object size follows the number of named objects, so a crowded image has small objects and a sparse one
    large; distractors are the same size. The named objects are placed first, so their count is what was
    drawn unless the image is full; a distractor that finds no room is left out (and out of all_points).
    """
    name, shape, colour = cls
    width = int(rng.integers(cfg.min_width, cfg.max_width + 1))
    height = int(rng.integers(cfg.image_height, cfg.max_height + 1)) if cfg.max_height > cfg.image_height else cfg.image_height
    others, other_counts = [], []
    if cfg.distractors:
        candidates = [c for c in pool if c != cls]
        n_classes = min(len(candidates), int(rng.integers(1, cfg.distractors + 1)))
        others = [candidates[i] for i in rng.choice(len(candidates), n_classes, replace=False)]
        other_counts = [int(v) for v in rng.integers(1, cfg.distractor_objects + 1, size=n_classes)]
    # (Draws in the order of the one-class generator when there are no distractors: same seed, same image.)
    if cfg.background == "plain":
        image = _plain_background(rng, width, height, [COLOURS[colour]] + [COLOURS[c[2]] for c in others])
    else:
        image = _textured_background(rng, width, height)
    num = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    # Fewer objects -> larger objects, as photos of a few things are taken closer up. The size follows the named
    # class's count (the one-class generator's rule, objects about a token wide at 224 px for up to 10);
    # distractors take the same size and are left out where the image has no room for them.
    area_per_object = width * height / max(num, 1)
    r_max = min(0.22 * min(width, height), 0.3 * math.sqrt(area_per_object))
    radius = cfg.size_scale * float(rng.uniform(max(6.0, 0.6 * r_max), max(7.0, r_max)))
    named = _place(rng, width, height, radius, num, [], cfg.min_gap)
    placed = list(named)
    drawn = [(o, (shape, colour)) for o in named]
    for other, count in zip(others, other_counts):
        objs = _place(rng, width, height, radius, count, placed, cfg.min_gap)
        placed += objs
        drawn += [(o, (other[1], other[2])) for o in objs]
    draw = ImageDraw.Draw(image)
    for (cx, cy, r), (s, c) in drawn:
        _draw_object(draw, s, COLOURS[c], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
    rounded = lambda objs: [[round(cx, 2), round(cy, 2)] for cx, cy, _ in objs]
    boxes = [[[cx - r, cy - r], [cx - r, cy + r], [cx + r, cy + r], [cx + r, cy - r]] for cx, cy, r in named[:3]]
    boxes = [[[round(v, 2) for v in corner] for corner in box] for box in boxes]
    objects = [(cx, cy, r, class_of(s, c)[0]) for (cx, cy, r), (s, c) in drawn]
    return Scene(image, rounded(named), boxes, rounded(placed), [c[0] for c in others], objects)
