"""A Prefect server as the `egpt` commands meet it: one check of its address and auth string that
names the setting to fix (instead of a 401 traceback), and `egpt worker`, a process worker that
starts only against a server it can use and stops on SIGTERM however it was launched.

Clients authenticate with Prefect's standard setting PREFECT_API_AUTH_STRING ("user:password",
equal to the server's PREFECT_SERVER_API_AUTH_STRING); workers pass it on to the flow runs they start.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

API_URL_SETTING = "PREFECT_API_URL"
AUTH_SETTING = "PREFECT_API_AUTH_STRING"
SERVER_AUTH_SETTING = "PREFECT_SERVER_API_AUTH_STRING"


def server_problem(require_url: bool = False) -> str | None:
    """What stops this process from using the Prefect server of its settings, naming the setting to
    fix; None when it answers authenticated requests (or when no server is configured and
    ``require_url`` is False: flows then run on Prefect's embedded API)."""
    import httpx
    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if not url:
        return f"{API_URL_SETTING} is not set: set it to the server's API, e.g. http://10.0.0.5:4200/api" \
            if require_url else None
    auth_set = bool(settings.api.auth_string and settings.api.auth_string.get_secret_value())
    try:
        with get_client(sync_client=True) as client:
            if (exc := client.api_healthcheck()) is not None:
                return f"cannot reach the Prefect API at {url} ({API_URL_SETTING}): {exc}"
            client.hello()  # every API route but the health probe needs the auth string
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 401:
            return f"the Prefect API at {url} ({API_URL_SETTING}) answered HTTP {exc.response.status_code}"
        if not auth_set:
            return (f"the Prefect server at {url} requires authentication and {AUTH_SETTING} is not set: set it to "
                    f"the server's auth string (user:password, its {SERVER_AUTH_SETTING}) from a file only you "
                    f"can read, e.g. export {AUTH_SETTING}=\"$(cat /etc/egpt/prefect-auth)\"")
        return (f"the Prefect server at {url} refused {AUTH_SETTING} (HTTP 401): it must equal the server's "
                f"{SERVER_AUTH_SETTING}")
    except httpx.HTTPError as exc:
        return f"cannot reach the Prefect API at {url} ({API_URL_SETTING}): {exc}"
    return None


def _cmd_check_server(args: argparse.Namespace) -> int:
    from prefect.settings import get_current_settings

    if problem := server_problem(require_url=True):
        print(f"egpt check-server: {problem}", file=sys.stderr)
        return 2
    print(f"egpt check-server: {get_current_settings().api.url} answers authenticated requests")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    """`prefect worker start --type process` after the server check. The worker runs in a session of
    its own with default signal dispositions: launched from a script with `&` or nohup, a plain
    `prefect worker start` inherits an ignored SIGINT, and since it turns SIGTERM into SIGINT it
    then never stops. Each SIGTERM/SIGINT here is passed on as SIGTERM: the first stops the worker
    (Prefect 3.9.1 ends the flow runs it started with it: drain the pool first, README §4), the
    second kills it (Prefect's rule)."""
    if problem := server_problem(require_url=True):
        print(f"egpt worker: {problem}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.name:
        cmd += ["--name", args.name]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    worker: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    # handlers installed before the start: a handled signal is reset to default in the child at exec
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    extra = args.prefect_args[1:] if args.prefect_args[:1] == ["--"] else args.prefect_args
    worker = subprocess.Popen([*cmd, *extra], start_new_session=True)
    return worker.wait()


def register(sub) -> None:
    p = sub.add_parser("check-server", help="check that PREFECT_API_URL answers with PREFECT_API_AUTH_STRING")
    p.set_defaults(func=_cmd_check_server)
    p = sub.add_parser("worker", help="start a Prefect process worker after checking the server and its auth string",
                       description="Runs `prefect worker start --type process` (extra arguments after `--` are "
                       "passed on) once the server answers with PREFECT_API_AUTH_STRING; SIGTERM stops it.")
    p.add_argument("--pool", default="gpu", help="work pool (default: gpu)")
    p.add_argument("--name", help="worker name shown in the UI (e.g. node-a-gpu0)")
    p.add_argument("--limit", type=int, help="flow runs at a time (2: a fan-out parent next to one GPU run)")
    p.add_argument("prefect_args", nargs=argparse.REMAINDER, help="after --: more `prefect worker start` options")
    p.set_defaults(func=_cmd_worker)
