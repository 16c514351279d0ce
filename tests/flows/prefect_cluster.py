"""Helpers for tests that run a real Prefect server and process workers as subprocesses (loopback
ports, temporary PREFECT_HOMEs), always with basic authentication (deployments/README.md §1):
`prefect_cluster` (any number of workers) and `readme_cluster`, which starts the server and the
workers with the very shell blocks of deployments/README.md (only their site values replaced)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
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
README = REPO / "deployments" / "README.md"
#: the test servers' auth string (user:password)
AUTH = "egpt-test:7d1f0c8b-auth-string"
SITE_MARKER = "# ---- unchanged below ----"


def readme_block(name: str) -> str:
    """The shell block of deployments/README.md between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    m = re.search(rf"<!-- {name}:begin -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", README.read_text(), re.S)
    assert m, f"deployments/README.md has no {name} block"
    return m.group(1)


def readme_script(name: str, prelude: str = "", **site: str) -> str:
    """A README block with its site lines (those above SITE_MARKER: values and the venv's
    activation) replaced by ``prelude`` and the ``site`` values; the rest verbatim."""
    head, marker, tail = readme_block(name).partition(SITE_MARKER)
    assert marker, f"the {name} block has no '{SITE_MARKER}' line"
    names = re.findall(r"^(?:export )?(\w+)=", head, re.M)
    assert set(site) == set(names), f"the {name} block's site values changed: {names}"
    return "set -e\n" + prelude + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in site.items()) + tail


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def egpt_worker_pid(pid: int) -> int | None:
    """The `egpt worker` process among ``pid``'s descendants."""
    for p in descendants(pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"/egpt") and argv[2] == b"worker":
            return p
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] not in "ZX"
    except OSError:
        return False


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


def base_env(**update: str) -> dict[str, str]:
    """This process's environment without PREFECT_* (e.g. its test harness) and without AWS
    credentials (a run must get those the documented way), the venv's bin on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(update)
    return env


@dataclass
class Cluster:
    """A running server; ``env`` is the base environment of CLI and worker processes (no PREFECT_*
    of the test process, e.g. its test harness, leaks into them) with the API URL and auth string."""

    api: str
    env: dict[str, str]
    root: Path
    workers: dict[str, tuple[subprocess.Popen, Path]] = field(default_factory=dict)
    secrets: Path | None = None

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

    def readme_worker(self, name: str, gpu: str = "") -> tuple[str, dict[str, str]]:
        """(script, environment) of deployments/README.md's worker block (`egpt worker`) for this
        server: site values this server, the secrets directory and ``gpu``; its own PREFECT_HOME;
        no API settings of its own but what the block sets."""
        home = self.root / f"worker-{name}"
        home.mkdir()
        host, port = re.match(r"http://([^:/]+):(\d+)/api", self.api).groups()
        script = readme_script("worker-start", prelude=f"cd {shlex.quote(str(REPO))}\n", SERVER_ADDR=host,
                               SERVER_PORT=port, SECRETS=str(self.secrets), GPU=gpu)
        env = {k: v for k, v in self.env.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
        return script, {**env, "PREFECT_HOME": str(home)}

    def start_readme_worker(self, name: str, gpu: str = "") -> Path:
        """Start the README's worker block; returns its log file."""
        script, env = self.readme_worker(name, gpu)
        log_path = Path(env["PREFECT_HOME"]) / "worker.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers[name] = (proc, log_path)
        return log_path

    def kill_node(self, name: str) -> None:
        """SIGKILL a worker and every process it started (its flow runs, which Prefect starts in
        sessions of their own): a node that vanishes, leaving nobody to report its runs' end."""
        proc = self.workers[name][0]
        victims = [proc.pid, *descendants(proc.pid)]
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
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api, PREFECT_API_AUTH_STRING: AUTH}), \
                get_client(sync_client=True) as client:
            yield client

    def wait_final(self, flow_run_id, timeout_s: float = 300):
        """Poll a flow run until its state is final; returns the FlowRun."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while not (run := client.read_flow_run(flow_run_id)).state.is_final():
                assert time.monotonic() < deadline, f"run still {run.state.name} after {timeout_s}s\n{self.logs_tail()}"
                time.sleep(1)
        return run


def stop_worker(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """SIGTERM to what a README worker runs (`egpt worker`, as systemd's KillMode=mixed does), wait
    for it and its children; SIGKILL whatever is left after ``timeout_s``."""
    tree = descendants(proc.pid)
    targets = tree[:1] or [proc.pid]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in [proc.pid, *tree]) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.2)
    for pid in [proc.pid, *tree]:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _running(cluster: Cluster, server: subprocess.Popen, log) -> Iterator[Cluster]:
    try:
        wait_healthy(cluster.api, server)
        yield cluster
    finally:  # workers before the server (with the API gone a worker takes long to stop)
        for proc, _ in cluster.workers.values():
            stop_worker(proc) if proc.args[:1] == ["bash"] else stop(proc)
        if server.args[:1] == ["bash"]:
            for pid in [server.pid, *descendants(server.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        stop(server)
        log.close()


@contextlib.contextmanager
def prefect_cluster(root: Path) -> Iterator[Cluster]:
    """`prefect server start` on a free loopback port with PREFECT_HOME under ``root`` and the auth
    string AUTH (UI off: quicker); on exit stops the workers started through it, then the server."""
    home = root / "server"
    home.mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=AUTH,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed by _running)
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**env, "PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_UI_ENABLED": "false"},
                              stdout=log, stderr=subprocess.STDOUT)
    with _running(Cluster(api=api, env=env, root=root), server, log) as cluster:
        yield cluster


def write_secrets(directory: Path) -> Path:
    """The README's secret files (mode 600): prefect-auth = AUTH, prefect-encryption-key (a Fernet key)."""
    from cryptography.fernet import Fernet

    directory.mkdir(parents=True, mode=0o700)
    for name, value in (("prefect-auth", AUTH), ("prefect-encryption-key", Fernet.generate_key().decode())):
        (directory / name).write_text(value)
        (directory / name).chmod(0o600)
    return directory


@contextlib.contextmanager
def readme_cluster(root: Path) -> Iterator[Cluster]:
    """The server started by deployments/README.md's server block verbatim below its site values
    (this host's loopback address, a free port, secrets and PREFECT_HOME under ``root``). Clients get
    the README's client settings (§2)."""
    secrets = write_secrets(root / "secrets")
    home = root / "server"
    home.mkdir(parents=True)
    port = free_port()
    script = readme_script("server-start", SERVER_ADDR="127.0.0.1", SERVER_PORT=str(port), SECRETS=str(secrets),
                           PREFECT_HOME=str(home))
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed by _running)
    server = subprocess.Popen(["bash", "-c", script], env=base_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    env = base_env(PREFECT_HOME=str(root / "client"), PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=AUTH,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    with _running(Cluster(api=api, env=env, root=root, secrets=secrets), server, log) as cluster:
        yield cluster
