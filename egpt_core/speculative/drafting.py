"""Draft tokens from hidden rows: the optional adapter, then the TARGET's LM head (greedy).

How each prediction source drafts position t (rows follow the position convention, DESIGN.md §3.2:
drafter row t is the drafter's state after the prefix g_0..g_{t-1} and predicts g_t):

============  ==========================================================================================
source        draft of position t
============  ==========================================================================================
identity, L6  argmax W · drafter_row[t]
L1, L2, L3    argmax W · adapter(drafter_row[t])                 (position-wise)
L4, L5        argmax W · adapter(drafter_rows[0..t])[t]          (all rows so far: the loop cannot see
                                                                  rows after t; offline, bidirectional L4
                                                                  sees the whole answer)
B1            argmax W · next_head(target_rows[0..t-1])[t-1]     (the target's VERIFIED rows, as the
L5F           argmax W · next_head(drafter_rows[0..t-1],          research loop; drafts after the first in a
                                   target_rows[0..t-1])[t-1]      round roll out the head's own estimates)
============  ==========================================================================================

W is the target's LM head [V, D] (fp32). Adapters run in fp32 whatever the models' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from egpt_core.adapters.modules import apply_adapter, level_spec


@dataclass
class Draft:
    """One draft token: id, its logit margin (top-1 minus top-2 under W), and the row it came from
    (for B1/L5F: the estimate of the target's row t, fed back for the next draft of the round)."""

    token: int
    margin: float
    row: torch.Tensor


class DraftHead:
    """Turns rows into draft tokens through the target's LM head, with an optional adapter."""

    def __init__(self, lm_head: torch.Tensor, device: torch.device | str, adapter=None, adapter_cfg=None):
        self.device = torch.device(device)
        self.weight = lm_head.detach().to(self.device, torch.float32)  # [V, D]
        self.adapter = adapter.to(self.device).eval() if adapter is not None else None
        self.adapter_cfg = adapter_cfg
        self.level = str(adapter_cfg.level) if adapter_cfg is not None else None
        if self.device.type == "cuda":  # made on the default stream, read on the drafter's stream
            torch.cuda.synchronize(self.device)

    @property
    def kind(self) -> str:
        """'identity' | 'position' (L1-L3) | 'sequence' (L4, L5) | 'target_next' (B1) | 'fused_next' (L5F)."""
        if self.level is None:
            return "identity"
        spec = level_spec(self.level)
        return {"target": "target_next", "both": "fused_next"}.get(spec.inputs,
                                                                  "sequence" if spec.attends else "position")

    @property
    def uses_drafter(self) -> bool:
        """B1 drafts from the target's rows alone: no drafter model runs."""
        return self.kind != "target_next"

    @property
    def uses_target_rows(self) -> bool:
        return self.kind in ("target_next", "fused_next")

    @property
    def max_context(self) -> int | None:
        """Longest row sequence the adapter accepts (the L5 family's positional table)."""
        return None if self.adapter_cfg is None or self.kind == "position" else int(self.adapter_cfg.max_seq_len)

    @torch.no_grad()
    def estimate(self, t: int, drafter_rows: list[torch.Tensor], target_rows: list[torch.Tensor]) -> torch.Tensor:
        """The estimate of the target's row t [D] (fp32) from rows 0..t (drafter) / 0..t-1 (target)."""
        kind = self.kind
        if kind == "identity":
            return drafter_rows[t].to(self.device, torch.float32)
        if kind == "position":
            h = drafter_rows[t].to(self.device, torch.float32)[None, None]
            return apply_adapter(self.adapter, self.adapter_cfg, h, None)[0, 0]
        if kind == "sequence":
            h = _stack(drafter_rows[: t + 1], self.device)[None]
            return apply_adapter(self.adapter, self.adapter_cfg, h, None, _ones(h))[0, -1]
        if t < 1:
            raise ValueError(f"{self.level} drafts position t from the target's rows before t; t={t} has none")
        tgt = _stack(target_rows[:t], self.device)[None]
        drf = _stack(drafter_rows[:t], self.device)[None] if kind == "fused_next" else None
        return apply_adapter(self.adapter, self.adapter_cfg, drf, tgt, _ones(tgt), output="next")[0, -1]

    @torch.no_grad()
    def draft(self, t: int, drafter_rows: list[torch.Tensor], target_rows: list[torch.Tensor]) -> Draft:
        """Draft position t: argmax of W · estimate (see the module table)."""
        row = self.estimate(t, drafter_rows, target_rows)
        top = (self.weight @ row).topk(2)
        idx, _, v1, v2 = torch.cat([top.indices.to(top.values.dtype), top.values]).tolist()  # one host transfer
        return Draft(int(idx), float(v1 - v2), row)


def _stack(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([r.to(device, torch.float32) for r in rows])


def _ones(h: torch.Tensor) -> torch.Tensor:
    return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
