"""One vocabulary check for every mode that pairs the two models (issue 13.8: retf and train-lora used
to accept a drafter whose ids 100/101 were swapped), and the target vocabulary / LM head in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from egpt_core.config import LoraTrainConfig, ModelLoadConfig
from egpt_core.errors import ConfigError, StoreError
from egpt_core.extraction import run_extraction
from egpt_core.models import load_eventgpt
from egpt_core.models.vocab import check_vocab_compat, vocab_tokens
from egpt_core.store import StoreReader

FP32 = ModelLoadConfig(dtype="float32", device="cpu")
SWAPPED = r"ids? 100.*ids? 101|id 100: .* vs .*id 101"


@pytest.fixture(scope="module")
def swapped_dir(fixtures_dir, tmp_path_factory) -> Path:
    """The tiny EventGPT whose tokenizer maps ids 100 and 101 to each other's tokens (weights unchanged)."""
    out = tmp_path_factory.mktemp("swapped") / "eventgpt"
    shutil.copytree(fixtures_dir / "eventgpt", out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == k) for k in (100, 101))
    vocab[a], vocab[b] = 101, 100
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="module")
def swapped(swapped_dir):
    return load_eventgpt(str(swapped_dir), FP32)


@pytest.fixture(scope="module")
def source_store(extract_cfg, drafter, target, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("vocab") / "src")
    s = run_extraction(extract_cfg(url, max_scenes=2, max_questions=2, max_new_tokens=6), models=(drafter, target))
    assert s.counts["ok"] >= 2
    return url


def test_swapped_fixture_really_differs_only_there(swapped, drafter):
    d, t = vocab_tokens(swapped.tokenizer), vocab_tokens(drafter.tokenizer)
    assert [i for i in range(len(t)) if d[i] != t[i]] == [100, 101]


@pytest.mark.parametrize("mode", ["shared_prefix", "independent"])
def test_paired_modes_refuse_swapped_ids(mode, extract_cfg, swapped, swapped_dir, target, tmp_path):
    cfg = extract_cfg(str(tmp_path / mode), mode=mode, drafter=str(swapped_dir), max_scenes=1)
    with pytest.raises(ConfigError, match=SWAPPED):
        run_extraction(cfg, models=(swapped, target))  # the models handed in are checked too
    assert not (tmp_path / mode).exists()  # refused before any store or model work


def test_retf_refuses_swapped_drafter(extract_cfg, source_store, swapped, swapped_dir, tmp_path):
    cfg = extract_cfg(str(tmp_path / "retf"), mode="retf", source_store=source_store, drafter=str(swapped_dir))
    with pytest.raises(ConfigError, match=SWAPPED) as exc:
        run_extraction(cfg, models=(swapped, None))
    assert source_store in str(exc.value)  # compared with the vocabulary the source store records
    with pytest.raises(ConfigError, match=SWAPPED):  # and through the loading path
        run_extraction(cfg)
    assert not (tmp_path / "retf").exists()


def test_retf_without_a_recorded_vocabulary_checks_the_target_checkpoint(extract_cfg, source_store, swapped,
                                                                         swapped_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(StoreReader, "target_vocab", lambda self: None)  # a store written before vocabularies
    cfg = extract_cfg(str(tmp_path / "retf"), mode="retf", source_store=source_store, drafter=str(swapped_dir))
    with pytest.raises(ConfigError, match=SWAPPED) as exc:
        run_extraction(cfg, models=(swapped, None))
    assert "videollava" in str(exc.value)


def test_retf_with_the_right_drafter_passes_and_keeps_the_vocabulary(extract_cfg, source_store, drafter,
                                                                     target, tmp_path):
    url = str(tmp_path / "ok")
    run_extraction(extract_cfg(url, mode="retf", source_store=source_store), models=(drafter, None))
    assert StoreReader(url).target_vocab() == vocab_tokens(target.tokenizer)


def test_train_lora_refuses_swapped_drafter(source_store, swapped_dir, tmp_path):
    from egpt_core.lora import train_lora

    cfg = LoraTrainConfig(store=source_store, drafter=str(swapped_dir), out=str(tmp_path / "l6"), load=FP32,
                          epochs=1, val_fraction=0.5)
    with pytest.raises(ConfigError, match=SWAPPED) as exc:
        train_lora(cfg)
    assert "store" in str(exc.value)
    assert not (tmp_path / "l6" / "checkpoint").exists()


def test_train_lora_on_a_store_without_any_vocabulary_is_refused(source_store, fixtures_dir, tmp_path, monkeypatch):
    from egpt_core.lora import train_lora
    from egpt_core.models import loading

    real = loading.local_checkpoint

    def elsewhere(url, storage_options=None):  # the store's target lives on another machine
        if "videollava" in str(url):
            raise ConfigError(f"checkpoint directory {url} does not exist")
        return real(url, storage_options)

    monkeypatch.setattr(StoreReader, "target_vocab", lambda self: None)
    monkeypatch.setattr(loading, "local_checkpoint", elsewhere)
    cfg = LoraTrainConfig(store=source_store, drafter=str(fixtures_dir / "eventgpt"), out=str(tmp_path / "l6"),
                          load=FP32, epochs=1, val_fraction=0.5)
    with pytest.raises(ConfigError, match="records no target vocabulary"):
        train_lora(cfg)


def test_store_records_the_target_vocabulary_checked_on_read(source_store, target, tmp_path):
    r = StoreReader(source_store)
    assert r.target_vocab() == vocab_tokens(target.tokenizer)
    info = r.manifest["lm_head"]["vocab"]
    assert info["size"] == len(target.tokenizer) == r.lm_head().shape[0]
    assert r.verify()["problems"] == []
    copy = tmp_path / "tampered"
    shutil.copytree(source_store, copy)
    path = copy / info["path"]
    tokens = json.loads(path.read_text())
    tokens[100], tokens[101] = tokens[101], tokens[100]
    path.write_text(json.dumps(tokens))
    with pytest.raises(StoreError, match="sha256"):
        StoreReader(str(copy)).target_vocab()
    assert any("target_vocab.json" in p for p in StoreReader(str(copy)).verify(raise_on_error=False)["problems"])


def test_check_vocab_compat_allows_appended_target_tokens():
    """Vicuna 32000 vs Video-LLaVA 32064: only the shared ids are compared."""
    base = [f"t{i}" for i in range(50)]
    assert check_vocab_compat(base, base + ["<image>", "<video>", "<pad>"]) == 50
    with pytest.raises(ConfigError, match="id 7: 'x' vs 't7'"):
        check_vocab_compat(base[:7] + ["x"] + base[8:], base + ["<image>"])


def test_lm_head_float32_is_the_checkpoints_own_values(fixtures_dir):
    """lm_head_dtype='float32' stores the checkpoint's head exactly, not the bf16-loaded copy."""
    from safetensors.torch import load_file

    from egpt_core.config import ExtractConfig
    from egpt_core.extraction.run import target_lm_head
    from egpt_core.models import load_videollava

    ckpt = fixtures_dir / "videollava"
    t = load_videollava(str(ckpt), ModelLoadConfig(dtype="bfloat16", device="cpu"))
    base = dict(dataset="d", drafter="e", target=str(ckpt), store="s")
    sd = load_file(str(ckpt / "model.safetensors"))
    raw = sd.get("lm_head.weight", sd.get("language_model.lm_head.weight"))
    head, dtype = target_lm_head(ExtractConfig(**base, lm_head_dtype="float32"), t)
    assert dtype == "float32" and torch.equal(head, raw.float())
    head, dtype = target_lm_head(ExtractConfig(**base), t)
    assert dtype == "bfloat16" and torch.equal(head, raw.to(torch.bfloat16).float())
    assert not torch.equal(raw.to(torch.bfloat16).float(), raw.float())  # bf16 rounding is not a no-op here
