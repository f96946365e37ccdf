"""SequentialAttentionCountingModel: shapes for any k, gradient to every module, each subset trains."""

import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch

import debug_training
from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_sequential_attention import ATTENTION_MODULES, SequentialAttentionCountingModel
from model_sequential_simple import compute_loss
from model_loading import build_model, load_checkpoint, model_inputs, save_checkpoint
from run_logging import grad_norms
from train_sequential_attention import build_optimizer, main, state_loss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def attention_config(train_config):
    return dataclasses.replace(train_config, model_type="attention", attention_dim=64)


@pytest.fixture(scope="module")
def mixed_batches(synth_root):
    """cls and reg batches whose states include k = 0 and k > 0."""
    ds = FSC147Dataset(synth_root, "train")
    samples = [s for s in (ds[i] for i in range(len(ds))) if len(s.points) >= 3][:4]
    rng = np.random.default_rng(0)
    for _ in range(100):
        batches = {mode: prepare_batch(samples, mode, rng) for mode in ("cls", "reg")}
        ks = [len(c) for b in batches.values() for c in b.counted]
        if 0 in ks and max(ks) > 0:
            return batches
    raise AssertionError("could not draw a batch with k = 0 and k > 0")


def test_forward_shapes_with_zero_one_and_many_counted(attention_config, synth_root):
    model = build_model(attention_config)
    model.eval()
    ds = FSC147Dataset(synth_root, "val")
    images, names = [ds[i].image for i in range(3)], [ds[i].class_name for i in range(3)]
    inputs = {k: v.to(CPU) for k, v in model.build_inputs(images, names).items()}
    rng = np.random.default_rng(0)
    counted = [np.zeros((0, 2)), rng.uniform(-1, 1, (1, 2)), rng.uniform(-1, 1, (300, 2))]
    with torch.no_grad():
        out = model(inputs, counted=counted)
        empty = model(inputs, counted=None)  # no counted points at all
    for o in (out, empty):
        for key in ("x", "y", "done_logit"):
            assert o[key].shape == (3,) and torch.isfinite(o[key]).all()
    # The counted points change the prediction (the modules read them).
    assert not torch.allclose(out["done_logit"][2], empty["done_logit"][2])


def test_image_token_positions_follow_the_merged_grid(attention_config, synth_root):
    model = build_model(attention_config)
    ds = FSC147Dataset(synth_root, "val")
    inputs = model.build_inputs([ds[0].image, ds[1].image], [ds[0].class_name, ds[1].class_name])
    hidden = torch.randn(*inputs["input_ids"].shape, 8)
    tokens, xy, mask, cell = model.image_tokens(hidden, inputs["input_ids"], inputs["image_grid_thw"])
    for i, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
        n = t * h * w // 4
        assert int(mask[i].sum()) == n
        rows, cols = h // 2, w // 2
        assert torch.allclose(cell[i], torch.tensor([2 / cols, 2 / rows]))
        assert torch.allclose(xy[i, 0], torch.tensor([1 / cols - 1, 1 / rows - 1]))  # top-left token centre
        assert torch.allclose(xy[i, n - 1], torch.tensor([1 - 1 / cols, 1 - 1 / rows]))  # bottom-right


def test_gradient_reaches_every_parameter_of_every_module(attention_config, mixed_batches):
    model = build_model(attention_config)
    model.zero_grad()
    for mode, batch in mixed_batches.items():
        out = model(model_inputs(model, batch, CPU), counted=batch.counted)
        state_loss(out, batch, CPU).backward()
    groups = model.module_groups()
    for module in ("working_memory", "foveation", "cross_attention", "reasoning", "input_projections", "out_proj"):
        assert module in groups
    norms = grad_norms(model)
    for name, params in groups.items():
        assert norms[name] > 1e-4, f"{name}: total gradient {norms[name]}"
        if name == "lora":
            continue  # LoRA starts with B = 0, so A gets no gradient at the first step, by design
        for p in params:
            assert p.grad is not None and float(p.grad.norm()) > 0, f"a parameter of {name} got no gradient"


@pytest.mark.parametrize("subset", [c for r in range(len(ATTENTION_MODULES) + 1)
                                    for c in itertools.combinations(ATTENTION_MODULES, r)],
                         ids=lambda s: "+".join(s) or "none")
def test_each_subset_trains_with_decreasing_loss(attention_config, mixed_batches, subset):
    cfg = dataclasses.replace(attention_config, attention_modules=",".join(subset), lr=1e-3)
    model = build_model(cfg)
    assert model.enabled == subset
    if not subset:  # empty = the simple model: no extra parameters
        assert not hasattr(model, "out_proj")
    model.eval()  # no dropout: the same function at every step
    optimizer, _ = build_optimizer(cfg, model, total_steps=100)
    inputs = {mode: model_inputs(model, b, CPU) for mode, b in mixed_batches.items()}

    def loss():
        return sum(compute_loss(model(inputs[m], counted=b.counted), b.done, b.targets, b.target_mask, m)
                   for m, b in mixed_batches.items())

    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    with torch.no_grad():
        losses.append(loss().item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def test_starts_close_to_the_simple_model_plus_the_pointer(attention_config, train_config, mixed_batches):
    # Regression pointing, where x_head and y_head add their output to the foveation's pointer.
    simple = build_model(dataclasses.replace(train_config, pointing="regress"))  # same seed: same LoRA, heads, rows
    attention = build_model(dataclasses.replace(attention_config, pointing="regress"))
    batch = mixed_batches["reg"]
    with torch.no_grad():
        a = simple(model_inputs(simple, batch, CPU))
        b = attention(model_inputs(attention, batch, CPU), counted=batch.counted)
    # done starts near the simple model's; x, y start near the simple model's value added to where the
    # foveation looks (its pointer).
    assert (a["done_logit"] - b["done_logit"]).abs().max() < 0.5 and not torch.equal(a["done_logit"], b["done_logit"])
    assert (a["x"] + b["pointer"][:, 0] - b["x"]).abs().max() < 0.5
    assert (a["y"] + b["pointer"][:, 1] - b["y"]).abs().max() < 0.5
    assert b["pointer"].abs().max() <= 1  # a weighted mean of token centres lies in the image


def test_foveation_looks_around_the_last_counted_point(attention_config, synth_root):
    cfg = dataclasses.replace(attention_config, attention_modules="foveation", pointing="regress")
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():  # scores from position alone: a sharp Gaussian around the centre it is given
        for layer in (model.foveation.q, model.foveation.k):
            layer.weight.zero_(), layer.bias.zero_()
        model.foveation.log_sigma.fill_(float(np.log(0.05)))
    ds = FSC147Dataset(synth_root, "val")
    inputs = model.build_inputs([ds[0].image], [ds[0].class_name])
    first, last = [-0.8, -0.8], [0.6, 0.5]
    with torch.no_grad():
        out = model(inputs, counted=[np.array([first, [0.0, 0.0], last], dtype=np.float32)])
    # It looks at the image token nearest the last point (tokens are at most ~0.35 apart here), far from the first.
    where = out["pointer"][0].numpy()
    assert np.abs(where - last).max() < 0.2 and np.abs(where - first).max() > 1.0


def test_checkpoint_round_trip_gives_identical_predictions(attention_config, mixed_batches, tmp_path):
    cfg = dataclasses.replace(attention_config, output_dir=str(tmp_path))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(model, cfg, str(tmp_path / "checkpoint-0"))
    loaded, loaded_cfg = load_checkpoint(path, device="cpu")
    assert isinstance(loaded, SequentialAttentionCountingModel) and loaded_cfg.model_type == "attention"
    model.eval()
    batch = mixed_batches["reg"]
    with torch.no_grad():
        a = model(model_inputs(model, batch, CPU), counted=batch.counted)
        b = loaded(model_inputs(loaded, batch, CPU), counted=batch.counted)
    for key in ("x", "y", "done_logit"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_train_main_with_attention_model(tmp_path, synth_root, tiny_model_dir):
    from conftest import TINY_PIXELS

    out = str(tmp_path / "run")
    assert main(["--data_root", synth_root, "--model_name_or_path", tiny_model_dir, "--model_type", "attention",
                 "--attention_modules", "memory,foveation", "--attention_dim", "64", "--max_steps", "2",
                 "--batch_size", "2", "--eval_states", "2", "--eval_images", "2", "--max_count", "2",
                 "--num_workers", "0", "--wandb_mode", "disabled", "--output_dir", out, *TINY_PIXELS]) == 0
    model, cfg = load_checkpoint(os.path.join(out, "checkpoint-last"), device="cpu")
    assert cfg.model_type == "attention" and model.enabled == ("memory", "foveation")


def test_unknown_attention_module_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["--data_root", "x", "--model_type", "attention", "--attention_modules", "memory,lstm"])
    assert "lstm" in capsys.readouterr().err


def test_debug_tiny_attention_passes(capsys):
    assert debug_training.main(["--tiny", "--model_type", "attention"]) == 0
    out = capsys.readouterr().out
    for module in ("working_memory", "foveation", "cross_attention", "reasoning"):
        assert f"gradient {module}" in out
    assert "0 failed" in out
