"""What every task shares: the retry rule, the GPU concurrency slot and the progress artifact."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

from prefect import get_client, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from egpt_core.config import worker_gpu_limit
from egpt_core.errors import BadInputError, ConfigError, StoreError, TrainingDivergedError

#: the global concurrency limit (`prefect gcl create gpu --limit N`) that GPU sections occupy
GPU_LIMIT = "gpu"

#: a worker's environment may name another limit for its runs, e.g. a per-node one:
#: EGPT_GPU_LIMIT=gpu:<node> with `prefect gcl create gpu:<node> --limit <GPUs of the node>`
GPU_LIMIT_ENV = "EGPT_GPU_LIMIT"


def gpu_limit_name() -> str:
    """The limit GPU sections occupy: $EGPT_GPU_LIMIT (set on the worker, inherited by its flow
    runs), else `gpu`."""
    return worker_gpu_limit() or GPU_LIMIT

#: errors that a retry cannot fix: bad data, wrong settings, a corrupt store, a diverged training run
NOT_RETRIED = (BadInputError, ConfigError, StoreError, TrainingDivergedError, ValidationError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O hiccups, OOM, S3 5xx; never bad input or config."""
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return True


#: retries for the expensive stages: 3 more attempts after 10 s, 20 s, 40 s (± jitter)
RETRY = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=10),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}


#: how long a GPU slot outlives its holder: Prefect renews the lease while the holder runs; a holder
#: that ends normally, fails, is cancelled or gets SIGTERM releases it at once; one killed outright
#: (SIGKILL, OOM killer, a lost node) frees it when the lease expires. 60 s is Prefect's minimum
#: (its default, 300 s, kept a dead run's slot taken for five minutes).
GPU_LEASE_S = 60.0


def gpu_limit_exists(name: str = GPU_LIMIT) -> bool:
    """True when the API server has the global concurrency limit ``name``."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the GPU limit (`gpu`, or $EGPT_GPU_LIMIT) when the server defines it
    (strict: never run unlimited by accident); without the `gpu` limit (demo, tests) run directly and
    say so. A limit named by $EGPT_GPU_LIMIT must exist (ConfigError: a typo never runs unlimited)."""
    logger = get_run_logger()
    name = gpu_limit_name()
    exists = gpu_limit_exists(name)
    if not exists and worker_gpu_limit():
        raise ConfigError(f"{GPU_LIMIT_ENV}={name!r} names a concurrency limit this Prefect server does not have "
                          f"(create it: prefect gcl create {name} --limit 1)")
    if exists:
        start = time.monotonic()
        with concurrency(name, occupy=1, strict=True, lease_duration=GPU_LEASE_S):
            logger.info("holding a '%s' slot (waited %.1fs)", name, time.monotonic() - start)
            yield
    else:
        logger.info("no '%s' concurrency limit on this server: running without a GPU slot", name)
        yield


class ProgressArtifact:
    """A ``progress(fraction, message)`` callback for egpt_core that updates a Prefect progress
    artifact and logs, at most every ``min_interval_s`` (always at 100 %)."""

    def __init__(self, description: str, min_interval_s: float = 2.0):
        self.description = description
        self.min_interval_s = min_interval_s
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)
        self._last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.logger.info("%s: %3.0f%% %s", self.description, 100 * fraction, message)
        try:
            update_progress_artifact(self.artifact_id, progress=round(100 * min(max(fraction, 0.0), 1.0), 1),
                                     description=f"{self.description}: {message}")
        except Exception as exc:  # the UI's progress bar is not worth failing a GPU stage for
            self.logger.warning("could not update the progress artifact: %s", exc)


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes) from free text."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:100] or "artifact"


def url_name(url: str) -> str:
    """The last component of a store/run URL: a short, credential-free label for run names."""
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit("@", 1)[-1] or "store"


def heartbeat_stale_seconds() -> float | None:
    """How long a dispatched flow run may go without a heartbeat (or a state change) before its node
    is taken for dead: three of Prefect's flow-run heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    180 s by default) plus 30 s. None when heartbeats are off: then nothing can tell a dead node from
    a slow one."""
    from prefect.settings import get_current_settings

    freq = get_current_settings().flows.heartbeat_frequency
    return None if freq is None else 3 * max(int(freq), 30) + 30.0


def _last_sign_of_life(client, run) -> float:
    """Unix time of the run's latest heartbeat event or state change."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    last = run.state.timestamp.timestamp()
    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=run.state.timestamp),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    for event in page.events:
        last = max(last, event.occurred.timestamp())
    return last


def wait_for_live_run(flow_run_id, poll_s: float = 5.0, stale_s: float | None = None):
    """Wait until a dispatched flow run is final and return it. A run that stays Running without a
    heartbeat for ``stale_s`` (default :func:`heartbeat_stale_seconds`) lost its worker or node:
    nobody will ever report its end, so it is marked Crashed here instead of being waited for forever
    (Prefect's own zombie automation, where configured, does the same and is simply seen first)."""
    from prefect.states import Crashed

    stale_s = heartbeat_stale_seconds() if stale_s is None else stale_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if stale_s is not None and run.state is not None and run.state.is_running():
                silent = time.time() - _last_sign_of_life(client, run)
                if silent > stale_s:
                    message = (f"no heartbeat for {silent:.0f} s (limit {stale_s:.0f} s): its worker or node is "
                               "gone; marked Crashed by the run waiting for it")
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                    get_run_logger().warning("flow run %s: %s", run.name, message)
                    continue
            time.sleep(poll_s)
