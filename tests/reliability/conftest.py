"""Reliability-suite fixtures. ``prefect_api`` is opt-in (not autouse): only the Prefect-level tests
pay for the test server (~10 s, once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> dict[str, str]:
    """One Prefect test server for the session, task results under a temp dir (not ~/.prefect).

    Yields the settings a child process needs to use the same server and result storage:
    ``{"PREFECT_API_URL": ..., "PREFECT_RESULTS_LOCAL_STORAGE_PATH": ...}``.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=90):
            yield {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage)}
