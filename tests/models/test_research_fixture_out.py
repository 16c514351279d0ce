"""`egpt fixtures --layout research` replaces only the research checkpoints it wrote itself."""

from __future__ import annotations

import pytest

from egpt_core.errors import ConfigError
from egpt_core.models.research_layout import write_research_eventgpt


def test_a_users_directory_is_refused_and_kept(fixtures_dir, tmp_path):
    out = tmp_path / "eventgpt-research-bin"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by"):
        write_research_eventgpt(fixtures_dir / "eventgpt", out, "bin")
    assert (out / "notes.txt").read_text() == "mine"


def test_its_own_output_is_replaced(fixtures_dir, tmp_path):
    out = tmp_path / "eventgpt-research-bin"
    write_research_eventgpt(fixtures_dir / "eventgpt", out, "bin")
    (out / "stale.bin").write_bytes(b"x")
    write_research_eventgpt(fixtures_dir / "eventgpt", out, "bin")
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
