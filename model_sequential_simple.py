"""SimpleSequentialModel: Qwen2-VL features at <x>, <y>, <done> straight into three MLP heads.

    image with counted objects marked 1..k + "Count the <class>. ..." + <x><y><done>
        -> Qwen2-VL (4-bit NF4 + LoRA) -> last hidden states at <x>, <y>, <done>
        -> x_head, y_head (no tanh, clamped to [-2, 2], MSE)   done_head (logit, BCE)

The prompt goes after the image (`prompt_position="after"`, the seed's layout) or before it ("before"):
in the causal LM only tokens after the class name can read it, so "before" lets every image token know
what is being counted. Qwen2-VL-2B is pretrained with text on either side of an image.

Two ways to point (`pointing`):
  regress  x_head, y_head regress x, y from the <x>, <y> states (the seed's design).
  token    every image token is scored as "holds the next object" (cross-entropy on the token that
           holds the target) and as "holds an unmarked object" (dense BCE); x, y = the best token's
           centre + a sub-token offset from x_head, y_head (applied per token). done_head also sees
           the strongest "unmarked object here" score, so done follows image evidence, not the
           number of marks. This is how pointing VLMs localise (choose a token, then refine).
           `class_binding` says how the class query meets each token: "add" (query projection added to
           the token's, then GELU) or "film" (the query also scales the token's features, a product,
           which lets one colour + shape query switch features on and off).

Both also estimate the named objects' size (`log_size`: log of the typical object size in image-token
widths) so that counting without exemplar boxes (the text-only protocol) can size its marks: token
pointing from every token that holds an unmarked object (weighted by the "object here" score),
regression pointing from the <done> state.

The backbone is built elsewhere (`model_loading.build_model`), so this file does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIAL_TOKENS = ("<x>", "<y>", "<done>")
# Words whose embeddings initialise the new tokens' rows, so <x>, <y>, <done> start distinct.
SPECIAL_TOKEN_INIT_WORDS = ("x", "y", "done")
PROMPT = ("Count the {class_name}. Objects already counted carry numbered marks. "
          "Point at the next uncounted object, or say that counting is done.")
COORD_CLAMP = 2.0  # predictions are clamped to [-2, 2]: room past the image edge, no tanh saturation
POINTING_MODES = ("regress", "token")
PROMPT_POSITIONS = ("after", "before")  # the prompt after the image (the seed's layout) or before it
CLASS_BINDINGS = ("add", "film")
# The dense "unmarked object here" BCE is ~20x smaller than the pointing cross-entropy; weighted 5x it
# teaches perception much sooner (RESULTS.md: 1,200 steps, exact-count accuracy 0.75 -> 0.80, MAE 0.60 -> 0.36).
OBJECT_MAP_WEIGHT = 5.0


def clamp_coordinates(v: torch.Tensor) -> torch.Tensor:
    """Clamp to [-2, 2] in the forward pass with gradient 1 in the backward pass (straight-through):
    torch.clamp's gradient is 0 outside the range, so a head output of 2.5 would never be pulled back."""
    return v + (v.clamp(-COORD_CLAMP, COORD_CLAMP) - v).detach()


def pad_points(points, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (k_i, 2) arrays (or None) -> points (B, K, 2) zero-padded, mask (B, K); K >= 1."""
    points = points if points is not None else [[]] * batch
    pts = [torch.as_tensor(p, dtype=torch.float32, device=device).reshape(-1, 2) for p in points]
    k = max([1] + [p.shape[0] for p in pts])
    out = torch.zeros(batch, k, 2, device=device)
    mask = torch.zeros(batch, k, dtype=torch.bool, device=device)
    for i, p in enumerate(pts):
        out[i, :p.shape[0]] = p
        mask[i, :p.shape[0]] = True
    return out, mask


def token_index(points: torch.Tensor, token_xy: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The image token whose cell holds each point (nearest centre on the grid): (B, M, 2) -> (B, M)."""
    dist2 = ((points.unsqueeze(2) - token_xy.unsqueeze(1)) ** 2).sum(-1)  # (B, M, N)
    return dist2.masked_fill(~token_mask.unsqueeze(1), float("inf")).argmin(-1)


class PredictionHead(nn.Module):
    """2-layer MLP from one hidden state to one scalar (LayerNorm first: VLM states are large)."""

    def __init__(self, hidden_size: int, head_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, head_hidden)
        self.fc2 = nn.Linear(head_hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B,)
        return self.fc2(F.gelu(self.fc1(self.norm(h)))).squeeze(-1)


class TokenContext(nn.Module):
    """A k x k convolution over the merged image-token grid, added to each token's pointer features, so a token also
    sees its neighbours (which object an edge belongs to, a rim around a mark). Zero-initialised: it starts as no
    context at all, and the weights still get gradient (the features they multiply are not zero)."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor, token_xy: torch.Tensor, token_mask: torch.Tensor,
                cell: torch.Tensor) -> torch.Tensor:
        # h (B, N, D) per token, row-major per image and padded; token_xy (B, N, 2) its centre; cell (B, 2) a token's
        # size, both in normalised units -> h + gelu(conv(h)) on each image's own grid (zeros beyond its edges).
        b, n, d = h.shape
        col = ((token_xy[..., 0] + 1) / cell[:, :1]).floor().long()  # (B, N): centre (c + 0.5) * cell - 1
        row = ((token_xy[..., 1] + 1) / cell[:, 1:]).floor().long()
        rows = int(row[token_mask].max()) + 1 if bool(token_mask.any()) else 1
        cols = int(col[token_mask].max()) + 1 if bool(token_mask.any()) else 1
        slot = torch.where(token_mask, row * cols + col, rows * cols)  # padding tokens -> one spare slot
        canvas = h.new_zeros(b, rows * cols + 1, d).scatter(1, slot.unsqueeze(-1).expand(-1, -1, d), h)
        grid = canvas[:, :-1].transpose(1, 2).reshape(b, d, rows, cols)  # (B, D, R, C)
        out = F.gelu(self.conv(grid)).reshape(b, d, rows * cols).transpose(1, 2)  # (B, R*C, D)
        out = torch.cat([out, out.new_zeros(b, 1, d)], 1).gather(1, slot.unsqueeze(-1).expand(-1, -1, d))  # (B, N, D)
        return h + out


class TokenPointer(nn.Module):
    """Per image token: logits "the next object is here" and "an unmarked object is here", and the log size
    of the object there (in token widths).

    Reads the token's state and the query (the <x> state, which has read the prompt and its class name;
    with the prompt after the image, image tokens cannot know what to count in the causal LM).
    binding "add": gelu(token + query); "film": gelu(token * (1 + scale(query)) + query), the product
    starting at "add" (scale's weights start at zero). context k > 0: a `TokenContext` (k x k over the token grid)
    on the bound features before the scores.
    """

    def __init__(self, hidden_size: int, dim: int, binding: str = "add", context: int = 0):
        super().__init__()
        if binding not in CLASS_BINDINGS:
            raise ValueError(f"class_binding must be one of {CLASS_BINDINGS}, got {binding!r}")
        self.token_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
        self.query_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim, bias=False))
        self.next_score = nn.Linear(dim, 1)
        self.object_score = nn.Linear(dim, 1)
        self.size_score = nn.Linear(dim, 1)
        self.query_scale = None
        if binding == "film":
            self.query_scale = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, dim))
            nn.init.zeros_(self.query_scale[1].weight)
            nn.init.zeros_(self.query_scale[1].bias)
        self.context = TokenContext(dim, context) if context else None

    def forward(self, tokens: torch.Tensor, query: torch.Tensor,
                layout: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # tokens (B, N, H), query (B, H) -> next logits (B, N), object logits (B, N), log sizes (B, N);
        # layout (token_xy, token_mask, cell): where each token sits, needed with context
        t = self.token_proj(tokens)  # (B, N, D)
        if self.query_scale is not None:
            t = t * (1 + self.query_scale(query).unsqueeze(1))
        h = F.gelu(t + self.query_proj(query).unsqueeze(1))  # (B, N, D)
        if self.context is not None:
            h = self.context(h, *layout)
        return self.next_score(h).squeeze(-1), self.object_score(h).squeeze(-1), self.size_score(h).squeeze(-1)


class SpecialTokenEmbeddings(nn.Module):
    """Trainable embedding rows for <x>, <y>, <done> only; the rest of the matrix stays frozen.

    A forward hook on the backbone's input embedding swaps these rows in wherever the new token ids
    occur, so only 3 x H numbers train instead of the whole (vocab x H) matrix.
    """

    def __init__(self, token_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(init.detach().clone().float())  # (3, H)

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]  # (B, T)
        which = (input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)).long()  # (B, T, 3)
        is_new = which.sum(-1, keepdim=True).bool()  # (B, T, 1)
        rows = which.to(self.weight.dtype) @ self.weight  # (B, T, H)
        return torch.where(is_new, rows.to(output.dtype), output)


class SimpleSequentialModel(nn.Module):
    """Qwen2-VL backbone + x_head, y_head, done_head on the hidden states at <x>, <y>, <done>."""

    def __init__(self, backbone: nn.Module, processor, head_hidden: int = 256, pointing: str = "regress",
                 prompt_position: str = "after", class_binding: str = "add", class_vocabulary: tuple = (),
                 token_context: int = 0):
        super().__init__()
        if pointing not in POINTING_MODES:
            raise ValueError(f"pointing must be one of {POINTING_MODES}, got {pointing!r}")
        if prompt_position not in PROMPT_POSITIONS:
            raise ValueError(f"prompt_position must be one of {PROMPT_POSITIONS}, got {prompt_position!r}")
        self.prompt_position = prompt_position
        self.compute_dtype = torch.float32  # the backbone's autocast dtype (bf16 on GPU: set by build_model)
        self.backbone = backbone  # PeftModel (LoRA) around Qwen2VLForConditionalGeneration, or the bare model
        self.processor = processor
        self.pointing = pointing
        config = backbone.get_base_model().config if hasattr(backbone, "get_base_model") else backbone.config
        self.image_token_id = config.image_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        self._prompts: dict[str, str] = {}  # class name -> prompt; rendering the template is slow
        tokenizer = processor.tokenizer
        token_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        if any(t is None or t == tokenizer.unk_token_id for t in token_ids):
            raise ValueError(f"tokenizer lacks {SPECIAL_TOKENS}: add them before building the model")
        self.token_ids = token_ids
        embedding = backbone.get_input_embeddings()
        hidden_size = embedding.weight.shape[1]
        with torch.no_grad():
            init = torch.stack([
                embedding.weight[tokenizer(word, add_special_tokens=False)["input_ids"]].float().mean(0)
                for word in SPECIAL_TOKEN_INIT_WORDS
            ])
        self.token_embeddings = SpecialTokenEmbeddings(token_ids, init)
        self._hook = embedding.register_forward_hook(self.token_embeddings.hook)
        self.x_head = PredictionHead(hidden_size, head_hidden)
        self.y_head = PredictionHead(hidden_size, head_hidden)
        self.done_head = PredictionHead(hidden_size, head_hidden)
        self.class_vocabulary = list(class_vocabulary)  # the classes the auxiliary class head tells apart
        if pointing == "token":
            self.token_pointer = TokenPointer(hidden_size, head_hidden, class_binding, token_context)
            if self.class_vocabulary:  # what each image token sees, among the training classes (auxiliary)
                self.class_head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, len(class_vocabulary)))
            # done_logit += w * (strongest "unmarked object here" logit) + b; w starts at -1: evidence of
            # an object left argues against done.
            self.done_evidence = nn.Linear(1, 1)
            with torch.no_grad():
                self.done_evidence.weight.fill_(-1.0)
                self.done_evidence.bias.zero_()
        else:
            self.size_head = PredictionHead(hidden_size, head_hidden)  # log object size from the <done> state

    # --- inputs ---------------------------------------------------------------------------------

    def build_prompt(self, class_name: str) -> str:
        """Chat-template prompt naming the class, ending with the three query tokens (cached per class)."""
        if class_name in self._prompts:
            return self._prompts[class_name]
        parts = [{"type": "image"}, {"type": "text", "text": PROMPT.format(class_name=class_name)}]
        messages = [{"role": "user", "content": parts if self.prompt_position == "after" else parts[::-1]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._prompts[class_name] = text + "".join(SPECIAL_TOKENS)
        return self._prompts[class_name]

    def build_inputs(self, images, class_names) -> dict[str, torch.Tensor]:
        """Processor inputs (input_ids, pixel_values, image_grid_thw, mm_token_type_ids, ...)."""
        texts = [self.build_prompt(c) for c in class_names]
        return dict(self.processor(text=texts, images=list(images), return_tensors="pt", padding=True))

    # --- forward --------------------------------------------------------------------------------

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states of the VLM: (B, T, H), in the compute dtype. Skips the LM head (no vocab-sized logits).

        The backbone runs under autocast to `compute_dtype` (bf16 on GPU): its matmuls and attention in bf16,
        norms in fp32 as autocast keeps them; the heads read the states cast to fp32, outside autocast.
        """
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        device_type = inputs["input_ids"].device.type
        with torch.autocast(device_type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return base.model(**inputs, use_cache=False).last_hidden_state

    def token_features(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states at <x>, <y>, <done>: (B, 3, H) in float32."""
        feats = []
        for token_id in self.token_ids:
            match = input_ids == token_id  # (B, T)
            if not bool((match.sum(1) == 1).all()):
                raise ValueError(f"each prompt must contain token id {token_id} exactly once")
            pos = match.float().argmax(1)  # (B,)
            feats.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos])
        return torch.stack(feats, 1).float()  # (B, 3, H)

    def image_tokens(self, hidden, input_ids, grid_thw):
        """Image-token states and their (x, y) centres on the merged patch grid, padded per image.

        Returns tokens (B, N, H), xy (B, N, 2) in [-1, 1], mask (B, N), cell (B, 2): a token's width
        and height in normalised units.
        """
        per_image, positions = [], []
        for i in range(hidden.shape[0]):
            states = hidden[i, input_ids[i] == self.image_token_id]  # (N_i, H), row-major on the merged grid
            t, h, w = (int(v) for v in grid_thw[i])
            rows, cols = h // self.merge_size, w // self.merge_size
            if states.shape[0] != t * rows * cols:
                raise ValueError(f"image {i}: {states.shape[0]} image tokens, expected {t * rows * cols}")
            r = torch.arange(rows, device=hidden.device).repeat_interleave(cols).repeat(t)
            c = torch.arange(cols, device=hidden.device).repeat(rows * t)
            xy = torch.stack([(c + 0.5) / cols, (r + 0.5) / rows], -1) * 2 - 1  # (N_i, 2)
            per_image.append(states)
            positions.append(xy)
        tokens = nn.utils.rnn.pad_sequence(per_image, batch_first=True)  # (B, N, H)
        xy = nn.utils.rnn.pad_sequence(positions, batch_first=True)  # (B, N, 2)
        lengths = torch.tensor([p.shape[0] for p in per_image], device=hidden.device)
        mask = torch.arange(tokens.shape[1], device=hidden.device) < lengths.unsqueeze(1)  # (B, N)
        return tokens, xy, mask, self.grid_cells(grid_thw)

    def grid_cells(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """A merged image token's width and height in normalised units, per image: (B, 3) grid -> (B, 2)."""
        cols = (grid_thw[:, 2] // self.merge_size).float()
        rows = (grid_thw[:, 1] // self.merge_size).float()
        return torch.stack([2.0 / cols, 2.0 / rows], -1)

    def predict(self, feats: torch.Tensor, pointer: torch.Tensor | None = None, image=None,
                cell: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Heads on (B, 3, H) features -> x, y (clamped), done_logit, log_size, each (B,).

        pointer (B, 2): a location the heads' x, y are added to (the attention model's foveation).
        image: `image_tokens(...)`, needed with token pointing; x, y then come from the chosen token.
        cell (B, 2): `grid_cells(...)`, the token size that log_size is measured in (regression pointing).
        """
        done_logit = self.done_head(feats[:, 2])
        if self.pointing == "token":
            return self.point_at_token(feats, done_logit, *image)
        x, y = self.x_head(feats[:, 0]), self.y_head(feats[:, 1])
        if pointer is not None:
            x, y = x + pointer[:, 0], y + pointer[:, 1]
        out = {"x": clamp_coordinates(x), "y": clamp_coordinates(y), "done_logit": done_logit,
               "log_size": self.size_head(feats[:, 2]), "cell": cell}
        if pointer is not None:
            out["pointer"] = pointer
        return out

    def point_at_token(self, feats, done_logit, tokens, token_xy, token_mask, cell) -> dict[str, torch.Tensor]:
        """Token pointing: scores per token, x, y = best token's centre + its offset, done with evidence,
        object size = the sizes read at the tokens that hold unmarked objects, weighted by that score."""
        tokens = tokens.float()
        next_logits, object_logits, token_log_sizes = self.token_pointer(tokens, feats[:, 0],
                                                                         (token_xy, token_mask, cell))  # (B, N) each
        next_logits = next_logits.masked_fill(~token_mask, float("-inf"))
        # Offsets from the token centre in half-cells, by x_head / y_head on each token's state plus the query.
        offsets = torch.stack([self.x_head(tokens + feats[:, :1]), self.y_head(tokens + feats[:, 1:2])], -1)  # (B, N, 2)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        token_points = token_xy + offsets * cell.unsqueeze(1) / 2  # (B, N, 2): each token's refined point
        xy = token_points[rows, next_logits.argmax(1)]  # (B, 2)
        evidence = object_logits.masked_fill(~token_mask, float("-inf")).max(1).values  # (B,)
        weight = torch.sigmoid(object_logits).masked_fill(~token_mask, 0.0)  # (B, N)
        log_size = (weight * token_log_sizes).sum(1) / weight.sum(1).clamp(min=1e-6)  # (B,)
        extra = {"class_logits": self.class_head(tokens)} if self.class_vocabulary else {}  # (B, N, C)
        return {**extra, "x": clamp_coordinates(xy[:, 0]), "y": clamp_coordinates(xy[:, 1]),
                "done_logit": done_logit + self.done_evidence(evidence.unsqueeze(-1)).squeeze(-1),
                "log_size": log_size, "token_log_sizes": token_log_sizes,
                "next_logits": next_logits, "object_logits": object_logits, "offsets": offsets,
                "token_points": token_points, "token_xy": token_xy, "token_mask": token_mask, "cell": cell}

    def forward(self, inputs: dict[str, torch.Tensor], counted=None) -> dict[str, torch.Tensor]:
        """inputs from `build_inputs` (on the model's device). `counted` is unused here."""
        hidden = self.encode(inputs)
        grid = inputs["image_grid_thw"]
        image = self.image_tokens(hidden, inputs["input_ids"], grid) if self.pointing == "token" else None
        return self.predict(self.token_features(hidden, inputs["input_ids"]), image=image, cell=self.grid_cells(grid))

    # --- state ----------------------------------------------------------------------------------

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything trainable outside the LoRA adapter: heads and the new tokens' rows."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("backbone.")}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"head weights do not match the model: missing {missing}, unexpected {unexpected}")

    def module_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by module, for gradient reports: heads, new-token rows, the backbone's
        trainable weights (LoRA, or every weight with full fine-tuning), the token pointer."""
        groups = {
            "x_head": list(self.x_head.parameters()),
            "y_head": list(self.y_head.parameters()),
            "done_head": list(self.done_head.parameters()),
            "token_embeddings": list(self.token_embeddings.parameters()),
        }
        trainable = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        if any("lora_" in n for n, _ in trainable) or not trainable:
            groups["lora"] = [p for n, p in trainable if "lora_" in n]
        else:
            groups["backbone"] = [p for _, p in trainable]
        if self.pointing == "token":
            groups["token_pointer"] = [*self.token_pointer.parameters(), *self.done_evidence.parameters()]
            if self.class_vocabulary:
                groups["class_head"] = list(self.class_head.parameters())
        else:
            groups["size_head"] = list(self.size_head.parameters())
        return groups


def xy_mse(outputs: dict[str, torch.Tensor], targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """MSE of the predicted (x, y) to the nearest candidate target: targets (B, M, 2), target_mask (B, M)."""
    pred = torch.stack([outputs["x"], outputs["y"]], -1)  # (B, 2)
    sq = ((pred.unsqueeze(1) - targets) ** 2).mean(-1)  # (B, M)
    return sq.masked_fill(~target_mask, float("inf")).min(1).values.mean()


def remaining_token_map(outputs: dict[str, torch.Tensor], remaining) -> torch.Tensor:
    """(B, N) True at each image token that holds an uncounted object. remaining: per state (r, 2)."""
    token_xy, token_mask = outputs["token_xy"], outputs["token_mask"]
    points, mask = pad_points(remaining, token_xy.shape[0], token_xy.device)
    idx = token_index(points, token_xy, token_mask)  # (B, R)
    return torch.zeros(token_mask.shape, device=token_xy.device).scatter_add_(1, idx, mask.float()) > 0


def object_map_loss(outputs: dict[str, torch.Tensor], remaining, focal: float = 0.0, others=None,
                    other_weight: float = 1.0) -> torch.Tensor:
    """Dense BCE: each image token holds an uncounted object (1) or not (0). remaining: per state (r, 2).

    focal > 0: each token's BCE is weighted by (1 - p_t)^focal (p_t: its probability of the right answer), so
    the many easy background tokens count less than the hard ones, such as an object of the named colour but
    another shape.
    others: per state (d, 2) points of objects the prompt does not name; a token holding one of them and no
    uncounted named object weighs other_weight (a hard negative: it is where a counter overcounts), every other
    token 1. The mean stays over tokens, so other_weight = 1 is the plain BCE."""
    token_mask = outputs["token_mask"]
    positive = remaining_token_map(outputs, remaining)  # (B, N)
    target = positive.float()[token_mask]
    logits = outputs["object_logits"][token_mask]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal > 0:
        bce = bce * (1 - torch.exp(-bce)) ** focal  # exp(-bce) = p_t
    if others is not None and other_weight != 1.0:
        hard = (remaining_token_map(outputs, others) & ~positive)[token_mask]
        bce = bce * (1.0 + (other_weight - 1.0) * hard.float())
    return bce.mean()


def class_loss(outputs: dict[str, torch.Tensor], remaining, class_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `class_logits` at every token holding an uncounted object against its class (class_ids
    (B,), -1 where the class is not among the head's classes): what each token sees, whatever the prompt says."""
    where = remaining_token_map(outputs, remaining) & (class_ids >= 0).unsqueeze(1)  # (B, N)
    if not bool(where.any()):
        return outputs["class_logits"].sum() * 0.0
    target = class_ids.unsqueeze(1).expand_as(where)[where]
    return F.cross_entropy(outputs["class_logits"][where], target)


def size_loss(outputs: dict[str, torch.Tensor], object_sizes: torch.Tensor, image_sizes: torch.Tensor,
              remaining=None) -> torch.Tensor:
    """MSE of the log object size in token widths: object_sizes (B,) in pixels, image_sizes (B, 2) as (W, H).

    The target is log(size / token size), the token size in pixels of the image as stored (the processor
    resizes the whole image, so the ratio is the one the model sees). Token pointing reads a size at every
    token that holds an uncounted object (`remaining`); regression pointing has one estimate per state.
    """
    token_px = (outputs["cell"] / 2 * image_sizes).mean(-1)  # (B,): a token's side in pixels
    target = torch.log(object_sizes / token_px)  # (B,); NaN for a state naming a class the image lacks
    if "token_log_sizes" not in outputs:
        known = torch.isfinite(target)
        return F.mse_loss(outputs["log_size"][known], target[known]) if bool(known.any()) else outputs["log_size"].sum() * 0
    where = remaining_token_map(outputs, remaining)  # (B, N)
    if not bool(where.any()):
        return outputs["token_log_sizes"].sum() * 0.0  # no uncounted object in any state (all done)
    return F.mse_loss(outputs["token_log_sizes"][where], target.unsqueeze(1).expand_as(where)[where])


def token_pointing_loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor, target_mask: torch.Tensor) -> tuple:
    """Cross-entropy on the token(s) holding the target(s) and MSE of the sub-token offset there.

    With several valid targets ("nearest") the cross-entropy is on the set: -log sum of their probabilities.
    Returns (cross-entropy, offset MSE).
    """
    token_xy, token_mask, cell = outputs["token_xy"], outputs["token_mask"], outputs["cell"]
    idx = token_index(targets, token_xy, token_mask)  # (B, M)
    logits = outputs["next_logits"]  # (B, N), -inf off the image
    hit = torch.zeros_like(logits).scatter_add_(1, idx, target_mask.float()) > 0  # (B, N) tokens holding a target
    ce = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~hit, float("-inf")), 1)).mean()
    centre = torch.gather(token_xy, 1, idx.unsqueeze(-1).expand(-1, -1, 2))  # (B, M, 2)
    true_offset = (targets - centre) / (cell.unsqueeze(1) / 2)
    pred_offset = torch.gather(outputs["offsets"], 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    sq = ((pred_offset - true_offset) ** 2).mean(-1)  # (B, M)
    return ce, sq[target_mask].mean()


@dataclass
class LossWeights:
    """The weights of the loss terms that are not always on (the training config sets them)."""

    object_map: float = OBJECT_MAP_WEIGHT  # the dense "unmarked object here" BCE (token pointing)
    object_map_focal: float = 0.0  # focal exponent of that BCE (0: plain BCE)
    other_objects: float = 1.0  # that BCE's weight at tokens holding an object the prompt does not name
    size: float = 1.0  # the object-size estimate's MSE (text-only protocol)
    classes: float = 0.0  # the per-token class cross-entropy (a model built with a class vocabulary)


def compute_loss(outputs: dict[str, torch.Tensor], done: torch.Tensor, targets: torch.Tensor,
                 target_mask: torch.Tensor, mode: str, remaining=None, parts: dict | None = None,
                 object_sizes: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                 class_ids: torch.Tensor | None = None, weights: LossWeights | None = None,
                 others=None) -> torch.Tensor:
    """The training loss of a step.

    cls: BCE-with-logits of done_logit against done (1 when k == N).
    reg, regress pointing: MSE of (x, y) to the nearest candidate target (targets (B, M, 2), target_mask
      (B, M)): plain MSE with one candidate (reading order), the closest uncounted object with several.
    reg, token pointing: cross-entropy on the target token + MSE of its sub-token offset.
    Token pointing adds, in both modes, the dense "unmarked object here" BCE over the `remaining`
    (uncounted) objects, times weights.object_map (tokens holding one of `others`, the objects the prompt does not
    name, weigh weights.other_objects). With `object_sizes` (B,) and `image_sizes` (B, 2), every
    step also trains the object-size estimate (`size_loss`), and with `class_ids` (B,) and a model that has a
    class head, the per-token class cross-entropy (`class_loss`). `parts`, if given, receives each term and
    the (x, y) MSE as detached tensors, for logging (the caller reads them with one host sync).
    """
    weights = weights or LossWeights()
    token = "next_logits" in outputs
    terms = {}
    if mode == "cls":
        terms["done_bce"] = F.binary_cross_entropy_with_logits(outputs["done_logit"], done)
    elif token:
        terms["point_ce"], terms["offset_mse"] = token_pointing_loss(outputs, targets, target_mask)
    else:
        terms["xy_mse"] = xy_mse(outputs, targets, target_mask)
    if token and remaining is not None:
        terms["object_bce"] = weights.object_map * object_map_loss(outputs, remaining, weights.object_map_focal,
                                                                   others, weights.other_objects)
    if object_sizes is not None:
        terms["size_mse"] = weights.size * size_loss(outputs, object_sizes, image_sizes, remaining)
    if class_ids is not None and "class_logits" in outputs and weights.classes > 0:
        terms["class_ce"] = weights.classes * class_loss(outputs, remaining, class_ids)
    if parts is not None:
        parts.update({k: v.detach() for k, v in terms.items()})
        if mode == "reg" and "xy_mse" not in parts:
            parts["xy_mse"] = xy_mse(outputs, targets, target_mask).detach()
    return sum(terms.values())
