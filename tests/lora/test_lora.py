"""L6 LoRA: position convention (B3), decoder-only targets (B8), training, merge/export, retf, NF4, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egpt_core.config import EventRenderConfig, ExtractConfig, LoraTrainConfig, ModelLoadConfig
from egpt_core.errors import ConfigError
from egpt_core.extraction import run_extraction
from egpt_core.lora import export_drafter, train_lora
from egpt_core.lora.train import (
    FeatureSource,
    apply_lora,
    check_lora_placement,
    expected_trainable_params,
    load_samples,
    lora_modules,
    loss_and_sums,
    split_by_scene,
    tf_rows,
    trainable_parameters,
)
from egpt_core.models import load_eventgpt
from egpt_core.store import StoreReader
from egpt_core.training.schedule import warmup_cosine_lr as lr_at

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FP32 = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


@pytest.fixture(scope="module")
def store(fixtures_dir, drafter, target, tmp_path_factory) -> str:
    """3 scenes x 2 questions, shared_prefix, float32 models, 8 new tokens."""
    url = str(tmp_path_factory.mktemp("lora_store") / "S")
    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
                        target=str(fixtures_dir / "videollava"), store=url, load=FP32, max_new_tokens=8,
                        max_scenes=3, max_questions=2)
    summary = run_extraction(cfg, models=(drafter, target))
    assert summary.counts["ok"] >= 5, summary
    return url


def _cfg(store: str, fixtures_dir: Path, out: Path, **kw) -> LoraTrainConfig:
    base = dict(store=store, drafter=str(fixtures_dir / "eventgpt"), out=str(out), load=FP32, epochs=3,
                grad_accum=2, lr=5e-3, val_fraction=0.34, early_stopping=10)
    base.update(kw)
    return LoraTrainConfig(**base)


def _features(drafter, reader, fixtures_dir, samples):
    src = FeatureSource(drafter, EventRenderConfig(**reader.meta["events"]), [reader], [str(fixtures_dir / "dataset")],
                        run_url=None, write=False)
    feats = [src.get(s.scene_id) for s in samples]
    assert src.stats == {"cached": len({s.scene_id for s in samples})}  # same key as extraction: all cache hits
    return feats


@pytest.fixture(scope="module")
def fresh_lora(store, fixtures_dir, tmp_path_factory):
    """A freshly initialised LoRA (B = 0) on its own fp32 drafter."""
    d = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
    reader = StoreReader(store)
    samples = load_samples(reader)
    feats = _features(d, reader, fixtures_dir, samples)
    peft_model = apply_lora(d, _cfg(store, fixtures_dir, tmp_path_factory.mktemp("unused")))
    return d, peft_model, reader, samples, feats


def test_fresh_lora_tf_rows_equal_stored_rows_and_research_slice_does_not(fresh_lora):
    """Off-by-one guard (B3): the trainer's TF rows reproduce the extracted drafter rows."""
    d, peft_model, reader, samples, feats = fresh_lora
    peft_model.eval()
    with torch.no_grad():
        batched = tf_rows(d, samples, feats)  # right-padded micro-batch of all pairs
        single = [tf_rows(d, [s], [f])[0] for s, f in zip(samples, feats)]
        for s, f, rb, r1 in zip(samples, feats, batched, single):
            stored = reader.get(s.pair_id).drafter.float()
            scale = stored.abs().max().item()
            assert rb.shape == stored.shape == (s.length, d.hidden_size)
            torch.testing.assert_close(rb.float(), stored, atol=2e-2 * scale, rtol=0)
            torch.testing.assert_close(r1.float(), stored, atol=2e-2 * scale, rtol=0)
            # research L6: the last T positions of prompt + g_0..g_{T-1} (rows that predict g_{t+1})
            emb = d.model.splice_embeddings(s.prompt_ids + s.fed_ids, f)
            wrong = d.model.model(inputs_embeds=emb[None]).last_hidden_state[0, -s.length:]
            assert (wrong - stored).abs().max().item() > 2e-1 * scale


def test_lora_only_on_decoder_qkvo_and_trainable_count(fresh_lora, fixtures_dir):
    d, peft_model, reader, samples, feats = fresh_lora
    names = lora_modules(peft_model)
    cfg = d.model.config
    assert len(names) == cfg.num_hidden_layers * 4
    assert not any("visual_tower" in n for n in names)
    check_lora_placement(peft_model)
    r, layers, h = 16, cfg.num_hidden_layers, cfg.hidden_size
    expected = layers * 4 * r * (h + h)
    assert expected == expected_trainable_params(cfg, r) == 16384
    assert sum(p.numel() for _, p in trainable_parameters(peft_model)) == expected
    # gradients flow into every LoRA parameter through the checkpointed, frozen-embedding forward
    peft_model.train()
    ids = torch.tensor([t for s in samples[:2] for t in s.target_ids])
    tgt = torch.cat([reader.get(s.pair_id).target.float() for s in samples[:2]])
    lcfg = LoraTrainConfig(store="x", drafter="x")
    loss, _ = loss_and_sums(torch.cat(tf_rows(d, samples[:2], feats[:2])), tgt, ids, reader.lm_head().float(), lcfg)
    loss.backward()
    with_grad = [(n, p) for n, p in trainable_parameters(peft_model) if p.grad is not None]
    assert sum(p.numel() for _, p in with_grad) == expected
    assert all(p.grad.abs().sum() > 0 for n, p in with_grad if "lora_B" in n)
    peft_model.zero_grad(set_to_none=True)
    peft_model.eval()

    # the research name match (".*q_proj" etc.) also hits the CLIP tower: rejected, and those get no grads
    from peft import LoraConfig, get_peft_model

    d2 = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
    d2.model.requires_grad_(False)
    bad = get_peft_model(d2.model, LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert any("visual_tower" in n for n in lora_modules(bad))
    with pytest.raises(ConfigError, match="outside the decoder"):
        check_lora_placement(bad)
    clip = d2.model.model.visual_tower.config
    dead = clip.num_hidden_layers * 3 * r * (clip.hidden_size * 2)
    assert sum(p.numel() for _, p in trainable_parameters(bad)) == expected + dead


def test_split_by_scene_is_seeded_and_disjoint(store):
    samples = load_samples(StoreReader(store))
    tr, va = split_by_scene(samples, 0.34, seed=0)
    assert sorted(tr + va) == list(range(len(samples)))
    assert not {samples[i].scene_id for i in tr} & {samples[i].scene_id for i in va}
    assert (tr, va) == split_by_scene(samples, 0.34, seed=0)
    assert math.isclose(lr_at(0, 10, 2, 1.0, 0.0), 0.5) and math.isclose(lr_at(2, 10, 2, 1.0, 0.0), 1.0)
    assert lr_at(9, 10, 2, 1.0, 0.1) < lr_at(5, 10, 2, 1.0, 0.1)


@pytest.fixture(scope="module")
def run_dir(store, fixtures_dir, tmp_path_factory):
    """A short L6 run through the CLI (config file + flags)."""
    from egpt_core.cli import main

    tmp = tmp_path_factory.mktemp("lora_run")
    cfg_file = tmp / "lora.json"
    cfg_file.write_text(json.dumps({"val_fraction": 0.34, "early_stopping": 10, "load": {"device": "cpu"}}))
    out = tmp / "run"
    rc = main(["train-lora", "--store", store, "--drafter", str(fixtures_dir / "eventgpt"), "--out", str(out),
               "--quant", "none", "--dtype", "float32", "--epochs", "3", "--lr", "5e-3", "--grad-accum", "2",
               "--config", str(cfg_file)])
    assert rc == 0
    return out


def test_short_run_lowers_val_loss_and_writes_outputs(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_val_loss"] < 0.5 * metrics["initial_val"]["loss"]
    assert metrics["trainable_params"] == 16384 == metrics["declared_trainable_params"]
    assert metrics["lora_modules"] == 8 and metrics["val_scenes"] == 1 and metrics["train_scenes"] == 2
    hist = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for key in ("train_loss", "train_mse", "train_cos_loss", "train_ce", "train_cos_sim", "val_loss", "val_mse",
                "val_ce", "val_cos_sim", "val_accept_80", "val_accept_85", "val_accept_90", "val_accept_95",
                "val_token_match", "lr"):
        assert all(math.isfinite(h[key]) for h in hist), key
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["load"] == {"dtype": "float32", "quant": "none", "device": "cpu", "clip_path": None} and cfg["lr"] == 5e-3
    for sub in ("adapter", "best"):
        files = {p.name for p in (run_dir / sub).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "egpt_lora.json"} <= files
        acfg = json.loads((run_dir / sub / "adapter_config.json").read_text())
        assert "model\\.layers" in str(acfg["target_modules"])
    assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]  # no pickles


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory) -> Path:
    from egpt_core.cli import main

    out = tmp_path_factory.mktemp("merged") / "eventgpt-l6"
    assert main(["export-drafter", "--lora", str(run_dir / "adapter"), "--out", str(out)]) == 0
    return out


def test_merge_reload_equals_unmerged_peft(merged, run_dir, store, fixtures_dir, tmp_path):
    from peft import PeftModel

    raw = json.loads((merged / "config.json").read_text())
    assert raw["model_type"] == "EventChat_llama" and (merged / raw["mm_visual_tower"] / "config.json").is_file()
    keys = set(load_file(str(merged / "model.safetensors")))
    assert not any(k.startswith("model.visual_tower.") for k in keys) and not any("lora" in k for k in keys)
    m = load_eventgpt(str(merged), FP32)
    base = load_eventgpt(str(fixtures_dir / "eventgpt"), FP32)
    PeftModel.from_pretrained(base.model, str(run_dir / "adapter")).eval()  # injects the LoRA into base.model
    reader = StoreReader(store)
    samples = load_samples(reader)[:3]
    feats = _features(m, reader, fixtures_dir, samples)  # vision path untouched: same feature keys
    with torch.no_grad():
        a = tf_rows(m, samples, feats)
        b = tf_rows(base, samples, feats)
    for x, y, s in zip(a, b, samples):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert (x - reader.get(s.pair_id).drafter.float()).abs().max() > 1e-2  # the LoRA did change the rows
    # exporting a run directory picks its best/ adapter; the base defaults to the recorded drafter
    out2 = export_drafter(str(run_dir), str(tmp_path / "from-run-dir"))
    assert json.loads((Path(out2) / "egpt_export.json").read_text())["base"] == str(fixtures_dir / "eventgpt")


def test_retf_with_merged_drafter_changes_only_drafter_rows(merged, store, fixtures_dir, tmp_path):
    cfg = ExtractConfig(dataset=str(fixtures_dir / "dataset"), drafter=str(merged), target=str(fixtures_dir / "videollava"),
                        store=str(tmp_path / "S2"), source_store=store, mode="retf", load=FP32, max_new_tokens=8,
                        max_scenes=3, max_questions=2)
    run_extraction(cfg)
    src, new = StoreReader(store), StoreReader(str(tmp_path / "S2"))
    assert sorted(src.pair_ids()) == sorted(new.pair_ids())
    for pid in src.pair_ids():
        a, b = src.get(pid), new.get(pid)
        assert torch.equal(a.target, b.target)
        assert a.target_response_ids == b.target_response_ids and a.drafter_response_ids == b.drafter_response_ids
        assert (a.drafter.float() - b.drafter.float()).abs().max() > 1e-2
    # the LM head is carried over (retf re-stores it in the store dtype, so compare at bf16 precision)
    torch.testing.assert_close(new.lm_head().float(), src.lm_head().float(), atol=1e-2, rtol=1e-2)


def test_nf4_path_trains_on_cpu(store, fixtures_dir, tmp_path):
    import bitsandbytes as bnb

    cfg = _cfg(store, fixtures_dir, tmp_path / "nf4", load=ModelLoadConfig(dtype="bfloat16", quant="nf4", device="cpu"),
               epochs=1)
    res = train_lora(cfg)
    hist = res.metrics["final"]
    assert math.isfinite(hist["train_loss"]) and math.isfinite(hist["val_loss"])
    assert res.trainable_params == 16384
    w = load_file(str(tmp_path / "nf4" / "adapter" / "adapter_model.safetensors"))
    b_weights = [v for k, v in w.items() if "lora_B" in k]
    assert len(b_weights) == 8 and all(v.abs().max() > 0 for v in b_weights)  # B started at zero
    d = load_eventgpt(str(fixtures_dir / "eventgpt"), ModelLoadConfig(dtype="bfloat16", quant="nf4", device="cpu"))
    assert isinstance(d.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_crash_and_resume_equals_uninterrupted(run_dir, tmp_path):
    cfg = LoraTrainConfig.model_validate({**json.loads((run_dir / "config.json").read_text()), "out": str(tmp_path / "r")})
    seen = []

    def crash(frac, msg):
        seen.append(msg)
        if msg.startswith("epoch 3/3 step"):
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(cfg, progress=crash)
    assert not (tmp_path / "r" / "adapter").exists()
    res = train_lora(cfg)
    assert res.resumed_from_epoch == 2 and res.epochs_run == 3
    ref = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert json.loads((run_dir / "history.json").read_text())[-1]["val_loss"] == res.metrics["final"]["val_loss"]
    # a checkpoint of a different config is not silently continued
    with pytest.raises(ConfigError, match="different configuration"):
        train_lora(cfg.model_copy(update={"lr": 1e-3}))


_DDP_SCRIPT = """
import json, sys
from egpt_core.config import LoraTrainConfig
from egpt_core.lora import train_lora
train_lora(LoraTrainConfig.model_validate(json.load(open(sys.argv[1]))), resume=False)
"""


def test_torchrun_two_ranks_gloo_matches_single_process(store, fixtures_dir, tmp_path):
    """torchrun (2 CPU ranks, gloo): gradients summed across ranks -> the same weights as one process."""
    import os
    import subprocess
    import sys

    single = _cfg(store, fixtures_dir, tmp_path / "single", epochs=1, dropout=0.0)
    train_lora(single)
    ddp = single.model_copy(update={"out": str(tmp_path / "ddp")})
    (tmp_path / "cfg.json").write_text(ddp.model_dump_json())
    (tmp_path / "run.py").write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "run.py"), str(tmp_path / "cfg.json")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
