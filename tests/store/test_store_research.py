"""Import of the research chunk format (index.json + chunks/chunk_*.pt)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from egpt_core.errors import ConfigError, StoreError
from egpt_core.store import StoreReader, StoreWriter, import_research, research_pair_id

D = 16
QUESTIONS = ["What is happening?", "Describe the scene.", "Is there a car?"]


def make_research_dir(root, chunk_sizes=(4, 5), seed=0, extra=None):
    """A fake research directory; returns the per-pair truth {pair_id: (egpt rows, vl rows, meta)}."""
    g = torch.Generator().manual_seed(seed)
    (root / "chunks").mkdir(parents=True)
    truth, chunks, start = {}, [], 0
    for n in chunk_sizes:
        lens = torch.randint(2, 9, (n,), generator=g)
        S = int(lens.max())
        eg = torch.zeros(n, S, D)
        vl = torch.zeros(n, S, D)
        meta = []
        for i in range(n):
            k = start + i
            L = int(lens[i])
            eg[i, :L] = torch.randn(L, D, generator=g)
            vl[i, :L] = torch.randn(L, D, generator=g)
            md = {"sample_idx": k // 3, "question_idx": k % 3, "question": QUESTIONS[k % 3],
                  "egpt_text": f"egpt says {k}", "vl_text": f"vl says {k}", "seq_len": L}
            meta.append(md)
            truth[research_pair_id(k // 3, QUESTIONS[k % 3])] = (eg[i, :L].clone(), vl[i, :L].clone(), md)
        obj = {"egpt_hidden": eg, "vl_hidden": vl, "seq_lens": lens.to(torch.int64), "metadata": meta,
               "chunk_id": start, "n_samples": n}
        if extra and start == 0:
            obj.update(extra)
        torch.save(obj, root / "chunks" / f"chunk_{start:06d}.pt")
        chunks.append({"path": f"chunk_{start:06d}.pt", "start_idx": start, "n_samples": n})
        start += n
    index = {"total_samples": start, "chunk_size": max(chunk_sizes), "chunks": chunks,
             "config": {"split": "test", "duration": "1s", "quant": "4bit", "max_questions": 3,
                        "max_new_tokens": 50, "hidden_dim": D}, "created": "2026-01-01T00:00:00"}
    (root / "index.json").write_text(json.dumps(index))
    return truth


def test_import_round_trip_and_resume(tmp_path):
    truth = make_research_dir(tmp_path / "research")
    url = str(tmp_path / "store")
    fracs = []
    s = import_research(str(tmp_path / "research"), url, shard_size=4, progress=lambda f, m: fracs.append(f))
    assert s["imported"] == 9 and s["shards"] == 3 and s["counts"]["ok"] == 9 and s["hidden_size"] == D
    assert fracs and fracs[-1] == 1.0
    r = StoreReader(url)
    assert r.meta["mode"] == "independent" and r.meta["notes"] == "imported from research format"
    assert r.dtype == torch.bfloat16
    pid = research_pair_id(0, "What is happening?")
    assert pid == f"research-000000|q{hashlib.sha1(b'What is happening?').hexdigest()[:8]}"
    assert sorted(r.pair_ids()) == sorted(truth)
    for p in r.iter_pairs():
        eg, vl, md = truth[p.pair_id]
        assert torch.equal(p.drafter, eg.to(torch.bfloat16)) and torch.equal(p.target, vl.to(torch.bfloat16))
        assert p.scene_id == f"research-{md['sample_idx']:06d}" and p.question == md["question"]
        assert p.drafter_text == md["egpt_text"] and p.target_text == md["vl_text"]
        assert p.target_response_ids == [] and p.length == md["seq_len"]
    # rerun: idempotent
    s2 = import_research(str(tmp_path / "research"), url, shard_size=4)
    assert s2["imported"] == 0 and s2["already_committed"] == 9
    assert StoreReader(url).fingerprint == r.fingerprint
    # a different research run cannot be mixed into the same store
    make_research_dir(tmp_path / "other", chunk_sizes=(2,))
    idx = json.loads((tmp_path / "other" / "index.json").read_text())
    idx["config"]["split"] = "train"
    (tmp_path / "other" / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ConfigError, match="compat_key"):
        import_research(str(tmp_path / "other"), url)
    # extraction writers are refused too (mode differs)
    with pytest.raises(ConfigError, match="mode"):
        StoreWriter(url, {"hidden_size": D, "dtype": "bfloat16", "mode": "shared_prefix"})


def test_import_lm_head(tmp_path, mem_url):
    make_research_dir(tmp_path / "research", chunk_sizes=(3,))
    head = torch.randn(7, D)
    torch.save({"lm_head_weight": head, "vocab_size": 7, "hidden_dim": D, "model_id": "x"}, tmp_path / "head.pt")
    s = import_research(str(tmp_path / "research"), mem_url, lm_head_url=str(tmp_path / "head.pt"))
    assert s["lm_head"] == [7, D]
    assert torch.equal(StoreReader(mem_url).lm_head(), head.to(torch.bfloat16))


class Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = str(marker)
    make_research_dir(tmp_path / "research", chunk_sizes=(2,), extra={"hook": evil})
    with pytest.raises(StoreError, match="refused to load"):
        import_research(str(tmp_path / "research"), str(tmp_path / "store"))
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../outside.pt", "/etc/passwd", "chunks/../../x.pt", "s3://bucket/chunk.pt"])
def test_unsafe_chunk_paths_are_refused(tmp_path, bad):
    make_research_dir(tmp_path / "research", chunk_sizes=(2,))
    idx = json.loads((tmp_path / "research" / "index.json").read_text())
    idx["chunks"][0]["path"] = bad
    (tmp_path / "research" / "index.json").write_text(json.dumps(idx))
    with pytest.raises(StoreError, match="Refusing"):
        import_research(str(tmp_path / "research"), str(tmp_path / "store"))
