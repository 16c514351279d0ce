"""Reliability-suite fixtures: the Prefect-level tests use the session's one test server
(`prefect_api` in tests/conftest.py)."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
