"""Numbered marks and counting states (prepare_batch)."""

import numpy as np
import pytest
from PIL import Image

from dataset_fsc147 import (FSC147Dataset, Sample, draw_marks, mark_radius, normalize_points, object_size, prepare_batch,
                            reading_order)


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


def test_mark_size_follows_the_exemplar_boxes():
    # 0.35 of the mean exemplar size ((w + h) / 2), whatever the image size.
    small = np.array([[0, 0, 8, 8], [10, 10, 18, 18]], dtype=np.float32)
    large = np.array([[0, 0, 100, 80], [0, 0, 120, 100]], dtype=np.float32)
    assert object_size(large, 576, 384) == pytest.approx(100.0)
    assert mark_radius(576, 384, small) == 3  # round(0.35 * 8 = 2.8)
    assert mark_radius(576, 384, large) == 35
    assert mark_radius(576, 384, np.zeros((0, 4), np.float32)) == mark_radius(576, 384) == 10


def test_marks_on_a_dense_grid_leave_uncounted_neighbours_visible():
    # 1,000 objects 9 px apart (8 px exemplars) on a 384 x 288 image, the first half counted in reading
    # order: no mark reaches the centre pixel of an uncounted object. (Marks of 1/40 of the image,
    # 7 px, would cover neighbours 9 px away.)
    xs, ys = np.meshgrid(np.arange(40) * 9 + 5.0, np.arange(25) * 9 + 5.0)
    points = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    boxes = np.array([[0, 0, 8, 8]] * 3, dtype=np.float32)
    sample = Sample("grid.jpg", Image.new("RGB", (384, 288), (90, 120, 150)), points, boxes, "beads")
    rng = np.random.default_rng(0)
    for _ in range(50):
        batch = prepare_batch([sample], "reg", rng)
        if len(batch.counted[0]) > 300:
            break
    marked = np.asarray(batch.images[0])
    uncounted = np.round((batch.remaining[0] + 1) / 2 * np.array([384, 288])).astype(int)
    uncounted = np.clip(uncounted, 0, [383, 287])
    assert (marked[uncounted[:, 1], uncounted[:, 0]] == (90, 120, 150)).all()
    assert batch.mark_radii == [3]


def test_only_the_counted_objects_are_marked():
    pts = [[20, 20], [100, 20], [180, 20], [60, 90], [140, 90]]
    sample = make_sample(pts, size=(200, 120))
    background = np.asarray(sample.image)[0, 0]
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(20):
        batch = prepare_batch([sample], "reg", rng)
        k = len(batch.counted[0])
        seen.add(k)
        pixels = np.asarray(batch.images[0])
        changed = [bool((pixels[y, x] != background).any()) for x, y in pts]
        # Reading order by hand: (20,20), (100,20), (180,20), (60,90), (140,90): the first k are marked.
        assert changed == [True] * k + [False] * (5 - k), (k, changed)
    assert len(seen) > 2


def test_jittered_marks_land_near_their_objects():
    pts = [[30, 30], [100, 30], [170, 30], [60, 90], [140, 90]]
    boxes = [[0, 0, 20, 20]]  # object size 20 px: jitter 0.3 moves a mark up to 6 px
    sample = make_sample(pts, size=(200, 120), boxes=boxes)
    rng = np.random.default_rng(5)
    moved = []
    for _ in range(30):
        batch = prepare_batch([sample], "reg", rng, jitter=0.3)
        counted = (batch.counted[0] + 1) / 2 * np.array([200, 120])  # back to pixels
        true = sample.points[[0, 1, 2, 3, 4][:len(counted)]]
        dist = np.hypot(*(counted - true).T)
        assert (dist <= 6 + 1e-3).all()
        moved.extend(dist.tolist())
        for x, y in np.round(counted).astype(int):  # the marks are drawn where the counted points are
            assert (np.asarray(batch.images[0])[y, x] != np.asarray(sample.image)[y, x]).any()
    assert max(moved) > 2  # they do move


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


def test_skip_states_leave_objects_unmarked_behind_the_last_counted_one():
    # Six objects in one row at x = 10, 30, ..., 110: reading order is left to right, so object i is the i-th.
    xs = [10, 30, 50, 70, 90, 110]
    sample = make_sample([[x, 50] for x in xs])
    rng = np.random.default_rng(5)
    pixel = lambda p: round(float(p[0]) * 100 + 100)  # normalised x -> pixels (200 px wide)
    seen_end, seen_missed = False, set()
    for mode in ("cls", "reg"):
        for _ in range(60):
            batch = prepare_batch([sample], mode, rng, skip=1.0)
            if batch.done[0]:  # done states: every object marked, none skipped
                assert len(batch.counted[0]) == 6
                continue
            marked = sorted(pixel(p) for p in batch.counted[0])
            unmarked = sorted(pixel(p) for p in batch.remaining[0])
            assert sorted(marked + unmarked) == xs  # each object either marked or remaining, once
            behind = [x for x in unmarked if x < marked[-1]]  # skipped: left of the last counted object
            assert 1 <= len(behind) <= 3
            seen_missed.add(len(behind))
            seen_end |= marked[-1] == 110  # the marks reach the last object, and still not done
            if mode == "reg":  # the next object is the first unmarked one in reading order: a skipped one
                assert pixel(batch.targets[0, 0]) == unmarked[0] == behind[0]
    assert seen_end and seen_missed == {1, 2, 3}
    # skip 0 (the default): the marks are always the first k objects in reading order.
    for _ in range(20):
        batch = prepare_batch([sample], "reg", rng)
        assert sorted(pixel(p) for p in batch.counted[0]) == xs[:len(batch.counted[0])]


def test_reading_order_does_not_zig_zag_across_a_band_boundary():
    # Six touching 20 px objects in one physical row, y alternating 41 / 39: fixed 20 px bands put
    # them in two rows (x read as 30, 70, 110, 10, 50, 90); grouped by gaps they are one row.
    boxes = np.array([[0, 0, 20, 20]], dtype=np.float32)
    xs = [10, 30, 50, 70, 90, 110]
    row = np.array([[x, 41 if i % 2 == 0 else 39] for i, x in enumerate(xs)], dtype=np.float32)
    assert row[reading_order(row, boxes)][:, 0].tolist() == xs
    shifted = row + np.array([0, 5], dtype=np.float32)  # the same row 5 px lower: the same order
    assert shifted[reading_order(shifted, boxes)][:, 0].tolist() == xs
    # Two rows 30 px apart stay two rows, each left to right.
    two = np.array([[90, 70], [10, 40], [50, 71], [30, 39]], dtype=np.float32)
    assert reading_order(two, boxes).tolist() == [1, 3, 2, 0]


def test_regression_targets_follow_reading_order():
    pts = [[150, 20], [20, 22], [80, 90], [30, 100]]
    sample = make_sample(pts)
    order = [1, 0, 3, 2]  # by hand: row y 20..22 left to right (20, 150), then row y 90..100 (30, 80)
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


def test_remaining_holds_every_uncounted_object_the_next_one_included():
    # Reading order by hand: (20,20), (100,20), (180,20), then (60,90), (140,90). With k counted, the dense
    # object map is trained on objects k+1..N: the next target must be among them.
    pts = [[100, 20], [60, 90], [20, 20], [140, 90], [180, 20]]
    in_order = np.array([[20, 20], [100, 20], [180, 20], [60, 90], [140, 90]], dtype=np.float32)
    sample = make_sample(pts, size=(200, 120))
    rng = np.random.default_rng(6)
    seen = set()
    for mode in ("cls", "reg"):
        for _ in range(40):
            batch = prepare_batch([sample], mode, rng)
            k = len(batch.counted[0])
            seen.add((mode, k))
            np.testing.assert_allclose(batch.remaining[0], normalize_points(in_order[k:], 200, 120), atol=1e-6)
            if mode == "reg":  # the target is the first remaining object
                np.testing.assert_allclose(batch.targets[0, 0].numpy(), normalize_points(in_order[k], 200, 120)[0],
                                           atol=1e-6)
    assert {("cls", 5), ("cls", 0), ("reg", 4)} <= seen  # done, nothing counted, one left


def test_remaining_never_holds_another_class_s_object():
    named = [[30, 30], [100, 30], [170, 30]]
    others = [[60, 90], [140, 90], [100, 60]]  # distractors: in the image and in all_points, not annotated
    sample = make_sample(named, size=(200, 120))
    sample.all_points = np.array(named + others, dtype=np.float32)
    distractors = {tuple(p) for p in np.round(normalize_points(np.array(others, np.float32), 200, 120), 5)}
    rng = np.random.default_rng(7)
    for mode in ("cls", "reg"):
        for strategy in ("reading_order", "nearest"):
            for _ in range(10):
                batch = prepare_batch([sample], mode, rng, strategy)
                k = len(batch.counted[0])
                remaining = {tuple(p) for p in np.round(batch.remaining[0], 5)}
                assert not remaining & distractors and len(remaining) == 3 - k
                assert batch.num_objects == [3]
                assert {tuple(p) for p in np.round(batch.others[0], 5)} == distractors  # the hard negatives


def test_other_objects_are_every_object_for_a_negative_prompt():
    named = [[20, 20], [100, 20], [180, 20]]
    sample = make_sample(named)
    sample.all_points = np.array(named + [[60, 70]], dtype=np.float32)
    sample.other_classes = ("blue squares",)
    rng = np.random.default_rng(3)
    batch = prepare_batch([sample, sample], "cls", rng, negatives=1.0, class_pool=["red circles", "green stars"])
    for done, others in zip(batch.done, batch.others):  # one done state (names green stars), one not
        assert len(others) == (4 if done else 1)  # the prompt names none of the four objects, or misses one
    without = make_sample(named)  # no all_points: no known other object, but a negative prompt's objects are
    batch = prepare_batch([without, without], "cls", np.random.default_rng(3), negatives=1.0,
                          class_pool=["red circles", "green stars"])
    assert sorted(len(o) for o in batch.others) == [0, 3]


def test_negative_prompts_name_an_absent_class_with_nothing_to_count():
    samples = [make_sample([[20, 20], [100, 20], [180, 20]]) for _ in range(8)]
    for s in samples:
        s.other_classes = ("blue squares",)  # a distractor class in the image: never a negative
    pool = ["red circles", "blue squares", "green stars"]
    rng = np.random.default_rng(8)
    for _ in range(5):
        batch = prepare_batch(samples, "cls", rng, negatives=1.0, class_pool=pool)
        assert batch.done.sum() == 4  # still half done
        for done, name, counted, remaining, n, size in zip(batch.done, batch.class_names, batch.counted,
                                                           batch.remaining, batch.num_objects, batch.object_sizes):
            if done:  # every done state names the absent class: nothing counted, nothing left, no size
                assert name == "green stars" and len(counted) == len(remaining) == n == 0 and np.isnan(size)
            else:
                assert name == "red circles" and n == 3 and len(counted) + len(remaining) == 3
    reg = prepare_batch(samples, "reg", rng, negatives=1.0, class_pool=pool)
    assert set(reg.class_names) == {"red circles"}  # regression states always have a next object
    plain = prepare_batch(samples, "cls", np.random.default_rng(8))
    again = prepare_batch(samples, "cls", np.random.default_rng(8), negatives=0.0, class_pool=pool)
    assert [len(c) for c in plain.counted] == [len(c) for c in again.counted]  # off: the same states as before


def test_mark_size_jitter_scales_each_state_s_marks():
    sample = make_sample([[30, 30], [100, 30], [170, 30]], boxes=[[0, 0, 40, 40]])  # radius 14
    rng = np.random.default_rng(9)
    radii = [prepare_batch([sample], "reg", rng, size_jitter=0.3).mark_radii[0] for _ in range(60)]
    assert min(radii) >= round(14 * 0.7) and max(radii) <= round(14 * 1.3) and len(set(radii)) > 4
    assert prepare_batch([sample], "reg", rng).mark_radii == [14]
