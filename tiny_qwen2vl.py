"""Build and save a tiny random-initialised Qwen2-VL that loads like the real one.

The tiny model lets tests and the CPU demo run the exact code path of Qwen2-VL-2B:
`Qwen2VLForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)`.
Every Linear layer's input size is a multiple of 64, because bitsandbytes' CPU 4-bit kernels need
that; so the 4-bit QLoRA path runs on CPU too.

    python tiny_qwen2vl.py --out models/tiny-qwen2vl            # builds in a few seconds
    python tiny_qwen2vl.py --out models/tiny --vision_width 128 --text_width 128 --seed 0
    python tiny_qwen2vl.py --out models/qwen2vl-2b-random --full_size   # Qwen2-VL-2B's architecture (4.4 GB)

--full_size builds the architecture of Qwen2-VL-2B from its published configuration (language model:
28 layers, hidden 1536, 12 heads / 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings, M-RoPE
sections 16/24/24, rope theta 1e6; vision: 32 blocks, width 1280, 16 heads, MLP ratio 4, patch 14,
merge 2, output 1536), with random weights saved in bf16, and the same small local tokenizer: for
exercising memory and speed of the real shapes without downloading anything (`make smoke-2b`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

from cli import arg, parse_config

# Words the tiny tokenizer's merges are learned from: the prompt, the chat template and class names.
_CORPUS = [
    "system", "user", "assistant", "You are a helpful assistant.",
    "Count the {}. Objects already counted carry numbered marks. Point at the next uncounted object,"
    " or say that counting is done.",
    "sea shells", "hot air balloons", "beads", "apples", "oranges", "cars", "birds", "people",
    "coins", "eggs", "bottles", "cups", "stamps", "keyboard keys", "red circles", "blue squares",
    "green triangles", "yellow stars", "purple diamonds", "orange hexagons", "white crosses",
    "black rings", "pink ellipses", "cyan plus signs", "brown bricks", "grey dots",
    "x", "y", "done", "point", "object", "objects", "count", "counted", "next",
]

# Qwen2-VL's chat template (image and text parts of messages), so prompts have the same shape.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]


@dataclass
class TinyConfig:
    out: str = arg("models/tiny-qwen2vl", "folder to write config, weights and processor into")
    seed: int = arg(0, "weight initialisation seed; same seed, same weights")
    vision_width: int = arg(128, "vision encoder embed_dim (multiple of 64 for CPU 4-bit)")
    vision_depth: int = arg(2, "vision transformer blocks")
    text_width: int = arg(128, "language model hidden_size (multiple of 64)")
    text_layers: int = arg(2, "language model decoder layers")
    bpe_vocab: int = arg(400, "size of the locally trained byte-level BPE vocabulary")
    min_pixels: int = arg(56 * 56, "processor default lower bound on image pixels")
    max_pixels: int = arg(224 * 224, "processor default upper bound on image pixels (small for CPU)")
    full_size: bool = arg(False, "Qwen2-VL-2B's architecture (published sizes) instead of the tiny widths")


def validate(cfg: TinyConfig) -> list[str]:
    """Return every problem with the config (empty when it is fine)."""
    errors = []
    for name in ("vision_width", "text_width"):
        value = getattr(cfg, name)
        if value <= 0 or value % 64:
            errors.append(f"--{name} must be a positive multiple of 64 (bitsandbytes CPU 4-bit), got {value}")
    for name in ("vision_depth", "text_layers"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1")
    if cfg.bpe_vocab < 300:
        errors.append(f"--bpe_vocab must be >= 300 (256 byte symbols plus merges), got {cfg.bpe_vocab}")
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        errors.append("--min_pixels must be positive and <= --max_pixels")
    return errors


def build_tokenizer(cfg: TinyConfig):
    """Train a small byte-level BPE locally and wrap it as Qwen2-VL's tokenizer class."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=cfg.bpe_vocab, min_frequency=1, show_progress=False)
    spec = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(cfg: TinyConfig, tokenizer):
    """Qwen2-VL processor: the real image processor class with the tiny tokenizer."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: TinyConfig, tokenizer):
    """A Qwen2VLForConditionalGeneration with tiny widths and seeded random weights."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = 64  # one or two heads of 64: every q/k/v projection input stays a multiple of 64
    quarter = head_dim // 2  # M-RoPE splits half the head dim into (temporal, height, width)
    mrope_section = [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    if cfg.full_size:
        torch.manual_seed(cfg.seed)
        model = Qwen2VLForConditionalGeneration._from_config(qwen2vl_2b_config(ids), dtype=torch.bfloat16)
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        return model.eval()
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab + 64 - vocab % 64,  # spare rows, as the real model has
            hidden_size=cfg.text_width,
            intermediate_size=2 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_width // head_dim,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            embed_dim=cfg.vision_width,
            hidden_size=cfg.text_width,
            num_heads=cfg.vision_width // head_dim,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def qwen2vl_2b_config(ids: dict):
    """Qwen2-VL-2B-Instruct's published configuration values; special-token ids from the local tokenizer."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen2vl(cfg: TinyConfig) -> str:
    """Build tokenizer, processor and model and save them with `save_pretrained` into cfg.out."""
    tokenizer = build_tokenizer(cfg)
    processor = build_processor(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    os.makedirs(cfg.out, exist_ok=True)
    model.save_pretrained(cfg.out)
    processor.save_pretrained(cfg.out)
    with open(os.path.join(cfg.out, "tiny_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    return cfg.out


def main(argv=None) -> int:
    cfg = parse_config(TinyConfig, argv, __doc__, validate)
    path = build_tiny_qwen2vl(cfg)
    print(f"Saved tiny Qwen2-VL to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
