"""Prefect tasks: thin wrappers over egpt_core stage entry points (DESIGN.md §5).

Each task declares its retries, cache policy and `gpu` tag on the decorator, runs its GPU work
inside the `gpu` concurrency limit when the server has one, publishes progress/table artifacts,
and returns a small pydantic reference (`tasks.refs`) — never tensors. Importing the package lets
storage options name a Prefect Secret block for their credentials (`tasks.credentials`).
"""

from tasks import credentials as _credentials

_credentials.install()
