"""The `benchmark_e2e` flow: several configurations on the same pairs, a comparison, artifacts, and a
rerun served from the task cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egpt_core.config import BenchmarkE2EConfig, ExtractConfig, ModelLoadConfig, SDConfigSpec, SpeculateConfig
from egpt_core.errors import ConfigError

CPU = ModelLoadConfig(dtype="float32", quant="none", device="cpu")


@pytest.fixture(scope="module")
def bench_cfg(fixture_paths, tmp_path_factory):
    from egpt_core.extraction import run_extraction

    root = tmp_path_factory.mktemp("bench")
    store = str(root / "store")
    run_extraction(ExtractConfig(dataset=str(fixture_paths["dataset"]), drafter=str(fixture_paths["eventgpt"]),
                                 target=str(fixture_paths["videollava"]), store=store, load=CPU, batch_size=12,
                                 max_new_tokens=12, store_dtype="float32"))
    base = SpeculateConfig(target=str(fixture_paths["videollava"]), drafter=str(fixture_paths["eventgpt"]), store=store,
                           gammas=[2, 5], max_new_tokens=12, max_pairs=3, load=CPU, out="ignored", warmup_pairs=0)
    return BenchmarkE2EConfig(base=base, out=str(root / "bench"), configs=[
        SDConfigSpec(kind="target_only"), SDConfigSpec(kind="identity"),
        SDConfigSpec(kind="identity", name="identity-research", mode="research")])


def test_benchmark_e2e_flow(bench_cfg, states_by_name):
    from flows.benchmark_e2e import benchmark_e2e

    cfg = bench_cfg
    state = benchmark_e2e(cfg, return_state=True)
    assert state.is_completed(), state.message
    ref = state.result()
    assert [r.name for r in ref.runs] == ["target_only", "identity", "identity-research"]
    assert all(r.n_pairs == 3 for r in ref.runs)
    assert [r.mode for r in ref.runs] == ["resync", "resync", "research"]
    out = Path(ref.out_url)
    assert (out / "benchmark.md").is_file() and (out / "speedup_per_configuration.png").is_file()
    runs = json.loads((out / "benchmark.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["target_only", "identity", "identity-research"]
    for name in ("| target_only |", "| identity |"):
        assert name in ref.markdown
    assert len({r.out_url for r in ref.runs}) == 3  # one run directory per configuration

    again = benchmark_e2e(cfg, return_state=True)
    states = states_by_name(again)
    assert sorted(s for n, s in states.items() if n.startswith("speculate-")) == ["Cached"] * 3


def test_research_mode_configuration_is_measured_on_the_same_pairs(bench_cfg, tmp_path):
    from egpt_core.speculative import run_speculative

    cfg = bench_cfg.base.model_copy(update={"identity": True, "mode": "research", "out": str(tmp_path / "r")})
    res = run_speculative(cfg)
    m = json.loads((tmp_path / "r" / "sd_metrics.json").read_text())
    assert res.mode == "research" and m["cross_check"] is None
    assert any("research mode" in n for n in m["notes"])
    assert all(m["per_gamma"][g]["lossless_mismatches"] == 0 for g in ("2", "5"))


@pytest.mark.parametrize("change, match", [
    ({"configs": [SDConfigSpec(kind="identity"), SDConfigSpec(kind="identity")]}, "distinct"),
    ({"configs": [SDConfigSpec(kind="adapter")]}, "needs adapter_run"),
])
def test_bad_benchmark_configs_fail_fast(bench_cfg, change, match):
    from flows.benchmark_e2e import speculate_configs

    with pytest.raises(ConfigError, match=match):
        speculate_configs(bench_cfg.model_copy(update=change))
    with pytest.raises(ConfigError, match="leave the base"):
        speculate_configs(bench_cfg.model_copy(update={"base": bench_cfg.base.model_copy(update={"identity": True})}))
