"""Build the counting model from its config, and save / load checkpoints of it.

`ModelConfig` holds the fields that decide the model (backbone, 4-bit, LoRA, heads, attention
modules, processor pixels); the training config extends it. `build_model` loads the processor and the
Qwen2-VL backbone (hub id or local folder, optionally 4-bit NF4), wraps it in LoRA and adds the heads;
`save_checkpoint` / `load_checkpoint` write and rebuild it. Training state (optimizer, scheduler,
counters) is passed in by the caller, never imported from the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from cli import UsageError, arg, config_from_dict, write_json_atomic
from model_sequential_attention import ATTENTION_MODULES, SequentialAttentionCountingModel
from model_sequential_simple import (CLASS_BINDINGS, POINTING_MODES, PROMPT_POSITIONS, SPECIAL_TOKENS,
                                     SimpleSequentialModel)

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
HEADS_FILE = "heads.safetensors"
BACKBONE_FILE = "backbone_trained.safetensors"  # backbone weights trained outside LoRA (full fine-tuning)
FINETUNE_MODES = ("lora", "full")
PRECISIONS = ("auto", "bf16", "fp32")
STATE_FILE = "training_state.pt"
MODEL_TYPES = ("simple", "attention")


@dataclass
class ModelConfig:
    """What `build_model` and `load_checkpoint` read."""

    model_name_or_path: str = arg("Qwen/Qwen2-VL-2B-Instruct", "hub id or local folder of a Qwen2-VL model")
    model_type: str = arg("simple", "simple (VLM features into the heads) or attention (+ working memory, "
                          "foveation, cross-attention to counted objects, reasoning)")
    attention_modules: str = arg("memory,foveation,cross_attention,reasoning",
                                 "with --model_type attention: comma-separated modules to enable (empty: simple model)")
    attention_dim: int = arg(256, "with --model_type attention: width of the attention modules")
    pointing: str = arg("token", "token (score every image token as 'next object here', CE on the target's token + "
                        "a sub-token offset; done also sees the strongest 'unmarked object here' token score: the "
                        "recipe that counts) or regress (x_head/y_head regress x, y: the seed's design)")
    prompt_position: str = arg("after", "after (image, then the prompt naming the class: the seed's layout) or "
                               "before (the prompt first, so every image token can read the class name in the "
                               "causal language model)")
    class_binding: str = arg("add", "with --pointing token, how the class query meets each image token: add "
                             "(added, then GELU) or film (the query also scales the token's features)")
    token_context: int = arg(0, "with --pointing token: a k x k convolution over the image-token grid on the pointer's "
                             "features, so each token also sees its neighbours (odd k, e.g. 3; 0: none)")
    class_vocabulary: str = arg("", "the classes of the auxiliary per-token class head, as a JSON list (set by "
                                "training from its split when --class_loss > 0; saved with every checkpoint)")
    object_tokens: float = arg(0.0, "the training images' median object width in image tokens (measured by "
                               "training from its data when 0; saved with every checkpoint): --tiles auto zooms "
                               "crops until the objects are about this wide")
    load_in_4bit: bool = arg(True, "4-bit NF4 backbone (double quantisation) + LoRA (QLoRA)")
    precision: str = arg("auto", "compute dtype of the backbone: auto (bf16 on GPU, fp32 on CPU, where bf16 matmuls "
                         "are emulated and 4x slower), bf16 or fp32. Heads, LoRA and weights that train in full keep "
                         "fp32 master copies; frozen weights are stored in the compute dtype")
    quantize_vision: bool = arg(False, "with --load_in_4bit, quantise the vision tower too (by default it stays in "
                                "bf16 on GPU / fp32 on CPU: quantising a 2B model's vision tower is a known cause "
                                "of badly degraded perception)")
    finetune: str = arg("lora", "lora (LoRA adapters on a frozen backbone) or full (train every backbone weight; "
                        "needs --no-load_in_4bit; for tiny random backbones, which have nothing pretrained to keep)")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    lora_target_modules: str = arg(DEFAULT_LORA_TARGETS, "comma-separated module names that get LoRA")
    head_hidden: int = arg(256, "hidden width of the x_head, y_head and done_head MLPs")
    min_pixels: int = arg(64 * 28 * 28, "processor lower bound on image pixels (dynamic resolution)")
    max_pixels: int = arg(512 * 28 * 28, "processor upper bound on image pixels; FSC-147 images are ~384x576")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save GPU memory")
    seed: int = arg(42, "seed for weights of the heads, data order and counting states")
    device: str = arg("auto", "auto (cuda if available), cuda or cpu")


def token_context_errors(kernel: int) -> list[str]:
    """--token_context is 0 (none) or an odd kernel size (the convolution keeps each token's place)."""
    if kernel < 0 or (kernel and kernel % 2 == 0):
        return [f"--token_context must be 0 or an odd kernel size such as 3, got {kernel}"]
    return []


def lora_dropout_errors(p: float) -> list[str]:
    """--lora_dropout is a probability below 1 (1 would drop every adapter input)."""
    return [] if 0 <= p < 1 else [f"--lora_dropout must be in [0, 1), got {p}"]


def validate_model_config(cfg: ModelConfig) -> list[str]:
    """Every problem with the model fields at once."""
    errors = []
    if cfg.model_type not in MODEL_TYPES:
        errors.append(f"--model_type must be one of {MODEL_TYPES}, got {cfg.model_type!r}")
    if cfg.pointing not in POINTING_MODES:
        errors.append(f"--pointing must be one of {POINTING_MODES}, got {cfg.pointing!r}")
    if cfg.prompt_position not in PROMPT_POSITIONS:
        errors.append(f"--prompt_position must be one of {PROMPT_POSITIONS}, got {cfg.prompt_position!r}")
    if token_context_errors(cfg.token_context):
        errors += token_context_errors(cfg.token_context)
    elif cfg.token_context and cfg.pointing != "token":
        errors.append("--token_context needs --pointing token (it works on the image tokens' scores)")
    if cfg.class_binding not in CLASS_BINDINGS:
        errors.append(f"--class_binding must be one of {CLASS_BINDINGS}, got {cfg.class_binding!r}")
    if cfg.precision not in PRECISIONS:
        errors.append(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.finetune not in FINETUNE_MODES:
        errors.append(f"--finetune must be one of {FINETUNE_MODES}, got {cfg.finetune!r}")
    elif cfg.finetune == "full" and cfg.load_in_4bit:
        errors.append("--finetune full trains every backbone weight, which 4-bit weights cannot: add --no-load_in_4bit")
    unknown = [m for m in attention_module_list(cfg) if m not in ATTENTION_MODULES]
    if unknown:
        errors.append(f"--attention_modules: unknown {unknown}; choose from {', '.join(ATTENTION_MODULES)}")
    try:
        vocabulary = class_vocabulary(cfg)
        if not isinstance(vocabulary, list) or not all(isinstance(c, str) for c in vocabulary):
            raise ValueError
    except ValueError:
        errors.append(f"--class_vocabulary must be a JSON list of class names, got {cfg.class_vocabulary!r}")
    if cfg.attention_dim < 8 or cfg.attention_dim % 4:
        errors.append(f"--attention_dim must be a multiple of 4 and >= 8, got {cfg.attention_dim}")
    for name in ("lora_r", "lora_alpha", "head_hidden"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    errors += lora_dropout_errors(cfg.lora_dropout)
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        errors.append("--min_pixels must be positive and <= --max_pixels")
    if not (cfg.object_tokens >= 0 and math.isfinite(cfg.object_tokens)):
        errors.append(f"--object_tokens must be >= 0 (0: measured by training), got {cfg.object_tokens}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        errors.append(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if not [m for m in cfg.lora_target_modules.split(",") if m.strip()]:
        errors.append("--lora_target_modules must name at least one module")
    return errors


def class_vocabulary(cfg: ModelConfig) -> list[str]:
    return json.loads(cfg.class_vocabulary) if cfg.class_vocabulary else []


def attention_module_list(cfg: ModelConfig) -> list[str]:
    return [m.strip() for m in cfg.attention_modules.split(",") if m.strip()]


# ----------------------------------------------------------------------------- building


class PatchConvAsMatmul(torch.nn.Conv3d):
    """Qwen2-VL's patch embedding (a Conv3d whose kernel is its stride, applied to inputs exactly one
    kernel big) as one matrix multiply: the same weights and function (to float rounding); on CPU its
    backward, which full fine-tuning pays at every step, ran 3x faster than the convolution's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, kt, kh, kw) -> (N, out, 1, 1, 1)
        n = x.shape[0]
        out = torch.nn.functional.linear(x.reshape(n, -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(n, self.out_channels, 1, 1, 1)


def use_matmul_patch_embedding(backbone) -> None:
    """Swap the vision tower's patch-embedding convolution for `PatchConvAsMatmul` (CPU only)."""
    for name, module in backbone.named_modules():
        if (name.endswith("patch_embed.proj") and type(module) is torch.nn.Conv3d
                and module.kernel_size == module.stride and module.padding == (0, 0, 0) and module.groups == 1):
            module.__class__ = PatchConvAsMatmul


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    torch.cuda.set_device(device)
    configure_cuda_math()
    return device


def configure_cuda_math() -> None:
    """TF32 for the matmuls that stay in fp32 on a GPU (the heads, the attention modules): ~8x the fp32 rate
    on Ampere and later, at a 10-bit mantissa for the products (cuDNN convolutions use TF32 by default)."""
    torch.set_float32_matmul_precision("high")


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the backbone computes in: --precision, where auto is bf16 on CUDA and fp32 on CPU."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]


def backbone_load_kwargs(cfg: ModelConfig, device: torch.device) -> dict:
    """from_pretrained's arguments: SDPA attention, the storage dtype and, with --load_in_4bit, NF4.

    Frozen weights are stored in the compute dtype (bf16 halves the vision tower's 665 M parameters on a GPU).
    Weights that train in full (--finetune full) are stored in fp32, the optimizer's master copy: AdamW steps of
    ~3e-4 are below bf16's resolution for weights near 0.05, and a LayerNorm weight near 1.0 (resolution 7.8e-3)
    would never move; autocast still computes in the compute dtype.
    """
    dtype = compute_dtype(cfg, device)
    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32 if cfg.finetune == "full" else dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # The modules left in `dtype`: the vision tower (unless --quantize_vision) and the LM head.
            # transformers 5 matches these from the start of a module's name ("model.visual.blocks.0...").
            llm_int8_skip_modules=["lm_head"] + ([] if cfg.quantize_vision else ["model.visual", "visual"]))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return kwargs


class _NotOurConfigFilter(logging.Filter):
    """Drops transformers' "model of type `simple` to instantiate a model of type ``" warning: the processor
    loader reads a checkpoint's config.json, which is this project's ModelConfig, not a transformers config."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("You are using a model of type")


def load_processor(path: str, cfg: ModelConfig):
    """The model's processor with the image pixel bounds of the config and the three new tokens."""
    from transformers import AutoProcessor

    config_logger, quiet = logging.getLogger("transformers.configuration_utils"), _NotOurConfigFilter()
    config_logger.addFilter(quiet)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a processor from {path!r}: not a local model folder and not "
                         f"reachable on the hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    finally:
        config_logger.removeFilter(quiet)
    if not hasattr(processor, "image_processor") or not hasattr(processor.image_processor, "size"):
        raise UsageError(f"{path}: the processor is not a Qwen2-VL image+text processor")
    # Dynamic resolution: the processor resizes each image to between min_pixels and max_pixels.
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                           replace_extra_special_tokens=False)
    return processor


def load_backbone(cfg: ModelConfig, device: torch.device):
    """Qwen2-VL from the hub or a folder, optionally 4-bit NF4, frozen (LoRA or full fine-tuning unfreezes).

    peft's prepare_model_for_kbit_training is not used: it casts every weight that is not 4-bit to fp32 (the
    whole vision tower, embeddings, norms), and Linear4bit returns its input's dtype, so the hidden states
    and every matmul outside the 4-bit layers would run in fp32 on a GPU too.
    """
    from transformers import Qwen2VLForConditionalGeneration

    try:
        model = Qwen2VLForConditionalGeneration.from_pretrained(cfg.model_name_or_path, **backbone_load_kwargs(cfg, device))
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a Qwen2-VL model from {cfg.model_name_or_path!r}: not a local model "
                         f"folder and not reachable on the hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if cfg.load_in_4bit:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # bitsandbytes repacks 4-bit weights for CPU inference the first time a layer runs in
                # eval mode without grad, and that packed form then breaks backward: keep one format.
                module.support_avx512bf16_for_cpu = False
    else:
        model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if device.type == "cpu":
        use_matmul_patch_embedding(model)
    return model


def build_model(cfg: ModelConfig, checkpoint: str | None = None, trainable: bool = True):
    """Processor + backbone + LoRA (new, or a checkpoint's) + heads, on the device.

    `checkpoint`: a checkpoint folder to take the processor and the LoRA adapter from (the heads and
    other trained weights are loaded by `load_checkpoint`). With --finetune full there is no LoRA:
    every backbone weight trains (when `trainable`).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    device = resolve_device(cfg)
    processor = load_processor(checkpoint or cfg.model_name_or_path, cfg)
    backbone = load_backbone(cfg, device)
    if len(processor.tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
        backbone.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    if cfg.finetune == "full":
        for p in backbone.parameters():
            p.requires_grad_(trainable)
        backbone.get_input_embeddings().weight.requires_grad_(False)  # its 3 new rows train in token_embeddings
    elif checkpoint:
        backbone = PeftModel.from_pretrained(backbone, checkpoint, is_trainable=trainable)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=[m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()],
                          bias="none")
        try:
            backbone = get_peft_model(backbone, lora)
        except ValueError as e:
            raise UsageError(f"--lora_target_modules {cfg.lora_target_modules!r}: {e}") from None
    torch.manual_seed(cfg.seed)  # heads start the same for the same seed
    if cfg.model_type == "attention":
        model = SequentialAttentionCountingModel(backbone, processor, head_hidden=cfg.head_hidden,
                                                 modules=tuple(attention_module_list(cfg)),
                                                 attention_dim=cfg.attention_dim, pointing=cfg.pointing,
                                                 prompt_position=cfg.prompt_position, class_binding=cfg.class_binding,
                                                 class_vocabulary=class_vocabulary(cfg), token_context=cfg.token_context)
    else:
        model = SimpleSequentialModel(backbone, processor, head_hidden=cfg.head_hidden, pointing=cfg.pointing,
                                      prompt_position=cfg.prompt_position, class_binding=cfg.class_binding,
                                      class_vocabulary=class_vocabulary(cfg), token_context=cfg.token_context)
    for name, module in model.named_children():
        if name != "backbone":  # the backbone is already placed (4-bit needs device_map)
            module.to(device)
    model.compute_dtype = compute_dtype(cfg, device)  # the backbone's forward runs under autocast to it
    return model


def model_inputs(model, batch, device) -> dict[str, torch.Tensor]:
    """Processor inputs for a CountingBatch, on the device."""
    inputs = model.build_inputs(batch.images, batch.class_names)
    return {k: v.to(device) for k, v in inputs.items()}


def device_of(model) -> torch.device:
    return model.x_head.fc1.weight.device


# ----------------------------------------------------------------------------- checkpoints


def backbone_trained_weights(model) -> dict[str, torch.Tensor]:
    """Backbone weights that train outside a LoRA adapter (all of them with --finetune full)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.backbone.named_parameters()
            if p.requires_grad and "lora_" not in n}


def save_checkpoint(model, cfg, folder: str, training_state: dict | None = None) -> str:
    """Write `folder` atomically with every weight that trained: the LoRA adapter (or, with full
    fine-tuning, backbone_trained.safetensors), heads + token rows, processor, config.json (all of
    `cfg`), and `training_state.pt` when the caller passes one (optimizer, scheduler, counters, RNG).

    Written to a temporary sibling folder and renamed into place; the previous checkpoint of that name
    survives until the new one is complete.
    """
    from safetensors.torch import save_file

    parent, name = os.path.split(os.path.abspath(folder))
    tmp = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if hasattr(model.backbone, "peft_config"):
        model.backbone.save_pretrained(tmp)
    trained = backbone_trained_weights(model)
    if trained:
        save_file(trained, os.path.join(tmp, BACKBONE_FILE))
    save_file(model.head_state_dict(), os.path.join(tmp, HEADS_FILE))
    model.processor.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "config.json"), asdict(cfg))
    if training_state is not None:
        torch.save(training_state, os.path.join(tmp, STATE_FILE))
    old = os.path.join(parent, f".old-{name}")
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_backbone_trained(model, path: str) -> None:
    """Load backbone_trained.safetensors (if the checkpoint has one) into the backbone; every key must fit."""
    from safetensors.torch import load_file

    file = os.path.join(path, BACKBONE_FILE)
    if not os.path.exists(file):
        return
    state = load_file(file, device=str(next(model.backbone.parameters()).device))
    params = dict(model.backbone.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise UsageError(f"{file}: weights {unknown[:3]} are not in the backbone (was it trained with another config?)")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def load_weights(model, path: str) -> None:
    """Load a checkpoint's trained weights into a model built with the same config (for resuming)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if hasattr(model.backbone, "peft_config"):
        set_peft_model_state_dict(model.backbone, load_file(os.path.join(path, "adapter_model.safetensors")))
    load_backbone_trained(model, path)
    model.load_head_state_dict(load_file(os.path.join(path, HEADS_FILE), device=str(device_of(model))))


def load_checkpoint(path: str, device: str = "auto", trainable: bool = False, config_cls=ModelConfig, **overrides):
    """Rebuild a model from a checkpoint folder with every weight that trained; returns (model, config as
    `config_cls`)."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise UsageError(f"checkpoint {path!r} is not a folder")
    missing = [f for f in ("config.json", HEADS_FILE) if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise UsageError(f"{path} is not a checkpoint of this project: missing {', '.join(missing)}")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = config_from_dict(config_cls, json.load(f))
    cfg = dataclasses.replace(cfg, device=device, **overrides)
    base = cfg.model_name_or_path
    if "model_name_or_path" not in overrides and (os.path.isabs(base) or base.startswith(".")) and not os.path.isdir(base):
        raise UsageError(f"{path}: the base weights it was trained on, {base!r}, are not there (moved?): pass "
                         "--model_name_or_path with the folder (or hub id) of the same model")
    need = "adapter_config.json" if cfg.finetune == "lora" else BACKBONE_FILE
    if not os.path.exists(os.path.join(path, need)):
        raise UsageError(f"{path} is not a complete checkpoint: missing {need} (--finetune {cfg.finetune})")
    model = build_model(cfg, checkpoint=path, trainable=trainable)
    load_backbone_trained(model, path)
    try:
        model.load_head_state_dict(load_file(os.path.join(path, HEADS_FILE), device=str(device_of(model))))
    except ValueError as e:
        raise UsageError(f"{path}: heads.safetensors does not fit --model_type {cfg.model_type} "
                         f"(modules {cfg.attention_modules!r}, --pointing {cfg.pointing}): {e}") from None
    model.eval()
    return model, cfg
