"""`egpt inspect` and `egpt import-research` (parsed through the store's own register())."""

from __future__ import annotations

import argparse
import json

import torch
from store_helpers import META, make_pairs
from test_store_research import make_research_dir

from egpt_core.cli import run_command
from egpt_core.store import StoreWriter
from egpt_core.store.commands import parse_storage_options, register


def run(argv):
    p = argparse.ArgumentParser(prog="egpt")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return run_command(args)


def _store(url):
    recs, d, t = make_pairs(5)
    recs[3] = {"pair_id": recs[3]["pair_id"], "status": "skipped", "reason": "shorter than min_tokens"}
    recs[4]["length"] = 2
    d[4], t[4] = d[4][:2], t[4][:2]
    d[4][0, 0] = float("nan")
    w = StoreWriter(url, META)
    w.commit_shard(recs, d, t)
    w.write_lm_head(torch.zeros(3, META["hidden_size"]), "head-fp")
    return recs


def test_inspect_json(mem_url, capsys):
    recs = _store(mem_url)
    assert run(["inspect", mem_url, "--json", "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"] == {"ok": 3, "failed": 1, "skipped": 1, "total": 5}
    assert out["reasons"] == {"non-finite hidden state": 1, "shorter than min_tokens": 1}
    assert out["shards"] == 1 and out["dtype"] == "bfloat16" and out["hidden_size"] == META["hidden_size"]
    assert out["rows"] == sum(r["length"] for r in recs[:3])
    # tokens = stored response token ids of both models (the failed pair keeps its ids)
    assert out["tokens"] == sum(len(r.get("drafter_response_ids", [])) + len(r.get("target_response_ids", []))
                                for r in recs)
    assert out["mode"] == "shared_prefix" and out["model_fingerprints"] == META["model_fingerprints"]
    assert out["models"] == META["models"] and out["lm_head"]["shape"] == [3, META["hidden_size"]]
    assert out["bytes"] > 0 and out["verify"]["problems"] == []


def test_inspect_text_and_errors(mem_url, tmp_path, capsys):
    _store(mem_url)
    assert run(["inspect", mem_url]) == 0
    text = capsys.readouterr().out
    assert "ok 3, failed 1, skipped 1" in text and "non-finite hidden state" in text and "bfloat16" in text
    assert run(["inspect", str(tmp_path / "missing")]) == 2
    assert "not a store" in capsys.readouterr().err


def test_import_research_cli(tmp_path, capsys):
    make_research_dir(tmp_path / "research", chunk_sizes=(3, 2))
    url = str(tmp_path / "store")
    assert run(["import-research", str(tmp_path / "research"), url, "--shard-size", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["imported"] == 5 and summary["shards"] == 3
    assert run(["inspect", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "independent"
    assert run(["import-research", str(tmp_path / "nowhere"), url, "--quiet"]) == 2


def test_parse_storage_options():
    assert parse_storage_options(["anon=true", "endpoint_url=http://minio:9000", "client_kwargs.region_name=x",
                                  "n=3"]) == {"anon": True, "endpoint_url": "http://minio:9000",
                                              "client_kwargs": {"region_name": "x"}, "n": 3}
