"""Session fixtures: tiny seeded checkpoints + a synthetic dataset, built once through `egpt fixtures`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_RECORDING = SHARED_DATA / "eventgpt_sample1.npy"


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """OUTDIR with eventgpt/, videollava/ and dataset/ (4 scenes x 3 questions)."""
    from egpt_core.models.commands import write_fixtures

    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out, scenes=4, questions=3, seed=0)
    return out


@pytest.fixture(scope="session")
def fp32():
    from egpt_core.config import ModelLoadConfig

    return ModelLoadConfig(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def drafter(fixtures_dir, fp32):
    from egpt_core.models import load_eventgpt

    return load_eventgpt(str(fixtures_dir / "eventgpt"), fp32)


@pytest.fixture(scope="session")
def target(fixtures_dir, fp32):
    from egpt_core.models import load_videollava

    return load_videollava(str(fixtures_dir / "videollava"), fp32)
