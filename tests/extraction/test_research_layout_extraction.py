"""Extraction from the EventGPT written as its authors save it gives bitwise the store rows of the
project-layout fixture (same weights, same tokenizer ids, same preprocessing)."""

from __future__ import annotations

import pytest
import torch

from egpt_core.extraction import run_extraction
from egpt_core.models.research_layout import RESEARCH_FORMATS, research_dir_name, write_research_eventgpt
from egpt_core.store import StoreReader

SMALL = dict(max_scenes=2, max_questions=2, max_new_tokens=6)


def _content(url: str) -> tuple[list[dict], dict]:
    r = StoreReader(url)
    table = r.pairs().sort_by("pair_id").drop_columns(["row_offset", "shard"]).to_pylist()
    rows = {p.pair_id: (p.drafter, p.target) for p in r.iter_pairs()}
    return table, rows


@pytest.fixture(scope="module")
def reference(extract_cfg, drafter, target, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ref") / "store")
    run_extraction(extract_cfg(url, **SMALL), models=(drafter, target))
    return _content(url)


@pytest.mark.parametrize("fmt", RESEARCH_FORMATS)
def test_research_layout_extracts_the_same_rows(fmt, reference, extract_cfg, fixtures_dir, tmp_path):
    ckpt = write_research_eventgpt(fixtures_dir / "eventgpt", tmp_path / research_dir_name(fmt), fmt)
    url = str(tmp_path / "store")
    run_extraction(extract_cfg(url, drafter=str(ckpt), **SMALL))  # loads both models itself
    table, rows = _content(url)
    ref_table, ref_rows = reference
    assert table == ref_table  # ids, prompts, texts, statuses
    assert rows.keys() == ref_rows.keys() and rows
    for pid, (d, t) in ref_rows.items():
        assert torch.equal(rows[pid][0], d), pid  # bitwise
        assert torch.equal(rows[pid][1], t), pid
