"""The counting loop, its metrics, evaluate_counting.py and count_objects.py."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import count_objects as count_mod
import evaluate_counting as eval_mod
from count_objects import count_objects
from dataset_fsc147 import IMAGE_DIR, SPLIT_FILE, FSC147Dataset, Sample, draw_marks, prepare_batch
from evaluate_counting import match_points, other_class_points, summarize
from model_loading import load_checkpoint
from train_sequential_attention import TrainConfig, evaluate


class ScriptedModel(nn.Module):
    """Stands in for the VLM: says done once an image carries `image.width // 100` marks.

    It reads the number of counted points from `counted` and the image width from the marked
    images, so the loop's bookkeeping (marks, refills, stop rules) is tested without a real model.
    """

    def __init__(self, point=(0.5, -0.5)):
        super().__init__()
        self.x_head = nn.Module()
        self.x_head.fc1 = nn.Linear(1, 1)
        self.point = point
        self.batch_sizes = []

    def build_inputs(self, images, class_names):
        return {"want": torch.tensor([im.width // 100 for im in images])}

    def forward(self, inputs, counted=None):
        have = torch.tensor([len(c) for c in counted])
        self.batch_sizes.append(len(have))
        self.counted_seen = [np.array(c) for c in counted]
        n = len(have)
        # log_size 0: objects one token wide, a token being a quarter of the image (cell 0.5 of 2 units).
        return {"x": torch.full((n,), self.point[0]), "y": torch.full((n,), self.point[1]),
                "done_logit": torch.where(have >= inputs["want"], 10.0, -10.0),
                "log_size": torch.zeros(n), "cell": torch.full((n, 2), 0.5)}


def test_loop_stops_on_done_and_refills_the_batch():
    images = [Image.new("RGB", (100 * k, 80)) for k in (3, 0, 5, 1, 2)]
    model = ScriptedModel()
    results = count_objects(model, images, ["dots"] * 5, batch_size=2, max_count=50, protocol="exemplar",
                            duplicate_guard=False)  # the same point every time
    assert [r.count for r in results] == [3, 0, 5, 1, 2]
    assert [r.steps for r in results] == [4, 1, 6, 2, 3]
    assert not any(r.capped for r in results)
    # A finished image's slot is refilled at once: every batch but the last ones is full.
    assert model.batch_sizes[:5] == [2, 2, 2, 2, 2]
    # Points are converted back to pixels of the original image: (0.5, -0.5) -> (0.75 W, 0.25 H).
    np.testing.assert_allclose(results[0].points[0], [225, 20], atol=1e-4)


def test_loop_stops_at_the_cap_and_flags_duplicates_and_outside_points():
    image = Image.new("RGB", (900, 80))  # wants 9, capped at 4
    result = count_objects(ScriptedModel(point=(1.5, 0.0)), [image], ["dots"], max_count=4, protocol="exemplar",
                           duplicate_guard=False)[0]
    assert result.capped and result.count == 4 and result.steps == 4
    assert result.n_outside == 4  # x = 1.5 is right of the image
    assert result.n_duplicate == 3  # the same point four times: three land on an earlier one


def test_a_model_that_keeps_pointing_at_one_object_stops_through_the_guard():
    image = Image.new("RGB", (4000, 80))  # wants 40 marks before it says done, and always points at one place
    result = count_objects(ScriptedModel(point=(0.2, 0.0)), [image], ["dots"], max_count=4000, protocol="exemplar")[0]
    # The second step points on the first (counted) point: not counted, no other candidate, so the image stops.
    assert result.count == 1 and result.steps == 2 and not result.capped
    assert result.stopped_on_duplicates and result.n_duplicate == 1
    np.testing.assert_allclose(result.points, [[2400, 40]])
    # Without the guard the same model runs to the cap, one point (and one forward) per step.
    unguarded = count_objects(ScriptedModel(point=(0.2, 0.0)), [image], ["dots"], max_count=30, protocol="exemplar",
                              duplicate_guard=False)[0]
    assert unguarded.count == 30 and unguarded.steps == 30 and unguarded.capped and unguarded.n_duplicate == 29


def test_points_off_the_image_are_marked_and_fed_back_at_its_edge():
    image = Image.new("RGB", (300, 80))  # wants 3
    model = ScriptedModel(point=(1.5, -1.2))
    result = count_objects(model, [image], ["dots"], max_count=10, protocol="exemplar", duplicate_guard=False)[0]
    assert result.count == 3 and result.n_outside == 3
    # Recorded clipped to the image (x = W - 1, y = 0), and the model was given exactly those points.
    np.testing.assert_allclose(result.points, [[299, 0]] * 3)
    np.testing.assert_allclose(model.counted_seen[0], [[2 * 299 / 300 - 1, -1.0]] * 3, atol=1e-6)


class TokenScriptedModel(ScriptedModel):
    """A token-pointing stand-in: the same candidates at every step (its chosen point, then the other tokens'
    points with their "object here" and "next object" logits), done once `want` points are counted. Keeps the
    images it was given."""

    def __init__(self, points, object_logits, next_logits, want):
        super().__init__(point=points[0])
        self.points, self.want, self.images_seen = torch.tensor([points]), want, []
        self.object_logits, self.next_logits = torch.tensor([object_logits]), torch.tensor([next_logits])

    def build_inputs(self, images, class_names):
        self.images_seen += [np.asarray(im) for im in images]
        return {"want": torch.tensor([self.want] * len(images))}

    def forward(self, inputs, counted=None):
        out = super().forward(inputs, counted)
        n = len(counted)
        return {**out, "token_points": self.points.expand(n, -1, -1), "object_logits": self.object_logits.expand(n, -1),
                "next_logits": self.next_logits.expand(n, -1), "token_mask": torch.ones(n, self.points.shape[1], dtype=bool)}


# Normalised candidates on a 400 x 300 image (mark radius 8 px with exemplar radius 8): the chosen point, then
# three more objects, a point 5 px from the first (one object seen from two tokens), and a token the model does not
# believe holds an object (logit -3).
CANDIDATES = [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5), (-0.475, -0.5), (0.0, 0.0)]
OBJECT_LOGITS = [4.0, 3.0, 2.0, 1.0, 2.5, -3.0]
NEXT_LOGITS = [9.0, 8.0, 7.0, 6.0, 7.5, 0.0]
PIXELS = [[100, 75], [300, 75], [100, 225], [300, 225]]


def test_several_points_per_step_marks_exactly_the_points_it_commits():
    image = Image.new("RGB", (400, 300), (40, 60, 80))
    model = TokenScriptedModel(CANDIDATES, OBJECT_LOGITS, NEXT_LOGITS, want=4)
    result = count_objects(model, [image], ["dots"], protocol="exemplar", mark_radii=[8], points_per_step=0)[0]
    # One forward commits the four separated objects (not the near-copy of the first, nor the token without an
    # object), the second says done: 2 forwards for 4 objects.
    assert result.count == 4 and result.steps == 2 and result.n_duplicate == 0
    np.testing.assert_allclose(result.points, PIXELS)
    # The second forward saw exactly those four marks, numbered 1 to 4, and nothing else.
    assert np.array_equal(model.images_seen[1], np.asarray(draw_marks(image, PIXELS, radius=8)))
    assert not np.array_equal(model.images_seen[1], np.asarray(draw_marks(image, PIXELS[:3], radius=8)))


def test_points_per_step_limits_each_forward_and_skips_counted_objects():
    image = Image.new("RGB", (400, 300), (40, 60, 80))
    model = TokenScriptedModel(CANDIDATES, OBJECT_LOGITS, NEXT_LOGITS, want=4)
    result = count_objects(model, [image], ["dots"], protocol="exemplar", mark_radii=[8], points_per_step=2)[0]
    # Step 1: the first two. Step 2: the same candidates, the first two now on counted objects (the chosen one is a
    # duplicate), so the next two. Step 3: done.
    assert result.count == 4 and result.steps == 3 and result.n_duplicate == 1 and not result.stopped_on_duplicates
    np.testing.assert_allclose(result.points, PIXELS)
    assert np.array_equal(model.images_seen[1], np.asarray(draw_marks(image, PIXELS[:2], radius=8)))
    assert np.array_equal(model.images_seen[2], np.asarray(draw_marks(image, PIXELS, radius=8)))
    # One point per step with the guard: a chosen point on a counted object gives way to the model's next choice.
    one = count_objects(TokenScriptedModel(CANDIDATES, OBJECT_LOGITS, NEXT_LOGITS, want=4), [image], ["dots"],
                        protocol="exemplar", mark_radii=[8])[0]
    assert one.count == 4 and one.steps == 5 and one.n_duplicate == 3
    np.testing.assert_allclose(one.points, PIXELS)


def test_points_per_step_default_follows_how_the_checkpoint_trained(tmp_path, trained_run, synth_root):
    def checkpoint(name, config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    nearest = checkpoint("nearest", {"target_strategy": "nearest"})
    reading = checkpoint("reading", {"target_strategy": "reading_order"})
    old = checkpoint("old", {})  # a checkpoint from before the field: reading order, the only strategy then
    # nearest targets: every confident point (0 = auto); reading order: one point per forward.
    assert [count_mod.points_per_step_for("checkpoint", c) for c in (nearest, reading, old)] == [0, 1, 1]
    # An explicit mode wins over the checkpoint's.
    assert count_mod.points_per_step_for("4", nearest) == 4 and count_mod.points_per_step_for("auto", reading) == 0
    assert eval_mod.EvalConfig().points_per_step == "checkpoint"
    # End to end: the same weights with the strategy in config.json flipped to nearest count several points per
    # forward by default (results.json's summary says which mode ran).
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(trained_run, "checkpoint-last"), ckpt)
    modes = []
    for strategy in ("reading_order", "nearest"):
        config = json.load(open(os.path.join(ckpt, "config.json")))
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "target_strategy": strategy}))
        out = str(tmp_path / f"eval-{strategy}")
        assert eval_mod.main(["--checkpoint", ckpt, "--data_root", synth_root, "--output_dir", out, "--max_count", "2",
                              "--max_images", "2"]) == 0
        modes.append(json.load(open(os.path.join(out, "results.json")))["summary"]["points_per_step"])
    assert modes == [1, "auto"]


def test_tiles_default_follows_the_checkpoints_pointing(tmp_path, trained_run, synth_root):
    # token pointing: auto (0); regression pointing has no token grid to size crops: 1. An explicit mode wins.
    assert [count_mod.tiles_for("checkpoint", p) for p in ("token", "regression")] == [0, 1]
    assert count_mod.tiles_for("2", "token") == 2 and count_mod.tiles_for("auto", "regression") == 0
    assert eval_mod.EvalConfig().tiles == "checkpoint" and count_mod.tiles_option_errors("checkpoint") == []
    assert "auto or checkpoint, got 'two'" in count_mod.tiles_option_errors("two")[0]  # a clear error
    # End to end: the default on a token-pointing checkpoint counts with auto's grids (results.json's summary says
    # which ran; tests/test_tiles.py: an image auto leaves whole costs one forward more, with the same points).
    tiles = []
    for flags in ([], ["--tiles", "1"]):
        out = str(tmp_path / f"eval{len(flags)}")
        assert eval_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--data_root", synth_root,
                              "--output_dir", out, "--max_count", "3", "--max_images", "2", *flags]) == 0
        tiles.append(json.load(open(os.path.join(out, "results.json")))["summary"]["tiles"])
    assert tiles == ["auto", 1]


class MarkReadingModel(ScriptedModel):
    """Counts the marks it sees in the image (red mark pixels / one mark's red pixels) and says done once
    it sees `image.width // 100` of them; points somewhere new each time. Blind to `counted`."""

    def __init__(self):
        super().__init__()
        one = np.asarray(draw_marks(Image.new("RGB", (300, 80)), [[150, 40]]))
        self.per_mark = int((one == (220, 30, 30)).all(-1).sum())

    def build_inputs(self, images, class_names):
        marks = [int((np.asarray(im) == (220, 30, 30)).all(-1).sum()) // self.per_mark for im in images]
        return {"want": torch.tensor([im.width // 100 for im in images]), "marks": torch.tensor(marks)}

    def forward(self, inputs, counted=None):
        seen = inputs["marks"]
        return {"x": -0.8 + 0.3 * seen.float(), "y": torch.zeros(len(seen)),
                "done_logit": torch.where(seen >= inputs["want"], 10.0, -10.0)}


def test_the_loop_feeds_the_marked_image():
    images = [Image.new("RGB", (100 * k, 80), (60, 90, 60)) for k in (1, 3, 5)]
    results = count_objects(MarkReadingModel(), images, ["dots"] * 3, batch_size=2, max_count=8, protocol="exemplar")
    assert [r.count for r in results] == [1, 3, 5] and not any(r.capped for r in results)


def test_validation_done_accuracy_by_hand(tmp_path):
    # Images 100 * N wide with N objects: ScriptedModel says done exactly when k >= N, so it is always right.
    samples = [Sample(f"{n}.jpg", Image.new("RGB", (100 * n, 80)), np.array([[50 + 100 * i, 40] for i in range(n)],
                                                                              dtype=np.float32),
                      np.array([[0, 0, 20, 20]], dtype=np.float32), "dots") for n in (1, 2, 3, 4)]
    rng = np.random.default_rng(0)
    batches = [prepare_batch(samples, "cls", rng) for _ in range(3)] + [prepare_batch(samples, "reg", rng)]
    result = evaluate(TrainConfig(), ScriptedModel(point=(0.0, 0.0)), batches)
    assert result["val/done_acc"] == 1.0
    # (0, 0) is the image centre: |error| to the next object, averaged over x and y, by hand per state.
    expected = np.mean([np.abs(t[0].numpy()).mean() for t in batches[-1].targets])
    assert result["val/xy_abs_err"] == pytest.approx(expected, rel=1e-5)


def test_batched_counts_equal_one_at_a_time(trained_run, synth_root):
    model, _ = load_checkpoint(os.path.join(trained_run, "checkpoint-last"), device="cpu")
    ds = FSC147Dataset(synth_root, "val")
    samples = [ds[i] for i in range(5)]
    images, names = [s.image for s in samples], [s.class_name for s in samples]
    # Pick the threshold from the model's own done probabilities (median over images and steps), so
    # images stop after different numbers of steps and finished slots get refilled mid-batch.
    probe = count_objects(model, images, names, batch_size=1, done_threshold=0.999, max_count=6)
    kwargs = dict(done_threshold=float(np.median(np.concatenate([r.done_probs for r in probe]))), max_count=6)
    one = count_objects(model, images, names, batch_size=1, **kwargs)
    many = count_objects(model, images, names, batch_size=4, **kwargs)
    assert len({r.count for r in one}) > 1  # the test means something only if counts differ
    assert [r.count for r in one] == [r.count for r in many]
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.points, b.points, atol=1e-4)
        np.testing.assert_allclose(a.done_probs, b.done_probs, atol=1e-5)


def test_match_points_one_to_one_within_radius():
    gt = np.array([[0, 0], [10, 0], [100, 100]])
    # Two predictions near the first point: only one may match it; the second takes (10, 0).
    pred = np.array([[1, 0], [6, 0], [300, 300]])
    assert match_points(pred, gt, radius=5) == 2
    assert match_points(pred, gt, radius=0.5) == 0
    assert match_points(np.zeros((0, 2)), gt, radius=5) == 0
    # A greedy nearest match would pair (6, 0) with (10, 0) and (9, 0) with nothing; the assignment finds 2.
    assert match_points(np.array([[6, 0], [9, 0]]), np.array([[2, 0], [10, 0]]), radius=4.5) == 2


def test_summary_metrics_by_hand():
    records = [
        {"pred_count": 3, "gt_count": 5, "n_matched": 3, "capped": False},
        {"pred_count": 10, "gt_count": 4, "n_matched": 4, "capped": True},
        {"pred_count": 2, "gt_count": 2, "n_matched": 1, "capped": False},
    ]
    s = summarize(records, elapsed_s=2.0)
    assert s["mae"] == pytest.approx((2 + 6 + 0) / 3)
    assert s["rmse"] == pytest.approx(math.sqrt((4 + 36 + 0) / 3))
    assert s["nae"] == pytest.approx((2 / 5 + 6 / 4 + 0) / 3)
    assert s["precision"] == pytest.approx(8 / 15) and s["recall"] == pytest.approx(8 / 11)
    p, r = 8 / 15, 8 / 11
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["n_capped"] == 1 and s["images_per_s"] == pytest.approx(1.5)
    assert "says_total" not in s  # no image lists every object


def test_says_total_counts_images_answered_with_every_object():
    records = [
        {"pred_count": 7, "gt_count": 3, "all_count": 7, "n_matched": 3, "capped": False},  # counted both classes
        {"pred_count": 3, "gt_count": 3, "all_count": 9, "n_matched": 3, "capped": False},  # counted the class
        {"pred_count": 5, "gt_count": 2, "all_count": 4, "n_matched": 2, "capped": False},  # neither
        {"pred_count": 4, "gt_count": 4, "all_count": None, "n_matched": 4, "capped": False},  # no all_points
    ]
    s = summarize(records, elapsed_s=1.0)
    assert s["says_total"] == pytest.approx(1 / 3) and s["n_with_all_points"] == 3


def test_points_on_another_class_and_per_class_scores_by_hand():
    named = np.array([[10, 10], [50, 10]])
    every = np.array([[10, 10], [50, 10], [90, 10], [130, 10]])  # two objects of another class at x = 90, 130
    # One point on each named object, one on the other class's object at 90, one on nothing (200), and a second
    # point near the named object at 10 that the one-to-one matching leaves over: near no other-class object.
    pred = np.array([[11, 10], [49, 11], [88, 10], [200, 10], [12, 12]])
    assert other_class_points(pred, named, every, radius=5) == 1
    # Two points on the one object at 90 count once (one-to-one).
    assert other_class_points(np.array([[88, 10], [91, 10]]), named, every, radius=5) == 1
    assert other_class_points(np.zeros((0, 2)), named, every, radius=5) == 0
    records = [
        {"class_name": "red squares", "pred_count": 5, "gt_count": 2, "n_matched": 2, "capped": False,
         "all_count": 4, "n_on_other_class": 1},
        {"class_name": "red squares", "pred_count": 2, "gt_count": 2, "n_matched": 2, "capped": False,
         "all_count": 4, "n_on_other_class": 0},
        {"class_name": "yellow stars", "pred_count": 3, "gt_count": 4, "n_matched": 3, "capped": False,
         "all_count": 6, "n_on_other_class": 0},
    ]
    s = summarize(records, elapsed_s=1.0)
    assert s["points_on_other_class"] == pytest.approx(1 / 10) and s["n_points_on_other_class"] == 1
    assert s["per_class"] == {"red squares": {"n_images": 2, "exact_acc": 0.5, "mae": 1.5, "bias": 1.5},
                              "yellow stars": {"n_images": 1, "exact_acc": 0.0, "mae": 1.0, "bias": -1.0}}


def test_text_protocol_sizes_marks_from_the_model_estimate():
    class SizingModel(ScriptedModel):
        def build_inputs(self, images, class_names):
            self.images_seen = getattr(self, "images_seen", []) + [np.asarray(im) for im in images]
            return super().build_inputs(images, class_names)

        def forward(self, inputs, counted=None):
            out = super().forward(inputs, counted)
            return {**out, "log_size": torch.full((len(counted),), math.log(0.2))}

    # 400 x 300 image, cell 0.5 of 2 normalised units: a token is 100 x 75 px, 87.5 on average; objects of
    # 0.2 tokens are 17.5 px, and marks 0.35 of that: round(6.125) = 6 px.
    image = Image.new("RGB", (400, 300), (40, 60, 80))
    model = SizingModel(point=(0.0, 0.0))
    result = count_objects(model, [image], ["dots"], max_count=10, protocol="text", duplicate_guard=False)[0]
    assert result.count == 4 and result.object_size == pytest.approx(17.5) and result.mark_radius == 6
    assert result.n_duplicate == 3  # the same point four times, within a 6 px mark
    # The second step's image carries the first point's mark, drawn at that radius.
    assert np.array_equal(model.images_seen[1], np.asarray(draw_marks(image, result.points[:1], radius=6)))
    with pytest.raises(ValueError, match="no mark_radii"):
        count_objects(model, [image], ["dots"], mark_radii=[5], protocol="text")

    class Unsized(ScriptedModel):
        def forward(self, inputs, counted=None):
            return {k: v for k, v in super().forward(inputs, counted).items() if k != "log_size"}

    with pytest.raises(ValueError, match="protocol 'exemplar'"):
        count_objects(Unsized(), [image], ["dots"], protocol="text")

def test_evaluate_writes_results_json(trained_run, synth_root, tmp_path, capsys):
    out = str(tmp_path / "eval")
    code = eval_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-best"), "--data_root", synth_root,
                          "--split", "val", "--output_dir", out, "--max_count", "4", "--batch_size", "3",
                          "--save_overlays", "2", "--device", "cpu"])
    assert code == 0
    results = json.load(open(os.path.join(out, "results.json")))
    summary = results["summary"]
    for key in ("n_images", "mae", "rmse", "nae", "precision", "recall", "f1", "n_capped", "images_per_s"):
        assert key in summary
    assert summary["n_images"] == len(results["images"]) == 6
    for record in results["images"]:
        for key in ("id", "class_name", "gt_count", "pred_count", "points", "steps", "capped", "n_outside",
                    "n_duplicate"):
            assert key in record
        assert record["pred_count"] == len(record["points"]) <= 4
    gt = np.array([r["gt_count"] for r in results["images"]])
    pred = np.array([r["pred_count"] for r in results["images"]])
    assert summary["mae"] == pytest.approx(np.abs(pred - gt).mean())
    train = FSC147Dataset(synth_root, "train")
    mean = np.mean([len(e["points"]) for e in train.entries])
    assert summary["baseline_mean_mae"] == pytest.approx(np.abs(gt - mean).mean())
    assert len([f for f in os.listdir(out) if f.startswith("overlay_")]) == 2
    assert "MAE" in capsys.readouterr().out


def test_evaluate_skips_unreadable_images_and_rejects_empty_splits(trained_run, synth_root, tmp_path, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(synth_root, root)
    splits = json.load(open(os.path.join(root, SPLIT_FILE)))
    with open(os.path.join(root, IMAGE_DIR, splits["val"][0]), "wb") as f:
        f.write(b"\x00" * 10)
    ckpt = os.path.join(trained_run, "checkpoint-last")
    out = str(tmp_path / "eval")
    assert eval_mod.main(["--checkpoint", ckpt, "--data_root", root, "--output_dir", out, "--max_count", "2"]) == 0
    summary = json.load(open(os.path.join(out, "results.json")))["summary"]
    assert summary["n_images"] == 5 and summary["n_skipped"] == 1
    # Not the whole split: said in results.json and printed, so the MAE is not taken for the split's.
    assert summary["n_listed"] == 6 and summary["complete"] is False
    assert "WARNING: counted 5 of the 6 images listed in split 'val'" in capsys.readouterr().out
    assert eval_mod.main(["--checkpoint", ckpt, "--data_root", synth_root, "--output_dir", out, "--max_count", "2"]) == 0
    summary = json.load(open(os.path.join(out, "results.json")))["summary"]
    assert summary["n_listed"] == summary["n_images"] == 6 and summary["complete"] is True
    assert "WARNING" not in capsys.readouterr().out
    splits["val"] = []
    json.dump(splits, open(os.path.join(root, SPLIT_FILE), "w"))
    assert eval_mod.main(["--checkpoint", ckpt, "--data_root", root, "--output_dir", out]) == 2
    assert "no usable images" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_count_objects_cli_on_grayscale_and_rgba(trained_run, tmp_path, mode, capsys):
    path = str(tmp_path / f"img_{mode}.png")
    Image.new(mode, (200, 150)).save(path)
    out = str(tmp_path / "out")
    code = count_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--image", path,
                           "--class_name", "sea shells", "--out_dir", out, "--max_count", "3"])
    assert code == 0
    points = json.load(open(os.path.join(out, f"img_{mode}_points.json")))
    assert points["count"] == len(points["points"]) <= 3 and points["class_name"] == "sea shells"
    assert Image.open(os.path.join(out, f"img_{mode}_counted.png")).size == (200, 150)
    assert "sea shells:" in capsys.readouterr().out


def test_count_objects_cli_sizes_marks_from_exemplar_boxes(trained_run, tmp_path, monkeypatch):
    path = str(tmp_path / "img.png")
    Image.new("RGB", (400, 300)).save(path)
    radii = []
    real = count_mod.count_objects
    monkeypatch.setattr(count_mod, "count_objects", lambda *a, **k: radii.append(k["mark_radii"]) or real(*a, **k))
    ckpt = os.path.join(trained_run, "checkpoint-last")
    # Untiled: on tiles each crop's marks are the radius times the crop's zoom (tests/test_tiles.py).
    args = ["--checkpoint", ckpt, "--image", path, "--class_name", "x", "--out_dir", str(tmp_path), "--max_count", "1",
            "--tiles", "1"]
    exemplar = args + ["--protocol", "exemplar"]
    assert count_mod.main(exemplar + ["--exemplar_boxes", "10,10,50,50; 100,100,140,140"]) == 0
    assert count_mod.main(exemplar + ["--mark_radius", "6"]) == 0
    assert radii == [[14], [6]]  # 0.35 x 40 px boxes; as given
    assert count_mod.main(args) == 0  # text-only: no radius given, the model sizes the marks
    assert radii[-1] is None
    saved = json.load(open(tmp_path / "img_points.json"))
    assert saved["mark_radius"] >= 2 and saved["object_size"] > 0


def test_count_objects_cli_errors(trained_run, tmp_path, capsys):
    bad = str(tmp_path / "bad.jpg")
    open(bad, "wb").write(b"not an image")
    ckpt = os.path.join(trained_run, "checkpoint-last")
    assert count_mod.main(["--checkpoint", ckpt, "--image", bad, "--class_name", "x"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert count_mod.main(["--checkpoint", str(tmp_path), "--image", bad, "--class_name", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err or "not a checkpoint" in err
    good = str(tmp_path / "good.png")
    Image.new("RGB", (64, 64)).save(good)
    assert count_mod.main(["--checkpoint", str(tmp_path), "--image", good, "--class_name", "x"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        count_mod.main(["--checkpoint", ckpt, "--image", good, "--class_name", "x", "--protocol", "exemplar",
                        "--exemplar_boxes", "1,2,3"])
    assert "--exemplar_boxes" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # boxes are not given to a text-only count, and exemplar needs them
        count_mod.main(["--checkpoint", ckpt, "--image", good, "--class_name", "x", "--exemplar_boxes", "1,2,3,4"])
    assert "add --protocol exemplar" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        count_mod.main(["--checkpoint", ckpt, "--image", good, "--class_name", "x", "--protocol", "exemplar"])
    assert "needs --exemplar_boxes or --mark_radius" in capsys.readouterr().err


def test_default_caps_cover_the_densest_fsc147_image():
    # FSC-147's densest image holds 3,731 objects (../shared/reference/README.md); a default cap below that
    # would cut it off and it would dominate the RMSE.
    import inspect

    assert eval_mod.EvalConfig().max_count > 3731
    assert inspect.signature(count_objects).parameters["max_count"].default > 3731


def test_without_the_guard_every_point_on_a_counted_object_is_a_duplicate():
    """Several points per step, no guard: step 2 commits the same four objects again, each on a counted one."""
    image = Image.new("RGB", (400, 300), (40, 60, 80))
    model = TokenScriptedModel(CANDIDATES, OBJECT_LOGITS, NEXT_LOGITS, want=100)
    result = count_objects(model, [image], ["dots"], protocol="exemplar", mark_radii=[8], points_per_step=0,
                           max_count=8, duplicate_guard=False)[0]
    # Step 1: the four objects (the near-copy of the first is the same object, skipped). Step 2: the same four
    # again, every one of them within half an object size of a counted point: four duplicates, not one.
    assert result.count == 8 and result.steps == 2 and result.capped
    np.testing.assert_allclose(result.points, PIXELS + PIXELS)
    assert result.n_duplicate == 4
    two = count_objects(TokenScriptedModel(CANDIDATES, OBJECT_LOGITS, NEXT_LOGITS, want=100), [image], ["dots"],
                        protocol="exemplar", mark_radii=[8], points_per_step=2, max_count=4, duplicate_guard=False)[0]
    assert two.count == 4 and two.n_duplicate == 2  # step 2 commits the first two again


def test_duplicate_distance_is_half_the_object_size_of_the_mark():
    # A mark of radius 7 is drawn for objects of 7 / 0.35 = 20 px; neighbours that touch are 20 px apart, so two
    # points closer than 10 px are on one object.
    assert count_mod.duplicate_distance(7) == pytest.approx(10.0)
    # Through the loop on a 400 x 300 image (radius 7): a point 11 px right of the first is a neighbour (counted),
    # one 9 px below it is the same object (skipped).
    candidates = [(-0.5, -0.5), (2 * 111 / 400 - 1, -0.5), (-0.5, 2 * 84 / 300 - 1)]
    model = TokenScriptedModel(candidates, [4.0, 3.0, 2.0], [9.0, 8.0, 7.0], want=2)
    result = count_objects(model, [Image.new("RGB", (400, 300))], ["dots"], protocol="exemplar", mark_radii=[7],
                           points_per_step=0)[0]
    assert result.count == 2 and result.steps == 2
    np.testing.assert_allclose(result.points, [[100, 75], [111, 75]], atol=1e-3)


def test_estimated_object_size_on_a_non_square_image():
    # Qwen2-VL tokens are 28 x 28 pixels: on a 576 x 384 image a token spans 2 * 28 / 576 of the x range [-1, 1]
    # and 2 * 28 / 384 of the y range. log_size ln 3: objects three tokens wide = 84 px. With width and height
    # swapped the same outputs would give (28 * 384 / 576 + 28 * 576 / 384) / 2 * 3 = 91 px.
    outputs = {"log_size": torch.tensor([math.log(3.0)]), "cell": torch.tensor([[2 * 28 / 576, 2 * 28 / 384]])}
    assert count_mod.estimated_object_size(outputs, 0, 576, 384) == pytest.approx(84.0, rel=1e-5)
    # Cells of unequal pixel size: x 0.1 of 2 units of 576 px = 28.8 px, y 0.2 of 2 units of 384 px = 38.4 px.
    outputs["cell"] = torch.tensor([[0.1, 0.2]])
    assert count_mod.estimated_object_size(outputs, 0, 576, 384) == pytest.approx(3 * (28.8 + 38.4) / 2, rel=1e-5)


def test_says_total_counts_only_images_that_hold_other_classes():
    records = [  # gt 3 of 5 objects: says the total; gt 4 of 4 (no distractor fitted): right count, not a total
        {"pred_count": 5, "gt_count": 3, "all_count": 5}, {"pred_count": 4, "gt_count": 4, "all_count": 4},
        {"pred_count": 2, "gt_count": 2, "all_count": 6}, {"pred_count": 3, "gt_count": 3, "all_count": None}]
    assert eval_mod.says_total(records) == {"says_total": 0.5, "n_with_distractors": 2, "n_with_all_points": 3}
    assert eval_mod.says_total(records[1:2])["says_total"] is None  # nothing to tell it from
    assert eval_mod.says_total(records[3:]) == {}


def test_a_max_images_sample_is_not_reported_as_the_whole_split(trained_run, synth_root, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert eval_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--data_root", synth_root,
                          "--output_dir", out, "--max_count", "2", "--max_images", "3"]) == 0
    summary = json.load(open(os.path.join(out, "results.json")))["summary"]
    assert summary["n_images"] == summary["n_asked"] == 3 and summary["n_listed"] == 6
    assert summary["subset"] is True and summary["complete"] is False
    printed = capsys.readouterr().out
    assert "WARNING: counted 3 of the 6 images listed in split 'val' (a sample of 3 (--max_images))" in printed
    assert "3 / 6" in printed


def test_count_objects_cli_rejects_boxes_and_radius_together(trained_run, tmp_path, capsys):
    good = str(tmp_path / "good.png")
    Image.new("RGB", (64, 64)).save(good)
    with pytest.raises(SystemExit):
        count_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--image", good, "--class_name",
                        "x", "--protocol", "exemplar", "--exemplar_boxes", "1,2,30,40", "--mark_radius", "6"])
    assert "--exemplar_boxes and --mark_radius both set the marks' size" in capsys.readouterr().err


def test_a_tie_on_val_goes_to_the_threshold_nearest_the_default_not_the_lowest():
    # bench-distractors' s15k row (RESULTS.md 1d): summed errors of 37 over 300 val images at 0.3, 0.4 and 0.7.
    maes = {0.3: 37 / 300, 0.4: 37 / 300, 0.5: 40 / 300, 0.6: 38 / 300, 0.7: 37 / 300}
    assert eval_mod.pick_threshold(maes, 0.5) == 0.4  # 0.1 from 0.5 against 0.2 for 0.3 and 0.7
    assert eval_mod.pick_threshold(maes, 0.9) == 0.7
    assert eval_mod.pick_threshold({0.3: 0.2, 0.7: 0.2}, 0.5) == 0.3  # as near: the lower
    assert eval_mod.pick_threshold({0.3: 0.2, 0.9: 0.1, 0.5: 0.15}, 0.5) == 0.9  # no tie: the lowest MAE wins


def test_tune_threshold_chooses_on_val_before_reading_a_test_image(trained_run, synth_root, tmp_path, monkeypatch):
    reads = []
    real = FSC147Dataset.__getitem__
    monkeypatch.setattr(FSC147Dataset, "__getitem__", lambda self, i: reads.append(self.split) or real(self, i))
    modes, count_dataset = [], eval_mod.count_dataset  # each call's (split, points per forward)
    monkeypatch.setattr(eval_mod, "count_dataset", lambda model, ds, settings, *a, **k: modes.append(
        (ds.split, settings.points_per_step)) or count_dataset(model, ds, settings, *a, **k))
    out = str(tmp_path / "eval")
    assert eval_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--data_root", synth_root,
                          "--split", "test", "--output_dir", out, "--max_count", "3",
                          "--tune_threshold", "0.3,0.7", "--points_per_step", "2"]) == 0
    # The threshold is chosen counting as the reported split is counted: two points per forward, not one.
    assert modes == [("val", 2), ("val", 2), ("test", 2)]
    first_test = reads.index("test")
    assert set(reads[:first_test]) == {"val"} and set(reads[first_test:]) == {"test"}
    assert len(reads[:first_test]) == 2 * 6  # both thresholds on every val image
    summary = json.load(open(os.path.join(out, "results.json")))["summary"]
    tuning = summary["threshold_tuning"]
    assert tuning["split"] == "val" and set(tuning["mae_per_threshold"]) == {"0.3", "0.7"}
    assert summary["done_threshold"] == tuning["chosen"] == min((0.3, 0.7), key=lambda t: tuning["mae_per_threshold"][str(t)])
    with pytest.raises(SystemExit):  # tuning on the split being reported is refused
        eval_mod.main(["--checkpoint", "x", "--data_root", synth_root, "--split", "val", "--tune_threshold", "0.5"])


def test_moved_base_weights_are_a_clear_error_and_model_name_or_path_overrides(trained_run, tiny_model_dir, tmp_path,
                                                                              capsys):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(trained_run, "checkpoint-last"), ckpt)
    config = json.load(open(os.path.join(ckpt, "config.json")))
    config["model_name_or_path"] = str(tmp_path / "moved-away")
    json.dump(config, open(os.path.join(ckpt, "config.json"), "w"))
    image = str(tmp_path / "img.png")
    Image.new("RGB", (120, 90)).save(image)
    args = ["--checkpoint", ckpt, "--image", image, "--class_name", "x", "--out_dir", str(tmp_path), "--max_count", "1"]
    assert count_mod.main(args) == 2
    assert "pass --model_name_or_path" in capsys.readouterr().err
    assert count_mod.main(args + ["--model_name_or_path", tiny_model_dir]) == 0


def test_photos_are_read_as_their_exif_orientation_shows_them(trained_run, tmp_path):
    """A phone photo stored 200 x 100 with EXIF orientation 6 (turn 90 degrees clockwise) is shown 100 x 200: it is
    counted, and its points given, in that frame. Dataset images are read as stored."""
    from dataset_fsc147 import load_rgb

    path = str(tmp_path / "phone.jpg")
    stored = Image.new("RGB", (200, 100), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 20, 20))  # a blue corner: top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes())
    shown = load_rgb(path, exif_orientation=True)
    assert shown.size == (100, 200) and load_rgb(path).size == (200, 100)
    assert shown.getpixel((90, 5))[2] > 150  # turned clockwise: the stored top-left corner is now top right
    out = tmp_path / "out"
    assert count_mod.main(["--checkpoint", os.path.join(trained_run, "checkpoint-last"), "--image", path,
                           "--class_name", "x", "--out_dir", str(out), "--max_count", "2"]) == 0
    assert Image.open(out / "phone_counted.png").size == (100, 200)
