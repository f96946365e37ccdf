"""pretrain_tiny.py: what the pretrained stand-in is taught (never a count, never marks in counting order), its
targets by hand, the strict variant's held-out pairs, and a saved model that loads like Qwen2-VL-2B."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pretrain_tiny as pt
from synthetic_fsc147 import COLOURS, SHAPES

TARGET_KEYS = {"colour", "shape", "mark", "ground", "present"}


def generated(n: int, strict: bool = False, seed: int = 0):
    cfg = pt.PretrainConfig(strict=strict, seed=seed)
    rng = np.random.default_rng(seed)
    classes = pt.pretraining_classes(cfg)
    return [pt.make_example(rng, cfg, classes) for _ in range(n)]


def on_object(x: float, y: float, objects) -> int | None:
    """Index of the object whose disc holds (x, y), if any."""
    for i, (ox, oy, r, _) in enumerate(objects):
        if np.hypot(x - ox, y - oy) <= r:
            return i
    return None


def counting_state(example) -> bool:
    """Marks numbered 1..k, each on its own object of one class: what a counting state looks like."""
    if len(example.marks) < 1:
        return False
    labels = sorted(label for _, _, label in example.marks)
    if labels != list(range(1, len(labels) + 1)):
        return False
    hit = [on_object(x, y, example.objects) for x, y, _ in example.marks]
    return None not in hit and len(set(hit)) == len(hit) and len({example.objects[i][3] for i in hit}) == 1


def test_no_pretraining_target_carries_a_count_and_no_mark_is_in_counting_order():
    examples = generated(300)
    assert sum(bool(e.marks) for e in examples) > 100  # marks are drawn, and read
    assert not any(counting_state(e) for e in examples)
    for e in examples:
        targets = pt.token_targets(e, 8, 10)
        assert set(targets) == TARGET_KEYS  # per-token maps and one yes/no: no field for how many
        assert float(targets["present"]) in (0.0, 1.0)
        assert targets["colour"].shape == targets["mark"].shape == targets["ground"].shape == (80,)
        assert set(targets["ground"].tolist()) <= {0.0, 1.0}


def test_the_counting_state_check_catches_marks_in_counting_order():
    """Planted: marks on the first k objects in reading order, numbered 1..k, is what the test above rejects."""
    example = next(e for e in generated(50) if len({o[3] for o in e.objects}) >= 1 and len(e.objects) >= 3)
    name = example.objects[0][3]
    mine = sorted([o for o in example.objects if o[3] == name], key=lambda o: (o[1], o[0]))
    example.marks = [(ox, oy, k + 1) for k, (ox, oy, _, _) in enumerate(mine[:2])]
    assert counting_state(example)


def test_token_targets_by_hand():
    """A 112 x 112 image on a 4 x 4 token grid (token centres at 14, 42, 70, 98 px): a red ring of radius 20 at the
    middle covers the four middle tokens (their centres 19.8 px away); a 3 px blue star at (100, 100) gets the token
    holding its centre; a mark numbered 7 at (100, 10) lies in row 0, column 3."""
    example = pt.Example(Image.new("RGB", (112, 112)), [(56, 56, 20, "red rings"), (100, 100, 3, "blue stars")],
                         [(100, 10, 7)], query="red rings", present=True, prompt_before=False)
    t = pt.token_targets(example, 4, 4)
    red, ring = list(COLOURS).index("red") + 1, list(SHAPES).index("ring") + 1
    blue, star = list(COLOURS).index("blue") + 1, list(SHAPES).index("star") + 1
    colour, shape = np.zeros((4, 4), dtype=np.int64), np.zeros((4, 4), dtype=np.int64)
    colour[1:3, 1:3], shape[1:3, 1:3] = red, ring
    colour[3, 3], shape[3, 3] = blue, star
    assert t["colour"].reshape(4, 4).tolist() == colour.tolist()
    assert t["shape"].reshape(4, 4).tolist() == shape.tolist()
    marks = np.zeros((4, 4), dtype=np.int64)
    marks[0, 3] = 7
    assert t["mark"].reshape(4, 4).tolist() == marks.tolist()
    assert t["ground"].reshape(4, 4).tolist() == (colour == red).astype(float).tolist()
    assert float(t["present"]) == 1.0


def test_shape_and_ground_weights_scale_only_their_own_loss():
    """Zero logits on 2 tokens: every cross-entropy is ln(classes), the BCEs ln 2; --shape_weight 3 triples the
    shape term (3 ln 9) and leaves the colour term at ln 9; --ground_weight 2 doubles the ground term (2 ln 2) and
    leaves the present term at ln 2."""
    out = {"colour": torch.zeros(2, 9), "shape": torch.zeros(2, 9), "mark": torch.zeros(2),
           "number": torch.zeros(2, pt.MAX_MARK_LABEL), "ground": torch.zeros(2), "present": torch.tensor(0.0)}
    tgt = {"colour": torch.tensor([0, 3]), "shape": torch.tensor([0, 5]), "mark": torch.tensor([0, 0]),
           "ground": torch.tensor([0.0, 1.0]), "present": torch.tensor(1.0)}
    terms = pt.losses([(out, tgt)], shape_weight=3.0)
    assert float(terms["shape"]) == pytest.approx(3 * np.log(9), rel=1e-5)
    assert float(terms["colour"]) == pytest.approx(np.log(9), rel=1e-5)
    assert float(terms["ground"]) == pytest.approx(np.log(2), rel=1e-5)
    terms = pt.losses([(out, tgt)], shape_weight=3.0, ground_weight=2.0)
    assert float(terms["ground"]) == pytest.approx(2 * np.log(2), rel=1e-5)
    assert float(terms["present"]) == pytest.approx(np.log(2), rel=1e-5)
    assert float(terms["shape"]) == pytest.approx(3 * np.log(9), rel=1e-5)


def test_vision_heads_add_their_own_colour_and_shape_loss():
    """Zero vision logits on 2 tokens: the vision term is vision_weight x (ln 9 + shape_weight x ln 9), by hand
    2 x (1 + 3) ln 9; without vision outputs there is no vision term."""
    zeros = {"colour": torch.zeros(2, 9), "shape": torch.zeros(2, 9), "mark": torch.zeros(2),
             "number": torch.zeros(2, pt.MAX_MARK_LABEL), "ground": torch.zeros(2), "present": torch.tensor(0.0)}
    tgt = {"colour": torch.tensor([0, 3]), "shape": torch.tensor([0, 5]), "mark": torch.tensor([0, 0]),
           "ground": torch.tensor([0.0, 1.0]), "present": torch.tensor(1.0)}
    out = zeros | {"vision_colour": torch.zeros(2, 9), "vision_shape": torch.zeros(2, 9)}
    terms = pt.losses([(out, tgt)], shape_weight=3.0, vision_weight=2.0)
    assert float(terms["vision"]) == pytest.approx(2 * 4 * np.log(9), rel=1e-5)
    assert float(terms["shape"]) == pytest.approx(3 * np.log(9), rel=1e-5)
    assert "vision" not in pt.losses([(zeros, tgt)], shape_weight=3.0, vision_weight=2.0)
    with pytest.raises(SystemExit):
        pt.main(["--vision_heads", "-1"])


def test_vision_heads_read_the_vision_towers_merged_tokens():
    """With vision heads the forward pass returns one vision row per image token, computed from the vision tower's
    merged output (the language model's image embeddings), not from the last hidden states."""
    cfg = pt.PretrainConfig(vision_heads=1.0, out="/tmp/unused")
    _, processor, backbone, heads = pt.build(cfg)
    examples = generated(2)
    pairs = pt.forward(backbone, heads, processor, examples)
    captured = []
    hook = backbone.model.visual.register_forward_hook(lambda m, a, o: captured.append(o.pooler_output))
    pt.forward(backbone, pt.PretrainHeads(backbone.config.text_config.hidden_size), processor, examples)
    hook.remove()
    first = captured[0][: len(pairs[0][1]["colour"])]
    for out, tgt in pairs:
        assert out["vision_shape"].shape == out["shape"].shape == (len(tgt["shape"]), len(SHAPES) + 1)
    assert torch.allclose(pairs[0][0]["vision_shape"], heads.vision_shape_head(first), atol=1e-5)
    assert "vision_shape" not in pt.forward(backbone, pt.PretrainHeads(128), processor, examples)[0][0]


def test_confusers_share_a_colour_or_a_shape_with_the_named_class():
    """Red stars' confusers are the 7 other red classes and the 7 other stars (14, by hand); with --confusers 1
    every scene's absent query looks like a present class but for its colour or its shape, and every class in a
    scene is one class (the named one) or one of its confusers."""
    red_stars = pt.CLASS_BY_NAME["red stars"]
    confusers = pt.confuser_classes(red_stars, pt.ALL_CLASSES)
    assert len(confusers) == 14 and red_stars not in confusers
    assert all((c[2] == "red") != (c[1] == "star") for c in confusers)
    cfg = pt.PretrainConfig(confusers=1.0)
    rng = np.random.default_rng(3)
    absent_checked = mixed = 0
    for _ in range(60):
        example = pt.make_example(rng, cfg, pt.ALL_CLASSES, [10])
        present = [pt.CLASS_BY_NAME[name] for name in {o[3] for o in example.objects}]
        if not example.present and present:
            query = pt.CLASS_BY_NAME[example.query]
            assert any(query in pt.confuser_classes(c, pt.ALL_CLASSES) for c in present), example.query
            absent_checked += 1
        # Some class (the named one, maybe with no object drawn) has every present class as itself or a confuser.
        assert any(all(b == a or b in pt.confuser_classes(a, pt.ALL_CLASSES) for b in present)
                   for a in pt.ALL_CLASSES), sorted(c[0] for c in present)
        mixed += len(present) >= 3
    assert absent_checked >= 10 and mixed >= 5
    with pytest.raises(SystemExit):
        pt.main(["--confusers", "1.5"])


def test_the_cnn_probe_reads_the_stand_ins_token_grid():
    """A 112 x 84 image is 4 x 3 tokens of 28 px: the probe's input is 4 x 3 cells of 32 px, its targets the
    stand-in's per-token shapes (the ring at (56, 42), radius 20, covers the centres of tokens (1, 1) and (1, 2)),
    and its logits come one row per token."""
    example = pt.Example(Image.new("RGB", (112, 84)), [(56, 42, 20, "red rings")], [], query="red rings",
                         present=True, prompt_before=False)
    pixels, shape = pt.probe_example(example)
    assert tuple(pixels.shape) == (3, 3 * 32, 4 * 32)
    ring = list(SHAPES).index("ring") + 1
    expected = np.zeros((3, 4), dtype=np.int64)
    expected[1, 1:3] = ring
    assert shape.reshape(3, 4).tolist() == expected.tolist()
    assert tuple(pt.ShapeProbe()(pixels).shape) == (12, len(SHAPES) + 1)


def test_probe_and_shape_weight_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        pt.main(["--probe", "vit", "--shape_weight", "0", "--ground_weight", "-1"])
    err = capsys.readouterr().err
    assert "--probe must be cnn or empty" in err and "--shape_weight must be > 0" in err
    assert "--ground_weight must be > 0" in err
    assert pt.main(["--probe", "cnn", "--steps", "2", "--batch_size", "2", "--eval_images", "2"]) == 0
    assert "sparse_token_shape_acc" in capsys.readouterr().out


def test_strict_leaves_out_the_held_out_pairs_but_no_colour_or_shape():
    cfg = pt.PretrainConfig(strict=True)
    held = pt.held_out_pairs(cfg)
    classes = pt.pretraining_classes(cfg)
    assert len(held) == 12 and not set(held) & set(classes)
    assert len(classes) == len(COLOURS) * len(SHAPES) - 12
    assert {c[2] for c in held} <= {c[2] for c in classes} and {c[1] for c in held} <= {c[1] for c in classes}
    # They are the val and test classes of the data `make bench-unseen` writes (its seed and grid).
    import bench_learning
    from synthetic_fsc147 import synth_split_classes

    synth = bench_learning.synth_config(bench_learning.BenchConfig(class_split="compositional"))
    split = synth_split_classes(synth, np.random.default_rng(synth.seed))
    assert set(held) == set(split["val"] + split["test"])
    assert not any(e.query in {c[0] for c in held} or {o[3] for o in e.objects} & {c[0] for c in held}
                   for e in generated(200, strict=True))


QUICK = ["--steps", "2", "--eval_images", "2", "--batch_size", "2", "--log_every", "1", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def quick_pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrained") / "tiny-pretrained")
    assert pt.main(["--out", out, *QUICK]) == 0
    return out


def test_pretraining_is_deterministic_and_saves_a_model_that_loads_like_qwen2vl(quick_pretrained, tmp_path):
    again = str(tmp_path / "again")
    assert pt.main(["--out", again, *QUICK]) == 0
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (quick_pretrained, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.load(open(os.path.join(quick_pretrained, "pretrain.json")))
    assert report["steps"] == 2 and 0 <= report["held_out_scores"]["token_class_acc"] <= 1
    assert not os.path.exists(quick_pretrained + ".partial")
    from model_loading import ModelConfig, build_model

    model = build_model(ModelConfig(model_name_or_path=quick_pretrained, load_in_4bit=True, min_pixels=3136,
                                    max_pixels=50176, device="cpu", pointing="token"))
    assert model.image_token_id is not None
    with pytest.raises(SystemExit):
        pt.main(["--steps", "0"])


def test_bench_rows_per_backbone_and_finetune(quick_pretrained, tmp_path, capsys):
    import bench_learning

    out = tmp_path / "bench"
    assert bench_learning.main(["--output_dir", str(out), "--variants", "mean,simple-token", "--backbone",
                                "random,pretrained", "--pretrained_dir", quick_pretrained, "--finetune",
                                "full,lora4bit", "--steps", "2", "--num_images", "25", "--max_objects", "3",
                                "--eval_every", "0", "--eval_images", "2", "--test_images", "3", "--max_count", "4",
                                "--warmup_steps", "1", "--lora_lr", "1e-3"]) == 0
    rows = json.load(open(out / "results.json"))["results"]
    assert [(r["variant"], r["backbone"], r["finetune"]) for r in rows] == [
        ("mean", "-", "-"), ("simple-token", "random", "full"), ("simple-token", "random", "lora4bit"),
        ("simple-token", "pretrained", "full"), ("simple-token", "pretrained", "lora4bit")]
    saved = json.load(open(out / "simple-token_pretrained_lora4bit" / "config.json"))
    assert saved["model_name_or_path"] == quick_pretrained and saved["load_in_4bit"] and saved["finetune"] == "lora"
    assert saved["lora_r"] == 16 and saved["lora_alpha"] == 32 and "qkv" not in saved["lora_target_modules"]
    assert saved["lr"] == 1e-3 and json.load(open(out / "simple-token_pretrained_full" / "config.json"))["lr"] == 3e-4
    assert "| simple-token | - | pretrained | lora4bit | text |" in open(out / "results.md").read()
    # A stand-in that is not built is a clear error naming the target that builds it.
    with pytest.raises(SystemExit):
        bench_learning.main(["--backbone", "pretrained", "--pretrained_dir", str(tmp_path / "none")])
    assert "run `make tiny-pretrained`" in capsys.readouterr().err
