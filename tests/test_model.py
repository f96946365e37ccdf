"""The tiny Qwen2-VL, the 4-bit QLoRA path, SimpleSequentialModel's forward, gradients and loss."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_sequential_simple import (SPECIAL_TOKENS, TokenContext, TokenPointer, clamp_coordinates, class_loss, compute_loss,
                                     object_map_loss, size_loss, token_index, token_pointing_loss)
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
    model = build_model(dataclasses.replace(train_config, pointing="regress"))
    model.zero_grad()
    for mode, batch in fixed_batches.items():
        out = model(model_inputs(model, batch, torch.device("cpu")))
        compute_loss(out, batch.done, batch.targets, batch.target_mask, mode, object_sizes=torch.tensor(batch.object_sizes),
                     image_sizes=torch.tensor(batch.sizes, dtype=torch.float32)).backward()
    norms = grad_norms(model)
    assert set(norms) == {"x_head", "y_head", "done_head", "size_head", "token_embeddings", "lora"}
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


def test_done_loss_is_bce_against_done_by_hand():
    out = {"x": torch.zeros(2), "y": torch.zeros(2), "done_logit": torch.tensor([2.0, -1.0])}
    targets, mask = torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.bool)
    # Right on both: -log sigmoid(2) = log(1 + e^-2), -log(1 - sigmoid(-1)) = log(1 + e^-1).
    loss = compute_loss(out, torch.tensor([1.0, 0.0]), targets, mask, "cls")
    assert loss.item() == pytest.approx((np.log1p(np.exp(-2)) + np.log1p(np.exp(-1))) / 2, rel=1e-6)
    wrong = compute_loss(out, torch.tensor([0.0, 1.0]), targets, mask, "cls")
    assert wrong.item() == pytest.approx((np.log1p(np.exp(2)) + np.log1p(np.exp(1))) / 2, rel=1e-6)


def test_clamp_keeps_the_gradient_outside_the_range():
    raw = torch.tensor([2.5, -3.0, 0.5], requires_grad=True)
    clamped = clamp_coordinates(raw)
    assert clamped.tolist() == [2.0, -2.0, 0.5]
    (clamped ** 2).sum().backward()  # target 0: d/draw (clamped^2) = 2 * clamped, also beyond +-2
    assert raw.grad.tolist() == [4.0, -4.0, 1.0]


# A 2 x 2 grid of tokens: centres at +-0.5, each cell 1 wide in normalised units.
GRID = {"token_xy": torch.tensor([[[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]]),
        "token_mask": torch.ones(1, 4, dtype=torch.bool), "cell": torch.tensor([[1.0, 1.0]])}


def test_token_index_is_the_cell_holding_the_point():
    points = torch.tensor([[[0.6, -0.4], [-0.9, 0.9], [0.1, 0.1]]])
    assert token_index(points, GRID["token_xy"], GRID["token_mask"]).tolist() == [[1, 2, 3]]


def test_token_pointing_loss_by_hand():
    outputs = {**GRID, "next_logits": torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "offsets": torch.zeros(1, 4, 2)}
    lse = float(np.log(np.exp([0.0, 1.0, 2.0, 3.0]).sum()))
    # One target at (0.6, -0.4): token 1; offset from its centre (0.5, -0.5) in half-cells: (0.2, 0.2).
    ce, off = token_pointing_loss(outputs, torch.tensor([[[0.6, -0.4]]]), torch.tensor([[True]]))
    assert ce.item() == pytest.approx(lse - 1.0, rel=1e-6) and off.item() == pytest.approx(0.04, rel=1e-5)
    # Two valid targets (tokens 1 and 3): cross-entropy on the set, -log(p1 + p3).
    ce, _ = token_pointing_loss(outputs, torch.tensor([[[0.6, -0.4], [0.5, 0.5]]]), torch.tensor([[True, True]]))
    assert ce.item() == pytest.approx(lse - float(np.log(np.exp(1.0) + np.exp(3.0))), rel=1e-6)
    # A padded (masked) target does not count, even where it falls.
    ce, _ = token_pointing_loss(outputs, torch.tensor([[[0.6, -0.4], [0.5, 0.5]]]), torch.tensor([[True, False]]))
    assert ce.item() == pytest.approx(lse - 1.0, rel=1e-6)


def test_object_map_loss_by_hand():
    outputs = {**GRID, "object_logits": torch.tensor([[2.0, -2.0, 0.0, 0.0]])}
    loss = object_map_loss(outputs, [np.array([[-0.4, -0.6]])])  # one uncounted object, in token 0
    expected = (np.log1p(np.exp(-2.0)) * 2 + np.log(2.0) * 2) / 4  # token 0: target 1, logit 2; others 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_other_objects_weigh_their_tokens_in_the_object_map_loss_by_hand():
    outputs = {**GRID, "object_logits": torch.zeros(1, 4)}  # every token's BCE is log 2
    remaining = [np.array([[-0.4, -0.6]])]  # a named object in token 0
    others = [np.array([[0.6, -0.4], [-0.6, -0.4]])]  # objects of another class in token 1 and in token 0
    # token 1 weighs 3; token 0 holds a named object too, so it stays a positive of weight 1: (1 + 3 + 1 + 1) / 4
    loss = object_map_loss(outputs, remaining, others=others, other_weight=3.0)
    assert loss.item() == pytest.approx(np.log(2.0) * 6 / 4, rel=1e-6)
    assert object_map_loss(outputs, remaining, others=others).item() == pytest.approx(np.log(2.0), rel=1e-6)


def test_focal_object_map_loss_weights_hard_tokens_by_hand():
    outputs = {**GRID, "object_logits": torch.tensor([[2.0, -2.0, 0.0, 3.0]])}
    remaining = [np.array([[-0.4, -0.6]])]  # token 0 holds an object: targets 1, 0, 0, 0
    p_right = 1 / (1 + np.exp(-np.array([2.0, 2.0, 0.0, -3.0])))  # sigmoid(logit) or sigmoid(-logit)
    expected = np.mean(-np.log(p_right) * (1 - p_right) ** 2)
    assert object_map_loss(outputs, remaining, focal=2.0).item() == pytest.approx(expected, rel=1e-5)
    # token 3 (logit 3, target 0: wrong and confident) weighs 0.95^2 of its BCE, token 0 (right) 0.12^2
    assert object_map_loss(outputs, remaining).item() == pytest.approx(np.mean(-np.log(p_right)), rel=1e-5)


def test_class_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]])
    outputs = {**GRID, "class_logits": logits}
    remaining = [np.array([[-0.4, -0.6], [0.6, -0.4]])]  # objects in tokens 0 and 1, of class 1
    ce = lambda row, c: float(torch.logsumexp(row, 0) - row[c])
    expected = (ce(logits[0, 0], 1) + ce(logits[0, 1], 1)) / 2
    assert class_loss(outputs, remaining, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-5)
    assert class_loss(outputs, remaining, torch.tensor([-1])).item() == 0.0  # a class the head does not know


def test_size_loss_by_hand():
    # A 200 x 120 image on a 2 x 2 token grid (cell 1.0 normalised): tokens are 100 x 60 px, 80 px on average.
    sizes, image = torch.tensor([40.0]), torch.tensor([[200.0, 120.0]])
    target = np.log(40.0 / 80.0)
    token = {**GRID, "token_log_sizes": torch.tensor([[0.0, 1.0, -1.0, 5.0]]), "log_size": torch.tensor([0.0])}
    # Uncounted objects in tokens 0 and 2 (token 3 holds none: its 5.0 does not count).
    loss = size_loss(token, sizes, image, [np.array([[-0.4, -0.6], [-0.5, 0.5]])])
    assert loss.item() == pytest.approx(((0.0 - target) ** 2 + (-1.0 - target) ** 2) / 2, rel=1e-5)
    # Regression pointing: one estimate per state.
    regress = {"log_size": torch.tensor([0.5]), "cell": GRID["cell"]}
    assert size_loss(regress, sizes, image).item() == pytest.approx((0.5 - target) ** 2, rel=1e-5)
    # A state naming a class the image lacks has no size (NaN): it is left out, not averaged in.
    two = {"log_size": torch.tensor([0.5, 3.0]), "cell": GRID["cell"].expand(2, 2)}
    loss = size_loss(two, torch.tensor([40.0, float("nan")]), image.expand(2, 2))
    assert loss.item() == pytest.approx((0.5 - target) ** 2, rel=1e-5)


def test_prompt_goes_before_or_after_the_image(train_config):
    after = build_model(train_config)
    before = build_model(dataclasses.replace(train_config, prompt_position="before"))
    image_at = lambda text: text.index("<|vision_start|>")
    name_at = lambda text: text.index("Count the sea shells")
    assert image_at(after.build_prompt("sea shells")) < name_at(after.build_prompt("sea shells"))
    assert name_at(before.build_prompt("sea shells")) < image_at(before.build_prompt("sea shells"))
    assert after.build_prompt("sea shells").endswith("<x><y><done>") and before.build_prompt("x").endswith("<x><y><done>")
    ids = lambda m: m.build_inputs([Image.new("RGB", (56, 56))], ["sea shells"])["input_ids"][0].tolist()
    image_id = after.image_token_id
    name_id = after.processor.tokenizer(" sea", add_special_tokens=False)["input_ids"][0]
    assert ids(after).index(image_id) < ids(after).index(name_id)
    assert ids(before).index(name_id) < ids(before).index(image_id)


def test_film_binding_starts_as_add_and_then_scales_tokens_by_the_query():
    torch.manual_seed(0)
    add, film = TokenPointer(8, 4, "add"), TokenPointer(8, 4, "film")
    film.load_state_dict({**add.state_dict(), **{k: v for k, v in film.state_dict().items() if "query_scale" in k}})
    tokens, query = torch.randn(1, 3, 8), torch.randn(1, 8)
    for a, f in zip(add(tokens, query), film(tokens, query)):
        assert torch.allclose(a, f)  # scale 0 at the start: the product is the identity
    with torch.no_grad():
        film.query_scale[1].bias.fill_(1.0)  # scale (1 + 1): token features doubled before the query is added
    h = torch.nn.functional.gelu(2 * add.token_proj(tokens) + add.query_proj(query).unsqueeze(1))
    assert torch.allclose(film(tokens, query)[0], add.next_score(h).squeeze(-1), atol=1e-6)


def grid_layout(rows: int, cols: int, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_xy (pad_to, 2) row-major on a rows x cols grid in [-1, 1], and its mask (image_tokens' layout)."""
    xy = [[(c + 0.5) / cols * 2 - 1, (r + 0.5) / rows * 2 - 1] for r in range(rows) for c in range(cols)]
    mask = [True] * len(xy) + [False] * (pad_to - len(xy))
    return torch.tensor(xy + [[0.0, 0.0]] * (pad_to - len(xy))), torch.tensor(mask)


def test_token_context_sums_each_tokens_grid_neighbours_within_its_own_image():
    context = TokenContext(1, 3)
    with torch.no_grad():
        context.conv.weight.fill_(1.0)  # each output: the sum of the 3 x 3 neighbourhood
    xy0, mask0 = grid_layout(2, 3, 6)  # image 0: 2 rows x 3 columns
    xy1, mask1 = grid_layout(2, 2, 6)  # image 1: 2 x 2, padded with two tokens
    h = torch.tensor([[1.0, 2, 3, 4, 5, 6], [10, 20, 30, 40, 99, 99]]).unsqueeze(-1)  # (B, N, 1)
    cell = torch.tensor([[2 / 3, 1.0], [1.0, 1.0]])
    out = context(h, torch.stack([xy0, xy1]), torch.stack([mask0, mask1]), cell)[..., 0]
    # By hand: [[1, 2, 3], [4, 5, 6]] -> neighbourhood sums [[12, 21, 16], [12, 21, 16]]; image 1 -> 100 everywhere,
    # nothing from image 0 or from its padding; the padding tokens keep their value.
    sums = torch.tensor([[12.0, 21, 16, 12, 21, 16], [100, 100, 100, 100, 0, 0]])
    assert torch.allclose(out, h[..., 0] + F.gelu(sums))
    assert out[1, 4:].tolist() == [99.0, 99.0]


def test_token_context_starts_as_none_and_still_learns():
    torch.manual_seed(0)
    plain, with_context = TokenPointer(8, 4, "film"), TokenPointer(8, 4, "film", context=3)
    with_context.load_state_dict({**with_context.state_dict(), **plain.state_dict()})
    tokens, query = torch.randn(1, 4, 8), torch.randn(1, 8)
    layout = (GRID["token_xy"], GRID["token_mask"], GRID["cell"])
    for a, b in zip(plain(tokens, query), with_context(tokens, query, layout)):
        assert torch.allclose(a, b)  # zero weights: no context at the start
    with_context(tokens, query, layout)[1].sum().backward()
    assert with_context.context.conv.weight.grad.abs().sum() > 0


def test_a_model_with_token_context_counts_through_the_real_backbone(train_config):
    model = build_model(dataclasses.replace(train_config, pointing="token", token_context=3))
    inputs = model.build_inputs([Image.new("RGB", (112, 84)), Image.new("RGB", (56, 56))], ["sea shells", "red rings"])
    out = model(inputs)
    assert out["object_logits"].shape[0] == 2 and torch.isfinite(out["object_logits"][out["token_mask"]]).all()
    assert "token_pointer.context.conv.weight" in model.head_state_dict()  # saved with the heads


def test_token_pointing_points_at_the_best_token_plus_its_offset(train_config):
    model = build_model(dataclasses.replace(train_config, pointing="token"))
    hidden = model.x_head.norm.normalized_shape[0]
    feats = torch.zeros(1, 3, hidden)
    tokens = torch.zeros(1, 4, hidden)
    with torch.no_grad():
        model.token_pointer.next_score.bias.zero_()
        model.token_pointer.next_score.weight.zero_()
        model.token_pointer.object_score.weight.zero_()
        model.token_pointer.object_score.bias.fill_(1.5)
        model.x_head.fc2.weight.zero_(), model.x_head.fc2.bias.fill_(0.5)  # offset x: half a half-cell
        model.y_head.fc2.weight.zero_(), model.y_head.fc2.bias.fill_(-1.0)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    objects = torch.tensor([[0.0, 0.0, 1.5, 1.5]])
    model.token_pointer.forward = lambda t, q, layout=None: (logits, objects, torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    out = model.point_at_token(feats, torch.zeros(1), tokens, GRID["token_xy"], GRID["token_mask"], GRID["cell"])
    # Token 2 (centre (-0.5, 0.5)) + offset (0.5, -1.0) half-cells of 0.5: (-0.25, 0.0).
    assert out["x"].item() == pytest.approx(-0.25) and out["y"].item() == pytest.approx(0.0)
    # done_logit = 0 + w * max object logit + b = -1 * 1.5 + 0 at initialisation: evidence argues against done.
    assert out["done_logit"].item() == pytest.approx(-1.5)
    # log size: the token sizes weighted by sigmoid(object logit): (0.5 * 0 + 0.5 * 1 + 0.8176 * (2 + 3)) / 2.6352.
    assert out["log_size"].item() == pytest.approx(1.7411, abs=1e-3)


def test_predictions_are_clamped_not_squashed(train_config):
    model = build_model(dataclasses.replace(train_config, pointing="regress"))
    feats = torch.randn(2, 3, model.x_head.norm.normalized_shape[0])
    with torch.no_grad():
        model.x_head.fc2.bias += 100.0
        out = model.predict(feats)
    assert torch.allclose(out["x"], torch.full((2,), 2.0))


def test_patch_embedding_as_matmul_is_the_same_convolution():
    from model_loading import PatchConvAsMatmul

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=True)
    x = torch.randn(5, 3, 2, 14, 14)
    expected = conv(x)
    conv.__class__ = PatchConvAsMatmul
    assert torch.allclose(conv(x), expected, atol=1e-5) and conv(x).shape == (5, 8, 1, 1, 1)


def test_vision_tower_stays_out_of_4bit_unless_asked(train_config):
    import bitsandbytes as bnb

    def linear4bit(model, part):
        return sum(isinstance(m, bnb.nn.Linear4bit) for n, m in model.backbone.named_modules() if part in n)

    default = build_model(train_config)
    assert linear4bit(default, "visual") == 0 and linear4bit(default, "language_model") > 0
    quantized = build_model(dataclasses.replace(train_config, quantize_vision=True))
    assert linear4bit(quantized, "visual") > 0
