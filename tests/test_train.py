"""End to end: main([...]) writes config, metrics, checkpoints and a W&B run; clear errors; --help."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT

from train_sequential_attention import TrainConfig, main


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def test_run_writes_config_metrics_checkpoints_and_wandb(run_dir):
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["max_steps"] == 6 and config["lr"] == 3e-4 and config["load_in_4bit"] is True
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [("loss_cls" in r, "loss_reg" in r) for r in steps[:2]] == [(True, False), (False, True)]
    for r in steps:
        for key in ("grad_norm/x_head", "grad_norm/y_head", "grad_norm/done_head", "grad_norm/lora",
                    "grad_norm/token_embeddings", "lr", "samples_per_s", "peak_mem_mb"):
            assert key in r and np.isfinite(r[key])
    assert steps[0]["grad_norm/done_head"] > 0 and steps[0]["grad_norm/x_head"] == 0  # cls step
    assert steps[1]["grad_norm/x_head"] > 0 and steps[1]["grad_norm/done_head"] == 0  # reg step
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("val/loss_cls", "val/loss_reg", "val/done_acc", "val/count_mae", "val/count_rmse", "val/count_f1"):
        assert key in evals[0]
    for name in ("checkpoint-4", "checkpoint-6", "checkpoint-last", "checkpoint-best"):
        ckpt = os.path.join(run_dir, name)
        for f in ("adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "config.json",
                  "training_state.pt", "processor_config.json", "tokenizer.json"):
            assert os.path.exists(os.path.join(ckpt, f)), f"{name}/{f}"
    assert not glob.glob(os.path.join(run_dir, ".tmp-*")) and not glob.glob(os.path.join(run_dir, ".old-*"))
    assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    state = torch.load(os.path.join(run_dir, "checkpoint-last", "training_state.pt"), weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "scheduler" in state


def test_val_counting_runs_every_count_every_steps_and_at_the_end(tmp_path, synth_root, tiny_model_dir):
    """--eval_every 2 --count_every 3 over 5 steps: evaluations at 2, 3, 4 and 5 (the end), counting at 3 and 5;
    --count_every 0 counts at every evaluation (2, 4 and the end)."""
    def eval_steps(count_every: str) -> tuple[list, list]:
        out = tmp_path / f"every{count_every}"
        assert main(["--data_root", synth_root, "--model_name_or_path", tiny_model_dir, "--max_steps", "5",
                     "--batch_size", "2", "--eval_every", "2", "--count_every", count_every, "--eval_states", "2",
                     "--eval_images", "2", "--max_count", "2", "--save_every", "0", "--num_workers", "0",
                     "--wandb_mode", "disabled", "--output_dir", str(out), "--min_pixels", "3136",
                     "--max_pixels", "50176"]) == 0
        evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
        assert all("val/loss_cls" in r for r in evals)
        return [r["step"] for r in evals], [r["step"] for r in evals if "val/count_mae" in r]

    assert eval_steps("3") == ([2, 3, 4, 5], [3, 5])
    assert eval_steps("0") == ([2, 4, 5], [2, 4, 5])


def test_missing_data_root_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    code = main(["--data_root", str(tmp_path / "nope"), "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(tmp_path / "out"), "--wandb_mode", "disabled", "--max_steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "expected FSC-147 layout" in err and "Traceback" not in err


def test_wrong_model_path_is_a_clear_error(tmp_path, synth_root, capsys):
    code = main(["--data_root", synth_root, "--model_name_or_path", str(tmp_path / "no-model"),
                 "--output_dir", str(tmp_path / "out"), "--wandb_mode", "disabled", "--max_steps", "1"])
    assert code == 2
    assert "no-model" in capsys.readouterr().err


def test_unknown_flags_and_bad_values_are_all_reported(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data_root", "x", "--no_such_flag", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--batch_size", "0", "--lr", "5", "--target_strategy", "random", "--token_context", "2"])
    err = capsys.readouterr().err
    for text in ("--data_root is required", "--batch_size", "--lr", "--target_strategy", "--token_context"):
        assert text in err


def test_synthetic_train_rejects_the_split_flags_it_would_ignore(capsys):
    for flags in (["--max_train_images", "10"], ["--train_split", "val"]):
        with pytest.raises(SystemExit):
            main(["--data_root", "x", "--synthetic_train", "--max_steps", "5", *flags])
        assert "--synthetic_train draws new images" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data_root", "--model_name_or_path", "--model_type", "--batch_size", "--epochs", "--max_steps",
                 "--lr", "--load_in_4bit", "--lora_r", "--lora_alpha", "--lora_dropout", "--grad_clip",
                 "--grad_accum", "--min_pixels", "--max_pixels", "--seed", "--output_dir", "--wandb_project",
                 "--wandb_mode", "--eval_every", "--save_every", "--num_workers", "--target_strategy"):
        assert flag in out
    assert "(default: 5e-05)" in out


def recipe(cfg) -> tuple:
    return cfg.pointing, cfg.mark_jitter, cfg.near_done_fraction


def test_the_recipe_that_counts_is_the_default_of_every_entry_point():
    import re

    import bench_learning
    import debug_training
    from cli import parse_config

    counts = ("token", 0.2, 0.5)
    assert recipe(parse_config(TrainConfig, ["--data_root", "d"], "")) == counts
    assert recipe(parse_config(debug_training.DebugConfig, ["--data_root", "d"], "")) == counts
    bench = parse_config(bench_learning.BenchConfig, [], "")
    assert (bench.mark_jitter, bench.near_done_fraction) == counts[1:]
    assert bench_learning.train_config(bench, "simple-token", "d", "m").pointing == "token"
    assert "simple-token" in bench.variants.split(",")
    # Every training command in the README trains the recipe that counts, unless it asks for the seed's.
    readme = "".join(open(os.path.join(ROOT, name), encoding="utf-8").read() for name in ("README.md", "docs/training.md"))
    readme = readme.replace("\\\n", " ")
    commands = re.findall(r"(?:python|accelerate launch.*?) train_sequential_attention\.py ([^\n`]*)", readme)
    commands = [c for c in commands if "--help" not in c]
    assert len(commands) >= 2
    for command in commands:
        cfg = parse_config(TrainConfig, command.split(" #")[0].split(), "")  # without a trailing comment
        if cfg.pointing == "regress":
            assert (cfg.mark_jitter, cfg.near_done_fraction) == (0.0, 0.0), command  # the seed's design, whole
        else:
            assert recipe(cfg) == counts, command


def test_class_loss_builds_a_class_head_over_the_training_classes_and_reloads(tmp_path, synth_root, tiny_model_dir):
    from model_loading import load_checkpoint

    out = tmp_path / "cls"
    assert main(["--data_root", synth_root, "--model_name_or_path", tiny_model_dir, "--max_steps", "2",
                 "--batch_size", "2", "--class_loss", "1.0", "--object_map_focal", "2", "--other_object_weight", "3",
                 "--eval_every", "0",
                 "--eval_images", "0", "--eval_states", "2", "--num_workers", "0", "--wandb_mode", "disabled",
                 "--output_dir", str(out), "--min_pixels", "3136", "--max_pixels", "50176"]) == 0
    config = json.load(open(out / "config.json"))
    assert float(config["other_object_weight"]) == 3.0
    train_classes = sorted({line.split("\t")[1].strip() for line in open(os.path.join(synth_root, "ImageClasses_FSC147.txt"))
                            if line.split("\t")[0] in json.load(open(os.path.join(synth_root, "Train_Test_Val_FSC_147.json")))["train"]})
    assert json.loads(config["class_vocabulary"]) == train_classes
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"mode"' in line]
    assert all(r["loss/class_ce"] > 0 for r in records)  # in both modes: every state has uncounted objects or is done
    model, _ = load_checkpoint(str(out / "checkpoint-last"), device="cpu")
    assert model.class_head[1].out_features == len(train_classes)
