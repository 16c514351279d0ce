"""Absolute figures at a named model shape: `python -m benchmarks --device cuda --shape 7b`.

Builds EventGPT and Video-LLaVA at ``shape`` (`benchmarks.model_shapes`; ``7b`` = the real
configurations) with random weights directly on ``device`` (bf16 on CUDA, fp32 on CPU) and measures,
through the project's own code paths:

- ``extraction``: `run_extraction` in ``shared_prefix`` mode (8 video frames, exactly 50 new tokens
  per pair: EOS is held back with ``min_new_tokens`` since random weights would stop anywhere) at
  batch 1 and batch 16, pairs/s per run call after a warm-up call on the same store; the share of the
  batch-16 run spent outside model forwards; and TF vs AR for the target (rows of 16 pairs x 50
  tokens by one teacher-forced forward vs AR generate).
- ``adapter``: `train_adapter` (L4, research sizes) on a synthetic store of the model's hidden size;
  train pairs/s of the last epoch (its seconds include validating ~5 % of the pairs).
- ``lora``: the EventGPT built for extraction is written as a checkpoint and `train_lora` loads it
  through `load_eventgpt` in 4-bit NF4 (bitsandbytes) and trains L6 for one epoch on the extraction
  store; seconds per optimizer step (micro-batch 1 x grad_accum 4 at 7b) from the trainer's own progress
  callbacks, first step excluded. Needs ``extraction`` in the same run.
- ``nf4``: the tiny fixtures loaded in NF4 and in bf16 on ``device``: NF4 placement (decoder only) and
  agreement of their teacher-forced rows.

Without ``--shape`` this group runs only when ``--device`` is CUDA (then at ``7b``): tiny-model CPU
figures would say nothing about real sizes. ``python -m benchmarks.bench_shapes --shape tiny`` runs
the same code on CPU in about a minute (the test suite does exactly that).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import best_time

PARTS = ("extraction", "adapter", "lora", "nf4")
NEW_TOKENS = 50
VIDEO_FRAMES = 8
#: research extraction: ~24 h for 52K pairs, both models 4-bit, RTX 4090 (reference §5.13)
RESEARCH_S_PER_PAIR = 1.66

#: pairs per extraction call (scenes x questions) and adapter/L6 sizes per shape
SIZES = {
    "7b": dict(questions=4, warm_scenes=1, b1_scenes=2, b16_scenes=12, adapter_scenes=64, adapter_per_scene=16,
               adapter_epochs=3, grad_accum=4),
    "small": dict(questions=4, warm_scenes=1, b1_scenes=1, b16_scenes=4, adapter_scenes=16, adapter_per_scene=16,
                  adapter_epochs=2, grad_accum=4),
    "tiny": dict(questions=2, warm_scenes=1, b1_scenes=1, b16_scenes=4, adapter_scenes=8, adapter_per_scene=8,
                 adapter_epochs=2, grad_accum=2),
}


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fixed_length_generation(target, drafter_vocab: int) -> None:
    """Random weights: every pair generates exactly NEW_TOKENS tokens the drafter can embed."""
    gcfg = target.model.generation_config
    gcfg.min_new_tokens = NEW_TOKENS
    vocab = target.model.get_output_embeddings().weight.shape[0]
    if vocab > drafter_vocab:  # Video-LLaVA's extra ids (<image>, <video>, <pad>...) never come out of a real model
        gcfg.suppress_tokens = list(range(drafter_vocab, vocab))


# --------------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------------
def _extraction(shape, device: torch.device, root: Path, sizes: dict, want_checkpoint: bool) -> tuple[dict, dict]:
    """Build both models on ``device``, measure extraction, optionally write the drafter as a checkpoint."""
    from benchmarks.model_shapes import (
        build_eventgpt,
        build_videollava,
        save_eventgpt_checkpoint,
        shape_tokenizer,
    )
    from egpt_core.data import write_synthetic_dataset

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_scenes = sizes["warm_scenes"] + sizes["b1_scenes"] + sizes["b16_scenes"]
    dataset = write_synthetic_dataset(root / "dataset", scenes=n_scenes, questions=sizes["questions"], seed=0)
    tok = shape_tokenizer()
    t0 = time.perf_counter()
    drafter = build_eventgpt(shape, tok, device=str(device), dtype=dtype)
    target = build_videollava(shape, tok, device=str(device), dtype=dtype)
    build_s = time.perf_counter() - t0
    try:
        out = _measure_extraction(shape, device, root, sizes, drafter, target, str(dataset))
        out[f"{shape.name}_extract_b16_pairs_per_s"]["build_s"] = round(build_s, 1)
        handles = {"store": str(root / "store"), "dataset": str(dataset)}
        if want_checkpoint:
            handles["drafter_ckpt"] = str(save_eventgpt_checkpoint(drafter, root / "eventgpt"))
    finally:
        del drafter, target
        _free()
    return out, handles


def _measure_extraction(shape, device: torch.device, root: Path, sizes: dict, drafter, target, dataset: str) -> dict:
    from benchmarks.forward_timer import ForwardTimer
    from benchmarks.model_shapes import parameter_count
    from egpt_core.config import ExtractConfig, ModelLoadConfig
    from egpt_core.data import read_video_frames
    from egpt_core.extraction.run import plan_pairs, run_extraction
    from egpt_core.store import StoreReader

    dtype = next(target.model.parameters()).dtype
    _fixed_length_generation(target, drafter.model.get_input_embeddings().num_embeddings)
    store = str(root / "store")
    load = ModelLoadConfig(dtype="bfloat16" if dtype == torch.bfloat16 else "float32", device=str(device))
    base = dict(dataset=dataset, drafter=drafter.path, target=target.path, store=store, load=load,
                max_new_tokens=NEW_TOKENS, n_video_frames=VIDEO_FRAMES, shard_size=64)
    pairs = plan_pairs(ExtractConfig(**base))
    scenes = list(dict.fromkeys(p.scene.scene_id for p in pairs))
    cut1, cut2 = sizes["warm_scenes"], sizes["warm_scenes"] + sizes["b1_scenes"]
    groups = {"warm": set(scenes[:cut1]), "b1": set(scenes[cut1:cut2]), "b16": set(scenes[cut2:])}
    chosen = {k: {p.pair_id for p in pairs if p.scene.scene_id in v} for k, v in groups.items()}

    def extract(which: str, batch: int, timer: ForwardTimer | None = None):
        cfg = ExtractConfig(**base, batch_size=batch)
        if timer is None:
            return run_extraction(cfg, only_pairs=chosen[which], models=(drafter, target))
        with timer:
            return run_extraction(cfg, only_pairs=chosen[which], models=(drafter, target))

    extract("warm", 4)  # allocator, kernels, LM head written once
    s1 = extract("b1", 1)
    timer = ForwardTimer(None, sync=_sync(device))  # every module (HF encodes video before the first forward)
    s16 = extract("b16", 16, timer)
    reader = StoreReader(store)
    lengths = reader.pairs(status="ok", columns=["length"]).column("length").to_pylist()
    n_ok = reader.counts.get("ok", 0)
    if n_ok != sum(len(v) for v in chosen.values()) or set(lengths) != {NEW_TOKENS}:
        raise AssertionError(f"extraction stored {n_ok} ok pairs with lengths {sorted(set(lengths))}; expected "
                             f"every pair ok with {NEW_TOKENS} rows (counts {reader.counts}, {reader.manifest.get('reasons')})")

    # TF vs AR on the target: rows of 16 pairs x 50 tokens
    by_id = {p.pair_id: p for p in pairs}
    sample = [by_id[i] for i in sorted(chosen["b16"])][:16]
    prepared = [target.prepare(p.question, read_video_frames(p.scene.video_path, VIDEO_FRAMES)) for p in sample]
    prompts, videos = [x[0] for x in prepared], [x[1] for x in prepared]
    ids, _ = target.generate(prompts, videos, NEW_TOKENS)
    t_ar = best_time(lambda: target.generate(prompts, videos, NEW_TOKENS), repeats=2)
    t_tf = best_time(lambda: target.teacher_forced(prompts, ids, videos), repeats=2)

    n1, n16 = s1.pairs_processed, s16.pairs_processed
    pps1, pps16 = n1 / s1.seconds, n16 / s16.seconds
    outside = max(0.0, 1.0 - timer.seconds / s16.seconds)
    name = shape.name
    info = {"drafter_params": parameter_count(drafter.model), "target_params": parameter_count(target.model),
            "target_prompt_tokens": len(prompts[0]),
            "drafter_prompt_tokens": drafter.model.expanded_len(drafter.prompt_ids(sample[0].question),
                                                                _event_tokens(shape)),
            "dtype": str(dtype).removeprefix("torch."), "device": _device_name(device)}
    where = f"{name} random weights, {info['device']}, {info['dtype']}"
    out = {
        f"{name}_extract_b16_pairs_per_s": {
            "ratio": round(pps16, 3), "goal": ">= 10" if name == "7b" and device.type == "cuda" else None,
            "unit": f"pairs/s, shared_prefix, batch 16, {VIDEO_FRAMES} video frames, {NEW_TOKENS} new tokens ({where})",
            "pairs": n16, "call_s": round(s16.seconds, 2), "s_per_pair": round(1 / pps16, 4),
            "vs_research_s_per_pair": RESEARCH_S_PER_PAIR, **info,
        },
        f"{name}_extract_b1_pairs_per_s": {
            "ratio": round(pps1, 3), "goal": None,
            "unit": f"pairs/s, shared_prefix, batch 1 ({where}); research anchor {1 / RESEARCH_S_PER_PAIR:.2f} pairs/s",
            "pairs": n1, "call_s": round(s1.seconds, 2), "s_per_pair": round(1 / pps1, 4),
        },
        f"{name}_extract_b16_vs_b1": {
            "ratio": round(pps16 / pps1, 2), "goal": None, "unit": "x pairs/s, batch 16 vs batch 1 (same run)",
        },
        f"{name}_extract_outside_forward_fraction": {
            "ratio": round(outside, 4), "goal": "<= 0.1" if name == "7b" else None,
            "unit": "share of the batch-16 extraction call's wall time outside model forwards (hooks, synced)",
            "forward_s": round(timer.seconds, 2), "forward_calls": timer.calls,
        },
        f"{name}_target_tf_vs_ar": {
            "ratio": round(t_ar / t_tf, 2), "goal": None,
            "unit": f"x: target rows of 16 pairs x {NEW_TOKENS} tokens, one TF forward ({t_tf * 1e3:.0f} ms) vs AR "
                    f"generate ({t_ar * 1e3:.0f} ms)",
        },
    }
    return out


def _event_tokens(shape) -> int:
    """Pooled event features per scene at one event frame: 1 temporal + S spatial tokens."""
    clip = shape.event_clip
    return 1 + (clip["image_size"] // clip["patch_size"]) ** 2 + 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# --------------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------------
def _adapter(shape, device: torch.device, root: Path, sizes: dict) -> dict:
    from egpt_core.adapters import train_adapter
    from egpt_core.adapters.synthetic import write_synthetic_pair_store
    from egpt_core.config import AdapterConfig, TrainAdapterConfig

    d = shape.decoder["hidden_size"]
    url = str(root / "adapter-store")
    t0 = time.perf_counter()
    info = write_synthetic_pair_store(url, hidden_size=d, n_scenes=sizes["adapter_scenes"],
                                      pairs_per_scene=sizes["adapter_per_scene"], min_len=11, max_len=50,
                                      dtype="bfloat16", shard_size=256)
    write_s = time.perf_counter() - t0
    cfg = TrainAdapterConfig(adapter=AdapterConfig(level="L4"), train=[url], out=str(root / "adapter-run"),
                             epochs=sizes["adapter_epochs"], batch_size=64, val_fraction=0.05, early_stopping=100,
                             device=str(device))
    res = train_adapter(cfg)
    hist = json.loads((root / "adapter-run" / "history.json").read_text())
    secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
    pps = res.n_train_pairs / statistics.median(secs)
    return {
        f"{shape.name}_adapter_L4_train_pairs_per_s": {
            "ratio": round(pps, 1), "goal": None,
            "unit": f"train pairs/s, L4 adapter at D={d} ({res.param_count / 1e6:.2f} M params), batch 64, "
                    f"{_device_name(device)} (epoch seconds include validating {res.n_val_pairs} pairs)",
            "n_train": res.n_train_pairs, "n_val": res.n_val_pairs, "epoch_seconds": secs,
            "rows": info["rows"], "store_write_s": round(write_s, 1),
        }
    }


# --------------------------------------------------------------------------------------------------
# L6 (NF4)
# --------------------------------------------------------------------------------------------------
def _lora(shape, device: torch.device, root: Path, handles: dict, sizes: dict) -> dict:
    from egpt_core.config import LoraTrainConfig, ModelLoadConfig
    from egpt_core.lora import train_lora

    grad_accum = sizes["grad_accum"]
    cfg = LoraTrainConfig(store=handles["store"], drafter=handles["drafter_ckpt"], dataset=handles["dataset"],
                          out=str(root / "lora-run"), load=ModelLoadConfig(dtype="bfloat16", quant="nf4",
                                                                           device=str(device)),
                          epochs=1, micro_batch=1, grad_accum=grad_accum, early_stopping=100)
    stamps: list[float] = []

    def progress(frac: float, msg: str) -> None:
        if " step " in msg:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the extraction's two bf16 models are gone
    t0 = time.perf_counter()
    res = train_lora(cfg, progress=progress)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not steps:
        raise AssertionError(f"L6 ran {len(stamps)} optimizer step(s); need at least 2 to time one")
    step_s = statistics.median(steps)
    if not all(math.isfinite(res.metrics["final"][k]) for k in ("train_loss", "val_loss")):
        raise AssertionError(f"L6 losses are not finite: {res.metrics['final']}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    _free()
    return {
        f"{shape.name}_lora_nf4_step_s": {
            "ratio": round(step_s, 4), "goal": None,
            "unit": f"s per optimizer step (micro-batch 1 x grad_accum {grad_accum}, rank 16, gradient checkpointing), "
                    f"EventGPT {shape.name} in NF4, {_device_name(device)}",
            "s_per_pair": round(step_s / grad_accum, 4), "steps_timed": len(steps),
            "n_train": res.n_train_pairs, "trainable_params": res.trainable_params,
            "run_seconds": round(total, 1), "peak_gpu_gib": None if peak is None else round(peak, 2),
        }
    }


# --------------------------------------------------------------------------------------------------
# NF4 load + forward (tiny fixtures, the loaders' own path)
# --------------------------------------------------------------------------------------------------
def _nf4(device: torch.device, root: Path) -> dict:
    import bitsandbytes as bnb
    import numpy as np

    from egpt_core.config import ModelLoadConfig
    from egpt_core.models import load_eventgpt
    from egpt_core.models.commands import write_fixtures

    paths = write_fixtures(root / "fixtures", scenes=1, questions=1)
    rows = {}
    for quant in ("none", "nf4"):
        d = load_eventgpt(str(paths["eventgpt"]), ModelLoadConfig(dtype="bfloat16", quant=quant, device=str(device)))
        if quant == "nf4":
            if not isinstance(d.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit):
                raise AssertionError("NF4 load left the decoder's q_proj unquantised")
            if isinstance(d.model.model.visual_projector[0], bnb.nn.Linear4bit):
                raise AssertionError("NF4 load quantised the vision projector (must stay full precision)")
        frames = [np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)]
        prompt = d.prompt_ids("What is this scene about?")
        feats = d.event_features(frames)
        ids = list(range(10, 30))
        rows[quant] = d.teacher_forced([prompt], [ids], [feats])[0]
        del d
        _free()
    cos = torch.nn.functional.cosine_similarity(rows["none"], rows["nf4"], dim=-1)
    if not torch.isfinite(rows["nf4"]).all():
        raise AssertionError("NF4 rows are not finite")
    return {
        "nf4_tiny_rows_cos_vs_bf16": {
            "ratio": round(float(cos.mean()), 4), "goal": None,
            "unit": f"mean cosine of teacher-forced rows, tiny EventGPT loaded in NF4 vs bf16 ({_device_name(device)})",
            "min_cos": round(float(cos.min()), 4),
        }
    }


# --------------------------------------------------------------------------------------------------
def run(device: str = "cpu", shape: str | None = None, parts: tuple[str, ...] | list[str] | None = None) -> dict:
    """The shape benchmarks on ``device``; see the module docstring. Returns {} on CPU without a shape."""
    from benchmarks.model_shapes import get_shape

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} but CUDA is not available")
    if shape is None:
        if dev.type != "cuda":
            print("... bench_shapes skipped: pass --shape tiny|small|7b (or --device cuda)", file=sys.stderr)
            return {}
        shape = "7b"
    spec = get_shape(shape)
    parts = tuple(parts or PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if "lora" in parts and "extraction" not in parts:
        raise ValueError("the lora part trains on the extraction part's store: add 'extraction'")
    sizes = SIZES[shape]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix=f"egpt-bench-{shape}-") as tmp:
        root = Path(tmp)
        handles: dict = {}
        if "extraction" in parts:
            out, handles = _extraction(spec, dev, root, sizes, want_checkpoint="lora" in parts)
            results.update(out)
        if "adapter" in parts:
            results.update(_adapter(spec, dev, root, sizes))
        if "lora" in parts:
            results.update(_lora(spec, dev, root, handles, sizes))
        if "nf4" in parts:
            results.update(_nf4(dev, root))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=["tiny", "small", "7b"])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.device, args.shape, [p for p in args.parts.split(",") if p]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
