"""Tiles for images denser than one encoding can resolve: overlapping crops, and their points merged.

At Qwen2-VL's resolution an image token covers 28 x 28 processed pixels; when objects are much smaller than a
token, several share one and a single encoding cannot point at each. Counting such an image on N x N overlapping
crops, each resized back to the whole image's pixel count (so the processor gives each crop as many tokens as the
whole image), makes its objects about N times wider in tokens (CountGD re-runs on tiles when its queries saturate;
WS-COC tiles 2 x 2 above 100 objects).

The grid: the image is cut into N x N equal *cores* (a partition: every pixel in exactly one core); each crop is
its core grown by `overlap` pixels on every side (clipped to the image), so an object whose centre lies in a core
is whole in that core's crop when the overlap is at least an object size. Merging keeps a crop's points that lie
in its own core or within `distance` (half an object size) of it, then drops a point that lies within `distance`
of a point kept from another crop: an object on a seam is seen by two crops, which may each put its point a
little on the other's side.

`auto` (`tiles_for_object_size`) decides from the model's own estimate of the objects' size in token widths, read
at the first forward on the whole image, against the width of the objects it trained on (`object_tokens`, which
training measures on its own data and saves with the checkpoint): nothing about the image's ground truth is used.

No torch, no I/O: the counting loop (count_objects.py) runs the model on the crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cli import parse_positive_or_auto

DEFAULT_OBJECT_TOKENS = 0.7  # auto's aim for checkpoints that did not record --object_tokens: bench-dense's
#                              training objects at 224 px (19 px objects, 28-px tokens)
ZOOM_MARGIN = 1.25  # auto tiles once the objects look this much smaller than training's (below, a zoom would
#                     make them larger than training's: 2 x 2 on objects of training's width hurt, RESULTS 1c)
MAX_AUTO_TILES = 4  # auto's largest grid side (16 crops): the cost grows as its square


@dataclass(frozen=True)
class Tile:
    """One crop of an image: its core (the part of the partition it owns) and the crop around it, in pixels."""

    core: tuple[float, float, float, float]  # x0, y0, x1, y1: the grid cell, half-open except at the image's edge
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1: the core grown by the overlap, clipped, integer pixels


def parse_tiles(text) -> int:
    """--tiles: a grid side N >= 1 (N x N crops), or "auto" (0)."""
    return parse_positive_or_auto(text, "--tiles")


def tiles_errors(text) -> list[str]:
    try:
        parse_tiles(text)
        return []
    except ValueError:
        return [f"--tiles must be a positive number (N: N x N crops) or auto, got {text!r}"]


def tiles_for_object_size(size_tokens: float, target: float = DEFAULT_OBJECT_TOKENS,
                          max_tiles: int = MAX_AUTO_TILES) -> int:
    """auto: the grid side N (1 to max_tiles) for objects estimated `size_tokens` token widths wide, when the
    model trained on objects `target` wide (the checkpoint's --object_tokens). N x N crops, each at the whole
    image's resolution, enlarge objects N times; N = ceil(target / size_tokens - (ZOOM_MARGIN - 1)), so an image
    is tiled 2 x 2 once its objects look 1.25x smaller than training's, 3 x 3 once 2.25x smaller, and so on.
    The margin also absorbs the estimate's bias on images denser than training (1.35 to 1.5x the true size)."""
    if not math.isfinite(size_tokens) or size_tokens <= 0:
        return max_tiles
    return int(min(max_tiles, max(1, math.ceil(target / size_tokens - (ZOOM_MARGIN - 1)))))


def tile_grid(width: int, height: int, n: int, overlap: float) -> list[Tile]:
    """N x N tiles of a (width x height) image, row by row; each crop its core grown by `overlap` pixels."""
    if n < 1:
        raise ValueError(f"tile grid side must be >= 1, got {n}")
    xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
    tiles = []
    for j in range(n):
        for i in range(n):
            x0, x1, y0, y1 = float(xs[i]), float(xs[i + 1]), float(ys[j]), float(ys[j + 1])
            crop = (max(0, math.floor(x0 - overlap)), max(0, math.floor(y0 - overlap)),
                    min(width, math.ceil(x1 + overlap)), min(height, math.ceil(y1 + overlap)))
            tiles.append(Tile((x0, y0, x1, y1), crop))
    return tiles


def in_core(points: np.ndarray, tile: Tile, width: int, height: int, margin: float = 0.0) -> np.ndarray:
    """(K,) bool: which points (K, 2), in pixels of the whole image, lie in the tile's core grown by `margin`.
    Cores are half-open ([x0, x1)) so that with no margin a point on a seam belongs to exactly one of them; the
    image's right and bottom edges are closed."""
    x0, y0, x1, y1 = tile.core
    x, y = points[:, 0], points[:, 1]
    inside_x = (x >= x0 - margin) & ((x < x1 + margin) | ((x1 >= width) & (x <= x1)))
    inside_y = (y >= y0 - margin) & ((y < y1 + margin) | ((y1 >= height) & (y <= y1)))
    return inside_x & inside_y


def merge_tile_points(tiles: list[Tile], points: list[np.ndarray], width: int, height: int,
                      distance: float) -> tuple[np.ndarray, int]:
    """The image's points from every crop's (K_i, 2) points in whole-image pixels, and how many were merged away.

    A crop keeps its points within `distance` of its core: an object on a seam, whose point each crop may put a
    little on the other side, is kept by at least one; a point the crop put on an object cut by its edge (the
    overlap is an object size, twice `distance`) lies beyond that band and is left to the crop that sees it whole.
    Then a point within `distance` of a point kept from another crop is the same object, and is dropped. Points of
    one crop are never merged with each other (the counting loop already keeps them apart)."""
    found = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in points]
    found = [(t, p[in_core(p, tile, width, height, distance)]) for t, (tile, p) in enumerate(zip(tiles, found))]
    candidates = np.concatenate([p for _, p in found]) if found else np.zeros((0, 2))
    owners = np.concatenate([np.full(len(p), t) for t, p in found]) if found else np.zeros(0, dtype=int)
    keep = np.ones(len(candidates), dtype=bool)
    for k in range(len(candidates)):  # against the points kept before it from other crops
        earlier = keep[:k] & (owners[:k] != owners[k])
        if earlier.any() and np.hypot(*(candidates[:k][earlier] - candidates[k]).T).min() < distance:
            keep[k] = False
    return candidates[keep].astype(np.float32), int((~keep).sum())
