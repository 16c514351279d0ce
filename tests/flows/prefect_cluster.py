"""Helpers for tests that run a real Prefect server and process workers as subprocesses (loopback
ports, temporary PREFECT_HOMEs): the pattern of test_deployments.py, with any number of workers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Cluster:
    """A running server; ``env`` is the base environment of CLI and worker processes (no PREFECT_*
    of the test process, e.g. its test harness, leaks into them)."""

    api: str
    env: dict[str, str]
    root: Path
    workers: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        out = subprocess.run([*PREFECT, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start_worker(self, name: str, pool: str = "gpu", limit: int | None = None, **env: str) -> Path:
        """`prefect worker start --pool <pool> --name <name>` with its own PREFECT_HOME (a node of its
        own) and ``env`` on top; returns its log file."""
        home = self.root / f"worker-{name}"
        home.mkdir()
        log_path = home / "worker.log"
        log = open(log_path, "w")  # noqa: SIM115 (the worker process owns it; closed with the process)
        cmd = [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", name]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        proc = subprocess.Popen(cmd, env={**self.env, "PREFECT_HOME": str(home), **env}, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.workers[name] = (proc, log_path)
        return log_path

    def kill_node(self, name: str) -> None:
        """SIGKILL a worker and every process it started (its flow runs, which Prefect starts in
        sessions of their own): a node that vanishes, leaving nobody to report its runs' end."""
        proc = self.workers[name][0]
        victims = [proc.pid, *_descendants(proc.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        proc.wait()

    def worker_log(self, name: str) -> str:
        return self.workers[name][1].read_text(errors="replace")

    def logs_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- worker {name} ---\n{self.worker_log(name)[-n:]}" for name in self.workers)

    @contextlib.contextmanager
    def client(self):
        """A sync client of this server (not of the session's test harness)."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
            yield client

    def wait_final(self, flow_run_id, timeout_s: float = 300):
        """Poll a flow run until its state is final; returns the FlowRun."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while not (run := client.read_flow_run(flow_run_id)).state.is_final():
                assert time.monotonic() < deadline, f"run still {run.state.name} after {timeout_s}s\n{self.logs_tail()}"
                time.sleep(1)
        return run


@contextlib.contextmanager
def prefect_cluster(root: Path) -> Iterator[Cluster]:
    """`prefect server start` on a free loopback port with PREFECT_HOME under ``root``; on exit
    stops the workers started through it, then the server (a worker hangs on SIGTERM once the API
    is gone)."""
    home = root / "server"
    home.mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    cluster = Cluster(api=api, env=env, root=root)
    try:
        wait_healthy(api, server)
        yield cluster
    finally:
        for proc, _ in cluster.workers.values():
            stop(proc)
        stop(server)
        log.close()
