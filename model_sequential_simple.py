"""SimpleSequentialModel: Qwen2-VL features at <x>, <y>, <done> straight into three MLP heads.

    image with counted objects marked 1..k + "Count the <class>. ..." + <x><y><done>
        -> Qwen2-VL (4-bit NF4 + LoRA) -> last hidden states at <x>, <y>, <done>
        -> x_head, y_head (no tanh, clamped to [-2, 2], MSE)   done_head (logit, BCE)

The backbone is built elsewhere (`model_loading.build_model`), so this file does no I/O.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIAL_TOKENS = ("<x>", "<y>", "<done>")
# Words whose embeddings initialise the new tokens' rows, so <x>, <y>, <done> start distinct.
SPECIAL_TOKEN_INIT_WORDS = ("x", "y", "done")
PROMPT = ("Count the {class_name}. Objects already counted carry numbered marks. "
          "Point at the next uncounted object, or say that counting is done.")
COORD_CLAMP = 2.0  # predictions are clamped to [-2, 2]: room past the image edge, no tanh saturation


class PredictionHead(nn.Module):
    """2-layer MLP from one hidden state to one scalar (LayerNorm first: VLM states are large)."""

    def __init__(self, hidden_size: int, head_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, head_hidden)
        self.fc2 = nn.Linear(head_hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B,)
        return self.fc2(F.gelu(self.fc1(self.norm(h)))).squeeze(-1)


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

    def __init__(self, backbone: nn.Module, processor, head_hidden: int = 256):
        super().__init__()
        self.backbone = backbone  # PeftModel (LoRA) around Qwen2VLForConditionalGeneration
        self.processor = processor
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

    # --- inputs ---------------------------------------------------------------------------------

    def build_prompt(self, class_name: str) -> str:
        """Chat-template prompt naming the class, ending with the three query tokens (cached per class)."""
        if class_name in self._prompts:
            return self._prompts[class_name]
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": PROMPT.format(class_name=class_name)}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._prompts[class_name] = text + "".join(SPECIAL_TOKENS)
        return self._prompts[class_name]

    def build_inputs(self, images, class_names) -> dict[str, torch.Tensor]:
        """Processor inputs (input_ids, pixel_values, image_grid_thw, mm_token_type_ids, ...)."""
        texts = [self.build_prompt(c) for c in class_names]
        return dict(self.processor(text=texts, images=list(images), return_tensors="pt", padding=True))

    # --- forward --------------------------------------------------------------------------------

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states of the VLM: (B, T, H). Skips the LM head (no vocab-sized logits)."""
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
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

    def predict(self, feats: torch.Tensor, pointer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Heads on (B, 3, H) features -> x, y (clamped), done_logit, each (B,).

        pointer (B, 2): a location the heads' x, y are added to (the attention model's foveation).
        """
        x, y = self.x_head(feats[:, 0]), self.y_head(feats[:, 1])
        if pointer is not None:
            x, y = x + pointer[:, 0], y + pointer[:, 1]
        x, y = x.clamp(-COORD_CLAMP, COORD_CLAMP), y.clamp(-COORD_CLAMP, COORD_CLAMP)
        out = {"x": x, "y": y, "done_logit": self.done_head(feats[:, 2])}
        if pointer is not None:
            out["pointer"] = pointer
        return out

    def forward(self, inputs: dict[str, torch.Tensor], counted=None) -> dict[str, torch.Tensor]:
        """inputs from `build_inputs` (on the model's device). `counted` is unused here."""
        hidden = self.encode(inputs)
        return self.predict(self.token_features(hidden, inputs["input_ids"]))

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
        """Trainable parameters by module, for gradient reports: heads, new-token rows, LoRA."""
        return {
            "x_head": list(self.x_head.parameters()),
            "y_head": list(self.y_head.parameters()),
            "done_head": list(self.done_head.parameters()),
            "token_embeddings": list(self.token_embeddings.parameters()),
            "lora": [p for n, p in self.backbone.named_parameters() if "lora_" in n and p.requires_grad],
        }


def compute_loss(outputs: dict[str, torch.Tensor], done: torch.Tensor, targets: torch.Tensor,
                 target_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """BCE-with-logits on done for "cls"; for "reg", MSE to the nearest candidate target.

    targets: (B, M, 2), target_mask: (B, M). With one candidate (reading order) this is plain MSE
    over x and y; with several ("nearest"), the min picks the uncounted object closest to the prediction.
    """
    if mode == "cls":
        return F.binary_cross_entropy_with_logits(outputs["done_logit"], done)
    pred = torch.stack([outputs["x"], outputs["y"]], -1)  # (B, 2)
    sq = ((pred.unsqueeze(1) - targets) ** 2).mean(-1)  # (B, M)
    sq = sq.masked_fill(~target_mask, float("inf"))
    return sq.min(1).values.mean()
