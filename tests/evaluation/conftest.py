"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest
from eval_helpers import build_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("store") / "s")
    W, pairs = build_store(url)
    return url, W, pairs
