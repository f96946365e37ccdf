"""Numbered marks and counting states (prepare_batch)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_fsc147 import FSC147Dataset, Sample, draw_marks, mark_radius, normalize_points, prepare_batch, reading_order


def make_sample(points, size=(200, 120), boxes=None, image_id="s.jpg"):
    pts = np.asarray(points, dtype=np.float32)
    boxes = np.asarray(boxes if boxes is not None else [[0, 0, 20, 20]], dtype=np.float32)
    return Sample(image_id, Image.new("RGB", size, (90, 120, 150)), pts, boxes, "red circles")


@pytest.mark.parametrize("background", [(0, 0, 0), (255, 255, 255), (220, 30, 30)])
def test_marks_contrast_on_any_background(background):
    image = Image.new("RGB", (300, 200), background)
    marked = np.asarray(draw_marks(image, [[150, 100]]))
    r = mark_radius(300, 200)
    patch = marked[100 - r - 3:100 + r + 4, 150 - r - 3:150 + r + 4].reshape(-1, 3).astype(int)
    # Both a near-white and a near-black outline/text pixel: one of them contrasts with the background.
    assert (patch.min(1) > 200).any() and (patch.max(1) < 50).any()
    assert np.asarray(image).max() == max(background) and (np.asarray(image) == background).all()  # input untouched


def test_marks_are_deterministic_numbered_and_local():
    image = Image.new("RGB", (400, 300), (100, 160, 90))
    pts = [[50, 50], [300, 200]]
    a, b = np.asarray(draw_marks(image, pts)), np.asarray(draw_marks(image, pts))
    assert (a == b).all()
    changed = (a != np.asarray(image)).any(-1)
    ys, xs = np.nonzero(changed)
    r = mark_radius(400, 300)
    assert all(min(np.hypot(x - px, y - py) for px, py in pts) <= 2.5 * r for x, y in zip(xs, ys))
    # Different numbers give different pixels (the label is drawn, not just a dot).
    c = np.asarray(draw_marks(image, pts, labels=[7, 8]))
    assert (a != c).any()


def test_mark_size_scales_with_the_image():
    assert mark_radius(1600, 1200) > 3 * mark_radius(400, 300)
    big = np.asarray(draw_marks(Image.new("RGB", (1600, 1200)), [[800, 600]]))
    small = np.asarray(draw_marks(Image.new("RGB", (400, 300)), [[200, 150]]))
    assert (big.any(-1)).sum() > 8 * (small.any(-1)).sum()


def test_no_points_gives_the_image_unchanged():
    image = Image.new("L", (64, 64), 128)
    out = draw_marks(image, np.zeros((0, 2)))
    assert out.mode == "RGB" and (np.asarray(out) == 128).all()


def test_reading_order_rows_then_left_to_right():
    # Two rows (band 20 px): y jitter inside a row does not change the order.
    pts = np.array([[100, 12], [10, 15], [50, 8], [20, 45], [90, 41]], dtype=np.float32)
    order = reading_order(pts, np.array([[0, 0, 20, 20]], dtype=np.float32))
    assert order.tolist() == [1, 2, 0, 3, 4]


def test_classification_batches_are_balanced():
    samples = [make_sample([[10 + 20 * i, 50] for i in range(n)]) for n in (1, 2, 3, 4, 5, 6, 7, 8)]
    rng = np.random.default_rng(0)
    for _ in range(10):
        batch = prepare_batch(samples, "cls", rng)
        assert batch.done.sum() == 4  # exactly half of an even batch
        for done, counted, n in zip(batch.done, batch.counted, batch.num_objects):
            assert (len(counted) == n) if done else (len(counted) < n)
    # Odd batches: the extra state goes either way, so the split is 50/50 over steps.
    done_total = sum(float(prepare_batch(samples[:3], "cls", rng).done.sum()) for _ in range(400))
    assert 0.45 < done_total / 1200 < 0.55


def test_near_done_states_leave_exactly_one_object():
    samples = [make_sample([[10 + 20 * i, 50] for i in range(n)]) for n in (2, 3, 4, 5, 6, 7, 8, 9)]
    rng = np.random.default_rng(3)
    left = lambda batch: [n - len(c) for d, c, n in zip(batch.done, batch.counted, batch.num_objects) if not d]
    for _ in range(10):
        always = prepare_batch(samples, "cls", rng, near_done=1.0)
        assert always.done.sum() == 4 and set(left(always)) == {1}  # still a 50/50 split
    uniform = [x for _ in range(20) for x in left(prepare_batch(samples, "cls", rng, near_done=0.0))]
    assert max(uniform) > 3  # uniform k leaves several objects in many states
    reg = prepare_batch(samples, "reg", rng, near_done=1.0)  # regression states keep uniform k
    assert len({len(c) for c in reg.counted}) > 1


def test_regression_targets_follow_reading_order():
    pts = [[150, 20], [20, 22], [80, 90], [30, 100]]
    sample = make_sample(pts)
    order = reading_order(sample.points, sample.boxes)
    rng = np.random.default_rng(1)
    seen_k = set()
    for _ in range(30):
        batch = prepare_batch([sample], "reg", rng, "reading_order")
        k = len(batch.counted[0])
        seen_k.add(k)
        assert batch.done[0] == 0 and k < 4
        expected = normalize_points(sample.points[order[k]], 200, 120)[0]
        np.testing.assert_allclose(batch.targets[0, 0].numpy(), expected, atol=1e-6)
        assert batch.target_mask.tolist() == [[True]]
        np.testing.assert_allclose(batch.counted[0], normalize_points(sample.points[order[:k]], 200, 120), atol=1e-6)
    assert seen_k == {0, 1, 2, 3}


def test_nearest_strategy_targets_every_uncounted_object():
    sample = make_sample([[10, 10], [60, 60], [110, 30], [180, 100]])
    rng = np.random.default_rng(2)
    for _ in range(20):
        batch = prepare_batch([sample], "reg", rng, "nearest")
        counted = {tuple(np.round(p, 5)) for p in batch.counted[0]}
        targets = {tuple(np.round(t, 5)) for t, m in zip(batch.targets[0].numpy(), batch.target_mask[0]) if m}
        everything = {tuple(np.round(p, 5)) for p in normalize_points(sample.points, 200, 120)}
        assert counted | targets == everything and not counted & targets and targets


def test_targets_are_normalised_against_the_image_size(synth_root):
    ds = FSC147Dataset(synth_root, "train")
    samples = [ds[i] for i in range(6)]
    batch = prepare_batch(samples, "reg", np.random.default_rng(0))
    assert batch.targets[batch.target_mask].abs().max() <= 1.0
    assert [im.size for im in batch.images] == [s.image.size for s in samples]


def test_bad_mode_or_strategy_is_an_error():
    with pytest.raises(ValueError, match="mode"):
        prepare_batch([make_sample([[1, 1]])], "both", np.random.default_rng(0))
    with pytest.raises(ValueError, match="strategy"):
        prepare_batch([make_sample([[1, 1]])], "reg", np.random.default_rng(0), "random")
