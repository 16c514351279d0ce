"""`egpt evaluate` and `egpt compare`."""

from __future__ import annotations

import argparse

from egpt_core import cliargs
from egpt_core.config import EvalConfig
from egpt_core.evaluation.report import fmt


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="stage 4: alignment/acceptance metrics of one prediction source on a store")
    p.add_argument("--store", help="store URL (test split)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", dest="adapter_run", help="adapter run directory")
    src.add_argument("--lora", help="L6 peft adapter directory (the store must be re-extracted with it: mode retf)")
    src.add_argument("--identity", action="store_true", help="raw drafter rows")
    p.add_argument("--out", help="output URL (metrics.json, report.md, plots)")
    p.add_argument("--timing", dest="timing_file", help="JSON file with measured TimingConfig fields (ms)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--name", default=None, help="run name in reports and comparisons")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation of another store/source in --out (never files egpt did not write)")
    cliargs.add_config_arguments(p, EvalConfig)
    p.set_defaults(func=_evaluate)

    c = subparsers.add_parser("compare", help="one comparison table from several metrics.json files")
    c.add_argument("metrics", nargs="+", help="metrics.json files (URLs or paths)")
    c.add_argument("--out", required=True, help="output URL for comparison.md / comparison.json")
    cliargs.add_storage_option_argument(c)
    c.set_defaults(func=_compare)


SUMMARY_ROWS = [
    ("cos_pooled", False), ("cos_pair_mean", False), ("accept@0.80", True), ("accept@0.90", True),
    ("accept@0.95", True), ("consecutive@0.90_mean", False), ("token_top1", True), ("token_top5", True),
    ("token_top10", True), ("argmax_agreement", True), ("acc_len_basis", False), ("acc_len_sim_gamma5", False),
    ("acc_len_empirical_gamma5", False), ("acc_len_rounds_gamma5", False), ("speedup_e2e_gamma5", False),
]


def summary_table(name: str, summary: dict) -> str:
    rows = [f"{'metric':<28} {name}", "-" * (29 + max(10, len(name)))]
    rows += [f"{'pairs / positions':<28} {summary.get('n_pairs')} / {summary.get('n_positions')}"]
    for key, pct in SUMMARY_ROWS:
        if key in summary:
            rows.append(f"{key:<28} {fmt(summary[key], pct=pct)}")
    return "\n".join(rows)


def _evaluate(args: argparse.Namespace) -> int:
    from egpt_core.evaluation.evaluate import evaluate

    flags = {"store": args.store, "out": args.out, "adapter_run": args.adapter_run, "lora": args.lora,
             "identity": args.identity or None, "timing_file": args.timing_file, "batch_size": args.batch_size,
             "name": args.name, "device": args.device}
    res = evaluate(cliargs.config_from_args(args, EvalConfig, flags), overwrite=args.overwrite)
    print(summary_table(res.name, res.metrics))
    print(f"\nwrote {res.out_url} (metrics.json, report.md, metrics_summary.png, per_position.png)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from egpt_core.evaluation.report import compare_runs, read_metrics

    storage_options = cliargs.parse_storage_options(args.storage_option)
    print(compare_runs([read_metrics(url, storage_options) for url in args.metrics], args.out, storage_options))
    return 0
