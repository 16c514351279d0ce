"""ForwardTimer / SectionTimer: forward time comes from hooks, nested forwards count once, patches
are undone. A fake clock makes every figure exact (no real timing)."""

import types

import torch
from torch import nn

from benchmarks.forward_timer import ForwardTimer, SectionTimer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Busy(nn.Module):
    """A module whose forward 'takes' ``seconds`` on the fake clock and may call an inner module."""

    def __init__(self, clock: Clock, seconds: float, inner: nn.Module | None = None):
        super().__init__()
        self.clock, self.seconds, self.inner = clock, seconds, inner

    def forward(self, x):
        self.clock.advance(self.seconds)
        return self.inner(x) if self.inner is not None else x


def test_nested_forwards_are_counted_once_and_time_between_forwards_is_not():
    clock = Clock()
    inner = Busy(clock, 2.0)
    outer = Busy(clock, 1.0, inner)
    timer = ForwardTimer([outer, inner, outer], clock=clock)  # listed twice: hooked once
    with timer:
        outer(torch.zeros(1))  # 1 + 2 (inner, nested)
        clock.advance(10.0)  # outside any forward
        inner(torch.zeros(1))  # 2, on its own
    assert timer.calls == 2
    assert timer.seconds == 5.0
    outer(torch.zeros(1))  # hooks are removed on exit
    assert timer.calls == 2 and timer.seconds == 5.0


def test_global_mode_sees_modules_created_inside_the_block():
    clock = Clock()
    with ForwardTimer(None, clock=clock) as timer:
        model = Busy(clock, 3.0, nn.Linear(2, 2))
        model(torch.zeros(1, 2))
    assert timer.calls == 1 and timer.seconds == 3.0
    model(torch.zeros(1, 2))
    assert timer.calls == 1


def test_a_forward_that_raises_still_closes_its_interval():
    clock = Clock()

    class Boom(nn.Module):
        def forward(self, x):
            clock.advance(1.0)
            raise RuntimeError("boom")

    model, ok = Boom(), Busy(clock, 2.0)
    with ForwardTimer([model, ok], clock=clock) as timer:
        try:
            model(torch.zeros(1))
        except RuntimeError:
            pass
        clock.advance(5.0)
        ok(torch.zeros(1))
    assert timer.seconds == 3.0 and timer.calls == 2


def test_section_timer_nets_out_forwards_and_restores_what_it_patched():
    clock = Clock()
    model = Busy(clock, 4.0)
    owner = types.SimpleNamespace(step=lambda: (clock.advance(1.0), model(torch.zeros(1))))

    class Worker:
        def work(self):
            clock.advance(0.5)
            return "done"

    original_step, original_work = owner.step, Worker.work
    instance = Worker()
    timer = ForwardTimer([model], clock=clock)
    sections = SectionTimer(timer)
    targets = [(owner, "step", "step"), (Worker, "work", "work"), (instance, "work", "instance"),
               (owner, "absent", "nope")]
    with sections.patched(targets) as missing:
        with timer:
            owner.step()
            assert Worker().work() == "done"
            assert instance.work() == "done"  # the instance wrapper calls the (wrapped) class method
    assert missing == ["nope"]
    assert owner.step is original_step and Worker.work is original_work
    assert "work" not in vars(instance)  # an instance patch is removed, not left as an attribute
    assert sections.calls == {"step": 1, "work": 2, "instance": 1}
    assert sections.wall == {"step": 5.0, "work": 1.0, "instance": 0.5}
    assert sections.forward == {"step": 4.0, "work": 0.0, "instance": 0.0}
