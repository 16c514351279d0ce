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


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    _write(meminfo, "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    node = 20_000_000 * 1024
    proc = tmp_path / "proc-self-cgroup"
    root = tmp_path / "sys-fs-cgroup"
    assert available_memory_bytes(meminfo, root, tmp_path / "absent") == node

    # cgroup v2: the job's own cgroup sets the limit (usage counts reclaimable page cache back in)
    _write(proc, "0::/jobs/job-7\n")
    job = root / "jobs" / "job-7"
    _write(job / "memory.max", "8000000000\n")
    _write(job / "memory.current", "3000000000\n")
    _write(job / "memory.stat", "anon 2000000000\ninactive_file 1000000000\n")
    assert available_memory_bytes(meminfo, root, proc) == 6_000_000_000
    _write(job / "memory.max", "max\n")
    assert available_memory_bytes(meminfo, root, proc) == node
    _write(root / "jobs" / "memory.max", "5000000000\n")  # a parent's limit applies too
    _write(root / "jobs" / "memory.current", "4000000000\n")
    assert available_memory_bytes(meminfo, root, proc) == 1_000_000_000

    # cgroup v1 (memory controller); "no limit" is a huge number
    _write(proc, "4:memory:/process_api/abc\n0::/\n")
    leaf = root / "memory" / "process_api" / "abc"
    _write(leaf / "memory.limit_in_bytes", "4000000000\n")
    _write(leaf / "memory.usage_in_bytes", "1000000000\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert available_memory_bytes(meminfo, root, proc) == 3_000_000_000

    real = available_memory_bytes()
    assert real is not None and real > 0
