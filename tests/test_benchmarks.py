"""The benchmarks run end to end on a tiny budget and write what RESULTS.md quotes."""

import json
import os

import pytest

import bench_learning
import bench_speed
from dataset_fsc147 import FSC147Dataset


def test_bench_learning_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench_learning.main(["--output_dir", str(out), "--variants", "mean,simple,attention-nearest",
                                "--steps", "4", "--num_images", "25", "--max_objects", "4", "--eval_every", "2",
                                "--eval_images", "2", "--test_images", "3", "--max_count", "5", "--warmup_steps", "1"])
    assert code == 0
    report = json.load(open(out / "results.json"))
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"mean", "simple", "attention-nearest"}
    assert rows["attention-nearest"]["target_strategy"] == "nearest"
    assert rows["simple"]["model_type"] == "simple" and rows["simple"]["steps"] == 4
    for row in rows.values():
        assert row["status"] == "ok" and 0 <= row["exact_acc"] <= 1 and row["mae"] >= 0
    # the mean baseline is the training split's mean count, scored on the same test images
    assert rows["simple"]["n_images"] == rows["mean"]["n_images"] == 3
    table = open(out / "results.md").read()
    assert "| attention-nearest | memory+foveation+cross_attention+reasoning | random | lora4bit | text | 1 | 1 | test | 4 |" \
        in table and "| mean | - | - | - | - | - | - | test |" in table
    assert os.path.getsize(out / "learning.png") > 1000
    # data and model are reused when the settings match
    stamp = os.path.getmtime(out / "data" / "bench_settings.json")
    assert bench_learning.main(["--output_dir", str(out), "--variants", "mean", "--num_images", "25",
                                "--max_objects", "4"]) == 0
    assert os.path.getmtime(out / "data" / "bench_settings.json") == stamp


def test_bench_learning_rows_per_protocol_with_distractors(tmp_path, monkeypatch):
    import train_sequential_attention as train_mod

    state_splits = []  # the split whose counting states give done acc and |xy error|
    real = train_mod.fixed_val_batches
    monkeypatch.setattr(train_mod, "fixed_val_batches", lambda cfg, ds: state_splits.append(ds.split) or real(cfg, ds))
    out = tmp_path / "bench"
    assert bench_learning.main(["--output_dir", str(out), "--variants", "mean,simple-token-before-film",
                                "--protocol", "text,exemplar", "--distractors", "2", "--steps", "2",
                                "--num_images", "25", "--max_objects", "3", "--eval_every", "0", "--eval_images", "2",
                                "--test_images", "3", "--max_count", "4", "--warmup_steps", "1"]) == 0
    rows = json.load(open(out / "results.json"))["results"]
    assert [(r["variant"], r["protocol"]) for r in rows] == [
        ("mean", "-"), ("simple-token-before-film", "text"), ("simple-token-before-film", "exemplar")]
    model_rows = rows[1:]
    assert all(r["prompt_position"] == "before" and r["class_binding"] == "film" for r in model_rows)
    # Every test image holds other classes: says_total is measured, on the same images as the counts.
    assert all(0 <= r["says_total"] <= 1 and r["n_images"] == 3 for r in rows)
    assert "object_size_rel_err" in rows[1] and "object_size_rel_err" not in rows[2]  # estimated only under text
    # Done acc and |xy error| are one figure per variant, from val images' states (never test images), named so;
    # the table shows it on the variant's first row only, not as if each protocol had measured it.
    assert state_splits[-1] == "val" and "test" not in state_splits
    assert "done_acc" not in rows[1] and rows[1]["val_states_done_acc"] == rows[2]["val_states_done_acc"]
    table = [line for line in open(out / "results.md").read().splitlines() if line.startswith("|")]
    col = table[0].split(" | ").index("done acc (val states)")
    assert [line.split(" | ")[col] for line in table[3:]] == [f"{rows[1]['val_states_done_acc']:.3f}", "-"]
    for protocol in ("text", "exemplar"):
        saved = json.load(open(out / "simple-token-before-film_random_lora4bit" / f"test_results_{protocol}.json"))
        assert saved["summary"]["protocol"] == protocol


def test_bench_learning_counts_each_mode_and_a_set_beyond_the_training_range(tmp_path, monkeypatch):
    import evaluate_counting

    calls, count_dataset = [], evaluate_counting.count_dataset  # (split, points per forward, threshold, tiles)
    monkeypatch.setattr(evaluate_counting, "count_dataset", lambda model, ds, settings, *a, **k: calls.append(
        (ds.split, settings.points_per_step, settings.done_threshold, settings.tiles))
        or count_dataset(model, ds, settings, *a, **k))
    out = tmp_path / "dense"
    assert bench_learning.main(["--output_dir", str(out), "--variants", "mean,simple-token", "--points_per_step", "1,auto",
                                "--tiles", "1,2", "--beyond_objects", "7,9", "--min_objects", "2", "--max_objects", "5", "--steps", "2",
                                "--num_images", "25", "--eval_every", "0", "--eval_images", "2", "--test_images", "3",
                                "--max_count", "12", "--warmup_steps", "1", "--large_objects", "12,20",
                                "--large_image_size", "96,128", "--large_tiles", "1,2", "--large_images", "2",
                                "--tune_threshold", "0.3,0.7"]) == 0
    rows = json.load(open(out / "results.json"))["results"]
    # The threshold is chosen on val once per points-per-forward mode (1, then auto = 0), before that mode's first
    # test count, and each mode's rows are counted at the threshold of their own val MAEs.
    # Val is counted untiled: one threshold per points-per-forward mode serves its tiled rows too.
    val = [(pps, t) for split, pps, t, tiles in calls if split == "val" and tiles == 1]
    assert [c for c in calls if c[0] == "val" and c[3] != 1] == []
    assert val[-4:] == [(1, 0.3), (1, 0.7), (0, 0.3), (0, 0.7)]
    assert val[:-4] and set(val[:-4]) == {(1, 0.5)}  # training's own val counts: one point, --done_threshold
    for r in rows[3:]:
        maes = r["val_mae_per_threshold"]
        assert r["done_threshold"] == min((0.3, 0.7), key=lambda t: maes[str(t)])
    # mode 1 on test, untiled and on 2 x 2 tiles, and on beyond
    assert rows[3]["val_mae_per_threshold"] == rows[4]["val_mae_per_threshold"] == rows[7]["val_mae_per_threshold"]
    assert [(r["variant"], r.get("points_per_step"), r.get("tiles"), r["test_set"]) for r in rows] == [
        ("mean", None, None, "test"), ("mean", None, None, "beyond"), ("mean", None, None, "large"),
        ("simple-token", "1", "1", "test"), ("simple-token", "1", "2", "test"),
        ("simple-token", "auto", "1", "test"), ("simple-token", "auto", "2", "test"),
        ("simple-token", "1", "1", "beyond"), ("simple-token", "1", "2", "beyond"),
        ("simple-token", "auto", "1", "beyond"), ("simple-token", "auto", "2", "beyond"),
        ("simple-token", "auto", "1", "large"), ("simple-token", "auto", "2", "large")]
    assert {(c[0], c[3]) for c in calls if c[0] == "test"} == {("test", 1), ("test", 2)}  # the tiles reach the count
    tiled = json.load(open(out / "simple-token_random_lora4bit" / "beyond_results_text_pps-auto_tiles-2.json"))
    assert all(i["tiles"] == 2 for i in tiled["images"])
    beyond = json.load(open(out / "simple-token_random_lora4bit" / "beyond_results_text_pps-auto.json"))
    assert {i["gt_count"] for i in beyond["images"]} <= {7, 8, 9} and beyond["summary"]["points_per_step"] == "auto"
    large = json.load(open(out / "simple-token_random_lora4bit" / "large_results_text_pps-auto_tiles-2.json"))
    assert len(large["images"]) == 2 and all(12 <= i["gt_count"] <= 20 and i["tiles"] == 2 for i in large["images"])
    assert all(i["forwards_per_image"] >= 5 for i in large["images"])  # a first look and 4 crops
    heights = [FSC147Dataset(str(out / "large"), "test")[k].image.height for k in range(2)]
    assert all(96 <= h <= 128 for h in heights)
    for r in rows:
        assert {"nae", "within_1", "mean_gt"} <= set(r)
        assert r["variant"] == "mean" or r["forwards_per_image"] >= 1
    assert os.path.getsize(out / "error_by_count.png") > 1000


def test_bench_learning_trains_the_attention_model_once_per_module_set(tmp_path):
    from model_loading import load_checkpoint

    out = tmp_path / "modules"
    assert bench_learning.main(["--output_dir", str(out), "--variants", "simple-token,attention-token",
                                "--attention_modules", "memory,memory+foveation", "--steps", "2", "--num_images", "25",
                                "--max_objects", "3", "--eval_every", "0", "--eval_images", "2", "--test_images", "2",
                                "--max_count", "4", "--warmup_steps", "1", "--finetune", "full"]) == 0
    rows = json.load(open(out / "results.json"))["results"]
    assert [(r["variant"], r["attention_modules"], r["run_dir"]) for r in rows] == [
        ("simple-token", None, "simple-token_random_full"),
        ("attention-token", "memory", "attention-token@memory_random_full"),
        ("attention-token", "memory+foveation", "attention-token@memory+foveation_random_full")]
    # each run trained the modules its set names, and only those
    for run, enabled in (("attention-token@memory_random_full", ("memory",)),
                         ("attention-token@memory+foveation_random_full", ("memory", "foveation"))):
        model, _ = load_checkpoint(str(out / run / "checkpoint-last"), device="cpu")
        assert model.enabled == enabled
    table = open(out / "results.md").read()
    assert "| attention-token | memory+foveation | random | full |" in table and "| simple-token | - | random |" in table


def test_pixel_scale_sets_the_processors_resolution(capsys):
    """--image_size 224 at --pixel_scale 2: the processor's side is 448 (16 tokens of 28 px), so min_pixels is
    448^2 = 200,704 and max_pixels twice that in every run's training config; at scale 1 it is 224^2 = 50,176;
    112 px at 1.5 is 168 (6 tokens)."""
    scaled = bench_learning.BenchConfig(image_size=224, pixel_scale=2.0)
    assert bench_learning.processor_side(scaled) == 448
    run = bench_learning.train_config(scaled, "simple-token", "data", "model")
    assert (run.min_pixels, run.max_pixels) == (200_704, 401_408)
    assert bench_learning.train_config(bench_learning.BenchConfig(image_size=224), "simple-token", "data",
                                       "model").min_pixels == 50_176
    assert bench_learning.processor_side(bench_learning.BenchConfig(image_size=112, pixel_scale=1.5)) == 168
    with pytest.raises(SystemExit):
        bench_learning.main(["--pixel_scale", "8"])
    assert "--pixel_scale must be in [0.25, 4]" in capsys.readouterr().err


def test_lora_vision_reaches_the_vision_blocks_and_says_so_in_the_row():
    """--lora_vision: the LoRA run's targets add the vision blocks' qkv, proj, fc1, fc2 to the language model's
    seven projections, and its rows read lora4bit+vision; full fine-tuning trains every weight, so no label."""
    vision = bench_learning.BenchConfig(lora_vision=True)
    targets = bench_learning.train_config(vision, "simple-token", "data", "model", finetune="lora4bit").lora_target_modules
    assert targets.split(",") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "qkv", "proj", "fc1", "fc2"]
    assert "qkv" not in bench_learning.train_config(bench_learning.BenchConfig(), "simple-token", "data", "model",
                                                    finetune="lora4bit").lora_target_modules
    assert bench_learning.finetune_label(vision, "lora4bit") == "lora4bit+vision"
    assert bench_learning.finetune_label(vision, "full") == "full"
    assert bench_learning.finetune_label(bench_learning.BenchConfig(), "lora4bit") == "lora4bit"


def test_lora_dropout_reaches_the_training_run_and_bad_values_are_refused(capsys):
    """--lora_dropout 0 reaches the run's training config; left out, the run keeps the training script's 0.05;
    1.5 is refused with a message naming the flag."""
    assert bench_learning.train_config(bench_learning.BenchConfig(lora_dropout=0.0), "simple-token", "data", "model",
                                       finetune="lora4bit").lora_dropout == 0.0
    assert bench_learning.train_config(bench_learning.BenchConfig(), "simple-token", "data", "model",
                                       finetune="lora4bit").lora_dropout == 0.05
    with pytest.raises(SystemExit):
        bench_learning.main(["--lora_dropout", "1.5"])
    assert "--lora_dropout must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_a_signal_during_training_stops_the_benchmark(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a variant's training (train returns interrupted) ends the benchmark with exit code 130 and writes
    no results table of the shortened run; the next variant is not trained."""
    import train_sequential_attention as train_mod

    calls = []

    def interrupted(cfg):
        calls.append(cfg.output_dir)
        return {"steps": 1, "interrupted": "SIGINT", "checkpoint": None}

    monkeypatch.setattr(train_mod, "train", interrupted)
    out = tmp_path / "bench"
    assert bench_learning.main(["--output_dir", str(out), "--variants", "mean,simple,simple-token", "--steps", "4",
                                "--num_images", "25", "--max_objects", "3", "--test_images", "3"]) == 130
    assert len(calls) == 1 and not (out / "results.json").exists()
    err = capsys.readouterr().err
    assert "simple_random_lora4bit: training stopped by SIGINT at step 1 of 4" in err


def test_bench_learning_rejects_unknown_variants(capsys):
    with pytest.raises(SystemExit):
        bench_learning.main(["--variants", "mean,transformer", "--steps", "0", "--attention_modules", "memory+lstm"])
    err = capsys.readouterr().err
    assert "unknown 'transformer'" in err and "--steps must be >= 1" in err and "unknown ['lstm']" in err


def test_bench_speed_reports_ratios(tmp_path):
    out = tmp_path / "speed.json"
    assert bench_speed.main(["--batch_size", "2", "--repeats", "1", "--num_images", "8", "--no-counting",
                             "--out", str(out)]) == 0
    result = json.load(open(out))
    step, data = result["step"], result["data"]
    assert step["ratio"] == pytest.approx(step["train_step_s"] / step["bare_forward_backward_s"])
    assert step["ratio"] > 0 and data["states_plus_processor_over_processor"] > 0
    assert set(data["loader_samples_per_s"]) == {"0", "2"}


def test_bench_counting_runs_every_step_on_an_untrained_model(capsys):
    """An untrained model points at counted objects: with the duplicate guard on, 5 of these 8 images stopped
    early and the benchmark's check failed (the batch sizes would not do the same work). Counting speed is
    measured with the guard off, as smoke_2b.py's GPU check does."""
    import bench_counting

    assert bench_counting.main(["--num_images", "8", "--steps", "8", "--repeats", "1", "--batch_sizes", "1,8"]) == 0
    assert "| 8 |" in capsys.readouterr().out


def test_train_seed_reseeds_the_training_and_keeps_the_data_seed(capsys):
    """--train_seed 3 with --seed 0: the training run's seed is 3 (init, training images and their order), the
    data's generator (classes, test images) stays at 0; unset (-1), training follows --seed."""
    cfg = bench_learning.BenchConfig(seed=0, train_seed=3)
    assert bench_learning.train_config(cfg, "simple-token", "data", "model").seed == 3
    assert bench_learning.synth_config(cfg).seed == 0
    assert bench_learning.train_config(bench_learning.BenchConfig(seed=5), "simple-token", "data", "model").seed == 5
    with pytest.raises(SystemExit):
        bench_learning.main(["--train_seed", "-2"])
    assert "--train_seed must be >= 0" in capsys.readouterr().err
