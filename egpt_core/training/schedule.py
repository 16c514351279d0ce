"""The learning-rate schedule and the AdamW parameter groups of both trainers.

The learning rate is a pure function of the optimizer step and the run's *requested* length, so a
run extended with more epochs simply continues on the cosine of its new length (the rate at the
resumed step rises from the old tail to the new curve); nothing about the schedule is saved in a
checkpoint besides the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps`` steps, then cosine
    from ``base_lr`` to ``min_lr`` at ``total_steps``; ``min_lr`` after that."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(int(total_steps) - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in opt.param_groups:
        group["lr"] = lr


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """The one no-decay rule: tensors of fewer than 2 dims (biases, norm scales, scalar gates), any
    parameter of a norm, positional tables (``pos_embed``) and gates (``alpha``).

    Why: weight decay is a prior that weights should be small. For a matrix that limits capacity; for
    a norm scale, a gate or a positional table it only drags the function toward zero (a gate toward
    "closed", a norm toward no signal), which is a change of the model, not a regularizer (the GPT-2 /
    BERT practice). LoRA's A/B matrices are 2-D and decay.
    """
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or "norm" in name.lower() or "pos_embed" in leaf or "alpha" in leaf


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups [decay, no decay] of the trainable parameters (see :func:`no_weight_decay`)."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
