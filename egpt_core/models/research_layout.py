"""The tiny EventGPT written exactly as its authors' code saves a checkpoint (XduSyL/EventGPT).

The authors train ``EventChatModel`` with transformers 4.37.2 (DeepSpeed ZeRO-3 ``save_model``) and
load it with ``use_fast=False``. Their directory therefore holds:

* ``config.json`` — ``model_type`` ``EventChat_llama``, ``architectures`` ``["EventChatModel"]``,
  ``mm_visual_tower`` (a CLIP path that usually does not exist on the reader's machine),
  ``event_feature_adaptor``, 4.37-style Llama keys (``rope_theta``, ``torch_dtype``); no tower config;
* every weight, the CLIP tower included, under the authors' module names: ``VisualTower`` wraps
  ``CLIPVisionModel``, so the tower is ``model.visual_tower.visual_tower.vision_model.*``;
* weights as ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` (``save_safetensors=False``);
* the slow LLaMA tokenizer: ``tokenizer.model`` (SentencePiece), ``tokenizer_config.json``,
  ``special_tokens_map.json`` — no ``tokenizer.json``.

:func:`write_research_eventgpt` converts a project-layout tiny EventGPT (``egpt fixtures``) into that
layout without changing a single weight, and :func:`sentencepiece_model` builds a SentencePiece BPE
model whose pieces are the fixture tokenizer's vocabulary (same ids, merge priority = id order, as
the fixture's BPE learned them), so both tokenizers give the same ids.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from egpt_core.errors import ConfigError
from egpt_core.fsio import Location

#: ``egpt fixtures --layout research`` writes one directory per weight format
RESEARCH_FORMATS = ("safetensors", "sharded", "bin")
AUTHORS_TOWER_PREFIX = "model.visual_tower.visual_tower.vision_model."
#: what the authors' config names as the tower (a path that does not exist here: the common case)
AUTHORS_TOWER_NAME = "./checkpoints/clip-vit-tiny"
TRANSFORMERS_VERSION = "4.37.2"
SHARDS = 3


def research_dir_name(fmt: str) -> str:
    return f"eventgpt-research-{fmt}"


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------
def authors_state_dict(project_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a project-layout tiny EventGPT (tower from its CLIP directory) under
    the authors' names, tensors unchanged."""
    project_dir = Path(project_dir)
    cfg = json.loads((project_dir / "config.json").read_text())
    sd = load_file(str(project_dir / "model.safetensors"))
    clip = load_file(str(project_dir / str(cfg["mm_visual_tower"]) / "model.safetensors"))
    for k, v in clip.items():
        sd[AUTHORS_TOWER_PREFIX + k.removeprefix("vision_model.")] = v
    return dict(sorted(sd.items()))


def _write_weights(sd: dict[str, torch.Tensor], out: Path, fmt: str) -> None:
    meta = {"format": "pt"}  # what transformers 4.37's save_pretrained writes
    if fmt == "safetensors":
        save_file(sd, str(out / "model.safetensors"), metadata=meta)
    elif fmt == "sharded":
        keys = list(sd)
        total = sum(v.numel() * v.element_size() for v in sd.values())
        budget, shards, cur, size = total / SHARDS, [], [], 0
        for k in keys:
            cur.append(k)
            size += sd[k].numel() * sd[k].element_size()
            if size >= budget and len(shards) < SHARDS - 1:
                shards.append(cur)
                cur, size = [], 0
        shards.append(cur)
        weight_map = {}
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: sd[k] for k in names}, str(out / fname), metadata=meta)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        Location(str(out / "model.safetensors.index.json")).write_atomic(json.dumps(index, indent=2, sort_keys=True) + "\n")
    elif fmt == "bin":
        buf = io.BytesIO()
        torch.save(sd, buf)  # the authors' pickle format, which this fixture exists to reproduce
        Location(str(out / "pytorch_model.bin")).write_atomic(buf.getvalue())
    else:
        raise ConfigError(f"unknown research weight format {fmt!r}; expected one of {RESEARCH_FORMATS}")


def _authors_config(project_cfg: dict) -> dict:
    """config.json as transformers 4.37.2 writes EventChatConfig (no tower config, no mm_hidden_size)."""
    keep = ("attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
            "initializer_range", "intermediate_size", "max_position_embeddings", "num_attention_heads",
            "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp", "rms_norm_eps",
            "tie_word_embeddings", "use_cache", "vocab_size", "event_feature_adaptor")
    cfg = {k: project_cfg[k] for k in keep if k in project_cfg}
    rope = project_cfg.get("rope_parameters") or {}
    cfg.update({
        "_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["EventChatModel"],
        "model_type": "EventChat_llama", "mm_visual_tower": AUTHORS_TOWER_NAME,
        "rope_scaling": None, "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "torch_dtype": str(project_cfg.get("dtype") or "float32"), "transformers_version": TRANSFORMERS_VERSION,
    })
    return dict(sorted(cfg.items()))


# --------------------------------------------------------------------------------------------------
# the slow (SentencePiece) tokenizer
# --------------------------------------------------------------------------------------------------
def sentencepiece_model(tokenizer) -> bytes:
    """A serialized SentencePiece BPE ``ModelProto`` holding ``tokenizer``'s vocabulary at the same
    ids: ``<unk>`` UNKNOWN, ``<s>``/``</s>`` CONTROL, the other special tokens USER_DEFINED, the rest
    NORMAL with score -id (merge priority = id order, as BPE learned them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = tokenizer.get_vocab()
    pieces = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in pieces] != list(range(len(pieces))):
        raise ConfigError("sentencepiece_model: the tokenizer's ids are not contiguous from 0")
    specials = set(tokenizer.all_special_tokens)
    sp = pb.ModelProto()
    for token, i in pieces:
        p = sp.pieces.add()
        p.piece = token
        if token == tokenizer.unk_token:
            p.type, p.score = pb.ModelProto.SentencePiece.UNKNOWN, 0.0
        elif token in (tokenizer.bos_token, tokenizer.eos_token):
            p.type, p.score = pb.ModelProto.SentencePiece.CONTROL, 0.0
        elif token in specials:
            p.type, p.score = pb.ModelProto.SentencePiece.USER_DEFINED, 0.0
        else:
            p.type, p.score = pb.ModelProto.SentencePiece.NORMAL, -float(i)
    ts = sp.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = (vocab[tokenizer.unk_token], vocab[tokenizer.bos_token],
                                                  vocab[tokenizer.eos_token], -1)
    ts.byte_fallback = False  # the tiny vocabulary has no byte pieces: unknown characters -> <unk>
    ns = sp.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces = "identity", True, False  # as LLaMA's
    return sp.SerializeToString()


def write_slow_llama_tokenizer(tokenizer, out: str | Path) -> Path:
    """``tokenizer.model`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` as 4.37's slow
    ``LlamaTokenizer.save_pretrained`` writes them (no ``tokenizer.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Location(str(out / "tokenizer.model")).write_atomic(sentencepiece_model(tokenizer))
    vocab = tokenizer.get_vocab()
    extra = [t for t in tokenizer.all_special_tokens
             if t not in (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    decoder = {str(vocab[t]): {"content": t, **flags}
               for t in [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, *extra]}
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda
                                                                                            kv: int(kv[0]))),
        "additional_special_tokens": extra, "bos_token": tokenizer.bos_token, "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer.eos_token, "legacy": False, "model_max_length": int(tokenizer.model_max_length),
        "pad_token": tokenizer.pad_token, "padding_side": "right", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "unk_token": tokenizer.unk_token, "use_default_system_prompt": False,
    }
    Location(str(out / "tokenizer_config.json")).write_atomic(json.dumps(config, indent=2) + "\n")
    special_map = {"additional_special_tokens": extra, "bos_token": tokenizer.bos_token,
                   "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
    Location(str(out / "special_tokens_map.json")).write_atomic(json.dumps(special_map, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# the whole checkpoint
# --------------------------------------------------------------------------------------------------
#: marks a directory written by :func:`write_research_eventgpt` (the only kind it replaces)
RESEARCH_MARKER = ".egpt-research-fixture"


def write_research_eventgpt(project_dir: str | Path, out: str | Path, fmt: str = "safetensors") -> Path:
    """Rewrite a project-layout tiny EventGPT (``egpt fixtures``) in the authors' layout at ``out``:
    same tensors, authors' names and config, ``fmt`` in :data:`RESEARCH_FORMATS`, slow tokenizer,
    no CLIP directory (its weights are in the checkpoint)."""
    from transformers import AutoTokenizer

    from egpt_core.models.loading import _quiet_transformers

    project_dir, out = Path(project_dir), Path(out)
    if fmt not in RESEARCH_FORMATS:
        raise ConfigError(f"unknown research weight format {fmt!r}; expected one of {RESEARCH_FORMATS}")
    if out.exists():  # replace only a checkpoint this function wrote (its marker), never a user's directory
        if not (out / RESEARCH_MARKER).is_file() and any(out.iterdir()):
            raise ConfigError(f"{out} exists and was not written by `egpt fixtures --layout research`; "
                              "choose another OUTDIR or remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / RESEARCH_MARKER).write_text("written by egpt fixtures --layout research\n")
    project_cfg = json.loads((project_dir / "config.json").read_text())
    _write_weights(authors_state_dict(project_dir), out, fmt)
    Location(str(out / "config.json")).write_atomic(json.dumps(_authors_config(project_cfg), indent=2) + "\n")
    gen = {"bos_token_id": project_cfg.get("bos_token_id", 1), "eos_token_id": project_cfg.get("eos_token_id", 2),
           "pad_token_id": project_cfg.get("pad_token_id", 0), "transformers_version": TRANSFORMERS_VERSION}
    Location(str(out / "generation_config.json")).write_atomic(json.dumps(gen, indent=2) + "\n")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(project_dir))
    write_slow_llama_tokenizer(tokenizer, out)
    return out


def write_research_fixtures(fixtures_dir: str | Path, formats: tuple[str, ...] = RESEARCH_FORMATS) -> dict[str, Path]:
    """``<fixtures_dir>/eventgpt-research-<fmt>/`` for each format, from ``<fixtures_dir>/eventgpt``."""
    fixtures_dir = Path(fixtures_dir)
    return {research_dir_name(fmt): write_research_eventgpt(fixtures_dir / "eventgpt",
                                                             fixtures_dir / research_dir_name(fmt), fmt)
            for fmt in formats}


__all__ = ["AUTHORS_TOWER_PREFIX", "RESEARCH_FORMATS", "authors_state_dict", "research_dir_name",
           "sentencepiece_model", "write_research_eventgpt", "write_research_fixtures",
           "write_slow_llama_tokenizer"]
