"""The process-group context of a training run: one process, or data parallel under torchrun.

``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` come from torchrun; the group is NCCL
on CUDA and gloo on CPU. Rank 0 (``main``) writes every run file; every rank calls every collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from egpt_core import outdir
from egpt_core import runfiles as rf
from egpt_core.errors import ConfigError
from egpt_core.fsio import Location

RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]
T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (they share its memory)
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_setting: str = "auto") -> DistContext:
        """Join (or create) the process group; ``device_setting`` is ``auto``, ``cpu`` or ``cuda[:i]``
        (under torchrun each rank takes ``cuda:<LOCAL_RANK>``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        want_cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError(f"device={device_setting!r} but CUDA is not available (use 'auto' or 'cpu')")
        if not want_cuda:
            device = torch.device("cpu")
        elif world > 1:
            device = torch.device(f"cuda:{local_rank}")
        else:
            device = torch.device(device_setting if device_setting.startswith("cuda") else "cuda")
        if world > 1 and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (all_gather_object too) use the current device
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        rank = dist.get_rank() if world > 1 else 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # torchrun sets it; else one node
        return cls(rank, world, local_rank, local_world, device, owns)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (a new tensor under DDP; ``t`` itself in one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks in place (a rank without one adds zeros)."""
        if self.world <= 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- RNG of every rank (a resumed run continues every rank's random stream) --------------------
    def gather_rng(self, numpy_state: bool = True) -> RngState:
        """Every rank's RNG state: rank 0's under plain keys, rank r's tensors suffixed ``.rank<r>``;
        the infos keyed by rank ("0", "1", ...)."""
        mine = rf.rng_to_flat(numpy_state=numpy_state)
        gathered: list[Any] = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, Any] = {}
        for r, (t, info) in enumerate(gathered):
            tensors.update({k if r == 0 else f"{k}.rank{r}": v for k, v in t.items()})
            infos[str(r)] = info
        return tensors, infos

    def restore_rng(self, tensors: dict[str, torch.Tensor], infos: dict[str, Any], fallback_seed: int) -> None:
        """Restore this rank's RNG from :meth:`gather_rng` output; a rank the checkpoint did not
        have (resumed with more ranks) is seeded with ``fallback_seed`` + its rank instead."""
        suffix = f".rank{self.rank}"
        if self.rank == 0:
            mine = {k: v for k, v in tensors.items() if k.startswith("rng.") and ".rank" not in k}
        else:
            mine = {k[: -len(suffix)]: v for k, v in tensors.items() if k.startswith("rng.") and k.endswith(suffix)}
        info = infos.get(str(self.rank))
        if not mine or info is None:
            torch.manual_seed(fallback_seed + 7919 * self.rank)
            return
        rf.rng_from_flat(mine, info)


def launch(run_dir: Location, kind: str, identity: str, *, resume: bool, device: str,
           run: Callable[[DistContext], T]) -> T:
    """Join the process group, let rank 0 claim ``run_dir`` for a ``kind`` run of ``identity`` (one run
    owns a directory, never one egpt did not write: `egpt_core.outdir`; ``resume=False`` replaces an
    earlier run of another identity), call ``run(ctx)``, leave the group."""
    ctx = DistContext.setup(device)
    try:
        claim = outdir.claim_output(run_dir, kind, identity, replace=not resume,
                                    replace_hint="--no-resume") if ctx.main else nullcontext()
        with claim:
            return run(ctx)
    finally:
        ctx.teardown()
