"""Count the objects of a class in an image by pointing at them one at a time.

    python count_objects.py --checkpoint runs/demo/checkpoint-last --image photo.jpg --class_name "oranges"
    python count_objects.py --checkpoint RUN/checkpoint-best --image shells.jpg --class_name "sea shells" \
        --protocol exemplar --exemplar_boxes "10,12,40,38;200,50,228,80" --out_dir counted/ --max_count 4000

The counting loop: start with no marks; at each step draw the marks for the points found so far, run
the model, stop if sigmoid(done) > --done_threshold, else add the predicted (x, y) and go on; stop at
--max_count. Marks are sized as in training, 0.35 of the typical object size, which comes from:
  --protocol text      (default) the model's own estimate of the named objects' size, read at the first
                       step (no marks yet): nothing but the image and the class name is given, as in the
                       text-prompt counting literature.
  --protocol exemplar  boxes around a few of the objects (--exemplar_boxes, as FSC-147 gives three per
                       image), or a radius in pixels (--mark_radius).
Dense images (objects much smaller than an image token): --tiles N counts on N x N overlapping crops, each
resized to the whole image's pixel count, and merges their points (tiles.py); --tiles auto chooses N per image
from the model's own size estimate at a first forward, against the objects' width it trained on (its checkpoint's
object_tokens). The default, --tiles checkpoint, is auto for a token-pointing checkpoint, 1 for regression.
    python count_objects.py --checkpoint RUN/checkpoint-best --image crowd.jpg --class_name "people" --tiles auto
Several points per forward (--points_per_step N or auto): by default (checkpoint) what suits how the checkpoint
trained: auto after nearest targets (any uncounted object was a right next point), 1 after reading order.

Prints the count and writes OUT_DIR/<image>_counted.png (numbered marks) and OUT_DIR/<image>_points.json
(points in pixels of the original image).
"""

from __future__ import annotations

import json
import os
import sys
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from cli import UsageError, arg, parse_config, parse_positive_or_auto
from dataset_fsc147 import (MARK_TO_OBJECT, clip_points, denormalize_points, draw_marks, load_rgb, mark_radius,
                            normalize_points, radius_for_size)
from model_loading import device_of, load_checkpoint
from tiles import DEFAULT_OBJECT_TOKENS, merge_tile_points, parse_tiles, tile_grid, tiles_for_object_size


MAX_COUNT = 4000  # default cap on points per image: above FSC-147's densest image (3,731 objects)
PROTOCOLS = ("text", "exemplar")  # where the mark size comes from: the model's own estimate, or exemplar boxes


@dataclass
class CountSettings:
    """How the counting loop runs: `count_objects`'s keyword arguments, shared by the scripts that count."""

    batch_size: int = 8  # images counted at once, each at its own step
    done_threshold: float = 0.5  # stop an image when sigmoid(done) exceeds this
    max_count: int = MAX_COUNT  # stop an image after this many points (capped)
    protocol: str = "text"  # text (marks sized by the model's estimate) or exemplar (by the given radii)
    points_per_step: int = 1  # points committed per forward (0: every confident, well-separated one)
    duplicate_guard: bool = True  # points on counted objects are not counted; the loop re-chooses or stops
    tiles: int = 1  # N x N overlapping crops per image, each at the whole image's resolution (0: auto, tiles.py)
    object_tokens: float = 0.0  # auto's aim: the training objects' width in tokens (the checkpoint's; 0: tiles.py's
    #                             DEFAULT_OBJECT_TOKENS)


def parse_points_per_step(text: str) -> int:
    """--points_per_step: a positive number, or "auto" (0: every confident, well-separated point)."""
    return parse_positive_or_auto(text, "--points_per_step")


FROM_CHECKPOINT = "checkpoint"  # --points_per_step's default: the mode that suits how the checkpoint was trained
POINTS_PER_STEP_HELP = ("points committed per forward: 1 (the model's chosen point), N, auto (every token it believes "
                        "holds an unmarked object, well separated), or checkpoint: auto for a checkpoint trained with "
                        "nearest targets (any uncounted object was a right next point; on dense scenes the more "
                        "accurate mode and ~10x fewer forwards), 1 for reading order (one right next point, where auto "
                        "counted worse): RESULTS.md 1c")


TILES_HELP = ("N: count on N x N overlapping crops, each at the whole image's resolution, points merged so an "
              "object on a seam counts once (for objects much smaller than an image token); auto: N per image from "
              "the model's own estimate of the objects' size at a first forward (one forward more per image), "
              "against the width of the objects it trained on (the checkpoint's object_tokens; never the ground "
              "truth): 1 where the objects look as wide as training's; or checkpoint: auto for a token-pointing "
              "checkpoint (on dense scenes as or more accurate than 1 on every test set: RESULTS.md 1c), 1 for "
              "regression pointing (no token grid to size the crops)")


def option_errors(text: str, parse, flag: str, numbers: str) -> list[str]:
    """[] when `text` is "checkpoint" or `parse` (a number or auto) takes it, else one message naming `flag`."""
    if text == FROM_CHECKPOINT:
        return []
    try:
        parse(text)
        return []
    except ValueError:
        return [f"{flag} must be {numbers}, auto or {FROM_CHECKPOINT}, got {text!r}"]


def tiles_option_errors(text: str) -> list[str]:
    return option_errors(text, parse_tiles, "--tiles", "a positive number (N: N x N crops)")


def tiles_for(text: str, pointing: str) -> int:
    """--tiles as a grid side (0: auto); "checkpoint" gives auto for a model that points at tokens (`pointing`, the
    checkpoint's), 1 for regression pointing, which has no token grid to size the crops."""
    if text != FROM_CHECKPOINT:
        return parse_tiles(text)
    return 0 if pointing == "token" else 1


def points_per_step_errors(text: str) -> list[str]:
    return option_errors(text, parse_points_per_step, "--points_per_step", "a positive number")


def points_per_step_for(text: str, checkpoint: str) -> int:
    """--points_per_step as a number (0: auto); "checkpoint" reads the target strategy the checkpoint trained with
    from its config.json: nearest -> 0 (auto), reading order (or a checkpoint that predates the field) -> 1."""
    if text != FROM_CHECKPOINT:
        return parse_points_per_step(text)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        strategy = json.load(f).get("target_strategy", "reading_order")
    return 0 if strategy == "nearest" else 1


@dataclass
class CountResult:
    """What the counting loop found in one image."""

    points: np.ndarray  # (K, 2) predicted points in pixels of the original image, in counting order
    steps: int  # forward passes spent on the image (K + 1 when it stopped on done, one point per step)
    capped: bool  # stopped at max_count rather than on done
    n_outside: int  # predicted points outside the image (recorded, marked and fed back at the image's edge)
    n_duplicate: int  # points on already-counted objects (within half an object size): without the guard every
    #                   such point committed; with it, the steps whose chosen point it rejected
    done_probs: list[float] = field(default_factory=list)  # sigmoid(done) at each step
    mark_radius: int = 0  # the radius its marks were drawn with, in pixels
    object_size: float | None = None  # text-only protocol: the model's estimate of the objects' size, in pixels
    stopped_on_duplicates: bool = False  # the guard stopped it: the model pointed only at counted objects
    tiles: int = 1  # the grid side it was counted on (1: the whole image; steps then include the tiling forward)
    n_seam_duplicates: int = 0  # points dropped when merging the tiles: one object found from two crops

    @property
    def count(self) -> int:
        return len(self.points)


@dataclass
class _State:
    """An image being counted: its index in the input list, the points found so far, its marked image."""

    index: int
    image: object
    class_name: str
    radius: int | None  # mark radius in pixels; None until the model's first estimate (text-only protocol)
    points: list = field(default_factory=list)  # (x, y) pixels per counted point, clipped to the image
    n_outside: int = 0
    n_duplicate: int = 0
    done_probs: list = field(default_factory=list)
    object_size: float | None = None
    marked: object = None  # the image with every counted point's mark, drawn incrementally

    def pixel(self, x: float, y: float) -> tuple[np.ndarray, bool]:
        """A predicted point (normalised) where it will be marked: clipped to the image, as in training;
        and whether it fell outside."""
        width, height = self.image.size
        pixel = denormalize_points(np.array([[x, y]], dtype=np.float32), width, height)
        clipped = clip_points(pixel, width, height)
        return clipped[0], not np.array_equal(pixel, clipped)

    def add(self, points: list[np.ndarray]) -> None:
        """Count pixel points and draw their marks (numbered on from the last) onto the marked image."""
        first = len(self.points) + 1
        self.points.extend(points)
        self.marked = draw_marks(self.marked if self.marked is not None else self.image, np.asarray(points),
                                 labels=range(first, first + len(points)), radius=self.radius)

    def pixels(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float32).reshape(-1, 2)

    def near_counted(self, point: np.ndarray, distance: float) -> bool:
        return bool(self.points) and bool((np.hypot(*(self.pixels() - point).T) < distance).any())


def _finish(state: _State, capped: bool, on_duplicates: bool = False) -> CountResult:
    return CountResult(state.pixels(), len(state.done_probs), capped, state.n_outside, state.n_duplicate,
                       list(state.done_probs), state.radius, state.object_size, on_duplicates)


def estimated_object_size(outputs: dict, row: int, width: int, height: int) -> float:
    """The model's estimate of the named objects' size in pixels of a (width x height) image: its log size
    in token widths (`log_size`) times a token's side in pixels (`cell`, in normalised units)."""
    if "log_size" not in outputs:
        raise ValueError("the model gives no object-size estimate, which the text-only protocol needs: count "
                         "with protocol 'exemplar' (exemplar boxes or a mark radius)")
    return float(torch.exp(outputs["log_size"][row].float().cpu())) * token_side_px(outputs, row, width, height)


def token_side_px(outputs: dict, row: int, width: int, height: int) -> float:
    """An image token's side in pixels of a (width x height) image, from `cell` (its size in normalised units,
    2 per image side), averaged over x and y."""
    cell = outputs["cell"][row].float().cpu()
    return float((cell[0] / 2 * width + cell[1] / 2 * height) / 2)


POINT_THRESHOLD = 0.5  # a token's "unmarked object here" probability that makes it a candidate point


def candidate_points(outputs: dict, row: int) -> list[tuple[float, float]]:
    """Where the model would point, best first (normalised): its chosen point, then, for token pointing, the
    refined point of every other token it believes holds an unmarked object (probability above
    POINT_THRESHOLD), in the order of its "next object" scores."""
    first = (float(outputs["x"][row]), float(outputs["y"][row]))
    if "token_points" not in outputs:
        return [first]
    believed = (torch.sigmoid(outputs["object_logits"][row].float()) > POINT_THRESHOLD) & outputs["token_mask"][row]
    order = outputs["next_logits"][row].float().masked_fill(~believed, float("-inf")).argsort(descending=True)
    order = order[:int(believed.sum())]
    return [first] + [tuple(float(v) for v in outputs["token_points"][row, i]) for i in order.tolist()]


def duplicate_distance(radius: int) -> float:
    """Two points closer than this are on one object: half the object size that a mark of `radius` is
    drawn for (neighbours that touch are a whole object size apart)."""
    return radius / MARK_TO_OBJECT / 2


def choose_points(state: _State, candidates: list, limit: int, guard: bool) -> list[np.ndarray]:
    """The points to commit this step, in pixels: up to `limit` candidates, none on the same object as another
    one chosen with it (one object seen from two tokens) and, with the guard, none on a counted object (within
    `duplicate_distance` of a point counted at an earlier step).

    Duplicates (`n_duplicate`): without the guard, every committed point on a counted object (each one counts an
    object twice); with the guard, the model's own choice (the first candidate) when it lies on a counted object
    and is rejected (the other candidates are only fallbacks, so skipping them is no duplicate)."""
    chosen = []
    same_object = duplicate_distance(state.radius)
    for i, (x, y) in enumerate(candidates):
        point, outside = state.pixel(x, y)
        if any(np.hypot(*(point - c)) < same_object for c in chosen):
            continue
        if state.near_counted(point, same_object):
            state.n_duplicate += int(i == 0 or not guard)
            if guard:
                continue
        chosen.append(point)
        state.n_outside += int(outside)
        if len(chosen) == limit:
            break
    return chosen


@torch.no_grad()
def count_objects(model, images, class_names, batch_size: int = 8, done_threshold: float = 0.5,
                  max_count: int = MAX_COUNT, progress=None, mark_radii=None, protocol: str = "text",
                  points_per_step: int = 1, duplicate_guard: bool = True) -> list[CountResult]:
    """Count every image, several at once: each batch slot holds one image at its own step.

    When an image finishes, the next waiting image takes its slot, so batches stay full. Every image
    gets the same inputs as when counted alone, so counts do not depend on batch_size.
    protocol "text": marks are sized from the model's own estimate of the objects' size at the image's
    first step (before any mark is drawn); `mark_radii` must be None. protocol "exemplar": mark_radii
    gives per image the radius in pixels (`dataset_fsc147.mark_radius` of its exemplar boxes), None for
    the rule without boxes. The model sees the same points that are marked: clipped to the image, like
    the marks drawn in training.
    points_per_step: points committed per forward (1: the model's chosen point; N > 1 or 0 for no limit: also
    the other tokens it believes hold unmarked objects, well separated; their marks are all drawn before the
    next forward). duplicate_guard: a point within half an object size of a counted one is not counted; the next
    candidate is taken instead, and an image whose candidates are all on counted objects stops
    (`stopped_on_duplicates`) rather than running to max_count.
    """
    if len(images) != len(class_names):
        raise ValueError("images and class_names must have the same length")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "text" and mark_radii is not None:
        raise ValueError("the text-only protocol sizes marks from the model's own estimate: pass no mark_radii")
    if points_per_step < 0:
        raise ValueError(f"points_per_step must be >= 0 (0: no limit), got {points_per_step}")
    mark_radii = mark_radii if mark_radii is not None else [None] * len(images)
    model.eval()
    device = device_of(model)
    waiting = [_State(i, im, c, None if protocol == "text" else r or mark_radius(*im.size)) for i, (im, c, r)
               in enumerate(zip(images, class_names, mark_radii))][::-1]
    active: list[_State] = []
    results: list[CountResult | None] = [None] * len(images)
    while waiting or active:
        while waiting and len(active) < batch_size:
            active.append(waiting.pop())
        inputs = model.build_inputs([s.marked if s.marked is not None else s.image for s in active],
                                    [s.class_name for s in active])
        counted = [normalize_points(s.pixels(), *s.image.size) for s in active]
        out = model({k: v.to(device) for k, v in inputs.items()}, counted=counted)
        out = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in out.items()}  # one copy, then per image
        probs = torch.sigmoid(out["done_logit"].float()).tolist()
        still = []
        for row, (state, p) in enumerate(zip(active, probs)):
            if state.radius is None:  # text-only protocol, first step: no marks drawn yet
                state.object_size = estimated_object_size(out, row, *state.image.size)
                state.radius = radius_for_size(state.object_size)
            state.done_probs.append(p)
            if p > done_threshold:
                results[state.index] = _finish(state, capped=False)
            else:
                room = max_count - len(state.points)
                limit = room if points_per_step == 0 else min(points_per_step, room)
                chosen = choose_points(state, candidate_points(out, row), limit, duplicate_guard)
                if not chosen:
                    results[state.index] = _finish(state, capped=False, on_duplicates=True)
                else:
                    state.add(chosen)
                    if len(state.points) >= max_count:
                        results[state.index] = _finish(state, capped=True)
                    else:
                        still.append(state)
                        continue
            if progress is not None:
                progress.update(1)
        active = still
    return results


@torch.no_grad()
def first_look(model, images, class_names, batch_size: int, mark_radii=None) -> list[tuple[float, float]]:
    """One forward per image, no marks: (the objects' size, an image token's side), both in pixels of the image.
    The size is the model's own estimate, or with `mark_radii` (exemplar protocol) the one the radius is drawn for.
    Tiling decides from these alone: no ground truth."""
    model.eval()
    device = device_of(model)
    found = []
    for start in range(0, len(images), batch_size):
        batch, names = images[start:start + batch_size], class_names[start:start + batch_size]
        out = model({k: v.to(device) for k, v in model.build_inputs(batch, names).items()}, counted=[np.zeros((0, 2))]
                    * len(batch))
        if "cell" not in out:
            raise ValueError("tiles need a token-pointing model (its token grid sizes the crops): count with tiles 1")
        out = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in out.items()}
        for row, image in enumerate(batch):
            width, height = image.size
            radius = None if mark_radii is None else mark_radii[start + row]
            size = (estimated_object_size(out, row, width, height) if not radius else radius / MARK_TO_OBJECT)
            found.append((size, token_side_px(out, row, width, height)))
    return found


def crop_for_tile(image, crop: tuple[int, int, int, int]) -> tuple[object, float, float]:
    """The crop resized to the whole image's pixel count (so the processor gives it as many tokens as the whole
    image: its objects grow), and its x and y scales (resized pixels per image pixel)."""
    width, height = image.size
    x0, y0, x1, y1 = crop
    scale = math.sqrt(width * height / ((x1 - x0) * (y1 - y0)))
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    return image.crop(crop).resize(size, Image.BICUBIC), size[0] / (x1 - x0), size[1] / (y1 - y0)


def count_images(model, images, class_names, settings: CountSettings, mark_radii=None, progress=None) -> list[CountResult]:
    """`count_objects` with `settings`, on the whole images (tiles 1) or on overlapping crops (tiles N: N x N
    each; 0: auto, the grid chosen per image from `first_look`), the crops' points merged (tiles.py).

    Tiled, an image costs one `first_look` forward plus its crops' forwards (`steps`); every crop of every
    image is counted in one pass of the loop, so batches stay full."""
    loop = {k: v for k, v in asdict(settings).items() if k not in ("tiles", "object_tokens")}
    if settings.tiles == 1:
        return count_objects(model, images, class_names, progress=progress, mark_radii=mark_radii, **loop)
    text = settings.protocol == "text"
    if not text:  # exemplar: every image's radius (the rule without boxes where none is given), as count_objects does
        given = mark_radii if mark_radii is not None else [None] * len(images)
        mark_radii = [r or mark_radius(*im.size) for im, r in zip(images, given)]
    looks = first_look(model, images, class_names, settings.batch_size, mark_radii)
    plans, crops, names, radii = [], [], [], []
    for i, (image, (size, token_px)) in enumerate(zip(images, looks)):
        n = settings.tiles or tiles_for_object_size(size / token_px, settings.object_tokens or DEFAULT_OBJECT_TOKENS)
        tiles = tile_grid(*image.size, n, overlap=size)  # an object whose centre is in a core is whole in its crop
        scales = []
        for tile in tiles:
            crop, sx, sy = crop_for_tile(image, tile.crop) if n > 1 else (image, 1.0, 1.0)
            crops.append(crop)
            names.append(class_names[i])
            # Marks in a crop are sized from the whole image's size (the estimate auto chose the grid by, or the
            # exemplar radius) times the crop's zoom: a crop's own estimate is off (objects larger than their
            # density suggests read as smaller: 8-9 px against 13 px on bench-dense's crops, and marks too
            # small to cover an object got it counted again).
            zoom = (sx + sy) / 2
            radii.append(radius_for_size(size * zoom) if text else max(1, round(mark_radii[i] * zoom)))
            scales.append((sx, sy))
        plans.append((tiles, scales, size))
    if progress is not None:
        progress.total = len(crops)  # the bar counts crops
        progress.refresh()
    # The crops are counted with the radii above (count_objects' "exemplar" path: given radii, no boxes read).
    results = iter(count_objects(model, crops, names, progress=progress, mark_radii=radii,
                                 **{**loop, "protocol": "exemplar"}))
    merged = []
    for i, (image, (tiles, scales, size)) in enumerate(zip(images, plans)):
        parts = [next(results) for _ in tiles]
        found = [np.asarray(t.crop[:2], dtype=np.float32) + r.points / np.array(s, dtype=np.float32)
                 for t, s, r in zip(tiles, scales, parts)]  # crop pixels -> the image's pixels
        points, seam = merge_tile_points(tiles, found, *image.size, distance=size / 2)
        merged.append(CountResult(
            points=points[:settings.max_count], steps=1 + sum(r.steps for r in parts),
            capped=any(r.capped for r in parts) or len(points) >= settings.max_count,
            n_outside=sum(r.n_outside for r in parts), n_duplicate=sum(r.n_duplicate for r in parts),
            done_probs=[p for r in parts for p in r.done_probs],
            mark_radius=radius_for_size(size) if text else int(mark_radii[i]), object_size=size if text else None,
            stopped_on_duplicates=any(r.stopped_on_duplicates for r in parts),
            tiles=math.isqrt(len(tiles)), n_seam_duplicates=seam))
    return merged


def points_json(result: CountResult, image_path: str, class_name: str) -> dict:
    """The JSON written next to the counted image."""
    return {"image": image_path, "class_name": class_name, "count": result.count,
            "points": [[round(float(x), 2), round(float(y), 2)] for x, y in result.points],
            "steps": result.steps, "capped": result.capped, "n_outside": result.n_outside,
            "n_duplicate": result.n_duplicate, "stopped_on_duplicates": result.stopped_on_duplicates,
            "tiles": result.tiles, "n_seam_duplicates": result.n_seam_duplicates, "mark_radius": result.mark_radius,
            "object_size": None if result.object_size is None else round(result.object_size, 2)}


def base_override(model_name_or_path: str) -> dict:
    """`load_checkpoint` keywords for --model_name_or_path: the base weights from there instead of the saved path."""
    return {"model_name_or_path": model_name_or_path} if model_name_or_path else {}


def parse_boxes(text: str) -> np.ndarray:
    """'x1,y1,x2,y2;...' -> (M, 4) float32 boxes; raises ValueError naming what is wrong."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        values = [v.strip() for v in part.split(",")]
        try:
            x1, y1, x2, y2 = (float(v) for v in values)
        except ValueError:
            raise ValueError(f"{part!r} is not four numbers x1,y1,x2,y2") from None
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"{part!r}: need x2 > x1 and y2 > y1")
        boxes.append([x1, y1, x2, y2])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def main(argv=None) -> int:
    @dataclass
    class CountConfig:
        checkpoint: str = arg("", "checkpoint folder written by training (e.g. RUN/checkpoint-best)")
        image: str = arg("", "image file to count in (any mode: grayscale, RGBA, palette are converted)")
        class_name: str = arg("", "what to count, e.g. 'sea shells'")
        out_dir: str = arg("counted", "folder for <image>_counted.png and <image>_points.json")
        protocol: str = arg("text", "text (marks sized from the model's own estimate of the objects' size: only "
                            "the image and the class name are given) or exemplar (sized from --exemplar_boxes "
                            "or --mark_radius)")
        exemplar_boxes: str = arg("", "with --protocol exemplar: boxes around a few of the objects, "
                                  "'x1,y1,x2,y2;x1,y1,x2,y2;...' in pixels; marks are sized from them, as in training")
        mark_radius: int = arg(0, "with --protocol exemplar: mark radius in pixels instead of --exemplar_boxes (not "
                               "both)")
        done_threshold: float = arg(0.5, "stop when sigmoid(done) exceeds this")
        max_count: int = arg(MAX_COUNT, "stop after this many points")
        tiles: str = arg(FROM_CHECKPOINT, TILES_HELP)
        points_per_step: str = arg(FROM_CHECKPOINT, POINTS_PER_STEP_HELP)
        device: str = arg("auto", "auto, cpu or cuda")
        model_name_or_path: str = arg("", "the base model's folder or hub id (default: the path saved in the "
                                      "checkpoint's config.json; give it when the weights moved)")

    def validate(cfg) -> list[str]:
        errors = [f"--{name} is required" for name in ("checkpoint", "image", "class_name") if not getattr(cfg, name)]
        if not 0 < cfg.done_threshold < 1:
            errors.append("--done_threshold must be in (0, 1)")
        if cfg.max_count < 1:
            errors.append("--max_count must be >= 1")
        if cfg.mark_radius < 0:
            errors.append("--mark_radius must be >= 0")
        if cfg.protocol not in PROTOCOLS:
            errors.append(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
        elif cfg.protocol == "text" and (cfg.exemplar_boxes or cfg.mark_radius):
            errors.append("--exemplar_boxes and --mark_radius give sizes the text-only protocol does not use: "
                          "add --protocol exemplar")
        elif cfg.protocol == "exemplar" and not (cfg.exemplar_boxes or cfg.mark_radius):
            errors.append("--protocol exemplar needs --exemplar_boxes or --mark_radius")
        elif cfg.exemplar_boxes and cfg.mark_radius:
            errors.append("--exemplar_boxes and --mark_radius both set the marks' size: give one of them")
        errors += tiles_option_errors(cfg.tiles) + points_per_step_errors(cfg.points_per_step)
        try:
            parse_boxes(cfg.exemplar_boxes)
        except ValueError as e:
            errors.append(f"--exemplar_boxes: {e}")
        return errors

    cfg = parse_config(CountConfig, argv, __doc__, validate)
    try:
        if not os.path.isfile(cfg.image):
            raise UsageError(f"image {cfg.image!r} does not exist")
        try:
            image = load_rgb(cfg.image, exif_orientation=True)  # as a viewer shows it: points in that frame
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image {cfg.image!r}: {e}") from None
        model, trained = load_checkpoint(cfg.checkpoint, device=cfg.device, **base_override(cfg.model_name_or_path))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    radii = None
    if cfg.protocol == "exemplar":
        radii = [cfg.mark_radius or mark_radius(*image.size, parse_boxes(cfg.exemplar_boxes))]
    settings = CountSettings(batch_size=1, done_threshold=cfg.done_threshold, max_count=cfg.max_count,
                             protocol=cfg.protocol,
                             points_per_step=points_per_step_for(cfg.points_per_step, cfg.checkpoint),
                             tiles=tiles_for(cfg.tiles, trained.pointing), object_tokens=trained.object_tokens)
    result = count_images(model, [image], [cfg.class_name], settings, mark_radii=radii)[0]
    os.makedirs(cfg.out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(cfg.image))[0]
    png = os.path.join(cfg.out_dir, f"{stem}_counted.png")
    js = os.path.join(cfg.out_dir, f"{stem}_points.json")
    draw_marks(image, result.points, radius=result.mark_radius).save(png)
    with open(js, "w", encoding="utf-8") as f:
        json.dump(points_json(result, cfg.image, cfg.class_name), f, indent=2)
    flags = (f" (on {result.tiles} x {result.tiles} tiles, {result.steps} forwards)" if result.tiles > 1 else "") + (
        " (stopped at --max_count)" if result.capped else "") + (
        f", {result.n_outside} outside the image" if result.n_outside else "") + (
        f", {result.n_duplicate} on top of earlier points" if result.n_duplicate else "")
    print(f"{cfg.class_name}: {result.count}{flags}")
    print(f"  marks:  {png}\n  points: {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
