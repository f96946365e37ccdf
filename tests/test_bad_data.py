"""A corpus of broken inputs, built here (no committed binaries): each gives a clear error or a counted skip."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cli import UsageError
from dataset_fsc147 import (ANNOTATION_FILE, CLASS_FILE, IMAGE_DIR, SPLIT_FILE, FSC147Dataset, collate_samples,
                            read_class_file)


def jpeg_bytes(size=(64, 48), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode != "RGB" else (120, 80, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# name -> (image bytes or None to keep the generated image, annotation patch, expected: None = usable, or reason text)
CORPUS = {
    "truncated_jpeg": (lambda: jpeg_bytes((200, 150))[:300], {}, "unreadable image"),
    "zero_byte": (lambda: b"", {}, "unreadable image"),
    "png_named_jpg": (lambda: png_bytes(Image.new("RGB", (80, 60), (10, 200, 30))), {}, None),
    "sixteen_bit": (lambda: png_bytes(Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 13).astype(np.uint16))), {}, None),
    "cmyk": (lambda: jpeg_bytes((80, 60), "CMYK"), {}, None),
    "one_pixel": (lambda: png_bytes(Image.new("RGB", (1, 1))), {}, "image too small"),
    "huge_wide": (lambda: jpeg_bytes((20000, 384)), {}, None),
    "too_elongated": (lambda: jpeg_bytes((12000, 40)), {}, "aspect ratio"),
    "points_as_strings": (None, {"points": [["12.5", "20"], ["30", "40"]]}, None),
    "points_not_numbers": (None, {"points": [["a", "b"]]}, "points are not numbers"),
    "nan_points": (None, {"points": [[float("nan"), 3.0]]}, "no finite points"),
    "some_nan_points": (None, {"points": [[float("nan"), 3.0], [5.0, 6.0]]}, None),
    "negative_and_outside_points": (None, {"points": [[-10.0, 5.0], [1e6, -3.0]]}, None),
    "duplicate_points": (None, {"points": [[10.0, 10.0], [10.0, 10.0]]}, None),
}


@pytest.fixture()
def corpus_root(tmp_path, synth_root):
    """The synthetic dataset with one broken train entry per corpus case (plus split/annotation cases)."""
    root = str(tmp_path / "bad")
    shutil.copytree(synth_root, root)
    ann = json.load(open(os.path.join(root, ANNOTATION_FILE)))
    splits = json.load(open(os.path.join(root, SPLIT_FILE)))
    class_lines = open(os.path.join(root, CLASS_FILE), encoding="utf-8").read()
    template = ann[splits["train"][0]]
    ids = {}
    for name, (make_bytes, patch, _) in CORPUS.items():
        image_id = f"{name}.jpg"
        ids[name] = image_id
        src = os.path.join(root, IMAGE_DIR, splits["train"][0])
        dst = os.path.join(root, IMAGE_DIR, image_id)
        if make_bytes is None:
            shutil.copy(src, dst)
        else:
            open(dst, "wb").write(make_bytes())
        ann[image_id] = {**template, **patch}
        splits["train"].append(image_id)
        class_lines += f"{image_id}\tsea shells ñandú 貝殼\n"  # non-ASCII class names
    splits["train"].append("listed_not_annotated.jpg")
    shutil.copy(os.path.join(root, IMAGE_DIR, splits["train"][0]), os.path.join(root, IMAGE_DIR, "listed_not_annotated.jpg"))
    class_lines += "listed_not_annotated.jpg\tsea shells\n"
    splits["train"].append("no_points.jpg")
    ann["no_points.jpg"] = {**template, "points": []}
    class_lines += "no_points.jpg\tsea shells\n"
    json.dump(ann, open(os.path.join(root, ANNOTATION_FILE), "w"))
    json.dump(splits, open(os.path.join(root, SPLIT_FILE), "w"))
    # Windows line endings in the class file.
    open(os.path.join(root, CLASS_FILE), "wb").write(class_lines.replace("\n", "\r\n").encode("utf-8"))
    return root, ids


def test_each_broken_input_is_a_counted_skip_or_usable(corpus_root):
    root, ids = corpus_root
    ds = FSC147Dataset(root, "train")
    assert ds.skipped["not in annotation file"] == ["listed_not_annotated.jpg"]
    assert ds.skipped["no points"] == ["no_points.jpg"]
    position = {e["id"]: i for i, e in enumerate(ds.entries)}
    for name, (_, _, expected) in CORPUS.items():
        sample = ds[position[ids[name]]]
        if expected is None:
            assert sample is not None, f"{name}: {ds.load_failures.get(ids[name])}"
            assert sample.image.mode == "RGB"
            w, h = sample.image.size
            assert np.isfinite(sample.points).all() and (sample.points >= 0).all()
            assert (sample.points[:, 0] <= w - 1).all() and (sample.points[:, 1] <= h - 1).all()
            assert sample.class_name == "sea shells ñandú 貝殼"
        else:
            assert sample is None, name
            assert expected in ds.load_failures[ids[name]], ds.load_failures[ids[name]]
    assert len(collate_samples([ds[position[ids["zero_byte"]]], ds[0]])) == 1


@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_over_bad_entries_finishes_and_reports_skips(corpus_root, tiny_model_dir, tmp_path, capsys, workers):
    from conftest import TINY_PIXELS

    import train_sequential_attention as train_mod

    root, _ = corpus_root
    out = tmp_path / "run"
    # Exactly one pass over the 32 usable training entries (batch 4): each bad image is seen once, also
    # when DataLoader worker processes load them.
    assert train_mod.main(["--data_root", root, "--model_name_or_path", tiny_model_dir, "--batch_size", "4",
                           "--max_steps", "8", "--eval_every", "0", "--eval_images", "2", "--max_count", "2",
                           "--eval_states", "2", "--num_workers", workers, "--wandb_mode", "disabled",
                           "--output_dir", str(out), *TINY_PIXELS]) == 0
    printed = capsys.readouterr().out
    end = [json.loads(line) for line in open(out / "metrics.jsonl") if '"end"' in line][0]
    start = [json.loads(line) for line in open(out / "metrics.jsonl") if '"start"' in line][0]
    assert start["train_skipped"] == 2  # not annotated, no points
    assert end["skipped_images"] == 6  # the six unreadable / unusable images, each seen once
    assert "6 images skipped" in printed


def test_class_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / CLASS_FILE
    path.write_text("2.jpg\tsea shells\n3.jpg\n", encoding="utf-8")
    with pytest.raises(UsageError, match=rf"{CLASS_FILE}:2"):
        read_class_file(str(path))


def test_broken_json_names_the_file(tmp_path, synth_root):
    root = str(tmp_path / "r")
    shutil.copytree(synth_root, root)
    open(os.path.join(root, ANNOTATION_FILE), "w").write("{not json")
    with pytest.raises(UsageError, match=ANNOTATION_FILE):
        FSC147Dataset(root, "train")
