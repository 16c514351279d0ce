"""The `extract-ray` flow: stages 1-2 with the shard groups as Ray tasks inside one flow run, for
teams that already run a Ray cluster (deployments/README.md §8; needs the `ray` extra).

It mirrors `extract_stage` (flows/extract.py) for the modes that use the drafter: event features
first, then the shard groups side by side (one Ray GPU each), then the store summary. Run it against
a Prefect server (``PREFECT_API_URL``): with the embedded API every Ray worker would start a
temporary server of its own and the task runs it reports to are lost. Deployed as `extract-ray/ray`
(deployments/prefect.yaml): its worker runs the Ray driver, so it needs `RAY_ADDRESS` (or a Ray node).
"""

from __future__ import annotations

from prefect import flow
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from egpt_core.config import ExtractConfig
from egpt_core.errors import ConfigError
from flows.plan import group_configs
from flows.preflight import extract_inputs, require_inputs
from tasks.extract import compute_features, extract_group, feature_scene_ids, store_exists, summarize_store
from tasks.refs import StoreRef


@flow(name="extract-ray", task_runner=RayTaskRunner(address="auto"), log_prints=True)
def extract_ray(cfg: ExtractConfig) -> StoreRef:
    """Stages 1-2 into ``cfg.store`` on the Ray cluster this process joins (``RAY_ADDRESS``, or the
    one started on this machine with ``ray start``): one Ray task per shard group, each asking for
    one GPU (Ray sets its ``CUDA_VISIBLE_DEVICES``). Missing inputs or a cluster without GPUs fail at
    once, before any task (a GPU task on a cluster without GPUs would wait forever).

    Args:
        cfg: dataset, models, store and how to extract; ``shard_groups`` = the number of Ray GPUs (or
            a small multiple).
    """
    require_inputs("extract-ray", extract_inputs(cfg), cfg.storage_options)
    _require_ray_gpus()
    refresh = {} if store_exists(cfg.store, cfg.storage_options) else {"refresh_cache": True}
    with remote_options(num_gpus=1):
        compute_features.with_options(**refresh).submit(cfg, feature_scene_ids(cfg)).result()
        groups = [extract_group.with_options(**refresh).submit(g) for g in group_configs(cfg)]
    for g in groups:
        g.result()
    return summarize_store(cfg.store, cfg.storage_options)


def _require_ray_gpus() -> None:
    """ConfigError when the Ray cluster this run joined has no GPU: with ``address="auto"`` and neither
    ``RAY_ADDRESS`` nor a Ray node, prefect-ray silently starts a local Ray without GPUs."""
    import os

    import ray

    if not ray.is_initialized():  # the body called outside the flow (no task runner)
        return
    if not ray.cluster_resources().get("GPU"):
        raise ConfigError("extract-ray: nothing was started; the Ray cluster this run joined has no GPUs "
                          f"(RAY_ADDRESS={os.environ.get('RAY_ADDRESS')!r}): set RAY_ADDRESS to the cluster's "
                          "head in the environment of the worker or process that runs this flow, or run it on a "
                          "Ray node (deployments/README.md §8)")
