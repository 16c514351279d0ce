"""Fixtures for the store tests: unique memory:// URLs."""

from __future__ import annotations

import uuid

import pytest
from store_helpers import META


@pytest.fixture
def mem_url():
    url = f"memory://store-tests/{uuid.uuid4().hex}"
    yield url
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    path = url[len("memory://"):]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def meta():
    return dict(META)
