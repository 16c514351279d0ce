"""`egpt fixtures OUTDIR`: tiny seeded checkpoints + a synthetic dataset in the real formats."""

from __future__ import annotations

import argparse
from pathlib import Path


def write_fixtures(outdir: str | Path, scenes: int = 4, questions: int = 3, seed: int = 0,
                   layout: str = "project") -> dict[str, Path]:
    """Write OUTDIR/eventgpt, OUTDIR/videollava and OUTDIR/dataset (with its questions.json).

    ``layout='research'`` also writes the same EventGPT as its authors save it, once per weight
    format: OUTDIR/eventgpt-research-{safetensors,sharded,bin} (see `egpt_core.models.research_layout`).
    """
    from egpt_core.data import write_synthetic_dataset
    from egpt_core.models.tiny import write_tiny_models

    out = Path(outdir)
    paths = write_tiny_models(out, seed=seed)
    paths["dataset"] = Path(write_synthetic_dataset(out / "dataset", scenes=scenes, questions=questions, seed=seed))
    if layout == "research":
        from egpt_core.models.research_layout import write_research_fixtures

        paths.update(write_research_fixtures(out))
    return paths


def _cmd_fixtures(args: argparse.Namespace) -> int:
    paths = write_fixtures(args.outdir, scenes=args.scenes, questions=args.questions, seed=args.seed,
                           layout=args.layout)
    for name, p in paths.items():
        print(f"{name:29s} {p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("fixtures", help="write tiny seeded EventGPT/Video-LLaVA checkpoints + synthetic dataset")
    p.add_argument("outdir")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["project", "research"], default="project",
                   help="'research': also write the EventGPT as its authors save it (tower weights under "
                        "model.visual_tower.visual_tower.vision_model.*, tokenizer.model only), as safetensors, "
                        "sharded safetensors and .bin: OUTDIR/eventgpt-research-<format>")
    p.set_defaults(func=_cmd_fixtures)
