"""A small synthetic dataset in the research layout, built once per test session."""

from __future__ import annotations

import pytest

from egpt_core.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "ds", scenes=4, questions=3, seed=0)
