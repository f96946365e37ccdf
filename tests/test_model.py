"""The tiny Qwen2-VL, the 4-bit QLoRA path, SimpleSequentialModel's forward, gradients and loss."""

import dataclasses

import numpy as np
import pytest
import torch

from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_sequential_simple import SPECIAL_TOKENS, compute_loss
from model_loading import build_model, model_inputs
from run_logging import grad_norms
from train_sequential_attention import build_optimizer


@pytest.fixture(scope="module")
def fixed_batches(synth_root):
    ds = FSC147Dataset(synth_root, "train")
    samples = [ds[i] for i in range(4)]
    rng = np.random.default_rng(0)
    return {mode: prepare_batch(samples, mode, rng) for mode in ("cls", "reg")}


def test_tiny_model_loads_like_the_real_one(tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoProcessor, BitsAndBytesConfig, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map={"": "cpu"})
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) > 10
    assert all(m.in_features % 64 == 0 for m in linear4)  # bitsandbytes CPU 4-bit needs this


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file

    from tiny_qwen2vl import TinyConfig, build_tiny_qwen2vl

    a = load_file(build_tiny_qwen2vl(TinyConfig(out=str(tmp_path / "a"), seed=1)) + "/model.safetensors")
    b = load_file(build_tiny_qwen2vl(TinyConfig(out=str(tmp_path / "b"), seed=1)) + "/model.safetensors")
    c = load_file(build_tiny_qwen2vl(TinyConfig(out=str(tmp_path / "c"), seed=2)) + "/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_builder_rejects_widths_that_break_cpu_4bit(capsys):
    from tiny_qwen2vl import main

    with pytest.raises(SystemExit):
        main(["--vision_width", "96", "--text_width", "32"])
    err = capsys.readouterr().err
    assert "--vision_width" in err and "--text_width" in err  # every problem reported at once


def test_prompt_names_the_class_and_ends_with_query_tokens(tiny_model):
    prompt = tiny_model.build_prompt("sea shells")
    assert "sea shells" in prompt and prompt.endswith("".join(SPECIAL_TOKENS))
    assert "<|image_pad|>" in prompt and "<|im_start|>assistant" in prompt


def test_forward_shapes_through_4bit(tiny_model, fixed_batches):
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in tiny_model.backbone.modules())
    batch = fixed_batches["reg"]
    inputs = model_inputs(tiny_model, batch, torch.device("cpu"))
    assert "mm_token_type_ids" in inputs and "image_grid_thw" in inputs
    with torch.no_grad():
        out = tiny_model(inputs)
    for key in ("x", "y", "done_logit"):
        assert out[key].shape == (4,) and torch.isfinite(out[key]).all()
    assert out["x"].abs().max() <= 2 and out["y"].abs().max() <= 2


def test_only_the_new_token_rows_train(tiny_model):
    emb = tiny_model.backbone.get_input_embeddings()
    assert not emb.weight.requires_grad
    assert tiny_model.token_embeddings.weight.shape == (3, emb.weight.shape[1])
    assert tiny_model.token_embeddings.weight.requires_grad
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert all(("lora_" in n) or not n.startswith("backbone.") for n in trainable)
    # The three rows start distinct (initialised from the words x, y, done).
    w = tiny_model.token_embeddings.weight
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


def test_new_token_rows_reach_the_hidden_states(tiny_model, fixed_batches):
    inputs = model_inputs(tiny_model, fixed_batches["cls"], torch.device("cpu"))
    with torch.no_grad():
        before = tiny_model(inputs)["done_logit"].clone()
        tiny_model.token_embeddings.weight[2] += 5.0
        after = tiny_model(inputs)["done_logit"].clone()
        tiny_model.token_embeddings.weight[2] -= 5.0
    assert not torch.allclose(before, after)


def test_gradients_reach_heads_token_rows_and_lora(train_config, fixed_batches):
    model = build_model(train_config)
    model.zero_grad()
    for mode, batch in fixed_batches.items():
        out = model(model_inputs(model, batch, torch.device("cpu")))
        compute_loss(out, batch.done, batch.targets, batch.target_mask, mode).backward()
    norms = grad_norms(model)
    assert set(norms) == {"x_head", "y_head", "done_head", "token_embeddings", "lora"}
    for name, norm in norms.items():
        assert norm > 1e-4, f"{name} got gradient {norm}"
    lora = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


@pytest.mark.parametrize("mode", ["cls", "reg"])
def test_one_step_at_the_default_lr_lowers_the_loss(train_config, fixed_batches, mode):
    cfg = dataclasses.replace(train_config, lr=5e-5)
    model = build_model(cfg)
    model.eval()  # same function before and after the step
    batch = fixed_batches[mode]
    inputs = model_inputs(model, batch, torch.device("cpu"))

    def loss():
        return compute_loss(model(inputs), batch.done, batch.targets, batch.target_mask, mode)

    optimizer, _ = build_optimizer(cfg, model, total_steps=10)
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_regression_loss_is_mse_to_the_nearest_target():
    out = {"x": torch.tensor([0.0, 0.5]), "y": torch.tensor([0.0, 0.5]), "done_logit": torch.zeros(2)}
    targets = torch.tensor([[[0.2, 0.0], [-1.0, -1.0]], [[0.5, 0.1], [9.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    loss = compute_loss(out, torch.zeros(2), targets, mask, "reg")
    # Image 0: nearest is (0.2, 0): (0.04 + 0) / 2; image 1: only (0.5, 0.1): (0 + 0.16) / 2.
    assert loss.item() == pytest.approx((0.02 + 0.08) / 2)
    bce = compute_loss(out, torch.tensor([1.0, 0.0]), targets, mask, "cls")
    assert bce.item() == pytest.approx(np.log(2), rel=1e-5)


def test_predictions_are_clamped_not_squashed(tiny_model):
    feats = torch.randn(2, 3, tiny_model.x_head.norm.normalized_shape[0])
    with torch.no_grad():
        tiny_model.x_head.fc2.bias += 100.0
        out = tiny_model.predict(feats)
        tiny_model.x_head.fc2.bias -= 100.0
    assert torch.allclose(out["x"], torch.full((2,), 2.0))
