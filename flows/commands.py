"""`egpt demo`, `egpt pipeline` and `egpt nightly`: run the Prefect flows from the command line.

Prefect is imported only inside the commands, after the environment is settled, so the other
`egpt` commands never pay for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _prefect_env(home: Path | None = None) -> str:
    """Settle Prefect's environment before it is imported; returns where runs are recorded.

    Without PREFECT_API_URL, flows run on Prefect's embedded ephemeral API (SQLite). The demo then
    keeps Prefect's database and result/cache store under its own directory (PREFECT_HOME=<out>/.prefect)
    unless PREFECT_HOME is set: a rerun finds its cache, deleting the directory resets everything,
    and ~/.prefect is left alone. Offline hosts: telemetry off.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect API {os.environ['PREFECT_API_URL']}"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    # a fresh database's migrations can outlast Prefect's 20 s default on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if home is not None and "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(home)
    where = os.environ.get("PREFECT_HOME", "~/.prefect")
    return f"Prefect's embedded ephemeral API; database and task cache under {where}"


def _cmd_demo(args: argparse.Namespace) -> int:
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    where = _prefect_env(root / ".prefect")
    from flows.server import server_problem

    if problem := server_problem():
        print(f"egpt demo: {problem}", file=sys.stderr)
        return 2
    print(f"egpt demo: outputs under {root}; {where}")
    from flows.demo import run_demo

    return run_demo(root, lora=not args.no_lora, scenes=args.scenes, questions=args.questions)


def _run_config_flow(args: argparse.Namespace, flow_name: str) -> int:
    where = _prefect_env()
    from egpt_core.cliargs import config_from_args
    from egpt_core.config import PipelineConfig

    cfg = config_from_args(args, PipelineConfig, {})  # a bad file or setting: one line, exit 2 (cli.main)
    from flows.server import server_problem

    if problem := server_problem():
        print(f"egpt {flow_name}: {problem}", file=sys.stderr)
        return 2
    print(f"egpt {flow_name}: {where}")
    if flow_name == "pipeline":
        from flows.pipeline import pipeline as run
    else:
        from flows.nightly import nightly_reextract as run
    state = run(cfg, extract_deployment=args.extract_deployment, return_state=True)
    if not state.is_completed():
        print(f"egpt {flow_name}: flow run ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    from flows.demo import cache_line, describe, task_states

    print(describe(state.result()))
    print(cache_line(task_states(state.state_details.flow_run_id)))
    return 0


def register(sub) -> None:
    from egpt_core.cliargs import add_config_arguments
    from egpt_core.config import PipelineConfig
    from flows import server

    server.register(sub)
    p = sub.add_parser("demo", help="run the pipeline flow on tiny fixtures (CPU, local store); a rerun is served from cache")
    p.add_argument("--out", default="egpt-demo", help="demo directory (fixtures, store, runs, Prefect home)")
    p.add_argument("--no-lora", action="store_true", help="skip the L6 LoRA branch")
    p.add_argument("--scenes", type=int, default=40, help="synthetic scenes (default 40; 75 %% train, 25 %% held out)")
    p.add_argument("--questions", type=int, default=8, help="questions per scene (default 8, at most 10)")
    p.set_defaults(func=_cmd_demo)
    for name, what in (("pipeline", "extract, train adapters/L6, evaluate, compare"),
                       ("nightly", "extract new pairs, re-extract for a changed drafter, retrain, re-evaluate")):
        p = sub.add_parser(name, help=f"run the `{name}` Prefect flow: {what}")
        add_config_arguments(p, PipelineConfig, storage_options=False, required=True)
        p.add_argument("--extract-deployment", help="fan shard groups out to this deployment (e.g. extract/gpu)")
        p.set_defaults(func=lambda a, n=name: _run_config_flow(a, n))
