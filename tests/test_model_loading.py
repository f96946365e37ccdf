"""Checkpoints: saved and rebuilt through model_loading, identical predictions, clear errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from cli import UsageError
from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_loading import build_model, load_checkpoint, model_inputs, save_checkpoint
from train_sequential_attention import TrainConfig, build_data, evaluate, fixed_val_batches


def test_reloaded_checkpoint_reproduces_the_validation_losses_of_training(trained_run):
    # The training process logged val losses at step 6 with the model in memory; the checkpoint of step 6,
    # rebuilt from disk, must give the same numbers on the same fixed validation states.
    model, cfg = load_checkpoint(os.path.join(trained_run, "checkpoint-6"), device="cpu", config_cls=TrainConfig)
    assert cfg.max_steps == 6
    logged = [json.loads(line) for line in open(os.path.join(trained_run, "metrics.jsonl"))]
    logged = [r for r in logged if r.get("event") == "eval" and r["step"] == 6][0]
    _, val = build_data(cfg)
    again = evaluate(cfg, model, fixed_val_batches(cfg, val))
    for key in ("val/loss_cls", "val/loss_reg", "val/done_acc"):
        assert again[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    # And the checkpoint is not simply the untrained model: the heads moved.
    fresh = build_model(cfg)
    assert not torch.equal(fresh.x_head.fc2.weight, model.x_head.fc2.weight)
    assert not torch.equal(fresh.token_embeddings.weight, model.token_embeddings.weight)


def test_full_fine_tuning_checkpoint_holds_the_backbone_weights(tmp_path, train_config, synth_root):
    cfg = dataclasses.replace(train_config, finetune="full", load_in_4bit=False, pointing="token",
                              output_dir=str(tmp_path))
    model = build_model(cfg)
    assert "backbone" in model.module_groups() and "lora" not in model.module_groups()
    with torch.no_grad():  # every trainable weight moves, the backbone's (vision and language) included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_checkpoint(model, cfg, str(tmp_path / "checkpoint-0"))
    loaded, loaded_cfg = load_checkpoint(path, device="cpu")
    assert loaded_cfg.finetune == "full"
    ds = FSC147Dataset(synth_root, "train")
    batch = prepare_batch([ds[i] for i in range(2)], "reg", np.random.default_rng(1))
    model.eval()
    with torch.no_grad():
        a = model(model_inputs(model, batch, torch.device("cpu")))
        b = loaded(model_inputs(loaded, batch, torch.device("cpu")))
    for key in ("x", "y", "done_logit", "next_logits"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_checkpoint_identical_to_the_model_that_was_saved(tmp_path, train_config, synth_root):
    cfg = dataclasses.replace(train_config, output_dir=str(tmp_path))
    model = build_model(cfg)
    with torch.no_grad():  # make the heads and LoRA non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(model, cfg, str(tmp_path / "checkpoint-0"))
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
    with pytest.raises(UsageError, match="missing"):
        load_checkpoint(str(tmp_path))


def test_loading_a_checkpoint_warns_of_no_model_type_mismatch(trained_run, caplog):
    # A checkpoint's config.json is this project's config ("model_type": "simple"), which transformers' processor
    # loader also reads; its "model of type `simple` to instantiate a model of type ``... can yield errors" warning
    # is about a file that is not a transformers config, and must not reach the user on every load.
    caplog.set_level("WARNING")
    load_checkpoint(os.path.join(trained_run, "checkpoint-last"), device="cpu")
    assert not [r for r in caplog.records if "to instantiate a model of type" in r.getMessage()]
