"""FSC-147 loading, numbered marks, counting states (`prepare_batch`), and synthetic scenes written in its layout.

    python dataset_fsc147.py synth --out data/synth --num_images 200 --seed 0     # FSC-147 layout
    python dataset_fsc147.py synth --out data/synth --num_images 60 --max_objects 6 --image_height 384
    python dataset_fsc147.py check --data_root /path/FSC147                       # parse + report skips
    python dataset_fsc147.py show --data_root DIR --index 0 --k 3 --out state.png  # a marked counting state

Layout read (and written by `synth`), as published with FSC-147:
    DATA_ROOT/images_384_VarV2/<id>.jpg         images resized to height 384
    DATA_ROOT/annotation_FSC147_384.json        {"<id>.jpg": {"points": [[x, y], ...],
                                                   "box_examples_coordinates": [[[x1,y1],[x1,y2],[x2,y2],[x2,y1]], ...],
                                                   "H": ..., "W": ..., ...}}
    DATA_ROOT/Train_Test_Val_FSC_147.json       {"train": [...], "val": [...], "test": [...]}
    DATA_ROOT/ImageClasses_FSC147.txt           "<id>.jpg<TAB><class name>" per line

Coordinates: points are pixels of the image as stored. The model sees normalised coordinates
x_n = 2 * x / W - 1, y_n = 2 * y / H - 1 (W, H: the image's width and height). The Qwen2-VL processor
resizes the whole image (no crop, no pad), so these normalised values are the same in the resized
image the model is fed: normalising against the stored image is normalising against the fed image.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cli import UsageError, config_from_dict, parse_config
from synthetic_fsc147 import (SynthConfig, confuser_classes, distractor_pools, synth_scene, synth_split_classes,
                              validate_synth)

logger = logging.getLogger(__name__)

IMAGE_DIR = "images_384_VarV2"
ANNOTATION_FILE = "annotation_FSC147_384.json"
SPLIT_FILE = "Train_Test_Val_FSC_147.json"
CLASS_FILE = "ImageClasses_FSC147.txt"
LAYOUT = f"""expected FSC-147 layout:
  DATA_ROOT/{IMAGE_DIR}/<id>.jpg
  DATA_ROOT/{ANNOTATION_FILE}
  DATA_ROOT/{SPLIT_FILE}
  DATA_ROOT/{CLASS_FILE}
(make a small one with: python dataset_fsc147.py synth --out DIR)"""

TARGET_STRATEGIES = ("reading_order", "nearest")
MIN_IMAGE_SIDE = 8  # smaller images carry no countable objects
MAX_ASPECT_RATIO = 200  # Qwen2-VL's processor rejects images more elongated than this


# ----------------------------------------------------------------------------- coordinates


def normalize_points(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel (x, y) -> [-1, 1] relative to the image. points: (N, 2)."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    scale = np.array([width, height], dtype=np.float32)
    return points / scale * 2.0 - 1.0


def denormalize_points(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """[-1, 1] -> pixel (x, y) of an image of the given size. points: (N, 2)."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    scale = np.array([width, height], dtype=np.float32)
    return (points + 1.0) / 2.0 * scale


def clip_points(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """A copy of pixel points (N, 2) clipped to the image: x in [0, W - 1], y in [0, H - 1]."""
    points = np.array(points, dtype=np.float32).reshape(-1, 2)
    points[:, 0] = points[:, 0].clip(0, width - 1)
    points[:, 1] = points[:, 1].clip(0, height - 1)
    return points


# ----------------------------------------------------------------------------- dataset


def spread_over_classes(class_names: list[str], n: int, seed: int = 0) -> list[int]:
    """Indices (ascending) of a fixed sample of n items spread over the classes.

    FSC-147 lists each split in runs of one class, so "the first n" covers a handful of classes (the
    first 16 val images: 3 of 29). Here classes take turns (in name order), each giving its next image
    in a seeded shuffled order, until n are taken: every class appears once n >= the number of classes,
    and the same (names, n, seed) always gives the same indices.
    """
    if n <= 0 or n >= len(class_names):
        return list(range(len(class_names)))
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        by_class.setdefault(name, []).append(i)
    queues = [list(rng.permutation(by_class[name])) for name in sorted(by_class)]
    picked = []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return sorted(picked)


@dataclass
class Sample:
    """One FSC-147 image with its annotation."""

    id: str  # file name, e.g. "2.jpg"
    image: Image.Image  # RGB
    points: np.ndarray  # (N, 2) float32 pixels, clipped to the image
    boxes: np.ndarray  # (M, 4) float32 exemplar boxes x1, y1, x2, y2 in pixels
    class_name: str
    all_points: np.ndarray | None = None  # (A, 2) every object of every class, when the annotation has them
    other_classes: tuple = ()  # other classes known to be in the image (synthetic distractors)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def read_class_file(path: str) -> dict[str, str]:
    """`<id>.jpg<TAB><class name>` per line -> {id: class name}. Tolerates CRLF and blank lines."""
    classes = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise UsageError(f"{path}:{lineno}: expected '<id>.jpg<TAB><class name>', got {line!r}")
            classes[parts[0].strip()] = parts[1].strip()
    return classes


def load_rgb(path: str, exif_orientation: bool = False) -> Image.Image:
    """Open an image fully and convert it to RGB (grayscale, palette, RGBA, CMYK, 16-bit). exif_orientation: turn
    it as its EXIF orientation tag says, as a photo viewer does (a phone photo; dataset annotations are in the
    stored pixels, so datasets read it as stored)."""
    from PIL import ImageOps

    with Image.open(path) as raw:
        raw.load()
        im = ImageOps.exif_transpose(raw) if exif_orientation else raw
        if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGB", im.size, (255, 255, 255))
            background.paste(im, mask=im.getchannel("A"))
            return background
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
            return Image.fromarray(arr).convert("RGB")
        return im.convert("RGB")


class FSC147Dataset(torch.utils.data.Dataset):
    """The images of one split of FSC-147 (or of a synthetic dataset in its layout).

    `max_images` > 0 keeps a fixed sample of that many, spread over the classes (`spread_over_classes`).
    Entries that cannot be used are skipped with a warning and counted in `self.skipped`
    ({reason: [ids]}): listed in the split but missing from the annotation file, no points, image
    file missing. Images that fail to decode are found when loaded: `__getitem__` returns None for
    them and counts them, and `collate_samples` drops the None.
    """

    def __init__(self, root: str, split: str = "train", max_images: int = 0, subset_seed: int = 0):
        self.root = root
        self.split = split
        missing = [p for p in (IMAGE_DIR, ANNOTATION_FILE, SPLIT_FILE, CLASS_FILE)
                   if not os.path.exists(os.path.join(root, p))]
        if not os.path.isdir(root):
            raise UsageError(f"data root {root!r} does not exist; {LAYOUT}")
        if missing:
            paths = ", ".join(os.path.join(root, p) for p in missing)
            raise UsageError(f"missing in data root: {paths}; {LAYOUT}")
        annotations = _read_json(os.path.join(root, ANNOTATION_FILE))
        splits = _read_json(os.path.join(root, SPLIT_FILE))
        classes = read_class_file(os.path.join(root, CLASS_FILE))
        if split not in splits:
            raise UsageError(f"{os.path.join(root, SPLIT_FILE)}: no split {split!r} (has {sorted(splits)})")

        self.num_listed = len(splits[split])  # images the split file lists, usable or not
        self.skipped: dict[str, list[str]] = {}
        self.load_failures: dict[str, str] = {}  # id -> reason, for images that failed when loaded here
        self.entries: list[dict] = []
        for image_id in splits[split]:
            reason = self._check_entry(image_id, annotations, classes)
            if reason:
                self.skipped.setdefault(reason, []).append(image_id)
                continue
            self.entries.append({"id": image_id, "class_name": classes[image_id], **annotations[image_id]})
        if self.skipped:
            summary = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in self.skipped.items())
            logger.warning("%s split %r: skipped %d entries: %s", root, split, self.num_skipped, summary)
        if not self.entries:
            raise UsageError(f"{root}: split {split!r} has no usable images "
                             f"({len(splits[split])} listed, {self.num_skipped} skipped)")
        if max_images:  # a fixed sample spread over the classes, not the first N (one or two classes)
            self.entries = [self.entries[i] for i in self.subset_indices(max_images, subset_seed)]

    def subset_indices(self, n: int, seed: int = 0) -> list[int]:
        """Indices of n images spread over the split's classes, the same for the same (n, seed)."""
        return spread_over_classes([e["class_name"] for e in self.entries], n, seed)

    def _check_entry(self, image_id: str, annotations: dict, classes: dict) -> str | None:
        """Why an entry of the split cannot be used, or None when it can."""
        if image_id not in annotations:
            return "not in annotation file"
        if image_id not in classes:
            return "not in class file"
        points = annotations[image_id].get("points")
        if not isinstance(points, list) or len(points) == 0:
            return "no points"
        if not os.path.isfile(os.path.join(self.root, IMAGE_DIR, image_id)):
            return "image file missing"
        return None

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def class_names(self) -> list[str]:
        """The split's class names, sorted."""
        return sorted({e["class_name"] for e in self.entries})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample | None:
        entry = self.entries[index]
        path = os.path.join(self.root, IMAGE_DIR, entry["id"])
        try:
            points = np.asarray(entry["points"], dtype=np.float32).reshape(-1, 2)
        except (ValueError, TypeError) as e:
            return self._fail(entry["id"], f"points are not numbers ({e})")
        try:
            image = load_rgb(path)
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
            return self._fail(entry["id"], f"unreadable image ({type(e).__name__}: {e})")
        width, height = image.size
        if min(width, height) < MIN_IMAGE_SIDE:
            return self._fail(entry["id"], f"image too small ({width}x{height})")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return self._fail(entry["id"], f"aspect ratio above {MAX_ASPECT_RATIO} ({width}x{height})")
        points = points[np.isfinite(points).all(axis=1)]
        if len(points) == 0:
            return self._fail(entry["id"], "no finite points")
        return Sample(entry["id"], image, clip_points(points, width, height),
                      _parse_boxes(entry.get("box_examples_coordinates")), entry["class_name"],
                      _parse_all_points(entry.get("all_points"), width, height),
                      tuple(entry.get("distractor_classes") or ()))

    def _fail(self, image_id: str, reason: str) -> None:
        """Log and remember why an image could not be used; callers count the None they get."""
        logger.warning("skipping %s: %s", os.path.join(self.root, IMAGE_DIR, image_id), reason)
        self.load_failures[image_id] = reason
        return None


def _parse_boxes(raw) -> np.ndarray:
    """FSC-147 exemplar boxes (4 corners each) -> (M, 4) x1, y1, x2, y2."""
    boxes = []
    for corners in raw or []:
        try:
            c = np.asarray(corners, dtype=np.float32).reshape(-1, 2)
        except (ValueError, TypeError):
            continue
        if len(c) >= 2 and np.isfinite(c).all():
            boxes.append([c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _parse_all_points(raw, width: int, height: int) -> np.ndarray | None:
    """The optional `all_points` field (every object, named or not; synthetic data writes it) -> (A, 2)."""
    if raw is None:
        return None
    try:
        points = np.asarray(raw, dtype=np.float32).reshape(-1, 2)
    except (ValueError, TypeError):
        return None
    return clip_points(points[np.isfinite(points).all(axis=1)], width, height)


def collate_samples(batch: list[Sample | None]) -> list[Sample]:
    """DataLoader collate: keep samples as a list, drop the ones that failed to load."""
    return [s for s in batch if s is not None]


# ----------------------------------------------------------------------------- marks


def _font(size: int):
    """A scalable font when Pillow has FreeType, else the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


MARK_TO_OBJECT = 0.35  # mark radius / typical object size: covers an object's middle, not its neighbours
MIN_MARK_RADIUS = 2
MIN_LABELLED_RADIUS = 5  # smaller marks are plain discs: a legible number would be larger than the object


def object_size(boxes: np.ndarray | None, width: int, height: int) -> float:
    """Typical object size in pixels: the mean (w + h) / 2 of the exemplar boxes, or 1/20 of the shorter
    image side when there are none."""
    if boxes is not None and len(boxes):
        return float(np.mean((boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2))
    return min(width, height) / 20


def mark_radius(width: int, height: int, boxes: np.ndarray | None = None) -> int:
    """Mark radius in pixels, the one rule for training, counting and evaluation.

    With exemplar boxes: 0.35 of the typical object size (`radius_for_size`), so a mark covers the middle
    of its object and leaves its neighbours visible, whether objects are 5 or 200 pixels wide (FSC-147
    has both). Without boxes: 1/40 of the shorter image side.
    """
    if boxes is not None and len(boxes):
        return radius_for_size(object_size(boxes, width, height))
    return max(4, round(min(width, height) / 40))


def radius_for_size(size: float) -> int:
    """Mark radius for objects of typical size `size` pixels (from exemplar boxes, or the model's own
    estimate under the text-only protocol)."""
    return max(MIN_MARK_RADIUS, round(MARK_TO_OBJECT * size))


@functools.lru_cache(maxsize=4096)
def _mark_stamp(label: str, r: int) -> tuple[Image.Image, int]:
    """One numbered mark as an RGBA image and its centre offset; drawn once per (label, radius), then pasted.

    Rendering the number (twice, for its stroke) costs most of a mark; training draws the same few
    labels at the same few radii millions of times.
    """
    font = _font(max(8, round(1.3 * r)))
    stroke = max(1, r // 5)
    label = label if r >= MIN_LABELLED_RADIUS else ""
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), label, font=font, anchor="mm", stroke_width=stroke)
    c = int(math.ceil(max(r + stroke, -left, right, -top, bottom))) + 1  # half size: disc and text fit
    stamp = Image.new("RGBA", (2 * c + 1, 2 * c + 1), (0, 0, 0, 0))
    draw = ImageDraw.Draw(stamp)
    draw.ellipse([c - r - stroke, c - r - stroke, c + r + stroke, c + r + stroke], fill=(0, 0, 0, 255))
    draw.ellipse([c - r, c - r, c + r, c + r], fill=(220, 30, 30, 255), outline=(255, 255, 255, 255), width=stroke)
    if label:
        draw.text((c, c), label, fill=(255, 255, 255, 255), font=font, anchor="mm", stroke_width=stroke,
                  stroke_fill=(0, 0, 0, 255))
    return stamp, c


def draw_marks(image: Image.Image, points, labels=None, radius: int | None = None) -> Image.Image:
    """Return a copy of `image` with a numbered mark (1, 2, ...) at each counted point.

    A filled red disc with a white-then-black outline, and a white number with a black stroke: one
    of the two outlines contrasts with any background. `radius`: from `mark_radius` (default: its
    rule without exemplar boxes); marks smaller than 5 px carry no number.
    Deterministic: the same inputs give the same pixels (marks sit on the nearest whole pixel).
    """
    out = image.convert("RGB")  # convert() copies, so the caller's image is untouched
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(points) == 0:
        return out
    labels = labels if labels is not None else range(1, len(points) + 1)
    r = radius or mark_radius(*out.size)
    for (x, y), label in zip(points, labels):
        stamp, c = _mark_stamp(str(label), r)
        out.paste(stamp, (int(round(float(x))) - c, int(round(float(y))) - c), stamp)
    return out


# ----------------------------------------------------------------------------- counting states


def reading_order(points: np.ndarray, boxes: np.ndarray | None = None, height: int = 384) -> np.ndarray:
    """Indices of points in reading order: rows top to bottom, left to right within a row.

    Rows are grouped by gaps: sorted by y, a new row starts where the next point lies more than half an
    object height (the mean exemplar box height, or height / 12 without boxes) below the previous one.
    So objects side by side are read left to right even when their y differ by a few pixels, and the
    order does not depend on where the image's origin falls (fixed bands would split a row that
    straddles a band boundary).
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    band = float(np.mean(boxes[:, 3] - boxes[:, 1])) if boxes is not None and len(boxes) else height / 12
    by_y = np.argsort(points[:, 1], kind="stable")
    new_row = np.diff(points[by_y, 1]) > max(band, 1.0) / 2
    rows = np.empty(len(points), dtype=np.int64)
    rows[by_y] = np.concatenate([[0], np.cumsum(new_row)])
    return np.lexsort((points[:, 0], rows))


@dataclass
class CountingBatch:
    """Counting states built from images: marked images, prompts' class names and targets."""

    mode: str  # "cls" (done vs not done) or "reg" (x, y of a next object)
    ids: list[str]
    images: list[Image.Image]  # with the counted objects marked 1..k
    class_names: list[str]
    counted: list[np.ndarray]  # per state (k, 2) normalised points where the marks are, in counting order
    num_objects: list[int]  # N per image
    remaining: list[np.ndarray]  # per state (N - k, 2) normalised points of the uncounted objects
    done: torch.Tensor  # (B,) 1.0 when k == N
    targets: torch.Tensor  # (B, M, 2) normalised candidate next objects (padded)
    target_mask: torch.Tensor  # (B, M) True where targets holds a candidate
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image
    mark_radii: list[int] = field(default_factory=list)  # mark radius in pixels per image
    object_sizes: list[float] = field(default_factory=list)  # typical object size in pixels (`object_size`)
    others: list[np.ndarray] = field(default_factory=list)  # per state (D, 2) normalised points of objects the
    # prompt does not name (distractors; every object for a negative prompt); empty without `all_points`

    def __len__(self) -> int:
        return len(self.ids)


def unnamed_points(points: np.ndarray, all_points: np.ndarray) -> np.ndarray:
    """(D, 2) the objects of `all_points` (every object, the named ones too) that are not at the place of one of
    the named class's `points`: the other classes' objects."""
    every, named = np.asarray(all_points).reshape(-1, 2), np.asarray(points).reshape(-1, 2)
    if len(every) == 0 or len(named) == 0:
        return every
    return every[np.linalg.norm(every[:, None] - named[None], axis=-1).min(axis=1) > 1e-3]


def other_points(sample: Sample, named: bool = True) -> np.ndarray:
    """(D, 2) pixel points of the objects in `sample` the prompt does not name: the other classes' objects
    (`unnamed_points`), or, when the prompt names an absent class (named=False), every object. Empty when the
    annotation lists no other objects."""
    if not named:
        return sample.points if sample.all_points is None else sample.all_points
    if sample.all_points is None:
        return np.zeros((0, 2), np.float32)
    return unnamed_points(sample.points, sample.all_points)


def jitter_points(points: np.ndarray, scale: float, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Points moved uniformly within a disc of radius `scale` pixels, clipped to the image: where the
    counting loop's marks land when its points are off by up to `scale`."""
    if scale <= 0 or len(points) == 0:
        return points
    r = scale * np.sqrt(rng.random(len(points)))
    angle = rng.uniform(0, 2 * np.pi, len(points))
    moved = points + np.stack([r * np.cos(angle), r * np.sin(angle)], 1).astype(np.float32)
    return clip_points(moved, width, height)


def prepare_batch(samples: list[Sample], mode: str, rng: np.random.Generator,
                  strategy: str = "reading_order", offset: int = 0, global_size: int | None = None,
                  near_done: float = 0.0, jitter: float = 0.0, size_jitter: float = 0.0, negatives: float = 0.0,
                  class_pool=(), skip: float = 0.0) -> CountingBatch:
    """Build one counting state per image: N objects, k of them counted and marked 1..k.

    With several processes, `samples` is this process's slice of a global batch of `global_size`
    images, starting at `offset`; every process passes the same `rng` state, so the states are exactly
    those one process would build for the whole global batch.

    mode "cls": half the states are done (k = N) and half not (0 <= k < N, uniform); an odd batch
      gives the extra state to either side at random, so the split is 50/50 over steps. With
      `near_done` > 0, that fraction of the not-done states has k = N - 1 (one object left: the
      state the counting loop must not stop at, and the rarest under uniform k).
    mode "reg": only not-done states; the target is the next object, by `strategy`:
      - "reading_order" (default): objects are counted in reading order (`reading_order`); the
        marks are the first k and the single target is object k + 1. One right answer per state.
      - "nearest": the counted objects are a random subset of k, marked 1..k in random order; every
        uncounted object is a target and the loss is the distance to the nearest one (min over
        targets), so the model is never pulled to a point between two valid objects.
    `jitter` > 0: each mark (and counted point) lands up to jitter x the object size (`object_size`)
    from its object, as marks drawn at the counting loop's imperfect points do.
    `size_jitter` > 0: each state's marks are drawn with the radius times a factor in [1 - j, 1 + j], as the
    text-only protocol's own size estimate errs.
    `negatives` > 0: that fraction of the done cls states instead name a class from `class_pool` that is not
    in the image (not the named class, not a known distractor): nothing to count, done at k = 0. (In FSC-147
    another class may be in the image unannotated; the pool's classes are rarely all present.)
    `skip` > 0 (reading order): that fraction of the not-done states of either mode (of 2 or more objects) are
    states with misses: the counting reached object k (2..N, uniform) and counted it but left 1 to 3 of the first
    k - 1 unmarked, as the counting loop's skipped objects stay unmarked behind it. Not done, even at k = N; the
    next object is the first unmarked one in reading order (a skipped one). Without these, a done state is the only
    one whose marks reach the last object, and done can read "the marks reached the end" instead of "no unmarked
    object is left".
    """
    if mode not in ("cls", "reg"):
        raise ValueError(f"mode must be 'cls' or 'reg', got {mode!r}")
    if strategy not in TARGET_STRATEGIES:
        raise ValueError(f"strategy must be one of {TARGET_STRATEGIES}, got {strategy!r}")
    n = len(samples)
    total = global_size or n
    if offset < 0 or offset + n > total:
        raise ValueError(f"samples [{offset}, {offset + n}) do not fit in a global batch of {total}")
    if mode == "cls":
        done_flags = np.array([True] * (total // 2) + [False] * (total // 2) + ([bool(rng.integers(2))] if total % 2 else []))
        rng.shuffle(done_flags)
    else:
        done_flags = np.zeros(total, dtype=bool)
    # One generator per position in the global batch: a state does not depend on which process builds it.
    seeds = rng.integers(2**63, size=total)
    done_flags, seeds = done_flags[offset:offset + n], seeds[offset:offset + n]

    images, counted, candidates, remaining, radii, object_sizes, others = [], [], [], [], [], [], []
    names = []
    for sample, done, seed in zip(samples, done_flags, seeds):
        width, height = sample.image.size
        num = len(sample.points)
        sample_rng = np.random.default_rng(seed)
        names.append(sample.class_name)
        if done and negatives > 0:
            absent = [c for c in class_pool if c != sample.class_name and c not in sample.other_classes]
            if absent and sample_rng.random() < negatives:
                names[-1] = absent[int(sample_rng.integers(len(absent)))]
                num = 0  # of the class the prompt names
        missed = np.zeros(0, dtype=np.int64)  # positions in reading order left unmarked behind the last counted one
        if done:
            k = num
        elif skip > 0 and strategy == "reading_order" and num >= 2 and sample_rng.random() < skip:
            k = int(sample_rng.integers(2, num + 1))  # objects 1..k were passed, the k-th counted
            missed = np.sort(sample_rng.choice(k - 1, size=int(sample_rng.integers(1, min(3, k - 1) + 1)),
                                               replace=False))
        elif mode == "cls" and sample_rng.random() < near_done:
            k = num - 1
        else:
            k = int(sample_rng.integers(0, num))
        if num == 0:  # a negative prompt: nothing of the named class to count or to point at
            order = next_idx = np.zeros(0, dtype=np.int64)
        elif strategy == "reading_order":
            order = reading_order(sample.points, sample.boxes, height)
            if len(missed):  # the skipped objects move behind the counted ones, so order[:k] stays "what is marked"
                order = np.concatenate([np.delete(order[:k], missed), order[:k][missed], order[k:]])
                k -= len(missed)
            next_idx = order[k:k + 1]
        else:
            order = sample_rng.permutation(num)
            next_idx = order[k:]
        counted_px = sample.points[order[:k]]
        if jitter > 0:
            counted_px = jitter_points(counted_px, jitter * object_size(sample.boxes, width, height), sample_rng,
                                       width, height)
        radius = mark_radius(width, height, sample.boxes)
        if size_jitter > 0:
            radius = max(MIN_MARK_RADIUS, round(radius * sample_rng.uniform(1 - size_jitter, 1 + size_jitter)))
        radii.append(radius)
        object_sizes.append(object_size(sample.boxes, width, height) if num else float("nan"))
        images.append(draw_marks(sample.image, counted_px, radius=radii[-1]))
        counted.append(normalize_points(counted_px, width, height))
        candidates.append(normalize_points(sample.points[next_idx], width, height))
        remaining.append(normalize_points(sample.points[order[k:]], width, height))
        others.append(normalize_points(other_points(sample, named=num > 0), width, height))

    m = max(1, max(len(c) for c in candidates))
    targets = torch.zeros(n, m, 2)
    mask = torch.zeros(n, m, dtype=torch.bool)
    for i, cand in enumerate(candidates):
        targets[i, :len(cand)] = torch.from_numpy(cand)
        mask[i, :len(cand)] = True
    return CountingBatch(
        mode=mode, ids=[s.id for s in samples], images=images, class_names=names,
        counted=counted, num_objects=[len(s.points) if n == s.class_name else 0 for s, n in zip(samples, names)],
        remaining=remaining,
        done=torch.from_numpy(done_flags.astype(np.float32)), targets=targets, target_mask=mask,
        sizes=[s.image.size for s in samples], mark_radii=radii, object_sizes=object_sizes, others=others,
    )


# ----------------------------------------------------------------------------- synthetic FSC-147

SYNTH_CONFIG_FILE = "synth_config.json"  # written beside a synthetic dataset: how to make more of its images


def write_synthetic_fsc147(cfg: SynthConfig) -> dict:
    """Write synthetic scenes (`synthetic_fsc147.synth_scene`) in the FSC-147 layout: images, annotations,
    splits, class file, and the generator's settings (synth_config.json, for `SyntheticTrainImages`).

    With --distractors, each annotation also has `all_points` (every object of every class) and
    `distractor_classes`; `points`, the exemplar boxes and the class file describe the named class only.
    """
    rng = np.random.default_rng(cfg.seed)
    split_classes = synth_split_classes(cfg, rng)
    pools = distractor_pools(split_classes)
    n_train = round(cfg.num_images * 0.6)
    n_val = round(cfg.num_images * 0.2)
    counts = {"train": n_train, "val": n_val, "test": cfg.num_images - n_train - n_val}
    os.makedirs(os.path.join(cfg.out, IMAGE_DIR), exist_ok=True)
    annotations, splits, class_lines = {}, {"train": [], "val": [], "test": [], "val_coco": [], "test_coco": []}, []
    next_id = 2  # FSC-147 ids start at 2.jpg
    for split in ("train", "val", "test"):
        for i in range(counts[split]):
            cls = split_classes[split][i % len(split_classes[split])]
            scene = synth_scene(rng, cfg, cls, pools[split])
            image_id = f"{next_id}.jpg"
            next_id += 1
            scene.image.save(os.path.join(cfg.out, IMAGE_DIR, image_id), quality=95)
            annotations[image_id] = {
                "H": scene.image.height, "W": scene.image.width, "ratio_h": 1.0, "ratio_w": 1.0,
                "box_examples_coordinates": scene.boxes, "box_examples_path": [],
                "density_path": f"gt_density_map_adaptive_384_VarV2/{image_id[:-4]}.npy",
                "img_path": f"{IMAGE_DIR}/{image_id}", "points": scene.points,
            }
            if cfg.distractors:
                annotations[image_id].update(all_points=scene.all_points, distractor_classes=scene.distractor_classes)
            splits[split].append(image_id)
            class_lines.append(f"{image_id}\t{cls[0]}\n")
    with open(os.path.join(cfg.out, ANNOTATION_FILE), "w", encoding="utf-8") as f:
        json.dump(annotations, f)
    with open(os.path.join(cfg.out, SPLIT_FILE), "w", encoding="utf-8") as f:
        json.dump(splits, f, indent=1)
    with open(os.path.join(cfg.out, CLASS_FILE), "w", encoding="utf-8") as f:
        f.writelines(class_lines)
    with open(os.path.join(cfg.out, SYNTH_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=2)
    return {s: {"images": len(splits[s]), "classes": [c[0] for c in split_classes[s]]} for s in ("train", "val", "test")}


class SyntheticTrainImages(torch.utils.data.Dataset):
    """Fresh training images from the generator that wrote a synthetic dataset: image i is made from
    seed (seed, i), so every index is a new image (nothing to memorise) and the same index is always
    the same image (resume and several processes work as with files).

    Same classes, distractors, sizes and object counts as the dataset's train split; JPEG-compressed in
    memory as the written files are. With `confusers` > 0, that share of the images (hard negatives) take their
    distractor classes only from those sharing the named class's colour or shape, where it has any.
    """

    def __init__(self, root: str, length: int = 10**6, confusers: float = 0.0):
        path = os.path.join(root, SYNTH_CONFIG_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"{path} is missing: training on fresh synthetic images needs a data root written "
                             "by `python dataset_fsc147.py synth`")
        self.cfg = config_from_dict(SynthConfig, _read_json(path))
        self.classes = synth_split_classes(self.cfg, np.random.default_rng(self.cfg.seed))["train"]
        self.pool = distractor_pools({"train": self.classes})["train"]
        self.class_names = sorted(c[0] for c in self.classes)
        self.length = length
        self.confusers = confusers
        self.hard_pools = {c: confuser_classes(c, self.pool) for c in self.classes}  # per named class, once
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.cfg.seed, 7919, index])
        cls = self.classes[index % len(self.classes)]
        pool = self.pool
        # Drawn only when asked for, so that confusers=0 gives the same images draw for draw.
        if self.confusers > 0 and rng.random() < self.confusers and self.hard_pools[cls]:
            pool = [cls] + self.hard_pools[cls]
        return synth_sample(rng, self.cfg, cls, f"synth-{index}", pool)


def synth_sample(rng: np.random.Generator, cfg: SynthConfig, cls: tuple[str, str, str], image_id: str,
                 pool=()) -> Sample:
    """One synthetic scene as a Sample, JPEG-compressed in memory as `write_synthetic_fsc147` stores it."""
    import io

    scene = synth_scene(rng, cfg, cls, pool)
    buf = io.BytesIO()
    scene.image.save(buf, format="JPEG", quality=95)
    image = Image.open(buf).convert("RGB")
    all_points = np.asarray(scene.all_points, dtype=np.float32).reshape(-1, 2) if cfg.distractors else None
    return Sample(image_id, image, np.asarray(scene.points, dtype=np.float32).reshape(-1, 2),
                  _parse_boxes(scene.boxes), cls[0], all_points, tuple(scene.distractor_classes))


def show_state(root: str, split: str, index: int, k: int, out: str) -> int:
    """Write one counting state: the image with its first k objects (reading order) marked."""
    ds = FSC147Dataset(root, split)
    if not 0 <= index < len(ds):
        raise UsageError(f"--index must be in [0, {len(ds) - 1}] for split {split!r}, got {index}")
    sample = ds[index]
    if sample is None:
        raise UsageError(f"image {ds.entries[index]['id']} of split {split!r} could not be read")
    order = reading_order(sample.points, sample.boxes, sample.image.height)
    k = len(order) if k < 0 else min(k, len(order))
    draw_marks(sample.image, sample.points[order[:k]], radius=mark_radius(*sample.image.size, sample.boxes)).save(out)
    print(f"{out}: {sample.id} ({sample.class_name}), {k} of {len(order)} objects marked")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("synth", help="write a synthetic dataset in the FSC-147 layout", add_help=False)
    check = sub.add_parser("check", help="parse a dataset and report usable and skipped images")
    check.add_argument("--data_root", required=True, help="FSC-147 root folder")
    show = sub.add_parser("show", help="write the image of one counting state (first k objects marked) as PNG")
    show.add_argument("--data_root", required=True, help="FSC-147 root folder")
    show.add_argument("--split", default="train", help="split to take the image from (default: train)")
    show.add_argument("--index", type=int, default=0, help="image index within the split (default: 0)")
    show.add_argument("--k", type=int, default=-1, help="objects to mark, in reading order (default: all)")
    show.add_argument("--out", required=True, help="PNG file to write")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "synth":
        cfg = parse_config(SynthConfig, rest, "Write a synthetic dataset in the FSC-147 layout.", validate_synth,
                           prog="dataset_fsc147.py synth")
        summary = write_synthetic_fsc147(cfg)
        print(f"Wrote synthetic FSC-147 to {cfg.out}")
        for split, info in summary.items():
            print(f"  {split:5s}: {info['images']:4d} images, classes: {', '.join(info['classes'])}")
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "show":
            return show_state(args.data_root, args.split, args.index, args.k, args.out)
        for split in ("train", "val", "test"):
            ds = FSC147Dataset(args.data_root, split)
            counts = [len(e["points"]) for e in ds.entries]
            print(f"{split:5s}: {len(ds):5d} images, {ds.num_skipped} skipped, {len({e['class_name'] for e in ds.entries})}"
                  f" classes, objects per image {min(counts)}..{max(counts)} (mean {np.mean(counts):.1f})")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
