from __future__ import annotations

import pytest

from egpt_core.config import ExtractConfig, ModelLoadConfig


@pytest.fixture(scope="session")
def extract_cfg(fixtures_dir):
    """Factory of ExtractConfig on the session fixtures (fp32 CPU, short generations)."""

    def make(store: str, **kw) -> ExtractConfig:
        base = dict(
            dataset=str(fixtures_dir / "dataset"), drafter=str(fixtures_dir / "eventgpt"),
            target=str(fixtures_dir / "videollava"), store=str(store), max_new_tokens=8, min_tokens=2,
            batch_size=4, shard_size=4, load=ModelLoadConfig(dtype="float32", device="cpu"),
        )
        base.update(kw)
        return ExtractConfig(**base)

    return make


@pytest.fixture(scope="session")
def models(extract_cfg, tmp_path_factory):
    from egpt_core.extraction import load_models

    return load_models(extract_cfg(str(tmp_path_factory.mktemp("unused"))))
