"""`egpt extract`: stage 1-2 from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from egpt_core import cliargs
from egpt_core.cliargs import parse_storage_options
from egpt_core.config import ExtractConfig

__all__ = ["add_extract_arguments", "config_from_args", "parse_storage_options", "register"]


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """ExtractConfig from --config (may be partial: flags fill in) and the flags given."""
    flags = {
        "dataset": args.dataset, "questions": args.questions, "drafter": args.drafter, "target": args.target,
        "store": args.store, "mode": args.mode, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "shard_size": args.shard_size, "max_scenes": args.max_scenes, "max_questions": args.max_questions,
        "source_store": args.source_store, "retf_side": args.retf_side, "frame_sampling": args.frame_sampling,
        "lm_head_dtype": args.lm_head_dtype,
        "store_dtype": getattr(args, "store_dtype", None),
    }
    load = {"dtype": args.dtype, "quant": args.quant, "device": args.device, "clip_path": args.clip_dir}
    return cliargs.config_from_args(args, ExtractConfig, flags,
                                    {"load": load, "events": {"n_frames": args.event_frames or None}})


def _cmd_extract(args: argparse.Namespace) -> int:
    from egpt_core.extraction import run_extraction

    summary = run_extraction(config_from_args(args))
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
        return 0
    c = summary.counts
    print(f"store      {summary.store_url}  (fingerprint {summary.store_fingerprint})")
    print(f"mode       {summary.mode}")
    print(f"pairs      {summary.pairs_total} in dataset, {summary.pairs_pending} pending, "
          f"{summary.pairs_processed} processed in {summary.seconds:.1f}s, {summary.shards_committed} shards committed")
    print(f"counts     ok {c.get('ok', 0)}  failed {c.get('failed', 0)}  skipped {c.get('skipped', 0)}")
    for reason, n in sorted(summary.reasons.items()):
        print(f"  {n:5d}  {reason}")
    return 0


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    cliargs.add_config_arguments(p, ExtractConfig)
    p.add_argument("--dataset")
    p.add_argument("--questions", help="questions file (default: the dataset's questions.json)")
    p.add_argument("--drafter", help="EventGPT checkpoint dir")
    p.add_argument("--target", help="Video-LLaVA checkpoint dir")
    p.add_argument("--store", help="store URL")
    p.add_argument("--mode", choices=["shared_prefix", "independent", "retf"])
    p.add_argument("--source-store", help="retf: store whose token ids are re-used")
    p.add_argument("--retf-side", choices=["drafter", "target"])
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--shard-size", type=int)
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--max-questions", type=int)
    p.add_argument("--event-frames", type=int)
    p.add_argument("--frame-sampling", choices=["linspace", "model_card"],
                   help="target video frames: linspace (research default) or the Video-LLaVA model card's arange")
    p.add_argument("--lm-head-dtype", choices=["model", "float32"],
                   help="store the target LM head as loaded (default) or the checkpoint's values in float32")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--store-dtype", choices=["bfloat16", "float16", "float32", "float8_e4m3fn"],
                   help="dtype of the stored rows (default bfloat16; float32 for an exact `egpt speculate` cross-check)")
    p.add_argument("--quant", choices=["none", "nf4"])
    p.add_argument("--device")
    p.add_argument("--clip-dir", help="EventGPT's CLIP vision tower directory (config + preprocessing), "
                                      "overriding config.json's mm_visual_tower")


def register(sub) -> None:
    p = sub.add_parser("extract", help="stage 1-2: extract paired hidden states into a store")
    add_extract_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_extract)
