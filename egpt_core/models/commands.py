"""`egpt fixtures OUTDIR`: tiny seeded checkpoints + a synthetic dataset in the real formats."""

from __future__ import annotations

import argparse
from pathlib import Path


def write_fixtures(outdir: str | Path, scenes: int = 4, questions: int = 3, seed: int = 0) -> dict[str, Path]:
    """Write OUTDIR/eventgpt, OUTDIR/videollava and OUTDIR/dataset (with its questions.json)."""
    from egpt_core.data import write_synthetic_dataset
    from egpt_core.models.tiny import write_tiny_models

    out = Path(outdir)
    paths = write_tiny_models(out, seed=seed)
    paths["dataset"] = Path(write_synthetic_dataset(out / "dataset", scenes=scenes, questions=questions, seed=seed))
    return paths


def _cmd_fixtures(args: argparse.Namespace) -> int:
    paths = write_fixtures(args.outdir, scenes=args.scenes, questions=args.questions, seed=args.seed)
    for name, p in paths.items():
        print(f"{name:11s} {p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("fixtures", help="write tiny seeded EventGPT/Video-LLaVA checkpoints + synthetic dataset")
    p.add_argument("outdir")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_fixtures)
