"""Shared fixtures: one tiny Qwen2-VL and one synthetic FSC-147 dataset per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never log online
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Real FSC-147 metadata, beside the checkout (../shared/reference/fsc147) when present.
REFERENCE_FSC147 = os.path.join(os.path.dirname(ROOT), "shared", "reference", "fsc147")

TINY_PIXELS = ["--min_pixels", "3136", "--max_pixels", "50176"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    return build_tiny_qwen2vl(TinyConfig(out=str(tmp_path_factory.mktemp("tiny") / "tiny-qwen2vl"), seed=0))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from dataset_fsc147 import SynthConfig, write_synthetic_fsc147

    out = str(tmp_path_factory.mktemp("synth") / "fsc147")
    write_synthetic_fsc147(SynthConfig(out=out, num_images=30, max_objects=6, seed=0))
    return out


@pytest.fixture(scope="session")
def train_config(tiny_model_dir, synth_root):
    """A TrainConfig for the tiny model on the synthetic data (CPU, 4-bit)."""
    from train_sequential_attention import TrainConfig

    return TrainConfig(data_root=synth_root, model_name_or_path=tiny_model_dir, load_in_4bit=True,
                       min_pixels=3136, max_pixels=50176, batch_size=4, num_workers=0, lora_dropout=0.0,
                       wandb_mode="disabled", device="cpu")


@pytest.fixture(scope="session")
def tiny_model(train_config):
    """A freshly built model (heads + LoRA) through the 4-bit path. Tests must not train it."""
    from model_loading import build_model

    return build_model(train_config)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, synth_root):
    """A few training steps with counting evaluation; its run folder (checkpoint-best included)."""
    from train_sequential_attention import main

    out = str(tmp_path_factory.mktemp("run") / "run")
    code = main(["--data_root", synth_root, "--model_name_or_path", tiny_model_dir, "--max_steps", "6",
                 "--batch_size", "4", "--lr", "3e-4", "--eval_every", "3", "--count_every", "0", "--save_every", "4",
                 "--eval_states", "4", "--eval_images", "3", "--max_count", "5", "--num_workers", "0",
                 "--wandb_mode", "offline", "--output_dir", out, *TINY_PIXELS])
    assert code == 0
    return out
