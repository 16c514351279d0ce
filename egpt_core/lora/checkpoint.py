"""Pickle-free run-directory I/O for L6: safetensors for tensors, JSON for the rest, on any fsspec URL.

Resume checkpoint (``<out>/checkpoint/``), written at the end of every epoch:

* ``lora.safetensors`` — the LoRA weights (peft state-dict names), metadata ``format``, ``epoch``.
* ``optim.safetensors`` — AdamW state tensors as ``state.<idx>.<name>`` plus RNG states
  (``rng.torch``, ``rng.cuda.<i>``) as uint8 tensors; metadata ``format``, ``epoch``.
* ``state.json`` — the commit point: epoch, optimizer step, optimizer param groups and scalar state,
  python RNG, best-so-far, patience, history, config fingerprint. It is written last; a checkpoint
  whose tensor files carry another epoch (a crash between writes) is ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from egpt_core import runfiles as rf
from egpt_core.fsio import join

FORMAT = "egpt-lora/1"
CHECKPOINT_DIR = "checkpoint"


# --------------------------------------------------------------------------------------------------
# bytes / JSON / directories on URLs
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# optimizer / RNG flattening
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# the resume checkpoint
# --------------------------------------------------------------------------------------------------


def save_checkpoint(out: str, lora_state: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    state: dict[str, Any], storage_options: dict | None = None) -> None:
    """LoRA weights, optimizer + RNG tensors, then state.json (the commit point)."""
    ck = join(out, CHECKPOINT_DIR)
    epoch = str(state["epoch"])
    meta = {"format": FORMAT, "epoch": epoch}
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state.items()}
    rf.write_bytes(join(ck, "lora.safetensors"), st_save(weights, metadata=meta), storage_options)
    opt_tensors, opt_info = rf.optimizer_to_flat(opt)
    rng_tensors, rng_info = rf.rng_to_flat(numpy_state=False)  # L6 draws no numpy randomness
    rf.write_bytes(join(ck, "optim.safetensors"), st_save({**opt_tensors, **rng_tensors}, metadata=meta), storage_options)
    rf.write_json(join(ck, "state.json"), dict(state, optimizer=opt_info, rng=rng_info, format=FORMAT), storage_options)


def load_checkpoint(out: str, storage_options: dict | None = None):
    """-> (state, lora tensors, optimizer+rng tensors) of the committed checkpoint, or None."""
    ck = join(out, CHECKPOINT_DIR)
    state = rf.read_json(join(ck, "state.json"), storage_options)
    if state is None:
        return None
    w = rf.read_bytes(join(ck, "lora.safetensors"), storage_options)
    o = rf.read_bytes(join(ck, "optim.safetensors"), storage_options)
    if w is None or o is None:
        return None
    epoch = str(state["epoch"])
    if rf.safetensors_metadata(w).get("epoch") != epoch or rf.safetensors_metadata(o).get("epoch") != epoch:
        return None
    return state, st_load(w), st_load(o)
