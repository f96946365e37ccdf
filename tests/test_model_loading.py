"""Checkpoints: saved and rebuilt through model_loading, identical predictions, clear errors."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from cli import UsageError
from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_loading import build_model, load_checkpoint, model_inputs, save_checkpoint
from train_sequential_attention import TrainConfig


def test_checkpoint_reload_gives_identical_predictions(trained_run, synth_root):
    ds = FSC147Dataset(synth_root, "val")
    batch = prepare_batch([ds[i] for i in range(3)], "reg", np.random.default_rng(5))
    a, _ = load_checkpoint(os.path.join(trained_run, "checkpoint-6"), device="cpu")
    b, cfg = load_checkpoint(os.path.join(trained_run, "checkpoint-last"), device="cpu", config_cls=TrainConfig)
    assert cfg.max_steps == 6
    with torch.no_grad():
        out_a = a(model_inputs(a, batch, torch.device("cpu")))
        out_b = b(model_inputs(b, batch, torch.device("cpu")))
    for key in ("x", "y", "done_logit"):
        assert torch.equal(out_a[key], out_b[key])
    # And the checkpoint is not simply the untrained model: the heads moved.
    fresh = build_model(cfg)
    assert not torch.equal(fresh.x_head.fc2.weight, a.x_head.fc2.weight)
    assert not torch.equal(fresh.token_embeddings.weight, a.token_embeddings.weight)


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
