"""Wall time spent inside model forward passes, measured with forward hooks (not estimated).

`ForwardTimer(modules)` hooks the forward of each module; a forward that runs inside another hooked
forward (e.g. the inner LlamaModel inside LlamaForCausalLM) is counted once, through a depth
counter. On CUDA pass ``sync=torch.cuda.synchronize`` so the time includes the kernels a forward
queued, not only their launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from torch import nn


class ForwardTimer:
    """Context manager: ``seconds`` (time inside outermost hooked forwards) and ``calls``."""

    def __init__(self, modules: Iterable[nn.Module], sync: Callable[[], None] | None = None):
        self.modules = [m for m in modules if m is not None]
        self.sync = sync
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._start = 0.0
        self._handles: list = []

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            if self.sync is not None:
                self.sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self.sync is not None:
                self.sync()
            self.seconds += time.perf_counter() - self._start
            self.calls += 1

    def __enter__(self) -> ForwardTimer:
        for m in dict.fromkeys(self.modules):  # a module listed twice is hooked once
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0


def extraction_modules(drafter, target) -> list[nn.Module]:
    """Every module whose forward is model work in extraction: the target's whole model, the drafter's
    decoder (TF and AR) and its vision path (event features)."""
    mods: list[nn.Module] = []
    if target is not None:
        mods.append(target.model)
    if drafter is not None:
        inner = drafter.model.model
        mods += [drafter.model, inner, getattr(inner, "visual_tower", None), getattr(inner, "visual_projector", None),
                 getattr(inner, "feature_adaptor", None)]
    return [m for m in mods if m is not None]
