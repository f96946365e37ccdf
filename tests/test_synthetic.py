"""The synthetic scene generator: distractor classes, the compositional class split, dense scenes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dataset_fsc147 import (ANNOTATION_FILE, CLASS_FILE, IMAGE_DIR, SPLIT_FILE, FSC147Dataset, SyntheticTrainImages,
                            read_class_file, synth_sample, write_synthetic_fsc147)
from dataset_fsc147 import main as dataset_main
from synthetic_fsc147 import (COLOURS, PLURALS, SynthConfig, compositional_classes, distractor_pools, synth_scene,
                              validate_synth)

SMALL = dict(image_height=224, min_width=224, max_width=280, background="plain")


def colour_at(image: Image.Image, x: float, y: float):
    return tuple(int(v) for v in np.asarray(image)[int(round(y)), int(round(x))])


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(COLOURS[c], rgb)))


def test_distractors_are_drawn_but_only_the_named_class_is_annotated(tmp_path):
    root = str(tmp_path / "d")
    # Circles, squares, triangles... (filled shapes: the centre pixel has the object's colour; rings are hollow).
    write_synthetic_fsc147(SynthConfig(out=root, num_images=30, seed=1, num_classes=6, class_split="shared",
                                       distractors=2, **SMALL))
    ann = json.load(open(os.path.join(root, ANNOTATION_FILE)))
    classes = read_class_file(os.path.join(root, CLASS_FILE))
    seen_other_classes = set()
    for image_id, entry in ann.items():
        named = classes[image_id]
        points, everything = np.array(entry["points"]), np.array(entry["all_points"])
        others = entry["distractor_classes"]
        assert 1 <= len(others) <= 2 and named not in others
        seen_other_classes.add(len(others))
        # all_points holds every named point and at least one object of each distractor class, 1 to 6 each.
        assert {tuple(p) for p in points} <= {tuple(p) for p in everything}
        assert len(others) <= len(everything) - len(points) <= 6 * len(others)
        # Exemplar boxes surround named objects (centres at named points).
        for b in entry["box_examples_coordinates"]:
            centre = np.array([(b[0][0] + b[2][0]) / 2, (b[0][1] + b[2][1]) / 2])
            assert np.linalg.norm(points - centre, axis=1).min() < 0.05
        # No two objects of any class overlap (centres farther apart than the smallest object, 6 px radius).
        d = np.linalg.norm(everything[:, None] - everything[None], axis=-1) + np.eye(len(everything)) * 1e9
        assert d.min() > 12
        image = Image.open(os.path.join(root, IMAGE_DIR, image_id)).convert("RGB")
        named_colour = named.split(" ")[0]
        shape = [s for s, plural in PLURALS.items() if named.endswith(plural)][0]
        if shape not in ("ring", "star"):  # filled at the centre
            for x, y in points:
                assert nearest_colour(colour_at(image, x, y)) == named_colour
        # The plain background differs from every object colour in the image.
        background = colour_at(image, 1, 1)
        present = [named_colour] + [o.split(" ")[0] for o in others]
        assert min(sum(abs(a - b) for a, b in zip(background, COLOURS[c])) for c in present) >= 100
    assert seen_other_classes == {1, 2}
    # Loaded samples carry every object, and a dataset without distractors carries none.
    sample = FSC147Dataset(root, "test")[0]
    assert sample.all_points is not None and len(sample.all_points) > len(sample.points)
    fresh = SyntheticTrainImages(root)[5]
    assert fresh.all_points is not None and len(fresh.all_points) > len(fresh.points)


def test_confuser_share_gives_training_images_only_same_colour_or_shape_neighbours(tmp_path):
    """--confusers 1: every fresh training image of a class that has a training class of its colour or shape holds
    only such classes besides its own; --confusers 0 leaves the images as they were, some with neither."""
    root = str(tmp_path / "c")
    write_synthetic_fsc147(SynthConfig(out=root, num_images=10, seed=1, num_classes=6, class_split="shared",
                                       distractors=2, **SMALL))
    shares = lambda a, b: a.split(" ")[0] == b.split(" ")[0] or a.split(" ")[1] == b.split(" ")[1]
    plain, hard = SyntheticTrainImages(root), SyntheticTrainImages(root, confusers=1.0)
    names = plain.class_names
    checked = unlike = 0
    for i in range(24):
        a, b = plain[i], hard[i]
        assert a.class_name == b.class_name and b.other_classes
        # confusers=0: the image the generator drew before the option existed (same seed, the whole pool).
        before = synth_sample(np.random.default_rng([plain.cfg.seed, 7919, i]), plain.cfg,
                              plain.classes[i % len(plain.classes)], f"synth-{i}", plain.pool)
        assert np.array_equal(a.points, before.points) and a.other_classes == before.other_classes
        unlike += not all(shares(a.class_name, o) for o in a.other_classes)
        if any(shares(b.class_name, n) for n in names if n != b.class_name):
            assert all(shares(b.class_name, o) for o in b.other_classes), (b.class_name, b.other_classes)
            checked += 1
    assert checked >= 12 and unlike >= 6


def test_without_distractors_the_annotation_has_no_all_points(synth_root):
    ann = json.load(open(os.path.join(synth_root, ANNOTATION_FILE)))
    assert not any("all_points" in entry for entry in ann.values())
    assert FSC147Dataset(synth_root, "train")[0].all_points is None


def test_compositional_split_holds_out_pairs_but_no_colour_or_shape():
    cfg = SynthConfig(class_split="compositional", num_colours=6, num_shapes=6)
    split = compositional_classes(cfg, np.random.default_rng(0))
    pairs = {name: {(shape, colour) for _, shape, colour in classes} for name, classes in split.items()}
    assert [len(pairs[s]) for s in ("train", "val", "test")] == [24, 6, 6]
    assert not pairs["train"] & pairs["val"] and not pairs["train"] & pairs["test"] and not pairs["val"] & pairs["test"]
    for held in ("val", "test"):
        # one pair per colour and per shape, each colour and shape also in training (4 times)
        assert len({c for _, c in pairs[held]}) == len({s for s, _ in pairs[held]}) == 6
        for shape, colour in pairs[held]:
            assert sum(s == shape for s, _ in pairs["train"]) == 4
            assert sum(c == colour for _, c in pairs["train"]) == 4
    # Distractors: training images draw on training classes only; test images on training and test classes.
    pools = distractor_pools(split)
    assert set(pools["train"]) == set(split["train"])
    assert set(pools["test"]) == set(split["train"]) | set(split["test"]) and not set(pools["test"]) & set(split["val"])


def test_compositional_dataset_names_unseen_pairs_in_its_test_split(tmp_path):
    root = str(tmp_path / "c")
    write_synthetic_fsc147(SynthConfig(out=root, num_images=40, seed=0, class_split="compositional",
                                       distractors=1, **SMALL))
    classes = read_class_file(os.path.join(root, CLASS_FILE))
    splits = json.load(open(os.path.join(root, SPLIT_FILE)))
    named = {s: {classes[i] for i in splits[s]} for s in ("train", "val", "test")}
    assert not named["train"] & named["test"] and not named["train"] & named["val"]
    ann = json.load(open(os.path.join(root, ANNOTATION_FILE)))
    train_distractors = {c for i in splits["train"] for c in ann[i]["distractor_classes"]}
    assert not train_distractors & (named["val"] | named["test"])  # unseen classes never appear in training images


def test_dense_scenes_place_many_small_touching_objects():
    cfg = SynthConfig(min_objects=60, max_objects=60, min_gap=0.0, **SMALL)
    scene = synth_scene(np.random.default_rng(0), cfg, ("red circles", "circle", "red"))
    pts = np.array(scene.points)
    assert len(pts) == 60  # all placed, without overlap
    boxes = np.array([[b[0][0], b[0][1], b[2][0], b[2][1]] for b in scene.boxes])
    size = float(np.mean((boxes[:, 2] - boxes[:, 0] + boxes[:, 3] - boxes[:, 1]) / 2))
    assert size < 28  # smaller than one 28 px image token
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9
    assert d.min() > 0.85 * size  # discs of radius >= 0.85 * r do not overlap


def test_placement_draws_the_same_scenes_as_the_seeds_uniform_draws():
    """`_place` draws its places with rng.random(); every benchmark's images and pretraining's scenes were drawn
    with rng.uniform(low, high) and the check against `placed + new` written out: the same discs, draw for draw."""
    from synthetic_fsc147 import _place

    def reference(rng, width, height, radius, count, placed, gap):  # the generator as first written
        new = []
        for _ in range(count):
            for _attempt in range(200):
                r = radius * float(rng.uniform(0.85, 1.15))
                cx, cy = float(rng.uniform(r + 2, width - r - 2)), float(rng.uniform(r + 2, height - r - 2))
                if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + gap) ** 2 for px, py, pr in placed + new):
                    new.append((cx, cy, r))
                    break
        return new

    for seed, (radius, count, gap) in enumerate([(20.0, 10, 4.0), (9.0, 60, 0.0), (30.0, 40, 1.0)]):
        placed = [(50.0, 60.0, 12.0), (120.0, 100.0, 8.0)]
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        got, want = _place(a, 280, 224, radius, count, placed, gap), reference(b, 280, 224, radius, count, placed, gap)
        assert got == want and 0 < len(want)  # every float equal, and the rngs left in the same state
        assert a.random() == b.random()
    assert len(want) < 40  # the last case runs out of room: the 200 tries of a left-out object are drawn too


def test_size_scale_shrinks_objects():
    base = SynthConfig(min_objects=5, max_objects=5, **SMALL)
    small = SynthConfig(min_objects=5, max_objects=5, size_scale=0.5, **SMALL)
    size = lambda cfg: np.mean([b[2][0] - b[0][0] for b in synth_scene(np.random.default_rng(3), cfg,
                                                                        ("red circles", "circle", "red")).boxes])
    assert size(small) == pytest.approx(0.5 * size(base), rel=0.2)


def test_bad_generator_settings_are_reported_together(capsys):
    errors = validate_synth(SynthConfig(class_split="compositional", shared_classes=True, num_colours=9,
                                        distractors=-1))
    assert any("contradict" in e for e in errors) and any("--num_colours" in e for e in errors)
    assert any("--distractors" in e for e in errors)
    with pytest.raises(SystemExit):
        dataset_main(["synth", "--out", "/tmp/x", "--class_split", "mixed"])
    assert "--class_split must be one of" in capsys.readouterr().err


def test_compositional_split_rejects_the_flags_it_cannot_honour():
    """The grid decides the classes: --num_classes other than its size and --distinct_colours are errors, not
    silently ignored; the bench builds the same checks from its own flags."""
    import bench_learning

    assert validate_synth(SynthConfig(class_split="compositional")) == []
    assert validate_synth(SynthConfig(class_split="compositional", num_classes=36)) == []  # the 6 x 6 grid itself
    errors = validate_synth(SynthConfig(class_split="compositional", num_classes=99, distinct_colours=True))
    assert any("--num_classes 99" in e for e in errors) and any("--distinct_colours cannot hold" in e for e in errors)
    for flags in (["--num_classes", "99"], ["--distinct_colours"]):
        with pytest.raises(SystemExit):
            bench_learning.main(["--class_split", "compositional", *flags])
    # Without compositional, --num_classes still sets the classes (0: the default of 12).
    assert validate_synth(SynthConfig(num_classes=99)) and validate_synth(SynthConfig(num_classes=0)) == []
