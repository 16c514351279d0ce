"""Real checkpoint layouts: the authors' EventGPT (tower names, sharded/.bin, tokenizer.model only),
strict loading (nothing left at random init), the CLIP override, tokenizers as shipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from egpt_core.config import ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.models import load_eventgpt, load_videollava
from egpt_core.models.research_layout import (
    AUTHORS_TOWER_PREFIX,
    RESEARCH_FORMATS,
    research_dir_name,
    write_research_eventgpt,
)

FP32 = ModelLoadConfig(dtype="float32", device="cpu")
TEXTS = [
    "What is this scene about?", "Describe the following scene.",
    "The scene shows a road with cars, a red car on the left, a blue truck moving right.",
    "USER: <video>\nWhat type of vehicles are present? ASSISTANT:", "Zürich ☃ [x] {y}\n\ttabs",
]


@pytest.fixture(scope="module")
def research(fixtures_dir, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny EventGPT rewritten in the authors' layout, once per weight format."""
    out = tmp_path_factory.mktemp("research")
    return {fmt: write_research_eventgpt(fixtures_dir / "eventgpt", out / research_dir_name(fmt), fmt)
            for fmt in RESEARCH_FORMATS}


def _keys(ckpt: Path) -> set[str]:
    keys: set[str] = set()
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    for f in ckpt.glob("*.bin"):
        keys |= set(torch.load(f, weights_only=True))
    return keys


def test_research_layout_is_the_authors(research, fixtures_dir):
    n_tower = len(load_file(str(fixtures_dir / "eventgpt" / "clip-vit-tiny" / "model.safetensors")))
    for fmt, ckpt in research.items():
        files = {p.name for p in ckpt.iterdir()}
        assert "tokenizer.model" in files and "tokenizer.json" not in files, fmt
        assert not any((ckpt / f).is_dir() for f in files), fmt  # no CLIP directory
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["architectures"] == ["EventChatModel"] and cfg["transformers_version"] == "4.37.2"
        assert "mm_hidden_size" not in cfg and "clip_config" not in cfg and "rope_theta" in cfg
        tower = {k for k in _keys(ckpt) if k.startswith("model.visual_tower.")}
        assert len(tower) == n_tower and all(k.startswith(AUTHORS_TOWER_PREFIX) for k in tower), fmt
    assert (research["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(research["sharded"].glob("model-*-of-00003.safetensors"))) == 3
    assert (research["bin"] / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("fmt", RESEARCH_FORMATS)
def test_research_layout_loads_to_the_default_fixture(fmt, research, drafter):
    """Same tensors bitwise (tower from the checkpoint, no CLIP directory), same tokenizer, same
    preprocessing, same event features."""
    d = load_eventgpt(str(research[fmt]), FP32)
    assert d.tower.in_checkpoint and d.tower.clip_dir is None
    ref, got = drafter.model.state_dict(), d.model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert type(d.tokenizer).__name__ == "LlamaTokenizer"  # converted from tokenizer.model
    assert d.tokenizer.get_vocab() == drafter.tokenizer.get_vocab()
    assert d.tokenizer.all_special_ids == drafter.tokenizer.all_special_ids
    assert (d.tokenizer.pad_token_id, d.tokenizer.eos_token_id) == (drafter.tokenizer.pad_token_id,
                                                                    drafter.tokenizer.eos_token_id)
    for t in TEXTS:
        assert d.tokenizer(t).input_ids == drafter.tokenizer(t).input_ids, t
        assert d.prompt_ids(t) == drafter.prompt_ids(t), t
    ids = list(range(len(drafter.tokenizer)))
    assert d.decode(ids) == drafter.decode(ids)
    assert d.image_processor.to_dict() == drafter.image_processor.to_dict()
    frames = [torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    assert torch.equal(d.event_features(frames), drafter.event_features(frames))


def test_research_tokenizer_equals_sentencepiece_itself(research):
    """The converted tokenizer.model encodes like SentencePiece (unknown characters -> <unk>, as
    SentencePiece does; transformers' plain conversion would drop them)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from egpt_core.models.vocab import load_tokenizer

    model = research["safetensors"] / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = load_tokenizer(research["safetensors"])
    for t in [*TEXTS, "a\nb"]:
        assert tok(t, add_special_tokens=False).input_ids == sp.encode(t), t
    plain = AutoTokenizer.from_pretrained(str(research["safetensors"]))
    assert plain("a\nb", add_special_tokens=False).input_ids != sp.encode("a\nb")  # why the fix exists


def test_a_conversion_that_disagrees_with_sentencepiece_is_refused(research, drafter, tmp_path):
    from egpt_core.models.vocab import check_sentencepiece_fidelity

    spec = json.loads(drafter.tokenizer.backend_tokenizer.to_str())
    a, b = (next(t for t, i in spec["model"]["vocab"].items() if i == k) for k in (120, 121))
    spec["model"]["vocab"][a], spec["model"]["vocab"][b] = 121, 120
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    wrong = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    check_sentencepiece_fidelity(drafter.tokenizer, research["bin"] / "tokenizer.model")  # the real one agrees
    with pytest.raises(ConfigError, match="disagrees with SentencePiece"):
        check_sentencepiece_fidelity(wrong, research["bin"] / "tokenizer.model", texts=[
            drafter.tokenizer.decode(list(range(100, 140)))])


def test_clip_dir_override(research, fixtures_dir, tmp_path):
    clip = fixtures_dir / "eventgpt" / "clip-vit-tiny"
    d = load_eventgpt(str(research["bin"]), ModelLoadConfig(dtype="float32", device="cpu", clip_path=str(clip)))
    assert d.tower.clip_dir == clip and d.tower.in_checkpoint  # config/preprocessing from it, weights own
    with pytest.raises(ConfigError, match="clip_path"):
        load_eventgpt(str(research["bin"]), FP32, clip_dir=str(fixtures_dir / "nowhere"))
    # project layout whose mm_visual_tower is missing: the override is what makes it load
    proj = tmp_path / "override-proj"
    shutil.copytree(fixtures_dir / "eventgpt", proj, ignore=shutil.ignore_patterns("clip-vit-tiny"))
    with pytest.raises(ConfigError, match="--clip-dir"):
        load_eventgpt(str(proj), FP32)
    assert not load_eventgpt(str(proj), FP32, clip_dir=str(clip)).tower.in_checkpoint


def test_checkpoint_tower_wins_over_the_clip_directory(research, fixtures_dir, tmp_path, drafter):
    """The authors' checkpoint carries its tower; a CLIP directory that mm_visual_tower names supplies
    config and preprocessing only. (Before: the tower keys were dropped and the tower stayed random.)"""
    ckpt = _copy(research["safetensors"], tmp_path / "with-clip")
    clip = _copy(fixtures_dir / "eventgpt" / "clip-vit-tiny", tmp_path / "clip-vit-tiny")
    other = {k: v + 1.0 for k, v in load_file(str(clip / "model.safetensors")).items()}
    save_file(other, str(clip / "model.safetensors"), metadata={"format": "pt"})  # not the checkpoint's
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_visual_tower"] = str(clip)  # what the authors' README tells users to do
    (ckpt / "config.json").write_text(json.dumps(cfg))
    d = load_eventgpt(str(ckpt), FP32)
    assert d.tower.clip_dir == clip and d.tower.in_checkpoint
    ref = drafter.model.model.visual_tower.state_dict()
    got = d.model.model.visual_tower.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refuse_weight_reads(monkeypatch):
    """Strict checks must fire before transformers reads a single weight."""
    from egpt_core.models import eventgpt

    def boom(*a, **k):
        raise AssertionError("from_pretrained reached: the checkpoint was not refused up front")

    monkeypatch.setattr(eventgpt.EventChatLlamaForCausalLM, "from_pretrained", boom)


def test_renamed_tower_key_is_refused_before_loading(research, tmp_path, monkeypatch):
    ckpt = _copy(research["safetensors"], tmp_path / "renamed")
    sd = load_file(str(ckpt / "model.safetensors"))
    old = AUTHORS_TOWER_PREFIX + "encoder.layers.0.self_attn.q_proj.weight"
    sd[old.replace("q_proj", "query_proj")] = sd.pop(old)
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _refuse_weight_reads(monkeypatch)
    with pytest.raises(ConfigError) as exc:
        load_eventgpt(str(ckpt), FP32)
    msg = str(exc.value)
    assert str(ckpt) in msg and "model.visual_tower.encoder.layers.0.self_attn.q_proj.weight" in msg
    assert "query_proj" in msg


@pytest.mark.parametrize("drop", ["model.layers.1.mlp.down_proj.weight", "lm_head.weight",
                                  "model.feature_adaptor.bias",
                                  AUTHORS_TOWER_PREFIX + "encoder.layers.1.mlp.fc2.bias"])
def test_partial_checkpoint_is_refused(drop, research, tmp_path, monkeypatch):
    ckpt = _copy(research["safetensors"], tmp_path / "partial")
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd[drop]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _refuse_weight_reads(monkeypatch)
    with pytest.raises(ConfigError, match="missing") as exc:
        load_eventgpt(str(ckpt), FP32)
    assert drop.replace(AUTHORS_TOWER_PREFIX, "model.visual_tower.") in str(exc.value)


def test_partial_default_layout_is_refused(fixtures_dir, tmp_path):
    """The project's own layout too: a decoder weight missing is never silently random."""
    ckpt = _copy(fixtures_dir / "eventgpt", tmp_path / "p")
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_eventgpt(str(ckpt), FP32)
    clip = _copy(fixtures_dir / "eventgpt", tmp_path / "c") / "clip-vit-tiny"
    sd = load_file(str(clip / "model.safetensors"))
    del sd["post_layernorm.bias"]
    save_file(sd, str(clip / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="post_layernorm.bias"):
        load_eventgpt(str(clip.parent), FP32)


def test_wrong_shape_and_missing_shard_are_refused(research, tmp_path):
    ckpt = _copy(research["sharded"], tmp_path / "shard")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConfigError, match="model-00002-of-00003"):
        load_eventgpt(str(ckpt), FP32)
    ckpt = _copy(research["safetensors"], tmp_path / "shape")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["model.feature_adaptor.bias"] = torch.zeros(3)
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"wrong shape.*feature_adaptor\.bias \[3\]"):
        load_eventgpt(str(ckpt), FP32)


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/egpt-bin-pwned",)


def test_bin_weights_are_read_with_weights_only(research, tmp_path):
    import os

    ckpt = _copy(research["bin"], tmp_path / "evil")
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    sd["payload"] = _Payload()
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="weights_only"):
        load_eventgpt(str(ckpt), FP32)
    assert not os.path.exists("/tmp/egpt-bin-pwned")


def test_unknown_tower_without_clip_dir_is_a_clear_error(research, tmp_path):
    ckpt = _copy(research["safetensors"], tmp_path / "unknown")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_visual_tower"] = "/data/someones/clip-vit-huge"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="--clip-dir"):
        load_eventgpt(str(ckpt), FP32)


def test_known_tower_table_matches_the_real_tower():
    """The built-in config of the real EventGPT tower (openai/clip-vit-large-patch14-336) has the
    authors' 391 tower tensors, position embedding [577, 1024] and 24 layers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from egpt_core.models.loading import KNOWN_TOWERS
    from egpt_core.models.tiny import tiny_clip_config

    with torch.device("meta"):
        m = CLIPVisionModel(CLIPVisionConfig(**KNOWN_TOWERS["clip-vit-large-patch14-336"]))
    sd = m.state_dict()
    assert len(sd) == 391 and tuple(sd["embeddings.position_embedding.weight"].shape) == (577, 1024)
    assert tuple(sd["encoder.layers.23.self_attn.q_proj.weight"].shape) == (1024, 1024)
    tiny = tiny_clip_config().to_dict()
    assert all(tiny[k] == v for k, v in KNOWN_TOWERS["clip-vit-tiny"].items())


def test_videollava_partial_checkpoint_is_refused(fixtures_dir, tmp_path):
    ckpt = _copy(fixtures_dir / "videollava", tmp_path / "vl")
    sd = load_file(str(ckpt / "model.safetensors"))
    victim = next(k for k in sorted(sd) if k.endswith("mlp.up_proj.weight"))
    del sd[victim]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="missing"):
        load_videollava(str(ckpt), FP32)


def test_nf4_on_the_research_layout(research):
    import bitsandbytes as bnb

    d = load_eventgpt(str(research["sharded"]), ModelLoadConfig(dtype="bfloat16", quant="nf4", device="cpu"))
    assert isinstance(d.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    tower = d.model.model.visual_tower.encoder.layers[0].self_attn.q_proj
    assert not isinstance(tower, bnb.nn.Linear4bit)
    ref = load_file(str(research["safetensors"] / "model.safetensors"))[
        AUTHORS_TOWER_PREFIX + "encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(tower.weight, ref.to(torch.bfloat16))  # the checkpoint's tower, not a random one
    ids, rows = d.generate([d.prompt_ids("What is this scene about?")],
                           [d.event_features([torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()])], 4)
    assert len(ids[0]) == 4 and torch.isfinite(rows[0]).all()


def test_cli_fixtures_layout_research(tmp_path, fixtures_dir, capsys):
    from egpt_core.cli import main

    assert main(["fixtures", str(tmp_path), "--scenes", "1", "--questions", "1", "--layout", "research"]) == 0
    for fmt in RESEARCH_FORMATS:
        assert (tmp_path / research_dir_name(fmt) / "tokenizer.model").is_file()
    # the default fixture is byte-identical with or without the research variants
    for rel in ("eventgpt/model.safetensors", "eventgpt/tokenizer.json", "videollava/model.safetensors"):
        assert (tmp_path / rel).read_bytes() == (fixtures_dir / rel).read_bytes(), rel
