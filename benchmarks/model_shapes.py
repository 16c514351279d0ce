"""EventGPT and Video-LLaVA at named shapes, with random weights, built directly on a device.

``7b`` is the real configuration of both checkpoints (no download, nothing read from a hub):

- EventGPT-7b: the Vicuna-7B ``LlamaConfig`` (D=4096, 11008 MLP, 32 layers x 32 heads, vocab 32000)
  with EventGPT's multimodal keys: CLIP ViT-L/14-336 tower (1024 wide, 24 layers, 577 tokens per
  image), a 2-layer GELU projector 1024 -> 4096 -> 4096 and the 4096 x 4096 feature adaptor
  (reference §3.1). ~7.08 B parameters.
- Video-LLaVA-7B-hf: the checkpoint's ``config.json`` values - Vicuna-7B text config with vocab 32064,
  two CLIP ViT-L/14 towers at 224 px (257 tokens per frame, 8 frames -> 2056 video tokens), GELU
  projector, ``vision_feature_layer=-2``. ~7.37 B parameters.

``tiny`` is the shape of the test fixtures (`egpt_core.models.tiny`) and ``small`` keeps the real
vocabularies, image sizes and patch grids (so prompts are as long as at 7B: ~2070 target tokens,
~600 drafter tokens) with a narrow 2-layer decoder, for CPU runs of the same code path.

Both models share the tiny fixtures' offline LLaMA-style tokenizer (384 entries): special-token ids
in the configs follow that tokenizer (``<video>`` = 4 rather than 32001); this changes no tensor
shape or cost. Models are wrapped exactly as the loaders wrap checkpoints (`EventGPTDrafter`,
`VideoLlavaTarget`), so extraction, training and evaluation code runs on them unchanged.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: The EventGPT checkpoint's CLIP tower directory name (``mm_visual_tower``).
EVENT_CLIP_NAME = "clip-vit-large-patch14-336"

_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 patch_size=14, projection_dim=768)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of both models. ``*_vocab`` None = the tokenizer's size."""

    name: str
    decoder: dict = field(default_factory=dict)  # LlamaConfig sizes shared by both decoders
    drafter_vocab: int | None = None
    target_vocab: int | None = None
    event_clip: dict = field(default_factory=dict)  # EventGPT's CLIP tower (CLIPVisionConfig kwargs)
    video_clip: dict = field(default_factory=dict)  # Video-LLaVA's image/video towers


SHAPES: dict[str, ModelShape] = {
    "7b": ModelShape("7b", dict(_VICUNA_7B), 32000, 32064, dict(_CLIP_L14, image_size=336),
                     dict(_CLIP_L14, image_size=224)),
    "small": ModelShape(
        "small", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5), 32000, 32064,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
             projection_dim=64, image_size=336),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
             projection_dim=64, image_size=224)),
    "tiny": ModelShape(
        "tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5), None, None,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
             projection_dim=32, image_size=32),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
             projection_dim=32, image_size=32)),
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]


def _token_ids(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def eventgpt_config(shape: ModelShape, tokenizer):
    """The ``EventChat_llama`` config of ``shape`` (its CLIP tower config inline in ``clip_config``)."""
    from egpt_core.models.eventgpt import EventChatConfig

    return EventChatConfig(
        mm_visual_tower=EVENT_CLIP_NAME, mm_hidden_size=shape.event_clip["hidden_size"], event_feature_adaptor=True,
        clip_config=dict(shape.event_clip), architectures=["EventChatLlamaForCausalLM"],
        vocab_size=shape.drafter_vocab or len(tokenizer), **shape.decoder, **_token_ids(tokenizer),
    )


def videollava_config(shape: ModelShape, tokenizer):
    """The ``video_llava`` config of ``shape`` (Video-LLaVA-7B-hf's values at ``7b``)."""
    from transformers import VideoLlavaConfig

    clip = shape.video_clip
    per_frame = (clip["image_size"] // clip["patch_size"]) ** 2
    return VideoLlavaConfig(
        vision_config=dict(clip, model_type="clip_vision_model"),
        text_config=dict(model_type="llama", vocab_size=shape.target_vocab or len(tokenizer), **shape.decoder,
                         **_token_ids(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=per_frame, video_seq_length=8 * (per_frame + 1), tie_word_embeddings=False,
    )


@contextlib.contextmanager
def _on(device: str | torch.device, seed: int):
    """Parameters are created on ``device`` (no CPU copy first); seeded init."""
    torch.manual_seed(seed)
    with torch.device(device):
        yield


def build_eventgpt(shape: ModelShape, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0):
    """A random-weight EventGPT of ``shape`` on ``device`` -> `EventGPTDrafter` (as `load_eventgpt` returns)."""
    from transformers import CLIPImageProcessor

    from egpt_core.fingerprint import hash_json
    from egpt_core.models.eventgpt import EventChatLlamaForCausalLM, EventGPTDrafter

    with _on(device, seed):
        model = EventChatLlamaForCausalLM._from_config(eventgpt_config(shape, tokenizer), dtype=dtype).eval()
    size = shape.event_clip["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    drafter = EventGPTDrafter(model, tokenizer, processor)
    drafter.fingerprint = hash_json({"random": shape.name, "seed": seed, "model": "eventgpt", "dtype": str(dtype)})
    drafter.vision_fingerprint = hash_json({"random": shape.name, "seed": seed, "vision": True})
    drafter.path = f"random:{shape.name}/eventgpt"
    return drafter


def build_videollava(shape: ModelShape, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                     seed: int = 1):
    """A random-weight Video-LLaVA of ``shape`` on ``device`` -> `VideoLlavaTarget` (as `load_videollava` returns)."""
    from transformers import (
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    from egpt_core.fingerprint import hash_json
    from egpt_core.models.videollava import VideoLlavaTarget

    with _on(device, seed):
        model = VideoLlavaForConditionalGeneration._from_config(videollava_config(shape, tokenizer), dtype=dtype).eval()
    size = shape.video_clip["image_size"]
    crop = {"height": size, "width": size}
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size={"shortest_edge": size}, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size={"shortest_edge": size}, crop_size=crop),
        tokenizer=tokenizer, patch_size=shape.video_clip["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.tokenizer.padding_side = "left"
    target = VideoLlavaTarget(model, processor)
    target.fingerprint = hash_json({"random": shape.name, "seed": seed, "model": "videollava", "dtype": str(dtype)})
    target.path = f"random:{shape.name}/videollava"
    return target


def shape_tokenizer():
    """The offline LLaMA-style tokenizer both models share (the fixtures' tokenizer)."""
    from egpt_core.models.tiny import build_tokenizer

    return build_tokenizer()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_eventgpt_checkpoint(drafter, out: str | Path) -> Path:
    """Write ``drafter`` as an EventGPT checkpoint directory (config + safetensors + tokenizer, CLIP tower
    config and processor in ``out/<mm_visual_tower>``) that `load_eventgpt` reads, e.g. in NF4."""
    from transformers import CLIPVisionConfig

    out = Path(out)
    clip_dir = out / EVENT_CLIP_NAME
    clip_dir.mkdir(parents=True, exist_ok=True)
    model = drafter.model
    CLIPVisionConfig(**model.config.clip_config).save_pretrained(clip_dir)
    drafter.image_processor.save_pretrained(clip_dir)
    model.save_pretrained(out)  # visual tower weights included: the loader takes them from the checkpoint
    drafter.tokenizer.save_pretrained(out)
    (out / "RANDOM_WEIGHTS.json").write_text(json.dumps({"shape": drafter.path, "note": "benchmark only"}))
    return out
