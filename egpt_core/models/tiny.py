"""Tiny, seeded checkpoints in the real on-disk formats (for the demo and the tests).

Like the real models (both fine-tuned from Vicuna-7B), the tiny EventGPT and Video-LLaVA decoders
are one seeded "tiny Vicuna" plus each model's own small fine-tuning perturbation (every decoder
weight and the LM head moved by ``FINETUNE_NOISE`` = 5 % of its own std, independently per model).
That is the learnable drafter -> target relationship the demo trains on: for the same prefix,
EventGPT's final hidden states differ from Video-LLaVA's mostly by a systematic, nearly affine map
(the two prompts differ - EventGPT's system prompt and pooled event features vs Video-LLaVA's 8
video frames - and shift every state alike; the fine-tuning deltas are small), so the raw drafter
read through the target's LM head accepts almost nothing (about 0.1 tokens per round at γ = 5),
while a map fitted on a few hundred pairs (any adapter level contains one) recovers cos ≈ 0.998
and 2-3 accepted tokens per round on held-out scenes. What is left is scene-specific: the target
sees the video, the drafter the events.

`write_tiny_models(out)` writes ``out/eventgpt/`` (EventChat_llama config + weights, its CLIP tower
in ``out/eventgpt/clip-vit-tiny/``), ``out/videollava/`` (VideoLlavaForConditionalGeneration +
VideoLlavaProcessor) and one shared LLaMA-style tokenizer built offline with `tokenizers`. They are
loaded by exactly the loaders used for real 7B checkpoints. Two runs write identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)

from egpt_core.fsio import Location
from egpt_core.models.eventgpt import EVENTGPT_SYSTEM, EventChatConfig, EventChatLlamaForCausalLM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<video>", "<event>", "<ev_start>", "<ev_end>", "<ev_patch>"]
CLIP_DIR_NAME = "clip-vit-tiny"

_CORPUS = [
    EVENTGPT_SYSTEM,
    "USER: ASSISTANT: What are the key elements in this scene? Can you elaborate on the elements of the scene provided?",
    "What is this scene about? What is the layout of the road in the scene?",
    "What type of vehicles are present in the scene and how are they positioned?",
    "What do you think is going on in this scene? What elements are present in the scene?",
    "What do you see happening in this scene? Describe the following scene.",
    "What types of vehicles are present in the scene and how are they positioned?",
    "The scene shows a road with cars, a red car on the left, a blue truck moving right, trees, "
    "buildings, pedestrians, a traffic light, and a cyclist. The vehicles are parked along the street.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) -",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A LLaMA-style (Metaspace BPE, BOS prepended) tokenizer trained offline on a fixed corpus."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        padding_side="left",
        model_max_length=2048,
    )
    return fast


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_clip_config(image_size: int = 32) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, projection_dim=32,
    )


def _llama_kwargs(vocab: int, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def _scale_lm_head(model, std: float) -> None:
    """Widen the logit spread so greedy decoding is decisive (bf16/batch noise cannot flip argmaxes)."""
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.normal_(0.0, std)


#: relative size of each model's own perturbation of the shared tiny-Vicuna decoder (see the module doc)
FINETUNE_NOISE = 0.05


def tiny_vicuna(vocab: int, hidden: int = 64, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """The shared base decoder (as EventGPT-7B and Video-LLaVA-7B both derive from Vicuna-7B):
    LlamaModel weights + LM head, seeded."""
    from transformers import LlamaForCausalLM

    _seed(seed + 10)
    base = LlamaForCausalLM(LlamaConfig(**_llama_kwargs(vocab, hidden, layers))).eval()
    _scale_lm_head(base, 0.5)
    return {k: v.detach().clone() for k, v in base.state_dict().items()}


def _load_finetuned(decoder, lm_head, base: dict[str, torch.Tensor], seed: int) -> None:
    """Copy the base decoder into ``decoder``/``lm_head`` plus a seeded per-model perturbation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.state_dict().items():
            src = base.get("model." + name)
            if src is None:  # EventGPT's visual modules keep their own init
                continue
            p.copy_(src + FINETUNE_NOISE * src.std() * torch.randn(src.shape, generator=g) if src.ndim > 1 else src)
        w = base["lm_head.weight"]
        lm_head.weight.copy_(w + FINETUNE_NOISE * w.std() * torch.randn(w.shape, generator=g))


def write_tiny_eventgpt(out: str | Path, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2,
                        seed: int = 0, base: dict[str, torch.Tensor] | None = None) -> Path:
    """EventChat_llama checkpoint; the CLIP tower lives in ``out/clip-vit-tiny`` (not in the weights)."""
    out = Path(out)
    clip_dir = out / CLIP_DIR_NAME
    clip_dir.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    clip_cfg = tiny_clip_config()
    clip = CLIPVisionModel(clip_cfg).eval()
    clip.save_pretrained(clip_dir)
    CLIPImageProcessor(
        size={"shortest_edge": clip_cfg.image_size}, crop_size={"height": clip_cfg.image_size, "width": clip_cfg.image_size}
    ).save_pretrained(clip_dir)
    cfg = EventChatConfig(
        mm_visual_tower=CLIP_DIR_NAME, mm_hidden_size=clip_cfg.hidden_size, event_feature_adaptor=True,
        clip_config=None, architectures=["EventChatLlamaForCausalLM"],
        **_llama_kwargs(len(tokenizer), hidden, layers),
    )
    _seed(seed + 1)
    model = EventChatLlamaForCausalLM(cfg).eval()
    _scale_lm_head(model, 0.5)
    if base is not None:
        _load_finetuned(model.model, model.lm_head, base, seed + 21)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model.visual_tower.")}
    model.save_pretrained(out, state_dict=sd)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_videollava(out: str | Path, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2,
                          seed: int = 0, base: dict[str, torch.Tensor] | None = None) -> Path:
    """VideoLlavaForConditionalGeneration + VideoLlavaProcessor in save_pretrained format."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip_cfg = tiny_clip_config()
    text_cfg = LlamaConfig(**_llama_kwargs(len(tokenizer), hidden, layers))
    cfg = VideoLlavaConfig(
        vision_config=clip_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(clip_cfg.image_size // clip_cfg.patch_size) ** 2,
        video_seq_length=8 * ((clip_cfg.image_size // clip_cfg.patch_size) ** 2 + 1),
        tie_word_embeddings=False,
    )
    _seed(seed + 2)
    model = VideoLlavaForConditionalGeneration(cfg).eval()
    _scale_lm_head(model, 0.5)
    if base is not None:
        _load_finetuned(model.model.language_model, model.lm_head, base, seed + 22)
    model.save_pretrained(out)
    size = clip_cfg.image_size
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    video_processor = VideoLlavaVideoProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = VideoLlavaProcessor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, patch_size=clip_cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return out


def write_tiny_models(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``out/eventgpt`` and ``out/videollava`` sharing one tokenizer."""
    out = Path(out)
    tokenizer = build_tokenizer()
    base = tiny_vicuna(len(tokenizer), seed=seed)
    paths = {
        "eventgpt": write_tiny_eventgpt(out / "eventgpt", tokenizer, seed=seed, base=base),
        "videollava": write_tiny_videollava(out / "videollava", tokenizer, seed=seed, base=base),
    }
    Location(str(out / "FIXTURES.json")).write_atomic(json.dumps({"seed": seed, "kind": "tiny-seeded"}, indent=2))
    return paths
