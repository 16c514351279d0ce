"""Wall time spent inside model forward passes, measured with forward hooks (not estimated).

`ForwardTimer(modules)` hooks the forward of each module (``modules=None``: every module, through
torch's global hooks - for models loaded where the caller cannot reach them, e.g. inside Prefect
tasks); a forward that runs inside another hooked forward (e.g. the inner LlamaModel inside
LlamaForCausalLM) is counted once, through a depth counter. On CUDA pass
``sync=torch.cuda.synchronize`` so the time includes the kernels a forward queued, not only their
launch. `SectionTimer` times named calls and how much of each was forward time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from torch import nn
from torch.nn.modules import module as nn_module


class ForwardTimer:
    """Context manager: ``seconds`` (time inside outermost hooked forwards) and ``calls``."""

    def __init__(self, modules: Iterable[nn.Module] | None, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.modules = None if modules is None else [m for m in modules if m is not None]
        self.sync = sync
        self.clock = clock
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._start = 0.0
        self._handles: list = []

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            if self.sync is not None:
                self.sync()
            self._start = self.clock()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self.sync is not None:
                self.sync()
            self.seconds += self.clock() - self._start
            self.calls += 1

    def __enter__(self) -> ForwardTimer:
        if self.modules is None:
            self._handles.append(nn_module.register_module_forward_pre_hook(self._pre))
            self._handles.append(nn_module.register_module_forward_hook(self._post, always_call=True))
            return self
        for m in dict.fromkeys(self.modules):  # a module listed twice is hooked once
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0


class SectionTimer:
    """Wall seconds of named calls (``wall``) and the forward seconds inside them (``forward``)."""

    def __init__(self, forward: ForwardTimer):
        self.fwd_timer = forward
        self.wall: dict[str, float] = {}
        self.forward: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            clock = self.fwd_timer.clock
            f0, t0 = self.fwd_timer.seconds, clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + clock() - t0
                self.forward[name] = self.forward.get(name, 0.0) + self.fwd_timer.seconds - f0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    @contextlib.contextmanager
    def patched(self, targets: Iterable[tuple[object, str, str]]) -> Iterator[list[str]]:
        """Temporarily replace ``owner.attr`` by its timed wrapper for each (owner, attr, section);
        yields the sections that could not be patched (attribute absent)."""
        saved, missing = [], []
        for owner, attr, name in targets:
            fn = getattr(owner, attr, None)
            if fn is None:
                missing.append(name)
                continue
            had_own = attr in vars(owner) if hasattr(owner, "__dict__") else False
            saved.append((owner, attr, vars(owner).get(attr) if had_own else None, had_own))
            setattr(owner, attr, self.wrap(name, fn))
        try:
            yield missing
        finally:
            for owner, attr, old, had_own in reversed(saved):
                if had_own:
                    setattr(owner, attr, old)
                else:
                    delattr(owner, attr)
