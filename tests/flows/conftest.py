"""Flow tests run against one Prefect test server per session (`prefect_test_harness`, ~10 s to start)
with the task-result/cache store in a temporary directory (not ~/.prefect)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

#: a fake credential carried in storage_options: it must never reach logs, artifacts, names, results
SECRET = "AKIA-EGPT-TEST-SECRET-5f3a"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(prefect_api):
    """Every flow test runs against the session's one Prefect test server (tests/conftest.py)."""
    from pathlib import Path

    return Path(prefect_api["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])


@pytest.fixture(scope="session")
def fixture_paths(fixtures_dir) -> dict:
    return {"eventgpt": fixtures_dir / "eventgpt", "videollava": fixtures_dir / "videollava",
            "dataset": fixtures_dir / "dataset"}


def _task_runs(flow_run_id) -> list:
    """The TaskRun records of a flow run (after its states have reached the API)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.demo import task_states

    task_states(flow_run_id)  # waits until every task run is final
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _states_by_name(flow_state) -> dict[str, str]:
    """{task run name: final state name} of a finished flow run."""
    from flows.demo import task_states

    return dict(task_states(flow_state.state_details.flow_run_id))


@pytest.fixture(scope="session")
def task_runs():
    """task_runs(flow_run_id) -> the TaskRun records of a finished flow run."""
    return _task_runs


@pytest.fixture(scope="session")
def states_by_name():
    """states_by_name(flow_state) -> {task run name: final state name}."""
    return _states_by_name


@pytest.fixture(scope="session")
def secret() -> str:
    return SECRET
