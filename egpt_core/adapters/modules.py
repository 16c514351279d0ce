"""Alignment adapters L1..L5, B1 and L5F (reference §6), with research defaults.

Every adapter maps drafter-side hidden states [B, S, D] to the target's space [B, S, D]:

======  ===========================  ==============================  ===========================
level   class                        forward                         input side
======  ===========================  ==============================  ===========================
L1      ``BottleneckStackAdapter``   ``(h, mask)``                   drafter rows
L2      ``BottleneckStackAdapter``   ``(h, mask)``                   drafter rows
L3      ``WideBottleneckAdapter``    ``(h, mask)``                   drafter rows
L4      ``AttentionAdapter``         ``(h, mask)``                   drafter rows
L5      ``EagleAdapter``             ``(h, mask)``                   drafter rows
B1      ``EagleAdapter``             ``(h, mask)``                   **target** rows (baseline)
L5F     ``FusedEagleAdapter``        ``(h_drafter, h_target, mask)`` both
======  ===========================  ==============================  ===========================

``mask`` is a [B, S] bool tensor (True = valid row). Attention levels use it as a key-padding
mask in training *and* evaluation (research bug B9: L4 was evaluated without it); position-wise
levels (L1-L3) accept it for a uniform signature. Outputs at padded positions are unspecified.

The L5 family (L5, B1, L5F) also predicts the next target row. By default
(``separate_prediction_head=True``) that prediction comes from its own head
(LayerNorm + Linear(D, D), identity init, plus its own residual gate) so the aligned output is
asked to match y[t] only and the next-position output y[t+1] only. The research objective
(``False``) asks one output to match both (reference §6.9, §12.2.4); parameter counts then equal
the research anchors exactly. The separate head adds ``D**2 + 3*D + 1`` parameters
(16,789,505 at D = 4096).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from egpt_core.config import AdapterConfig, AdapterLevel
from egpt_core.errors import ConfigError

LN_EPS = 1e-5
ALPHA_INIT = 0.1
TOKEN_VOCAB = 32000

def _kaiming_fan_in(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear")


def _identity_linear(linear: nn.Linear) -> None:
    with torch.no_grad():
        nn.init.eye_(linear.weight)
        if linear.bias is not None:
            linear.bias.zero_()


def _alpha() -> nn.Parameter:
    return nn.Parameter(torch.tensor(ALPHA_INIT))


def _check_mask(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if h.dim() != 3:
        raise ValueError(f"expected hidden states [B, S, D], got shape {tuple(h.shape)}")
    if mask is None:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if mask.shape != h.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(h.shape[:2])}")
    return mask.to(device=h.device, dtype=torch.bool)


class AdapterBase(nn.Module):
    """Common attributes: ``level``, ``input_side`` ('drafter' | 'target' | 'both'),
    ``has_next_prediction`` (L5 family) and ``forward_with_prediction``."""

    level: str = ""
    input_side: str = "drafter"
    has_next_prediction: bool = False

    def forward_with_prediction(self, *inputs: torch.Tensor, mask: torch.Tensor | None = None):
        """(aligned [B,S,D], next-position prediction [B,S,D] or None)."""
        return self(*inputs, mask=mask), None


# --------------------------------------------------------------------------------------------------
# L1 / L2: bottleneck blocks
# --------------------------------------------------------------------------------------------------
class BottleneckBlock(nn.Module):
    """y = x + alpha * Up(Dropout(GELU(Down(LN(x))))); Down Kaiming fan-in, Up zero-init."""

    def __init__(self, hidden_size: int, bottleneck: int = 256, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.down = nn.Linear(hidden_size, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.alpha = _alpha()
        _kaiming_fan_in(self.down.weight)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.up(self.dropout(F.gelu(self.down(self.norm(x)))))


class BottleneckStackAdapter(AdapterBase):
    """L1 (1 block) / L2 (N blocks): bottleneck blocks then a final LayerNorm.

    Params = N*(2*D*r + 2*D + 1) + 2*D.
    """

    def __init__(self, hidden_size: int, bottleneck: int = 256, num_blocks: int = 1, dropout: float = 0.1,
                 level: str = "L1"):
        super().__init__()
        self.level = level
        self.blocks = nn.ModuleList(BottleneckBlock(hidden_size, bottleneck, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_mask(h, mask)
        x = h
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


# --------------------------------------------------------------------------------------------------
# L3: wide bottleneck
# --------------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    def __init__(self, hidden_size: int, width: int, dropout: float):
        super().__init__()
        self.down = nn.Linear(hidden_size, width, bias=False)
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.up = nn.Linear(width, hidden_size, bias=False)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.alpha = _alpha()
        _kaiming_fan_in(self.down.weight)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop2(self.up(self.drop1(F.gelu(self.norm(self.down(x))))))
        return x + self.alpha * y


class WideBottleneckAdapter(AdapterBase):
    """L3: input LN; N residual wide blocks (D->b, LN(b), GELU, Dropout, b->D, Dropout); final LN.

    Params = N*(2*D*b + 2*b + 1) + 4*D.
    """

    level = "L3"

    def __init__(self, hidden_size: int, width: int = 1024, num_blocks: int = 3, dropout: float = 0.1):
        super().__init__()
        self.input_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.blocks = nn.ModuleList(WideBlock(hidden_size, width, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_mask(h, mask)
        x = self.input_norm(h)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


# --------------------------------------------------------------------------------------------------
# attention levels
# --------------------------------------------------------------------------------------------------
class PreNormLayer(nn.Module):
    """x <- x + MHA(LN(x)); x <- x + FFN(LN(x)); FFN = Linear(D,F) GELU Dropout Linear(F,D) Dropout."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, ffn_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(ffn_dim, hidden_size), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.norm1(x)
        # need_weights=False keeps the same (SDPA) code path in train and eval.
        x = x + self.attn(a, a, a, key_padding_mask=key_padding, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


def _key_padding(mask: torch.Tensor) -> torch.Tensor:
    """True = ignore this key. Rows without any valid position attend everywhere (no NaN)."""
    pad = ~mask
    empty = pad.all(dim=1, keepdim=True)
    return pad & ~empty


def _causal(seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


class OutputHead(nn.Module):
    """LN + Linear(D, D) initialised to identity weight, zero bias."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.proj = nn.Linear(hidden_size, hidden_size)
        _identity_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class AttentionAdapter(AdapterBase):
    """L4: pre-norm bidirectional transformer layer(s) with a key-padding mask, identity-init
    output head, residual gate out = h + alpha*(head(x) - h). Params = 5D^2 + 2DF + 12D + F + 1."""

    level = "L4"

    def __init__(self, hidden_size: int, num_heads: int = 8, ffn_dim: int = 2048, num_layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.layers = nn.ModuleList(PreNormLayer(hidden_size, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.head = OutputHead(hidden_size)
        self.alpha = _alpha()

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check_mask(h, mask)
        kp = _key_padding(mask)
        x = h
        for layer in self.layers:
            x = layer(x, kp, None)
        return h + self.alpha * (self.head(x) - h)


class _CausalCore(AdapterBase):
    """Shared by L5/B1/L5F: positional table, causal pre-norm layer(s), output head, residual gate,
    optional separate next-position head."""

    has_next_prediction = True

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float,
                 max_seq_len: int, separate_prediction_head: bool):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.max_seq_len = max_seq_len
        self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(PreNormLayer(hidden_size, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.head = OutputHead(hidden_size)
        self.alpha = _alpha()
        self.separate_prediction_head = separate_prediction_head
        if separate_prediction_head:
            self.next_head = OutputHead(hidden_size)
            self.next_alpha = _alpha()

    def _check_len(self, seq_len: int) -> None:
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"{self.level}: sequence length {seq_len} exceeds max_seq_len {self.max_seq_len} "
                "(the positional table size; raise AdapterConfig.max_seq_len or truncate the rows)"
            )

    def _core(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        x = x + self.pos_embed[:, :seq_len]
        kp = _key_padding(mask)
        causal = _causal(seq_len, x.device)
        for layer in self.layers:
            x = layer(x, kp, causal)
        return x

    def _outputs(self, x: torch.Tensor, anchor: torch.Tensor, with_prediction: bool):
        aligned = anchor + self.alpha * (self.head(x) - anchor)
        if not with_prediction:
            return aligned, None
        if self.separate_prediction_head:
            return aligned, anchor + self.next_alpha * (self.next_head(x) - anchor)
        return aligned, aligned


class EagleAdapter(_CausalCore):
    """L5 (drafter rows in) and B1 (target rows in, ``input_side='target'``).

    x = LN_in(h) [+ token fusion] + pos; causal pre-norm layer; out = h + alpha*(head(x) - h).
    Params (research objective) = 5D^2 + 2DF + 14D + F + 512*D + 1.
    """

    def __init__(self, hidden_size: int, num_heads: int = 8, ffn_dim: int = 2048, num_layers: int = 1,
                 dropout: float = 0.1, max_seq_len: int = 512, separate_prediction_head: bool = True,
                 use_token_embed: bool = False, vocab_size: int = TOKEN_VOCAB, level: str = "L5"):
        super().__init__(hidden_size, num_heads, ffn_dim, num_layers, dropout, max_seq_len, separate_prediction_head)
        self.level = level
        self.input_side = "target" if level == "B1" else "drafter"
        self.input_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.use_token_embed = use_token_embed
        if use_token_embed:
            self.token_embed = nn.Embedding(vocab_size, hidden_size)
            self.token_fuse = nn.Linear(2 * hidden_size, hidden_size)

    def _run(self, h, mask, prev_tokens, with_prediction):
        mask = _check_mask(h, mask)
        self._check_len(h.shape[1])
        x = h
        if self.use_token_embed and prev_tokens is not None:
            x = self.token_fuse(torch.cat([x, self.token_embed(prev_tokens)], dim=-1))
        x = self._core(self.input_norm(x), mask)
        return self._outputs(x, h, with_prediction)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None,
                prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(h, mask, prev_tokens, False)[0]

    def forward_with_prediction(self, h, mask=None, prev_tokens=None):
        return self._run(h, mask, prev_tokens, True)


class FusedEagleAdapter(_CausalCore):
    """L5F: g = sigmoid(Linear(2D,D)[h_e;h_v]); fused = g*h_e + (1-g)*h_v;
    x = LN(fused + Linear(2D,D)[h_e;h_v]) + pos; causal layer; out = h_v + alpha*(head(x) - h_v).
    Params (research objective) = 9D^2 + 2DF + 16D + F + 512*D + 1."""

    level = "L5F"
    input_side = "both"

    def __init__(self, hidden_size: int, num_heads: int = 8, ffn_dim: int = 2048, num_layers: int = 1,
                 dropout: float = 0.1, max_seq_len: int = 512, separate_prediction_head: bool = True):
        super().__init__(hidden_size, num_heads, ffn_dim, num_layers, dropout, max_seq_len, separate_prediction_head)
        self.gate = nn.Linear(2 * hidden_size, hidden_size)
        self.proj = nn.Linear(2 * hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.fuse_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)

    def _run(self, h_drafter, h_target, mask, with_prediction):
        if h_drafter.shape != h_target.shape:
            raise ValueError(f"L5F inputs differ in shape: {tuple(h_drafter.shape)} vs {tuple(h_target.shape)}")
        mask = _check_mask(h_drafter, mask)
        self._check_len(h_drafter.shape[1])
        cat = torch.cat([h_drafter, h_target], dim=-1)
        g = torch.sigmoid(self.gate(cat))
        fused = g * h_drafter + (1 - g) * h_target
        x = self._core(self.fuse_norm(fused + self.proj(cat)), mask)
        return self._outputs(x, h_target, with_prediction)

    def forward(self, h_drafter: torch.Tensor, h_target: torch.Tensor, mask: torch.Tensor | None = None):
        return self._run(h_drafter, h_target, mask, False)[0]

    def forward_with_prediction(self, h_drafter, h_target, mask=None):
        return self._run(h_drafter, h_target, mask, True)


# --------------------------------------------------------------------------------------------------
# factory, counting
# --------------------------------------------------------------------------------------------------
def resolve_hidden_size(cfg: AdapterConfig, hidden_size: int | None) -> int:
    d = hidden_size if hidden_size is not None else cfg.hidden_size
    if d is None:
        raise ConfigError("adapter hidden size unknown: set AdapterConfig.hidden_size or pass hidden_size")
    if cfg.hidden_size is not None and hidden_size is not None and cfg.hidden_size != hidden_size:
        raise ConfigError(
            f"hidden-size mismatch: adapter config hidden_size={cfg.hidden_size} but data has hidden size "
            f"{hidden_size}; set adapter.hidden_size to {hidden_size} (or leave it unset)"
        )
    return int(d)


# --------------------------------------------------------------------------------------------------
# the level registry: the one place a level is described
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelSpec:
    """One adapter level: what builds it, what it reads, whether it attends across positions
    (L4 and the L5 family) or maps each row alone (L1-L3), whether it also predicts the next target
    row (the L5 family, trained with the EAGLE objective) and its closed-form research parameter
    count (reference §6; ``separate_prediction_head=False``)."""

    name: str
    description: str
    builder: Callable[[AdapterConfig, int], AdapterBase]  # (cfg, hidden size D) -> module
    inputs: Literal["drafter", "target", "both"]
    attends: bool
    predicts_next: bool
    research_params: Callable[[int, AdapterConfig], int]  # (D, cfg) -> parameter count

    @property
    def leaks_target(self) -> bool:
        """Reads the target's own rows: its same-position metrics are no cross-modal result (§12.2 P1.3)."""
        return self.inputs != "drafter"


def _attention(cfg: AdapterConfig) -> dict:
    return dict(num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, dropout=cfg.dropout)


def _eagle(level: str) -> Callable[[AdapterConfig, int], AdapterBase]:
    def build(cfg: AdapterConfig, d: int) -> AdapterBase:
        return EagleAdapter(d, **_attention(cfg), max_seq_len=cfg.max_seq_len,
                            separate_prediction_head=cfg.separate_prediction_head, level=level)
    return build


def _bottleneck_params(d: int, r: int, n: int) -> int:
    return n * (2 * d * r + 2 * d + 1) + 2 * d


def _wide_params(d: int, b: int, n: int) -> int:
    return n * (2 * d * b + 2 * b + 1) + 4 * d


def _eagle_params(d: int, c: AdapterConfig) -> int:
    return 5 * d * d + 2 * d * c.ffn_dim + 14 * d + c.ffn_dim + c.max_seq_len * d + 1


LEVEL_SPECS: dict[str, LevelSpec] = {spec.name: spec for spec in (
    LevelSpec("L1", "bottleneck (r=256, 1 block + final LN)",
              lambda c, d: BottleneckStackAdapter(d, c.bottleneck_dim or 256, 1, c.dropout, level="L1"),
              "drafter", False, False, lambda d, c: _bottleneck_params(d, c.bottleneck_dim or 256, 1)),
    LevelSpec("L2", "stacked bottleneck (N blocks + final LN)",
              lambda c, d: BottleneckStackAdapter(d, c.bottleneck_dim or 256, c.num_blocks, c.dropout, level="L2"),
              "drafter", False, False, lambda d, c: _bottleneck_params(d, c.bottleneck_dim or 256, c.num_blocks)),
    LevelSpec("L3", "wide bottleneck (b=1024, N blocks, input/final LN)",
              lambda c, d: WideBottleneckAdapter(d, c.bottleneck_dim or 1024, c.num_blocks, c.dropout),
              "drafter", False, False,
              lambda d, c: _wide_params(d, c.bottleneck_dim or 1024, c.num_blocks)),
    LevelSpec("L4", "attention adapter (1 pre-norm bidirectional layer, key-padding mask)",
              lambda c, d: AttentionAdapter(d, **_attention(c)),
              "drafter", True, False, lambda d, c: 5 * d * d + 2 * d * c.ffn_dim + 12 * d + c.ffn_dim + 1),
    LevelSpec("L5", "EAGLE-style (causal layer + positional table), drafter input",
              _eagle("L5"), "drafter", True, True, _eagle_params),
    LevelSpec("B1", "EAGLE-style fed the TARGET rows (VLM-only baseline; leaks the target)",
              _eagle("B1"), "target", True, True, _eagle_params),
    LevelSpec("L5F", "fused EAGLE (gated drafter/target fusion + causal layer; leaks the target)",
              lambda c, d: FusedEagleAdapter(d, **_attention(c), max_seq_len=c.max_seq_len,
                                             separate_prediction_head=c.separate_prediction_head),
              "both", True, True, lambda d, c: _eagle_params(d, c) + 4 * d * d + 2 * d),
)}
LEVELS: tuple[str, ...] = tuple(LEVEL_SPECS)
LEVEL_DESCRIPTIONS: dict[str, str] = {name: spec.description for name, spec in LEVEL_SPECS.items()}
if set(LEVELS) != set(get_args(AdapterLevel)):  # the config's choices are the registry's levels
    raise ImportError(f"AdapterLevel {get_args(AdapterLevel)} and LEVEL_SPECS {LEVELS} disagree")


def level_spec(level: str) -> LevelSpec:
    """The registry entry of ``level`` (unknown level -> ConfigError)."""
    spec = LEVEL_SPECS.get(str(level))
    if spec is None:
        raise ConfigError(f"unknown adapter level {level!r}; expected one of {', '.join(LEVELS)}")
    return spec


def create_adapter(cfg: AdapterConfig, hidden_size: int | None = None) -> AdapterBase:
    """Build the adapter named by ``cfg.level`` (unknown level -> ConfigError)."""
    return level_spec(cfg.level).builder(cfg, resolve_hidden_size(cfg, hidden_size))


def input_side(level: str) -> str:
    """'drafter' (L1-L5), 'target' (B1) or 'both' (L5F)."""
    return level_spec(level).inputs


def adapter_inputs(level: str, drafter: torch.Tensor | None, target: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    side = input_side(level)
    needed = {"drafter": (drafter,), "target": (target,), "both": (drafter, target)}[side]
    if any(t is None for t in needed):
        raise ValueError(f"{level} needs {side} rows as input")
    return needed


def apply_adapter(module: nn.Module, cfg: AdapterConfig, drafter: torch.Tensor | None, target: torch.Tensor | None,
                  mask: torch.Tensor | None = None, output: str = "aligned") -> torch.Tensor:
    """Run an adapter on a batch, choosing its input by level (B1: target rows; L5F: both).

    ``output='aligned'`` (default) is the same-position estimate of target row t, what acceptance
    is measured on; ``output='next'`` is the L5 family's estimate of target row t+1 (the separate
    prediction head, or the aligned output itself under the research objective).
    """
    args = adapter_inputs(cfg.level, drafter, target)
    if output == "aligned":
        return module(*args, mask=mask)
    if output == "next":
        if not getattr(module, "has_next_prediction", False):
            raise ValueError(f"{cfg.level} has no next-position output")
        return module.forward_with_prediction(*args, mask=mask)[1]
    raise ValueError(f"output={output!r}: expected 'aligned' or 'next'")


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on meta-device modules."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def level_parameter_count(cfg: AdapterConfig, hidden_size: int | None = None) -> int:
    """Exact parameter count of ``cfg``'s adapter, built on the meta device (no memory used)."""
    with torch.device("meta"):
        return count_parameters(create_adapter(cfg, hidden_size))


def research_formula(level: str, d: int, r: int | None = None, n: int = 3, heads_ffn: int = 2048,
                     max_seq_len: int = 512) -> int:
    """Closed-form research counts (reference §6) for cross-checking ``level_parameter_count``."""
    spec = level_spec(level)
    cfg = AdapterConfig(level=level, bottleneck_dim=r, num_blocks=n, ffn_dim=heads_ffn, max_seq_len=max_seq_len)
    return spec.research_params(d, cfg)


def separate_head_extra(d: int) -> int:
    """Extra parameters of the separate next-position head (LN + Linear(D,D) + gate)."""
    return d * d + 3 * d + 1


__all__ = [
    "LEVELS", "LEVEL_DESCRIPTIONS", "LEVEL_SPECS", "LevelSpec", "level_spec", "AdapterBase", "BottleneckStackAdapter", "WideBottleneckAdapter",
    "AttentionAdapter", "EagleAdapter", "FusedEagleAdapter", "create_adapter", "count_parameters",
    "level_parameter_count", "research_formula", "apply_adapter", "input_side",
    "adapter_inputs", "separate_head_extra",
]
