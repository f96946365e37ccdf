"""SequentialAttentionCountingModel: the simple model plus working memory, foveation, cross-attention
to counted objects and reasoning, each joined to the heads through a residual path.

    VLM hidden states at <x>, <y>, <done>  ------------------------------------------+--> x_head, y_head, done_head
          |                                                                          ^
          +-> query --+-- working memory (GRU over counted points)       --+        |
    image-token states +-- foveation (attention near the last point)       +-> sum -> reasoning -> out_proj
    counted points ----+-- cross-attention (query over counted objects)  --+
    foveation's pointer (where it looked) + x_head, y_head outputs --> x, y

Why it trains where the original pipeline did not (that one gave working memory and foveation exactly
zero gradient): the heads read `base + out_proj(fused)`, so the simple model's features always reach
the heads unchanged, and `out_proj` starts small but not zero; a zero-initialised output would pass
no gradient to the modules before it at the first step. Every module adds to `fused`, so each one is
on a path to the loss from step one.

Cost per image, with k counted points and N image tokens (D = --attention_dim):
  working memory O(k D^2) sequential over k; sampling features at points O(k N D);
  foveation O(N D); cross-attention O(k D). Memory grows linearly in k and N: 500 points over 512
  image tokens is a (500 x 512) weight matrix per image.
No I/O here: the backbone is built by `model_loading.build_model`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from model_sequential_simple import SimpleSequentialModel, pad_points

ATTENTION_MODULES = ("memory", "foveation", "cross_attention", "reasoning")
OUT_PROJ_INIT_STD = 0.02  # small enough to start near the simple model, non-zero so modules get gradient


class PointEncoding(nn.Module):
    """Fourier features of normalised (x, y) -> D."""

    def __init__(self, dim: int, num_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(num_freqs)) * math.pi, persistent=False)
        self.proj = nn.Linear(4 * num_freqs, dim)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:  # (..., 2) -> (..., D)
        angles = xy.unsqueeze(-1) * self.freqs  # (..., 2, F)
        feats = torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)  # (..., 4F)
        return self.proj(feats)


class WorkingMemory(nn.Module):
    """GRU over [start token, counted objects] in counting order; its last state summarises them."""

    def __init__(self, dim: int):
        super().__init__()
        self.start = nn.Parameter(torch.randn(dim) * 0.02)  # makes k = 0 an ordinary sequence of length 1
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, objects: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # objects: (B, K, D) padded, lengths: (B,) -> (B, D)
        seq = torch.cat([self.start.expand(objects.shape[0], 1, -1), objects], 1)  # (B, K + 1, D)
        packed = nn.utils.rnn.pack_padded_sequence(seq, (lengths + 1).cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # (1, B, D)
        return h[0]


class Foveation(nn.Module):
    """Attention over image tokens, biased towards a Gaussian region around the last counted point.

    Returns the glimpse (what it saw) and where it looked (the attention-weighted token position).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.3)))  # region width in normalised units
        self.start_center = nn.Parameter(torch.tensor([-1.0, -1.0]))  # where to look before anything is counted

    def forward(self, query, tokens, token_xy, token_mask, last_xy, has_last):
        # query (B, D), tokens (B, N, D), token_xy (B, N, 2), token_mask (B, N), last_xy (B, 2), has_last (B,)
        center = torch.where(has_last.unsqueeze(-1), last_xy, self.start_center.expand_as(last_xy))  # (B, 2)
        dist2 = ((token_xy - center.unsqueeze(1)) ** 2).sum(-1)  # (B, N)
        scores = (self.k(tokens) @ self.q(query).unsqueeze(-1)).squeeze(-1) / math.sqrt(tokens.shape[-1])
        scores = scores - dist2 / (2 * self.log_sigma.exp() ** 2)
        weights = scores.masked_fill(~token_mask, float("-inf")).softmax(-1)  # (B, N)
        glimpse = (weights.unsqueeze(1) @ self.v(tokens)).squeeze(1)  # (B, D)
        where = (weights.unsqueeze(1) @ token_xy).squeeze(1)  # (B, 2)
        return glimpse, where


class CrossAttentionToCounted(nn.Module):
    """Queries from <x>, <y>, <done> attend over counted-object embeddings (plus a 'none' slot)."""

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        self.none = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # always attendable, so k = 0 is defined
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, queries: torch.Tensor, objects: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
        # queries (B, 3, D), objects (B, K, D), object_mask (B, K) True = real -> (B, 3, D)
        b = queries.shape[0]
        keys = torch.cat([self.none.expand(b, 1, -1), objects], 1)  # (B, K + 1, D)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=queries.device), ~object_mask], 1)
        out, _ = self.attn(queries, keys, keys, key_padding_mask=pad, need_weights=False)
        return out


class Reasoning(nn.Module):
    """A pre-norm transformer block over the three query tokens: lets x, y and done inform each other."""

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, D) -> (B, 3, D)
        return self.block(x)


class SequentialAttentionCountingModel(SimpleSequentialModel):
    """SimpleSequentialModel + the enabled attention modules, joined through `base + out_proj(fused)`."""

    def __init__(self, backbone: nn.Module, processor, head_hidden: int = 256,
                 modules: tuple[str, ...] = ATTENTION_MODULES, attention_dim: int = 256, pointing: str = "regress",
                 prompt_position: str = "after", class_binding: str = "add", class_vocabulary: tuple = (),
                 token_context: int = 0):
        super().__init__(backbone, processor, head_hidden, pointing, prompt_position, class_binding, class_vocabulary,
                         token_context)
        unknown = [m for m in modules if m not in ATTENTION_MODULES]
        if unknown:
            raise ValueError(f"unknown attention modules {unknown}; choose from {ATTENTION_MODULES}")
        self.enabled = tuple(m for m in ATTENTION_MODULES if m in modules)
        hidden = self.x_head.norm.normalized_shape[0]
        d = attention_dim
        if not self.enabled:
            return  # exactly the simple model
        self.token_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d))  # query tokens -> D
        self.image_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d))  # image tokens -> D
        self.point_encoding = PointEncoding(d)
        if "memory" in self.enabled:
            self.working_memory = WorkingMemory(d)
        if "foveation" in self.enabled:
            self.foveation = Foveation(d)
        if "cross_attention" in self.enabled:
            self.cross_attention = CrossAttentionToCounted(d)
        if "reasoning" in self.enabled:
            self.reasoning = Reasoning(d)
        self.out_proj = nn.Linear(d, hidden)
        nn.init.normal_(self.out_proj.weight, std=OUT_PROJ_INIT_STD)
        nn.init.zeros_(self.out_proj.bias)

    # --- inputs the modules use ---------------------------------------------------------------

    def sample_at_points(self, tokens, token_xy, token_mask, points):
        """Image feature at each counted point: Gaussian-weighted mean of nearby tokens. (B, K, D)."""
        spacing = 2.0 / token_mask.sum(1).clamp(min=1).float().sqrt()  # ~ one token, in normalised units
        dist2 = ((points.unsqueeze(2) - token_xy.unsqueeze(1)) ** 2).sum(-1)  # (B, K, N)
        logits = -dist2 / (2 * spacing.view(-1, 1, 1) ** 2)
        weights = logits.masked_fill(~token_mask.unsqueeze(1), float("-inf")).softmax(-1)
        return weights @ tokens  # (B, K, D)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], counted=None) -> dict[str, torch.Tensor]:
        """inputs from `build_inputs`; counted: per image a (k, 2) array of normalised points in order."""
        hidden = self.encode(inputs)  # (B, T, H)
        base = self.token_features(hidden, inputs["input_ids"])  # (B, 3, H) float32
        image = self.image_tokens(hidden, inputs["input_ids"], inputs["image_grid_thw"])
        if not self.enabled:
            return self.predict(base, image=image, cell=image[3])
        b, device = base.shape[0], base.device
        query = self.token_proj(base)  # (B, 3, D)
        tokens, token_xy, token_mask, _ = image
        # Each image token also carries its grid position: the backbone's rotary positions shape attention
        # scores but never reach the values, so without this no glimpse could say *where* it looked.
        tokens = self.image_proj(tokens.float()) + self.point_encoding(token_xy)  # (B, N, D)
        points, point_mask = pad_points(counted, b, device)
        lengths = point_mask.sum(1)
        objects = self.point_encoding(points) + self.sample_at_points(tokens, token_xy, token_mask, points)  # (B, K, D)

        fused, pointer = query, None
        if "memory" in self.enabled:
            fused = fused + self.working_memory(objects, lengths).unsqueeze(1)
        if "foveation" in self.enabled:
            last = points[torch.arange(b, device=device), (lengths - 1).clamp(min=0)]  # (B, 2)
            glimpse, pointer = self.foveation(query.mean(1), tokens, token_xy, token_mask, last, lengths > 0)
            fused = fused + glimpse.unsqueeze(1)
        if "cross_attention" in self.enabled:
            fused = fused + self.cross_attention(query, objects, point_mask)
        if "reasoning" in self.enabled:
            fused = self.reasoning(fused)
        # With foveation, x_head and y_head give an offset from where it looked: choosing a token by
        # attention is an easier problem than regressing a coordinate from features without position.
        # With token pointing, the chosen image token gives x, y instead (the pointer is still returned).
        return self.predict(base + self.out_proj(fused), pointer, image, cell=image[3])

    def module_groups(self) -> dict[str, list[nn.Parameter]]:
        """Heads, token rows and LoRA (as the simple model) plus every attention module."""
        groups = super().module_groups()
        if self.enabled:
            groups["input_projections"] = [*self.token_proj.parameters(), *self.image_proj.parameters(),
                                           *self.point_encoding.parameters()]
            for name, attr in (("memory", "working_memory"), ("foveation", "foveation"),
                               ("cross_attention", "cross_attention"), ("reasoning", "reasoning")):
                if name in self.enabled:
                    groups[attr] = list(getattr(self, attr).parameters())
            groups["out_proj"] = list(self.out_proj.parameters())
        return groups
