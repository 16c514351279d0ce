"""`egpt speculate`: stage 5 from the command line (one drafter configuration + the target-only
baseline on the same pairs)."""

from __future__ import annotations

import argparse

from egpt_core import cliargs
from egpt_core.config import SpeculateConfig


def parse_gammas(text: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5] (argparse type: a bad list is a usage error naming the value)."""
    try:
        gammas = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gammas {text!r}: expected comma-separated integers like 1,3,5") from None
    if not gammas or any(g < 1 for g in gammas):
        raise argparse.ArgumentTypeError(f"--gammas {text!r}: every γ must be >= 1")
    return gammas


def config_from_args(args: argparse.Namespace) -> SpeculateConfig:
    """SpeculateConfig from --config (may be partial: flags fill in) and the flags given."""
    flags = {
        "dataset": args.dataset, "questions": args.questions, "store": args.store, "drafter": args.drafter,
        "target": args.target, "adapter_run": args.adapter_run, "adapter_which": args.adapter_which,
        "lora": args.lora, "gammas": args.gammas, "mode": args.mode, "max_new_tokens": args.max_new_tokens,
        "max_pairs": args.max_pairs, "max_scenes": args.max_scenes, "max_questions": args.max_questions,
        "out": args.out, "name": args.name, "drafter_device": args.drafter_device, "warmup_pairs": args.warmup,
        "split": args.split, "val_fraction": args.val_fraction,
        "identity": args.identity or None, "target_only": args.target_only or None,
        "prefill_hiding": False if args.no_prefill_hiding else None,
    }
    load = {"dtype": args.dtype, "quant": args.quant, "device": args.device}
    return cliargs.config_from_args(args, SpeculateConfig, flags,
                                    {"load": load, "events": {"n_frames": args.event_frames or None}})


def summary_lines(res) -> list[str]:
    from egpt_core.evaluation.report import fmt

    s = res.summary
    gammas = sorted({int(k.rsplit("gamma", 1)[1]) for k in s if "_gamma" in k})
    lines = [f"{'γ':>3} {'acc len':>8} {'simulated':>9} {'agree':>7} {'accept':>8} {'tok/round':>9} {'e2e':>6} "
             f"{'decode':>6} {'model':>6} {'mismatch':>8}"]
    for g in gammas:
        def v(key, pct=False, digits=3, g=g):
            return fmt(s.get(f"{key}_gamma{g}"), pct=pct, digits=digits)

        lines.append(f"{g:>3} {v('acceptance_length'):>8} {v('simulated_acceptance_length'):>9} "
                     f"{v('round_agreement', pct=True):>7} {v('accept_rate', pct=True):>8} "
                     f"{v('tokens_per_round', digits=2):>9} {v('speedup_e2e', digits=2):>6} "
                     f"{v('speedup_decode', digits=2):>6} {v('predicted_speedup_e2e', digits=2):>6} "
                     f"{v('lossless_mismatches'):>8}")
    return lines


def _cmd_speculate(args: argparse.Namespace) -> int:
    from egpt_core.speculative import run_speculative

    res = run_speculative(config_from_args(args), overwrite=args.overwrite)
    print(f"{res.name} ({res.mode}): {res.n_pairs} pairs measured, {res.n_failed} failed")
    print("\n".join(summary_lines(res)))
    print(f"\nwrote {res.out_url} (sd_pairs.parquet, sd_metrics.json, report.md, plots)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "speculate", help="stage 5: real speculative decoding (drafter drafts, target verifies), measured",
        description="Run the greedy draft -> verify loop for one drafter configuration and the target-only "
                    "baseline on the same pairs; measure acceptance, wall-clock speedup and losslessness.")
    cliargs.add_config_arguments(p, SpeculateConfig)
    p.add_argument("--dataset", help="dataset root (default with --store: the dataset it was extracted from)")
    p.add_argument("--questions", help="questions file (default: the dataset's questions.json)")
    p.add_argument("--store", help="take the pairs and the target LM head from this store (and cross-check "
                                   "measured vs simulated acceptance on a shared_prefix store)")
    p.add_argument("--drafter", help="EventGPT checkpoint dir (base or an L6-merged export)")
    p.add_argument("--target", help="Video-LLaVA checkpoint dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", dest="adapter_run", help="adapter run directory (L1..L5, B1, L5F)")
    src.add_argument("--lora", help="L6 peft adapter directory (merged into the drafter in memory)")
    src.add_argument("--identity", action="store_true", help="raw drafter rows (no adapter)")
    src.add_argument("--target-only", action="store_true", help="only the target-only greedy baseline")
    p.add_argument("--adapter-which", help="adapter checkpoint: best (default), last or a file name")
    p.add_argument("--gammas", type=parse_gammas, help="draft windows, e.g. 1,3,5 (default)")
    p.add_argument("--mode", choices=["resync", "research"], help="resync (default) or research")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-pairs", type=int)
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--max-questions", type=int)
    p.add_argument("--split", choices=["all", "val"], help="'val' = only the held-out scenes of the seeded split")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--warmup", type=int, help="pairs run untimed first (default 1)")
    p.add_argument("--no-prefill-hiding", action="store_true", help="run the two prefills one after the other")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quant", choices=["none", "nf4"])
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:0 ...")
    p.add_argument("--drafter-device", help="put the drafter on another device (e.g. cuda:1)")
    p.add_argument("--event-frames", type=int)
    p.add_argument("--name", help="configuration name in reports")
    p.add_argument("--out", help="output directory URL")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier speculative run with other settings in --out (never files egpt did not write)")
    p.set_defaults(func=_cmd_speculate)
