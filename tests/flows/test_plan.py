"""retf_config picks the dataset to re-extract from by canonical URL, not by spelling."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def base(tmp_path, monkeypatch):
    from egpt_core.config import ExtractConfig

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return ExtractConfig(dataset="data", drafter="d", target="t", store=str(tmp_path / "store"), max_scenes=2)


def _source(dataset):
    from tasks.refs import StoreRef

    return StoreRef(url="/stores/s", fingerprint="f", hidden_size=8, counts={}, shards=0, lm_head=True, dataset=dataset)


@pytest.mark.parametrize("recorded", ["{cwd}/data", "file://{cwd}/data/", "{cwd}/./data/", None, "data", "../x/data"])
def test_same_dataset_however_spelled_keeps_the_config(base, tmp_path, recorded):
    from flows.plan import retf_config

    recorded = recorded and recorded.format(cwd=os.getcwd())
    cfg = retf_config(base, _source(recorded), "new-drafter", "0123456789abcdef")
    assert cfg.dataset == "data" and cfg.max_scenes == 2  # relative recordings are legacy: the config wins
    assert cfg.mode == "retf" and cfg.store == "/stores/s-retf-0123456789ab"


def test_another_dataset_is_taken_from_the_store(base):
    from flows.plan import retf_config

    cfg = retf_config(base, _source("s3://bucket/other-dataset"), "new-drafter", "0123456789abcdef")
    assert cfg.dataset == "s3://bucket/other-dataset" and cfg.max_scenes is None and cfg.questions is None


def test_epochs_are_not_part_of_a_run_directory(tmp_path):
    """More epochs continue the same adapter / L6 run (the trainers resume it); any other setting is
    another run in another directory."""
    from egpt_core.config import ExtractConfig, PipelineAdapterConfig, PipelineConfig, PipelineLoraConfig
    from flows.plan import adapter_configs, lora_config
    from tasks.refs import StoreRef

    extract = ExtractConfig(dataset="/d", drafter="/m/egpt", target="/m/vl", store=str(tmp_path / "s"))
    stores = [StoreRef(url=extract.store, fingerprint="f" * 16, counts={"ok": 1}, shards=1, hidden_size=8,
                       lm_head=True)]

    def dirs(epochs: int, lr: float = 1e-3) -> tuple[str, str]:
        cfg = PipelineConfig(extract=extract, out=str(tmp_path / "runs"),
                             adapters=[PipelineAdapterConfig(epochs=epochs, lr=lr)],
                             lora=PipelineLoraConfig(epochs=epochs, lr=lr))
        [(_, adapter)] = adapter_configs(cfg, stores)
        return adapter.out, lora_config(cfg, {extract.store: "f" * 16}).out

    assert dirs(3) == dirs(10)
    a, b = dirs(3), dirs(3, lr=2e-3)
    assert a[0] != b[0] and a[1] != b[1]
