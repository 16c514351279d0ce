"""The research pipeline's adapter classes, re-typed from the published formulas (reference §6) with
the research module/parameter names, and its checkpoint writer (§6.10). Test-only: they are the
*other* implementation the importer must reproduce."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HiddenAdapterConfig:
    hidden_dim: int = 4096
    bottleneck_dim: int = 256
    num_layers: int = 1
    dropout: float = 0.1
    alpha: float = 0.1
    use_layer_norm: bool = True
    use_gelu: bool = True


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_dim, bottleneck_dim, dropout=0.1, alpha=0.1):
        super().__init__()
        self.alpha = alpha  # stored, unused (reference §6.2)
        self.down_proj = nn.Linear(hidden_dim, bottleneck_dim, bias=False)
        self.up_proj = nn.Linear(bottleneck_dim, hidden_dim, bias=False)
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.alpha_param = nn.Parameter(torch.tensor(alpha))

    def forward(self, h):
        return h + self.alpha_param * self.up_proj(self.dropout(self.act(self.down_proj(self.layer_norm(h)))))


class HiddenStateAdapter(nn.Module):  # L1
    def __init__(self, config: HiddenAdapterConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(BottleneckAdapter(config.hidden_dim, config.bottleneck_dim, config.dropout,
                                                      config.alpha) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_dim)

    def forward(self, h, attention_mask=None):
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "config": self.config}


class MultiLayerBottleneckAdapter(nn.Module):  # L2
    def __init__(self, hidden_dim, bottleneck_dim=256, num_blocks=3, dropout=0.1, alpha=0.1):
        super().__init__()
        self.hidden_dim, self.bottleneck_dim, self.num_blocks = hidden_dim, bottleneck_dim, num_blocks
        self.blocks = nn.ModuleList(BottleneckAdapter(hidden_dim, bottleneck_dim, dropout, alpha)
                                    for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_dim)

    def forward(self, h, attention_mask=None):
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "adapter_type": "L2_MultiLayerBottleneck",
                "config": {"hidden_dim": self.hidden_dim, "bottleneck_dim": self.bottleneck_dim,
                           "num_blocks": self.num_blocks}}


class WideBottleneckAdapter(nn.Module):  # L3
    def __init__(self, hidden_dim, bottleneck_dim=1024, num_blocks=2, dropout=0.1, alpha=0.1):
        super().__init__()
        self.hidden_dim, self.bottleneck_dim, self.num_blocks = hidden_dim, bottleneck_dim, num_blocks
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Linear(hidden_dim, bottleneck_dim, bias=False), nn.LayerNorm(bottleneck_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(bottleneck_dim, hidden_dim, bias=False), nn.Dropout(dropout),
        ) for _ in range(num_blocks))
        self.alphas = nn.ParameterList(nn.Parameter(torch.tensor(alpha)) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_dim)

    def forward(self, h, attention_mask=None):
        x = self.input_norm(h)
        for block, alpha in zip(self.blocks, self.alphas):
            x = x + alpha * block(x)
        return self.final_norm(x)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "adapter_type": "L3_WideBottleneck",
                "config": {"hidden_dim": self.hidden_dim, "bottleneck_dim": self.bottleneck_dim,
                           "num_blocks": self.num_blocks}}


def _layers(hidden_dim, num_heads, ffn_dim, num_layers, dropout):
    return nn.ModuleList(nn.ModuleDict({
        "attn_norm": nn.LayerNorm(hidden_dim),
        "attn": nn.MultiheadAttention(embed_dim=hidden_dim, num_heads=num_heads, dropout=dropout, batch_first=True),
        "ffn_norm": nn.LayerNorm(hidden_dim),
        "ffn": nn.Sequential(nn.Linear(hidden_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(ffn_dim, hidden_dim), nn.Dropout(dropout)),
    }) for _ in range(num_layers))


def _run_layers(layers, x, attn_mask, attention_mask):
    kpm = None if attention_mask is None else attention_mask == 0
    for layer in layers:
        n = layer["attn_norm"](x)
        x = x + layer["attn"](n, n, n, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)[0]
        x = x + layer["ffn"](layer["ffn_norm"](x))
    return x


def _causal(s, device):
    m = torch.triu(torch.ones(s, s, device=device), diagonal=1)
    return m.masked_fill(m == 1, float("-inf"))


class AttentionAdapter(nn.Module):  # L4
    def __init__(self, hidden_dim, num_heads=8, ffn_dim=2048, num_layers=1, dropout=0.1):
        super().__init__()
        self.cfg = {"hidden_dim": hidden_dim, "num_heads": num_heads, "ffn_dim": ffn_dim, "num_layers": num_layers}
        self.layers = _layers(hidden_dim, num_heads, ffn_dim, num_layers, dropout)
        self.output_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.alpha = nn.Parameter(torch.tensor(0.1))

    def forward(self, h, attention_mask=None):
        x = _run_layers(self.layers, h, None, attention_mask)
        return h + self.alpha * (self.output_proj(x) - h)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "adapter_type": "L4_Attention", "config": self.cfg}


class EAGLEStyleAdapter(nn.Module):  # L5 and B1
    def __init__(self, hidden_dim, num_heads=8, ffn_dim=2048, num_layers=1, dropout=0.1, max_seq_len=512,
                 use_token_embed=False, vocab_size=32000):
        super().__init__()
        self.cfg = {"hidden_dim": hidden_dim, "num_heads": num_heads, "ffn_dim": ffn_dim, "num_layers": num_layers,
                    "use_token_embed": use_token_embed}
        if use_token_embed:
            self.token_embed = nn.Embedding(vocab_size, hidden_dim)
            self.token_fusion = nn.Linear(2 * hidden_dim, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_dim))
        self.layers = _layers(hidden_dim, num_heads, ffn_dim, num_layers, dropout)
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.alpha = nn.Parameter(torch.tensor(0.1))

    def forward(self, h, attention_mask=None):
        s = h.shape[1]
        x = self.input_norm(h) + self.pos_embed[:, :s, :]
        x = _run_layers(self.layers, x, _causal(s, h.device), attention_mask)
        return h + self.alpha * (self.output_proj(self.output_norm(x)) - h)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "adapter_type": "L5_EAGLE", "config": self.cfg}


class FusedEAGLEAdapter(nn.Module):  # L5F
    def __init__(self, hidden_dim, num_heads=8, ffn_dim=2048, num_layers=1, dropout=0.1, max_seq_len=512):
        super().__init__()
        self.cfg = {"hidden_dim": hidden_dim, "num_heads": num_heads, "ffn_dim": ffn_dim, "num_layers": num_layers}
        self.fusion_proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.fusion_norm = nn.LayerNorm(hidden_dim)
        self.gate = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.Sigmoid())
        self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_dim))
        self.layers = _layers(hidden_dim, num_heads, ffn_dim, num_layers, dropout)
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.alpha = nn.Parameter(torch.tensor(0.1))

    def forward(self, h_e, h_v, attention_mask=None):
        s = h_e.shape[1]
        cat = torch.cat([h_e, h_v], dim=-1)
        g = self.gate(cat)
        x = self.fusion_norm(g * h_e + (1 - g) * h_v + self.fusion_proj(cat)) + self.pos_embed[:, :s, :]
        x = _run_layers(self.layers, x, _causal(s, h_e.device), attention_mask)
        return h_v + self.alpha * (self.output_proj(self.output_norm(x)) - h_v)

    def checkpoint(self):
        return {"model_state_dict": self.state_dict(), "adapter_type": "L5F_FusedEAGLE", "config": self.cfg}


def build(level: str, d: int = 32):
    """A research adapter of ``level`` at hidden size ``d`` with every parameter randomised (the
    research init zeroes/identities some, which would make a name swap invisible)."""
    mod = {
        "L1": lambda: HiddenStateAdapter(HiddenAdapterConfig(hidden_dim=d, bottleneck_dim=8)),
        "L2": lambda: MultiLayerBottleneckAdapter(d, bottleneck_dim=8, num_blocks=3),
        "L3": lambda: WideBottleneckAdapter(d, bottleneck_dim=16, num_blocks=3),
        "L4": lambda: AttentionAdapter(d, num_heads=4, ffn_dim=48),
        "L5": lambda: EAGLEStyleAdapter(d, num_heads=4, ffn_dim=48, max_seq_len=16),
        "B1": lambda: EAGLEStyleAdapter(d, num_heads=4, ffn_dim=48, max_seq_len=16),
        "L5F": lambda: FusedEAGLEAdapter(d, num_heads=4, ffn_dim=48, max_seq_len=16),
    }[level]()
    g = torch.Generator().manual_seed(sum(map(ord, level)))
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return mod.eval()


def save_like_research(module: nn.Module, path, epoch: int = 7, metrics: dict | None = None) -> None:
    """``save_checkpoint`` of the research trainer: state dict, adapter_type, config, epoch, AdamW
    state and the validation metrics, one ``torch.save`` pickle."""
    ckpt = dict(module.checkpoint(), epoch=epoch)
    opt = torch.optim.AdamW(module.parameters(), lr=0.0, weight_decay=0.01)  # state filled, weights kept
    loss = sum(p.float().pow(2).sum() for p in module.parameters())
    loss.backward()
    opt.step()
    opt.zero_grad()
    ckpt["optimizer_state_dict"] = opt.state_dict()
    ckpt["metrics"] = metrics if metrics is not None else {"loss": 1.25, "cos_sim": 0.61, "accept_90": 0.2}
    torch.save(ckpt, path)
