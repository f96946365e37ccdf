"""Precision on a GPU: bf16 compute, fp32 master weights, SDPA, TF32.

There is no GPU here or in CI, so a GPU device stands in by name where only the choice is tested, and the
bf16 path itself runs on the CPU with --precision bf16 (the same autocast and storage rules, bf16 matmuls
emulated): the dtypes the vision tower and the language model compute in are read with forward hooks.
"""

import dataclasses

import numpy as np
import pytest
import torch

from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_loading import backbone_load_kwargs, build_model, compute_dtype, configure_cuda_math, model_inputs
from train_sequential_attention import build_optimizer, train_step

GPU = torch.device("cuda", 1)  # a name only


def test_gpu_runs_the_backbone_in_bf16_and_keeps_weights_that_train_in_fp32(train_config):
    lora = backbone_load_kwargs(train_config, GPU)
    assert lora["dtype"] == torch.bfloat16 and lora["attn_implementation"] == "sdpa"
    assert lora["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16 and lora["device_map"] == {"": 1}
    full = backbone_load_kwargs(dataclasses.replace(train_config, finetune="full", load_in_4bit=False), GPU)
    assert full["dtype"] == torch.float32  # master weights: AdamW's small steps would be lost in bf16
    assert "quantization_config" not in full
    assert compute_dtype(train_config, GPU) == torch.bfloat16
    assert compute_dtype(train_config, torch.device("cpu")) == torch.float32  # bf16 is emulated on this CPU
    assert compute_dtype(dataclasses.replace(train_config, precision="fp32"), GPU) == torch.float32


def test_bf16_steps_below_the_resolution_are_lost_and_fp32_masters_keep_them():
    # The premise of full fine-tuning's fp32 storage, by hand: bf16 spacing at 1.0 is 2**-7 = 7.8e-3.
    weight = torch.ones(4)
    assert torch.equal((weight.bfloat16() - 3e-4).float(), weight)
    assert not torch.equal(weight - 3e-4, weight)


def dtypes_seen(model, inputs) -> dict:
    """Output dtypes of a vision block's qkv, a language-model q_proj, the last hidden states and the heads."""
    seen = {}
    hooks = []
    for name, module in model.backbone.named_modules():
        for key, suffix in (("vision_qkv", "visual.blocks.0.attn.qkv"),
                            ("lm_q_proj", "language_model.layers.0.self_attn.q_proj")):
            if name.endswith(suffix) and key not in seen:
                hooks.append(module.register_forward_hook(lambda m, a, out, key=key: seen.setdefault(key, out.dtype) and None))
    hidden = model.encode(inputs)
    out = model(inputs)
    for h in hooks:
        h.remove()
    return {**seen, "hidden": hidden.dtype, "done_logit": out["done_logit"].dtype, "x": out["x"].dtype}


@pytest.fixture(scope="module")
def states(synth_root):
    ds = FSC147Dataset(synth_root, "train")
    return prepare_batch([ds[i] for i in range(2)], "reg", np.random.default_rng(0))


def test_bf16_qlora_computes_in_bf16_with_fp32_heads_and_adapters(train_config, states):
    model = build_model(dataclasses.replace(train_config, precision="bf16", pointing="token"))
    dtypes = dtypes_seen(model, model_inputs(model, states, torch.device("cpu")))
    assert dtypes["vision_qkv"] == dtypes["lm_q_proj"] == dtypes["hidden"] == torch.bfloat16
    assert dtypes["done_logit"] == dtypes["x"] == torch.float32  # the heads read fp32 states, outside autocast
    vision = [p for n, p in model.backbone.named_parameters() if ".visual." in n]
    assert vision and all(p.dtype == torch.bfloat16 for p in vision)  # stored in bf16, not cast up to fp32
    assert model.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # LoRA, heads, token rows
    config = model.backbone.get_base_model().config
    assert config._attn_implementation == config.vision_config._attn_implementation == "sdpa"
    cfg = dataclasses.replace(train_config, precision="bf16", pointing="token", lr=1e-3)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps=4)
    lora = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_B" in n}
    result = train_step(cfg, model, optimizer, scheduler, [states], "reg")
    assert result["finite"] and result["grad_norms"]["lora"] > 0
    moved = [n for n, p in model.backbone.named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])]
    assert len(moved) == len(lora)


def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights_that_move(train_config, states):
    cfg = dataclasses.replace(train_config, precision="bf16", finetune="full", load_in_4bit=False, lr=3e-4)
    model = build_model(cfg)
    dtypes = dtypes_seen(model, model_inputs(model, states, torch.device("cpu")))
    # The matmuls run in bf16 under autocast; the residual stream stays in its fp32 weights' dtype (as AMP does).
    assert dtypes["vision_qkv"] == dtypes["lm_q_proj"] == torch.bfloat16
    norm = dict(model.backbone.named_parameters())["model.visual.blocks.0.norm1.weight"]
    assert norm.dtype == torch.float32 and norm.requires_grad
    before = norm.detach().clone()
    optimizer, scheduler = build_optimizer(cfg, model, total_steps=4)
    assert train_step(cfg, model, optimizer, scheduler, [states], "reg")["finite"]
    # Adam's first step moves every weight with a gradient by ~lr: kept in fp32, a LayerNorm weight near 1 moves.
    assert (norm.detach() - before).abs().max() > 1e-4


def test_tf32_is_on_for_what_stays_fp32_on_a_gpu():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        configure_cuda_math()
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
    finally:
        torch.set_float32_matmul_precision(before)
