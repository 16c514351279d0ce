"""`egpt train-lora` and `egpt export-drafter`."""

from __future__ import annotations

import argparse
import json

from egpt_core import cliargs
from egpt_core.config import LoraTrainConfig


def build_config(args: argparse.Namespace):
    """LoraTrainConfig from --config FILE (optional) overridden by the flags given."""
    from egpt_core.config import LoraTrainConfig

    flags = {"store": args.store, "drafter": args.drafter, "out": args.out, "val_store": args.val_store,
             "dataset": args.dataset, "epochs": args.epochs, "rank": args.rank, "alpha": args.alpha, "lr": args.lr,
             "grad_accum": args.grad_accum, "micro_batch": args.micro_batch, "seed": args.seed}
    load = {"quant": args.quant, "dtype": args.dtype, "device": args.device, "clip_path": args.clip_dir}
    return cliargs.config_from_args(args, LoraTrainConfig, flags, {"load": load})


def _cmd_train(args: argparse.Namespace) -> int:
    from egpt_core.lora.train import train_lora

    cfg = build_config(args)
    res = train_lora(cfg, resume=not args.no_resume)
    best = res.metrics.get("best") or {}
    print(f"run          {res.out}")
    if res.resumed_from_epoch is not None:
        print(f"resumed      after epoch {res.resumed_from_epoch}")
    print(f"pairs        train {res.n_train_pairs}  val {res.n_val_pairs}")
    print(f"trainable    {res.trainable_params:,} params receive gradients "
          f"({res.lora_modules} LoRA modules, decoder q/k/v/o only; declared {res.declared_trainable_params:,})")
    print(f"epochs       {res.epochs_run}{' (early stop)' if res.stopped_early else ''}; best epoch {res.best_epoch}")
    print(f"val loss     {res.initial_val_loss:.4f} (untrained) -> {res.best_val_loss:.4f} (best)")
    if best:
        print(f"val cos      {best.get('val_cos_sim', float('nan')):.4f}   accept@0.90 "
              f"{best.get('val_accept_90', float('nan')):.4f}   token match {best.get('val_token_match', float('nan')):.4f}")
    print(f"adapter      {res.adapter_dir}  (best: {res.best_dir})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from egpt_core.lora.merge import export_drafter

    out = export_drafter(args.lora, args.out, base=args.base, dtype=args.dtype, clip_path=args.clip_dir,
                         overwrite=args.overwrite,
                         storage_options=cliargs.parse_storage_options(args.storage_option))
    print(json.dumps({"merged_drafter": out, "lora": args.lora, "base": args.base}, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-lora", help="L6: train a LoRA on the drafter's decoder against a store's target rows")
    p.add_argument("--store", help="store URL (token ids, target rows, target LM head)")
    p.add_argument("--drafter", help="EventGPT checkpoint directory")
    p.add_argument("--out", help="run directory")
    p.add_argument("--val-store", dest="val_store", help="validation store (default: seeded split by scene)")
    p.add_argument("--dataset", help="dataset root (when event features are not cached)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--quant", choices=["nf4", "none"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device")
    p.add_argument("--clip-dir", dest="clip_dir", help="EventGPT's CLIP tower directory (overrides mm_visual_tower)")
    p.add_argument("--rank", type=int, help="LoRA rank r")
    p.add_argument("--alpha", type=int, help="LoRA alpha")
    p.add_argument("--lr", type=float)
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--micro-batch", dest="micro_batch", type=int)
    p.add_argument("--seed", type=int)
    cliargs.add_config_arguments(p, LoraTrainConfig)
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.set_defaults(func=_cmd_train)

    e = sub.add_parser("export-drafter", help="merge an L6 LoRA into the drafter -> EventGPT checkpoint dir")
    e.add_argument("--lora", required=True, help="peft adapter dir (or an L6 run dir: its best/)")
    e.add_argument("--out", required=True, help="output checkpoint directory")
    e.add_argument("--base", help="base drafter (default: the one the LoRA was trained on)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the base checkpoint's")
    e.add_argument("--clip-dir", dest="clip_dir", help="the base's CLIP tower directory (default: training's)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of another LoRA/base in --out (never files egpt did not write)")
    cliargs.add_storage_option_argument(e)
    e.set_defaults(func=_cmd_export)
