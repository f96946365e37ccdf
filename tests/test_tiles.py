"""Tiles (tiles.py) and counting on them (count_objects.count_images): the grid, the merge at seams, auto."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from count_objects import CountSettings, count_images
from dataset_fsc147 import ANNOTATION_FILE, CLASS_FILE, IMAGE_DIR, SPLIT_FILE, FSC147Dataset
from tiles import Tile, in_core, merge_tile_points, parse_tiles, tile_grid, tiles_for_object_size


def test_tile_grid_by_hand():
    tiles = tile_grid(100, 60, 2, overlap=5)
    assert [t.core for t in tiles] == [(0, 0, 50, 30), (50, 0, 100, 30), (0, 30, 50, 60), (50, 30, 100, 60)]
    assert [t.crop for t in tiles] == [(0, 0, 55, 35), (45, 0, 100, 35), (0, 25, 55, 60), (45, 25, 100, 60)]
    assert tile_grid(100, 60, 1, overlap=5) == [Tile((0, 0, 100, 60), (0, 0, 100, 60))]


def test_every_point_of_the_image_is_in_exactly_one_core():
    tiles = tile_grid(90, 70, 3, overlap=4)
    # On seams (x = 30, 60; y = 23.33, 46.67), the image's corners and its right and bottom edges.
    points = np.array([[30, 10], [60, 46.67], [0, 0], [90, 70], [90, 0], [0, 70], [29.99, 23.34], [45, 35]])
    owners = np.stack([in_core(points, t, 90, 70) for t in tiles])  # (tiles, points)
    assert owners.sum(0).tolist() == [1] * len(points)
    assert owners[:, 0].argmax() == 1 and owners[:, 3].argmax() == 8  # x = 30 is the second column's


def test_an_object_on_a_seam_is_counted_once():
    # 200 x 100, 2 x 2 tiles: the vertical seam at x = 100, the horizontal at y = 50; objects 10 px wide, so the
    # merge distance is 5 px and the crops overlap by 10.
    tiles = tile_grid(200, 100, 2, overlap=10)
    left = np.array([[99.6, 20.0],    # an object on the seam, seen from the left ...
                     [104.0, 30.0],   # an object 4 px right of the seam: within 5 px of the left core, kept
                     [60.0, 20.0],    # an object well inside the left core
                     [108.5, 40.0]])  # the left crop's point on an object its edge (x = 110) cuts: beyond 5 px
    right = np.array([[100.4, 20.0],  # ... the same object seen from the right, 0.8 px away: merged
                      [104.2, 30.1],  # the object right of the seam again: merged
                      [108.0, 20.0],  # a neighbour 8.4 px right of the seam object: another object
                      [110.0, 40.0]])  # the cut object, seen whole from the right
    empty = np.zeros((0, 2))
    points, merged = merge_tile_points(tiles, [left, right, empty, empty], 200, 100, distance=5.0)
    np.testing.assert_allclose(points, [[99.6, 20.0], [104.0, 30.0], [60.0, 20.0], [108.0, 20.0], [110.0, 40.0]],
                               atol=1e-4)
    assert merged == 2
    # An object on the corner of four cores, seen by every crop: once.
    corner = [np.array([[100 + dx, 50 + dy]]) for dx, dy in ((0.3, 0.2), (-0.4, 0.1), (0.2, -0.3), (-0.1, -0.2))]
    points, merged = merge_tile_points(tiles, corner, 200, 100, distance=5.0)
    assert len(points) == 1 and merged == 3
    # Two objects of one crop closer than the distance are both kept: the loop already kept them apart.
    same, merged = merge_tile_points(tiles, [np.array([[10.0, 10.0], [13.0, 10.0]]), empty, empty, empty],
                                     200, 100, distance=5.0)
    assert len(same) == 2 and merged == 0


def test_auto_grid_from_the_estimated_size_by_hand():
    # N = ceil(target / size - 0.25), 1 to 4; the default target 0.7: 0.7 / 0.5 = 1.4 -> ceil(1.15) = 2,
    # 0.7 / 0.25 = 2.8 -> ceil(2.55) = 3, 0.7 / 0.7 = 1 -> 1, 0.7 / 0.05 = 14 -> 4 (the largest grid).
    assert [tiles_for_object_size(s) for s in (1.2, 0.7, 0.5, 0.3, 0.25, 0.05)] == [1, 1, 2, 3, 3, 4]
    # A model trained on objects 1.28 tokens wide (bench-dense at --pixel_scale 2): 1.28 / 0.95 = 1.35 -> 2
    # (1 under the default); objects of its own width -> 1; 1.28 / 0.5 = 2.56 -> 3; 1.28 / 0.4 = 3.2 -> 3.
    assert [tiles_for_object_size(s, 1.28) for s in (0.95, 1.28, 0.5, 0.4)] == [2, 1, 3, 3]
    assert tiles_for_object_size(0.95) == 1
    assert tiles_for_object_size(float("nan")) == 4 and tiles_for_object_size(0.0) == 4
    assert parse_tiles("auto") == 0 and parse_tiles("3") == 3
    with pytest.raises(ValueError):
        parse_tiles("0")


GREEN = (20, 230, 40)


def dot_image(width: int, height: int, centres, diameter: float) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 30, 90))
    draw = ImageDraw.Draw(image)
    r = diameter / 2
    for x, y in centres:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=GREEN)
    return image


class DotFinder(nn.Module):
    """Stands in for a token-pointing VLM that sees perfectly: finds the green dots of each image it is given (a
    whole image or a crop), points at every one not within a dot's width of a counted point, says done when none
    is left; its size estimate is the dots' measured width over a token's (a token: a quarter of the image each
    way, cell 0.5). Keeps the sizes of the images it saw."""

    def __init__(self):
        super().__init__()
        self.x_head = nn.Module()
        self.x_head.fc1 = nn.Linear(1, 1)
        self.sizes_seen = []

    def build_inputs(self, images, class_names):
        from scipy import ndimage

        found = []
        for im in images:
            self.sizes_seen.append(im.size)
            a = np.asarray(im).astype(int)
            mask = (a[..., 1] > 150) & (a[..., 0] < 120) & (a[..., 2] < 120)
            labels, n = ndimage.label(mask)
            centres = np.array(ndimage.center_of_mass(mask, labels, range(1, n + 1))).reshape(-1, 2)[:, ::-1]
            widths = 2 * np.sqrt(np.array(ndimage.sum(mask, labels, range(1, n + 1))).reshape(-1) / math.pi)
            found.append((centres + 0.5, widths, im.size))  # pixel centres: +0.5
        self.found = found
        return {"n": torch.tensor([len(images)])}

    def forward(self, inputs, counted=None):
        n_slots = 64
        rows = []
        for (centres, widths, (w, h)), done in zip(self.found, counted):
            done_px = (np.asarray(done, dtype=np.float64).reshape(-1, 2) + 1) / 2 * [w, h]
            width = float(np.max(widths)) if len(widths) else 8.0  # marks split dots: the pieces are smaller
            keep = [c for c in centres if not len(done_px) or np.hypot(*(done_px - c).T).min() > width]
            norm = np.array(keep, dtype=np.float32).reshape(-1, 2) / [w, h] * 2 - 1
            pts = np.zeros((n_slots, 2), dtype=np.float32)
            pts[:len(norm)] = norm[:n_slots]
            token_px = (w / 4 + h / 4) / 2
            rows.append((pts, len(norm), math.log(width / token_px)))
        pts = torch.tensor(np.stack([r[0] for r in rows]))
        k = torch.tensor([r[1] for r in rows])
        slot = torch.arange(n_slots)
        has = slot[None] < k[:, None]
        return {"x": pts[:, 0, 0], "y": pts[:, 0, 1], "done_logit": torch.where(k == 0, 10.0, -10.0),
                "log_size": torch.tensor([r[2] for r in rows]), "cell": torch.full((len(rows), 2), 0.5),
                "token_points": pts, "object_logits": torch.where(has, 5.0, -5.0),
                "next_logits": torch.where(has, -slot.float(), -1e4), "token_mask": torch.ones_like(has)}


# Dots 10 px wide on a 200 x 100 image, some on the 2 x 2 grid's seams (x = 100, y = 50) and next to them.
# (112, 50) is cut by the left crops' edge (x = 110); (95, 70) lies whole in the right crops' overlap.
SEAM_DOTS = [(100, 20), (95, 70), (112, 50), (30, 30), (170, 80), (100, 50), (150, 44), (60, 56)]


def test_counting_on_tiles_finds_each_object_once_at_the_seams():
    image = dot_image(200, 100, SEAM_DOTS, diameter=10)
    model = DotFinder()
    result = count_images(model, [image], ["dots"], CountSettings(points_per_step=0, tiles=2))[0]
    assert result.count == len(SEAM_DOTS) and result.tiles == 2
    # Each found point is on its own dot, in the image's pixels.
    dist = np.hypot(*(result.points[:, None] - np.array(SEAM_DOTS, dtype=np.float32)[None]).transpose(2, 0, 1))
    assert (dist.min(0) < 1.5).all() and (dist.min(1) < 1.5).all()
    # A first look at the whole image, then the 4 crops, each resized to the image's 20,000 pixels.
    assert model.sizes_seen[0] == (200, 100) and len(model.sizes_seen) >= 5
    assert all(abs(w * h - 20000) < 400 for w, h in model.sizes_seen[1:5])
    # Forwards: the first look plus every crop's (one to commit its dots, one to say done).
    assert result.steps == 1 + 4 * 2
    # Untiled, the same model finds the same dots in 2 forwards.
    whole = count_images(DotFinder(), [image], ["dots"], CountSettings(points_per_step=0, tiles=1))[0]
    assert whole.count == len(SEAM_DOTS) and whole.steps == 2 and whole.tiles == 1


def write_fsc147(root, images: dict, points: dict) -> str:
    """A tiny FSC-147-layout folder: every image in the test split, class 'dots', the given annotated points."""
    os.makedirs(os.path.join(root, IMAGE_DIR))
    annotation = {}
    for name, image in images.items():
        image.save(os.path.join(root, IMAGE_DIR, name), format="PNG")  # lossless: JPEG would fray the dots
        boxes = [[[x - 5, y - 5], [x - 5, y + 5], [x + 5, y + 5], [x + 5, y - 5]] for x, y in points[name][:3]]
        annotation[name] = {"points": [list(p) for p in points[name]], "box_examples_coordinates": boxes,
                            "H": image.height, "W": image.width}
    json.dump(annotation, open(os.path.join(root, ANNOTATION_FILE), "w"))
    json.dump({"train": [], "val": [], "test": sorted(images)}, open(os.path.join(root, SPLIT_FILE), "w"))
    with open(os.path.join(root, CLASS_FILE), "w") as f:
        f.writelines(f"{name}\tdots\n" for name in sorted(images))
    return root


def test_auto_tiles_read_no_ground_truth(tmp_path):
    from evaluate_counting import count_dataset

    scenes = {"sparse.jpg": (np.array([[30, 30], [90, 30], [150, 30], [30, 75], [90, 75], [150, 75]]), 30),  # 0.8 token
              "dense.jpg": (np.stack(np.meshgrid(np.arange(14, 200, 24), np.arange(14, 100, 24)), -1).reshape(-1, 2),
                            8)}  # 8 px dots, a token is 37.5 px: 0.21 token -> 4 x 4 tiles
    images = {name: dot_image(200, 100, pts, d) for name, (pts, d) in scenes.items()}
    truth = write_fsc147(str(tmp_path / "true"), images, {n: pts.tolist() for n, (pts, _) in scenes.items()})
    # The same images with other annotations: a third of the points, moved.
    wrong = write_fsc147(str(tmp_path / "wrong"), images, {n: (pts[::3] + 3).tolist() for n, (pts, _) in scenes.items()})
    settings = CountSettings(points_per_step=0, tiles=0)
    runs = [count_dataset(DotFinder(), FSC147Dataset(root, "test"), settings, progress=False)[0] for root in (truth, wrong)]
    by_id = [{r["id"]: r for r in records} for records in runs]
    for name in images:
        assert by_id[0][name]["tiles"] == by_id[1][name]["tiles"]
        assert by_id[0][name]["points"] == by_id[1][name]["points"]
        assert by_id[0][name]["forwards_per_image"] == by_id[1][name]["forwards_per_image"]
    # The grid follows the dots' size as the model sees it, against the default 0.7 tokens (hand: 30 px dots / 37.5
    # px tokens = 0.8 -> ceil(0.875 - 0.25) = 1; the 8 px dots measure 8.8 px from their drawn area: 0.235 token ->
    # ceil(2.98 - 0.25) = 3).
    assert by_id[0]["sparse.jpg"]["tiles"] == 1 and by_id[0]["dense.jpg"]["tiles"] == 3
    # An image auto leaves whole is counted as with --tiles 1 (the --tiles checkpoint default's cost): the same points,
    # and one forward more, the first look (untiled: one forward commits the 6 dots, one says done).
    whole = count_dataset(DotFinder(), FSC147Dataset(truth, "test"), CountSettings(points_per_step=0, tiles=1),
                          progress=False)[0]
    untiled = {r["id"]: r for r in whole}["sparse.jpg"]
    assert untiled["forwards_per_image"] == 2 and by_id[0]["sparse.jpg"]["forwards_per_image"] == 3
    assert by_id[0]["sparse.jpg"]["points"] == untiled["points"] and untiled["pred_count"] == 6
    assert by_id[0]["dense.jpg"]["pred_count"] == len(scenes["dense.jpg"][0])
    # Against a model trained on objects 2.4 tokens wide (the checkpoint's object_tokens): 2.4 / 0.8 = 3 -> 3 x 3.
    wide = count_dataset(DotFinder(), FSC147Dataset(truth, "test"), CountSettings(points_per_step=0, tiles=0,
                                                                                 object_tokens=2.4), progress=False)[0]
    assert {r["id"]: r["tiles"] for r in wide}["sparse.jpg"] == 3


def test_evaluate_and_count_objects_on_tiles_with_the_tiny_model(trained_run, synth_root, tmp_path, capsys):
    import count_objects as count_mod
    import evaluate_counting as eval_mod

    checkpoint = os.path.join(trained_run, "checkpoint-best")
    out = str(tmp_path / "eval")
    code = eval_mod.main(["--checkpoint", checkpoint, "--data_root", synth_root, "--split", "val", "--output_dir", out,
                          "--max_count", "3", "--tiles", "2", "--points_per_step", "auto", "--device", "cpu"])
    assert code == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["summary"]["tiles"] == 2 and results["summary"]["mean_tiles"] == 2
    for r in results["images"]:
        # The first look, then each of the 4 crops at least one forward; points inside the image, at most the cap.
        assert r["tiles"] == 2 and r["forwards_per_image"] == r["steps"] >= 5
        assert r["pred_count"] == len(r["points"]) <= 3
    assert results["summary"]["forwards_per_image"] == np.mean([r["steps"] for r in results["images"]])
    # Training recorded the width of its objects in tokens; auto aims at it and says so in the summary.
    trained = json.load(open(os.path.join(checkpoint, "config.json")))["object_tokens"]
    assert trained > 0
    assert eval_mod.main(["--checkpoint", checkpoint, "--data_root", synth_root, "--split", "val", "--output_dir", out,
                          "--max_count", "3", "--tiles", "auto", "--max_images", "1", "--device", "cpu"]) == 0
    assert json.load(open(os.path.join(out, "results.json")))["summary"]["object_tokens"] == trained
    image = str(tmp_path / "img.png")
    FSC147Dataset(synth_root, "val")[0].image.save(image)
    assert count_mod.main(["--checkpoint", checkpoint, "--image", image, "--class_name", "dots", "--tiles", "auto",
                           "--out_dir", str(tmp_path / "c"), "--max_count", "3", "--device", "cpu"]) == 0
    written = json.load(open(str(tmp_path / "c" / "img_points.json")))
    assert written["tiles"] >= 1 and written["count"] <= 3
    with pytest.raises(SystemExit):
        count_mod.main(["--checkpoint", checkpoint, "--image", image, "--class_name", "dots", "--tiles", "0"])
    assert "--tiles must be a positive number" in capsys.readouterr().err


def test_training_measures_its_objects_width_in_tokens_by_hand():
    from dataset_fsc147 import Sample
    from train_sequential_attention import median_object_tokens

    def sample(box_px: float, width: int = 224, height: int = 224):
        boxes = np.array([[0, 0, box_px, box_px], [10, 10, 10 + box_px, 10 + box_px]], dtype=np.float32)
        return Sample("a.jpg", Image.new("RGB", (width, height)), np.zeros((1, 2), np.float32), boxes, "dots")

    # 224 x 224 images, the processor's minimum 448 x 448: resized 2x, a token 28 processed px = 14 image px.
    # Boxes of 20, 10 and 30 px: 20 / 14 = 1.4286, 10 / 14 = 0.7143, 30 / 14 = 2.1429 tokens; the median 1.4286.
    data = [sample(20), sample(10), sample(30)]
    assert median_object_tokens(data, 448 * 448, 2 * 448 * 448) == pytest.approx(1.4286, abs=1e-4)
    # At the image's own size (224 = 8 tokens of 28 px): 20 / 28 = 0.7143.
    assert median_object_tokens(data, 224 * 224, 224 * 224) == pytest.approx(0.7143, abs=1e-4)
    # An unreadable image (None) is left out: the median of 10 and 30 px at 28 px per token = 20 / 28.
    assert median_object_tokens([sample(10), None, sample(30)], 224 * 224, 224 * 224) == pytest.approx(0.7143, abs=1e-4)
