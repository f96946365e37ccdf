"""FSC-147 parsing, bad entries, synthetic generator and coordinate normalisation."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import REFERENCE_FSC147
from PIL import Image

from dataset_fsc147 import (ANNOTATION_FILE, CLASS_FILE, IMAGE_DIR, SPLIT_FILE, FSC147Dataset, SynthConfig,
                            UsageError, collate_samples, denormalize_points, load_rgb, normalize_points,
                            read_class_file, spread_over_classes, write_synthetic_fsc147)
from dataset_fsc147 import main as dataset_main


def copy_root(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_synthetic_dataset_parses_in_fsc147_layout(synth_root):
    for name in (IMAGE_DIR, ANNOTATION_FILE, SPLIT_FILE, CLASS_FILE):
        assert os.path.exists(os.path.join(synth_root, name))
    splits = json.load(open(os.path.join(synth_root, SPLIT_FILE)))
    assert set(splits) >= {"train", "val", "test"}
    sizes = {}
    classes = {}
    for split in ("train", "val", "test"):
        ds = FSC147Dataset(synth_root, split)
        sizes[split] = len(ds)
        classes[split] = {e["class_name"] for e in ds.entries}
        sample = ds[0]
        assert sample.image.mode == "RGB" and sample.image.height == 384
        assert sample.points.shape[1] == 2 and len(sample.points) >= 1
        assert sample.boxes.shape[1] == 4 and (sample.boxes[:, 2] > sample.boxes[:, 0]).all()
        assert ds.num_skipped == 0
    assert sizes == {"train": 18, "val": 6, "test": 6}
    # Disjoint classes between splits, as in FSC-147.
    assert not classes["train"] & classes["val"] and not classes["train"] & classes["test"]
    assert not classes["val"] & classes["test"]


def test_synthetic_generator_is_deterministic(tmp_path):
    a = write_synthetic_fsc147(SynthConfig(out=str(tmp_path / "a"), num_images=6, seed=3))
    b = write_synthetic_fsc147(SynthConfig(out=str(tmp_path / "b"), num_images=6, seed=3))
    c = write_synthetic_fsc147(SynthConfig(out=str(tmp_path / "c"), num_images=6, seed=4))
    assert a == b
    ann_a = open(tmp_path / "a" / ANNOTATION_FILE).read()
    assert ann_a == open(tmp_path / "b" / ANNOTATION_FILE).read()
    assert ann_a != open(tmp_path / "c" / ANNOTATION_FILE).read()
    img = "2.jpg"
    assert (tmp_path / "a" / IMAGE_DIR / img).read_bytes() == (tmp_path / "b" / IMAGE_DIR / img).read_bytes()


def test_synthetic_object_counts_respect_bounds(tmp_path):
    write_synthetic_fsc147(SynthConfig(out=str(tmp_path / "s"), num_images=20, min_objects=2, max_objects=4, seed=1))
    ann = json.load(open(tmp_path / "s" / ANNOTATION_FILE))
    counts = [len(v["points"]) for v in ann.values()]
    assert min(counts) >= 2 and max(counts) <= 4
    for v in ann.values():
        assert len(v["box_examples_coordinates"]) == min(3, len(v["points"]))
        assert len(v["box_examples_coordinates"][0]) == 4  # four corners, as FSC-147 stores them


def test_missing_root_and_files_name_the_path(tmp_path, synth_root):
    with pytest.raises(UsageError, match="does not exist"):
        FSC147Dataset(str(tmp_path / "nope"), "train")
    root = copy_root(synth_root, tmp_path / "r")
    os.remove(os.path.join(root, SPLIT_FILE))
    with pytest.raises(UsageError, match=SPLIT_FILE) as err:
        FSC147Dataset(root, "train")
    assert "expected FSC-147 layout" in str(err.value)


def test_bad_entries_are_skipped_and_counted(tmp_path, synth_root):
    root = copy_root(synth_root, tmp_path / "r")
    splits = json.load(open(os.path.join(root, SPLIT_FILE)))
    ann = json.load(open(os.path.join(root, ANNOTATION_FILE)))
    train = splits["train"]
    os.remove(os.path.join(root, IMAGE_DIR, train[0]))  # listed, image missing
    ann[train[1]]["points"] = []  # no points
    del ann[train[2]]  # listed in the split, absent from the annotations
    json.dump(ann, open(os.path.join(root, ANNOTATION_FILE), "w"))
    ds = FSC147Dataset(root, "train")
    assert ds.num_skipped == 3
    assert ds.skipped == {"image file missing": [train[0]], "no points": [train[1]],
                          "not in annotation file": [train[2]]}
    assert len(ds) == len(train) - 3


def test_unreadable_image_is_dropped_by_collate(tmp_path, synth_root):
    root = copy_root(synth_root, tmp_path / "r")
    first = json.load(open(os.path.join(root, SPLIT_FILE)))["train"][0]
    with open(os.path.join(root, IMAGE_DIR, first), "wb") as f:
        f.write(b"not a jpeg")
    ds = FSC147Dataset(root, "train")
    assert ds[0] is None
    assert len(collate_samples([ds[0], ds[1]])) == 1


def test_points_outside_the_image_are_clipped(tmp_path, synth_root):
    root = copy_root(synth_root, tmp_path / "r")
    ann = json.load(open(os.path.join(root, ANNOTATION_FILE)))
    first = json.load(open(os.path.join(root, SPLIT_FILE)))["train"][0]
    ann[first]["points"] = [[-5.0, 10.0], [10000.0, 20.0], [30.0, 999.0]]
    json.dump(ann, open(os.path.join(root, ANNOTATION_FILE), "w"))
    sample = FSC147Dataset(root, "train")[0]
    w, h = sample.image.size
    assert sample.points[:, 0].min() >= 0 and sample.points[:, 0].max() <= w - 1
    assert sample.points[:, 1].max() <= h - 1
    assert sample.points[0, 0] == 0 and sample.points[1, 0] == w - 1 and sample.points[2, 1] == h - 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_non_rgb_images_are_converted(tmp_path, mode):
    path = str(tmp_path / "img.png")
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(path)
    else:
        Image.new(mode, (64, 48)).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (64, 48)


def test_class_file_with_crlf_and_blank_lines(tmp_path):
    path = tmp_path / CLASS_FILE
    path.write_bytes(b"2.jpg\tsea shells\r\n\r\n3.jpg\thot air balloons\r\n")
    assert read_class_file(str(path)) == {"2.jpg": "sea shells", "3.jpg": "hot air balloons"}
    path.write_bytes(b"2.jpg sea shells\n")
    with pytest.raises(UsageError, match=":1:"):
        read_class_file(str(path))


@pytest.mark.skipif(not os.path.isdir(REFERENCE_FSC147), reason="reference FSC-147 metadata not beside the checkout")
def test_real_fsc147_split_and_class_files_parse():
    classes = read_class_file(os.path.join(REFERENCE_FSC147, CLASS_FILE))
    splits = json.load(open(os.path.join(REFERENCE_FSC147, SPLIT_FILE)))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (3659, 1286, 1190)
    assert len(set(classes.values())) == 147
    assert "sea shells" in classes.values()
    per_split = {s: {classes[i] for i in splits[s]} for s in ("train", "val", "test")}
    assert (len(per_split["train"]), len(per_split["val"]), len(per_split["test"])) == (89, 29, 29)


def test_spread_over_classes_by_hand():
    names = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    picked = spread_over_classes(names, 4, seed=0)
    assert len(picked) == 4 and picked == sorted(picked)
    assert {names[i] for i in picked} == {"a", "b", "c"}  # every class before any class twice
    assert spread_over_classes(names, 4, seed=0) == picked  # fixed for the same seed
    assert spread_over_classes(names, 0) == spread_over_classes(names, 99) == list(range(10))


@pytest.mark.skipif(not os.path.isdir(REFERENCE_FSC147), reason="reference FSC-147 metadata not beside the checkout")
def test_subsets_of_the_real_splits_cover_the_classes():
    classes = read_class_file(os.path.join(REFERENCE_FSC147, CLASS_FILE))
    splits = json.load(open(os.path.join(REFERENCE_FSC147, SPLIT_FILE)))
    val = [classes[i] for i in splits["val"]]
    assert len(set(val[:16])) == 3  # the first 16 val images: 3 of the 29 classes
    assert len({val[i] for i in spread_over_classes(val, 16, seed=42)}) == 16
    assert len({val[i] for i in spread_over_classes(val, 32, seed=42)}) == 29
    test = [classes[i] for i in splits["test"]]
    assert len({test[i] for i in spread_over_classes(test, 32, seed=0)}) == 29
    train = [classes[i] for i in splits["train"]]
    assert len(set(train[:500])) == 32  # --max_train_images 500 used to train on 32 of the 89 classes
    assert len({train[i] for i in spread_over_classes(train, 500, seed=42)}) == 89


def test_max_images_is_a_fixed_sample_over_the_classes(tmp_path):
    root = str(tmp_path / "s")
    write_synthetic_fsc147(SynthConfig(out=root, num_images=40, num_classes=12, seed=2))  # train: 24 images, 6 classes
    classes = read_class_file(os.path.join(root, CLASS_FILE))
    splits = json.load(open(os.path.join(root, SPLIT_FILE)))
    splits["train"].sort(key=lambda i: classes[i])  # in runs of one class, as FSC-147 lists its splits
    json.dump(splits, open(os.path.join(root, SPLIT_FILE), "w"))
    full = FSC147Dataset(root, "train")
    first = [e["class_name"] for e in full.entries[:6]]
    small = FSC147Dataset(root, "train", max_images=6, subset_seed=42)
    again = FSC147Dataset(root, "train", max_images=6, subset_seed=42)
    assert [e["id"] for e in small.entries] == [e["id"] for e in again.entries]
    assert len({e["class_name"] for e in small.entries}) == 6 > len(set(first))


def test_normalisation_round_trip_and_corners():
    pts = np.array([[0, 0], [640, 384], [320, 192], [17.5, 300.25]], dtype=np.float32)
    norm = normalize_points(pts, 640, 384)
    np.testing.assert_allclose(norm[:3], [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(denormalize_points(norm, 640, 384), pts, atol=1e-3)


def test_check_command_reports_splits(synth_root, capsys):
    assert dataset_main(["check", "--data_root", synth_root]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val  :" in out and "skipped" in out
    assert dataset_main(["check", "--data_root", synth_root + "-missing"]) == 2
