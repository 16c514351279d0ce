"""Run adapter or L6 training in a subprocess and SIGKILL it at a named point (test_training_kill.py).

usage: python train_kill_runner.py adapter|lora CONFIG_JSON POINT

adapter points (epoch numbers are 1-based; checkpoint files: egpt_core/training/checkpoint.py):
  after-epoch   the progress callback reports epoch 2 done (its checkpoint is committed)
  torn-weights  mid-write of epoch 3's checkpoint/epoch-0003-*.weights.safetensors (a torn temp file
                is left; nothing renamed)
  torn-commit   epoch 3's weights + train-state files in place, then mid-write of
                checkpoint/commit.json (the commit record)
lora points (L6 commits the untrained LoRA as epoch 0 first):
  mid-epoch     right after the first optimizer step of epoch 2
  torn-weights  mid-write of epoch 2's checkpoint/epoch-0002-*.weights.safetensors
  torn-commit   epoch 2's weights + train-state files in place, then mid-write of checkpoint/commit.json
"""

from __future__ import annotations

import os
import signal
import sys

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # as tests/conftest.py: same kernels, same bits

calls: dict[str, int] = {}
TORN_SUFFIX = ".tmp-killed00"


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def torn_write_hook(name: str, nth: int):
    """Patch the one atomic write path (``fsio.Location.write_atomic``, under every ``runfiles`` write):
    the ``nth`` write of a file whose name ends with ``name`` leaves half its bytes in a temp file (as a
    crash mid-write does) and the process dies."""
    from egpt_core.fsio import Location

    original = Location.write_atomic

    def write_atomic(self, data):
        if str(self.path).endswith(name):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == nth:
                data = data.encode() if isinstance(data, str) else bytes(data)
                with open(str(self.path).removeprefix("file://") + TORN_SUFFIX, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
        return original(self, data)

    Location.write_atomic = write_atomic


def run_adapter(cfg_json: str, point: str) -> None:
    from egpt_core.adapters import train_adapter
    from egpt_core.config import TrainAdapterConfig

    cfg = TrainAdapterConfig.model_validate_json(cfg_json)
    progress = None
    if point == "after-epoch":
        def progress(frac, msg):
            if msg.startswith("epoch 2/"):
                die()
    elif point == "torn-weights":
        torn_write_hook(".weights.safetensors", 3)
    elif point == "torn-commit":
        torn_write_hook("/commit.json", 3)
    else:
        raise SystemExit(f"unknown adapter point {point}")
    train_adapter(cfg, progress=progress, resume=False)


def run_lora(cfg_json: str, point: str) -> None:
    from egpt_core.config import LoraTrainConfig
    from egpt_core.lora import train_lora

    cfg = LoraTrainConfig.model_validate_json(cfg_json)
    progress = None
    if point == "mid-epoch":
        def progress(frac, msg):
            if msg.startswith("epoch 2/") and " step " in msg:
                die()
    elif point == "torn-weights":
        torn_write_hook(".weights.safetensors", 3)
    elif point == "torn-commit":
        torn_write_hook("/commit.json", 3)
    else:
        raise SystemExit(f"unknown lora point {point}")
    train_lora(cfg, progress=progress, resume=False)


def main() -> None:
    kind, cfg_file, point = sys.argv[1:4]
    cfg_json = open(cfg_file).read()
    {"adapter": run_adapter, "lora": run_lora}[kind](cfg_json, point)
    print("completed without being killed")


if __name__ == "__main__":
    main()
