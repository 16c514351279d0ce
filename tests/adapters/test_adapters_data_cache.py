"""Where adapter training keeps its data: a RAM copy sized to the node's memory and its local ranks,
or byte-range reads; the choice and its reason are logged and recorded in the run's config.json."""

from __future__ import annotations

import json
import logging

from test_adapters_trainer import _cfg

from egpt_core.adapters import train_adapter
from egpt_core.memory import available_memory_bytes, decide_data_cache

GB = 10**9


def test_a_small_memory_budget_chooses_byte_range_reads(synth_store, tmp_path, monkeypatch, caplog):
    """Default config (no data_cache_gb) on a node with little memory left: the data is not copied
    into RAM (the old fixed 32 GB default would have), and the log says why."""
    import egpt_core.memory

    monkeypatch.setattr(egpt_core.memory, "available_memory_bytes", lambda: 20_000)  # 20 kB available
    with caplog.at_level(logging.INFO, logger="egpt_core.adapters.trainer"):
        train_adapter(_cfg(synth_store["url"], tmp_path / "small", "L1", epochs=1))
    record = json.loads((tmp_path / "small" / "config.json").read_text())
    assert record["data_in_ram"] is False and record["data_cache"]["path"] == "byte-range"
    assert record["data_cache"]["budget_bytes"] == 10_000 and record["data_cache"]["data_bytes"] > 10_000
    assert any("training data: byte-range" in m and "RAM budget" in m for m in caplog.messages)

    monkeypatch.setattr(egpt_core.memory, "available_memory_bytes", lambda: 64 * GB)
    train_adapter(_cfg(synth_store["url"], tmp_path / "large", "L1", epochs=1))
    record = json.loads((tmp_path / "large" / "config.json").read_text())
    assert record["data_in_ram"] is True and record["data_cache"]["path"] == "ram"


def test_local_ranks_share_the_node_budget(synth_store, tmp_path, monkeypatch):
    """Under torchrun every rank of a node sees the same free memory: each takes its share of it."""
    import egpt_core.memory

    first = train_adapter(_cfg(synth_store["url"], tmp_path / "one", "L1", epochs=1, data_cache_gb=1.0))
    data_bytes = json.loads((tmp_path / "one" / "config.json").read_text())["data_cache"]["data_bytes"]
    assert first.n_train_pairs and data_bytes > 0
    monkeypatch.setattr(egpt_core.memory, "available_memory_bytes", lambda: 4 * data_bytes)  # 1 rank: 2x the data
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    train_adapter(_cfg(synth_store["url"], tmp_path / "four", "L1", epochs=1))
    cache = json.loads((tmp_path / "four" / "config.json").read_text())["data_cache"]
    assert cache["path"] == "byte-range" and cache["local_ranks"] == 4 and "4 local ranks" in cache["reason"]


def test_decision_rules():
    one = decide_data_cache(3 * GB, None, local_ranks=1, available=8 * GB)
    assert one.in_ram and one.budget_bytes == 4 * GB
    eight = decide_data_cache(3 * GB, None, local_ranks=8, available=8 * GB)
    assert not eight.in_ram and eight.budget_bytes == GB // 2 and "page cache" in eight.reason
    assert "page cache" not in decide_data_cache(3 * GB, None, 8, 8 * GB, remote=True).reason
    configured = decide_data_cache(3 * GB, 32.0, local_ranks=8, available=8 * GB)  # as configured, per process
    assert configured.in_ram and "configured" in configured.reason
    assert not decide_data_cache(1, 0.0, available=8 * GB).in_ram


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    no_cgroup = tmp_path / "none"
    assert available_memory_bytes(meminfo, no_cgroup) == 20_000_000 * 1024
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8000000000\n")
    (v2 / "memory.current").write_text("3000000000\n")
    (v2 / "memory.stat").write_text("anon 2000000000\ninactive_file 1000000000\n")
    assert available_memory_bytes(meminfo, v2) == 6_000_000_000  # limit - usage + reclaimable cache
    (v2 / "memory.max").write_text("max\n")
    assert available_memory_bytes(meminfo, v2) == 20_000_000 * 1024
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("4000000000\n")
    (v1 / "memory.usage_in_bytes").write_text("1000000000\n")
    assert available_memory_bytes(meminfo, v1.parent) == 3_000_000_000
    real = available_memory_bytes()
    assert real is not None and real > 0
