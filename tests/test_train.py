"""End to end: main([...]) writes config, metrics, checkpoints and a W&B run; checkpoints reload."""

import glob
import json
import os

import numpy as np
import pytest
import torch

import train_sequential_attention as train_mod
from dataset_fsc147 import FSC147Dataset, prepare_batch
from train_sequential_attention import load_checkpoint, loss_trend, main, model_inputs


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


def test_checkpoint_reload_gives_identical_predictions(run_dir, synth_root):
    ds = FSC147Dataset(synth_root, "val")
    batch = prepare_batch([ds[i] for i in range(3)], "reg", np.random.default_rng(5))
    a, _ = load_checkpoint(os.path.join(run_dir, "checkpoint-6"), device="cpu")
    b, cfg = load_checkpoint(os.path.join(run_dir, "checkpoint-last"), device="cpu")
    assert cfg.max_steps == 6
    with torch.no_grad():
        out_a = a(model_inputs(a, batch, torch.device("cpu")))
        out_b = b(model_inputs(b, batch, torch.device("cpu")))
    for key in ("x", "y", "done_logit"):
        assert torch.equal(out_a[key], out_b[key])
    # And the checkpoint is not simply the untrained model: the heads moved.
    fresh = train_mod.build_model(cfg)
    assert not torch.equal(fresh.x_head.fc2.weight, a.x_head.fc2.weight)
    assert not torch.equal(fresh.token_embeddings.weight, a.token_embeddings.weight)


def test_checkpoint_identical_to_the_model_that_was_saved(tmp_path, train_config, synth_root):
    cfg = train_mod.dataclasses.replace(train_config, output_dir=str(tmp_path))
    model = train_mod.build_model(cfg)
    with torch.no_grad():  # make the heads and LoRA non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    optimizer, scheduler = train_mod.build_optimizer(cfg, model, 10)
    path = train_mod.save_checkpoint(cfg, model, optimizer, scheduler, train_mod.TrainState(), "checkpoint-0")
    ds = FSC147Dataset(synth_root, "train")
    batch = prepare_batch([ds[i] for i in range(2)], "cls", np.random.default_rng(1))
    loaded, _ = load_checkpoint(path, device="cpu")
    model.eval()
    with torch.no_grad():
        a = model(model_inputs(model, batch, torch.device("cpu")))
        b = loaded(model_inputs(loaded, batch, torch.device("cpu")))
    for key in ("x", "y", "done_logit"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(train_mod.UsageError, match="missing"):
        load_checkpoint(str(tmp_path))


def test_loss_trend_reads_first_and_last_fifth(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(1, 21):
            mode = "cls" if step % 2 else "reg"
            f.write(json.dumps({"step": step, f"loss_{mode}": float(20 - step)}) + "\n")
        f.write(json.dumps({"step": 20, "event": "eval", "loss_cls": 100.0}) + "\n")
    trend = loss_trend(str(path))
    assert trend["cls"] == (np.mean([19, 17]), np.mean([3, 1]))
    assert trend["reg"][0] > trend["reg"][1]


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
        main(["--batch_size", "0", "--lr", "5", "--target_strategy", "random"])
    err = capsys.readouterr().err
    for text in ("--data_root is required", "--batch_size", "--lr", "--target_strategy"):
        assert text in err


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
