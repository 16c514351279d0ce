"""The run state both trainers carry from epoch to epoch and save in every checkpoint.

The rule (one place): after each epoch :meth:`RunState.after_epoch` records the history entry,
calls the epoch *best* when its validation loss is finite and lower than every earlier one (the
baseline counts: L6 validates the untrained LoRA as epoch 0), counts epochs without improvement and
stops early once ``early_stopping`` of them follow each other before the last requested epoch. A run is *finished* when it stopped
early or has run the requested number of epochs. ``epochs`` is not part of a run's identity: the
same run asked for more epochs is unfinished again and continues (an early-stopped run stays done).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    best_epoch: int = 0  # 0: no epoch improved on the baseline (or none ran)
    bad_epochs: int = 0  # epochs since the last improvement
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def after_epoch(self, entry: dict[str, Any], val_loss: float, *, step: int, early_stopping: int,
                    epochs: int) -> bool:
        """Record epoch ``entry["epoch"]`` (its history entry and the step count after it); returns
        whether it is the new best. Sets ``stopped_early`` when ``early_stopping`` bad epochs in a
        row end the run before its ``epochs``."""
        self.history.append(entry)
        self.epoch, self.step = int(entry["epoch"]), int(step)
        improved = math.isfinite(val_loss) and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.bad_epochs = float(val_loss), self.epoch, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= early_stopping and self.epoch < epochs:
            self.stopped_early = True
        return improved

    def finished(self, epochs: int) -> bool:
        """Done for a run that asks for ``epochs`` epochs in total."""
        return self.stopped_early or self.epoch >= epochs

    def best_entry(self) -> dict[str, Any] | None:
        return next((h for h in self.history if h["epoch"] == self.best_epoch), None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not math.isfinite(out["best_val_loss"]):
            out["best_val_loss"] = None
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        best = d.get("best_val_loss")
        return cls(epoch=int(d["epoch"]), step=int(d["step"]), best_val_loss=math.inf if best is None else float(best),
                   best_epoch=int(d["best_epoch"]), bad_epochs=int(d["bad_epochs"]),
                   stopped_early=bool(d["stopped_early"]), history=list(d["history"]))
