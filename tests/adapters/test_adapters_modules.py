"""Adapter architectures: exact parameter counts (meta device), shapes, masking, factory errors."""

import pytest
import torch

from egpt_core.adapters import apply_adapter, count_parameters, create_adapter, level_parameter_count
from egpt_core.adapters.modules import LEVELS, research_formula, separate_head_extra
from egpt_core.config import AdapterConfig
from egpt_core.errors import ConfigError

D = 4096
RESEARCH_ANCHORS = {
    "L1": 2_113_537,
    "L2": 6_324_227,
    "L3": 25_188_355,
    "L4": 100_714_497,
    "L5": 102_819_841,
    "B1": 102_819_841,
    "L5F": 169_936_897,
}


@pytest.mark.parametrize("level", LEVELS)
def test_research_parameter_counts_exact_on_meta(level):
    cfg = AdapterConfig(level=level, separate_prediction_head=False)
    with torch.device("meta"):
        module = create_adapter(cfg, D)
    assert next(module.parameters()).is_meta
    assert count_parameters(module) == RESEARCH_ANCHORS[level]
    assert research_formula(level, D) == RESEARCH_ANCHORS[level]


def test_l3_two_blocks_and_default_head_counts():
    assert level_parameter_count(AdapterConfig(level="L3", num_blocks=2), D) == 16_797_698
    for level in ("L5", "B1", "L5F"):
        ours = level_parameter_count(AdapterConfig(level=level), D)
        assert ours == RESEARCH_ANCHORS[level] + separate_head_extra(D) == RESEARCH_ANCHORS[level] + 16_789_505
    for level in ("L1", "L2", "L3", "L4"):  # the flag only concerns the L5 family
        assert level_parameter_count(AdapterConfig(level=level), D) == RESEARCH_ANCHORS[level]


def test_unknown_level_and_hidden_size_errors():
    cfg = AdapterConfig.model_construct(level="L9", hidden_size=None, bottleneck_dim=None)
    with pytest.raises(ConfigError, match="unknown adapter level 'L9'"):
        create_adapter(cfg, 16)
    with pytest.raises(ConfigError, match="hidden_size=32.*16"):
        create_adapter(AdapterConfig(level="L1", hidden_size=32), 16)
    with pytest.raises(ConfigError, match="hidden size unknown"):
        create_adapter(AdapterConfig(level="L1"))


def _small(level, **kw):
    return AdapterConfig(level=level, num_heads=4, ffn_dim=32, bottleneck_dim=8, max_seq_len=16, **kw)


@pytest.mark.parametrize("level", LEVELS)
def test_forward_shapes_and_init(level):
    torch.manual_seed(0)
    d = 16
    m = create_adapter(_small(level), d).eval()
    x, y = torch.randn(3, 7, d), torch.randn(3, 7, d)
    mask = torch.ones(3, 7, dtype=torch.bool)
    out = apply_adapter(m, _small(level), x, y, mask)
    assert out.shape == (3, 7, d)
    assert torch.isfinite(out).all()
    if level in ("L5", "B1", "L5F"):
        nxt = apply_adapter(m, _small(level), x, y, mask, output="next")
        assert nxt.shape == (3, 7, d)
    if level == "L4":  # residual gate: out = h + 0.1 * (head(x) - h)
        assert m.alpha.item() == pytest.approx(0.1)
        assert torch.allclose(m.head.proj.weight, torch.eye(d))


def test_input_sides():
    d = 16
    x, y = torch.randn(2, 5, d), torch.randn(2, 5, d)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.manual_seed(0)
    b1 = create_adapter(_small("B1"), d).eval()
    assert b1.input_side == "target"
    assert torch.equal(apply_adapter(b1, _small("B1"), x, y, mask), b1(y, mask))
    torch.manual_seed(0)
    l5 = create_adapter(_small("L5"), d).eval()
    l5.load_state_dict(b1.state_dict())
    assert torch.equal(apply_adapter(l5, _small("L5"), x, y, mask), b1(x, mask))
    with pytest.raises(ValueError, match="needs target rows"):
        apply_adapter(b1, _small("B1"), x, None, mask)


def _perturb_padding(x, mask, seed):
    g = torch.Generator().manual_seed(seed)
    noise = 100 * torch.randn(x.shape, generator=g)
    return torch.where(mask[..., None], x, noise)


@pytest.mark.parametrize("level", ["L4", "L5", "B1", "L5F", "L2"])
@pytest.mark.parametrize("training", [False, True])
def test_valid_outputs_ignore_padding_content(level, training):
    """Same masking in train and eval (B9): valid outputs do not depend on padded rows."""
    torch.manual_seed(0)
    d = 16
    cfg = _small(level, dropout=0.0)
    m = create_adapter(cfg, d).train(training)
    with torch.no_grad():  # make the attention path matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lengths = torch.tensor([7, 4, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    x, y = torch.randn(3, 7, d), torch.randn(3, 7, d)
    out1 = apply_adapter(m, cfg, x, y, mask)
    out2 = apply_adapter(m, cfg, _perturb_padding(x, mask, 1), _perturb_padding(y, mask, 2), mask)
    assert torch.allclose(out1[mask], out2[mask], atol=1e-5, rtol=1e-5)
    # and padding is really masked: a shorter, unpadded batch gives the same valid rows
    solo = apply_adapter(m, cfg, x[1:2, :4], y[1:2, :4], mask[1:2, :4])
    assert torch.allclose(solo[0], out1[1, :4], atol=1e-5, rtol=1e-5)


def test_l4_is_bidirectional_l5_is_causal():
    torch.manual_seed(0)
    d = 16
    x = torch.randn(1, 6, d)
    mask = torch.ones(1, 6, dtype=torch.bool)
    x2 = x.clone()
    x2[0, 5] = torch.randn(d)  # change the last position only
    for level, changes_earlier in (("L4", True), ("L5", False)):
        m = create_adapter(_small(level, dropout=0.0), d).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        a, b = m(x, mask), m(x2, mask)
        assert (not torch.allclose(a[0, :5], b[0, :5], atol=1e-6)) == changes_earlier


def test_sequence_longer_than_table_is_a_clear_error():
    m = create_adapter(_small("L5"), 16)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len 16"):
        m(torch.randn(1, 17, 16), torch.ones(1, 17, dtype=torch.bool))
    m = create_adapter(_small("L5F"), 16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(torch.randn(1, 17, 16), torch.randn(1, 17, 16), torch.ones(1, 17, dtype=torch.bool))


def test_inits():
    torch.manual_seed(0)
    l1 = create_adapter(AdapterConfig(level="L1"), 64)
    blk = l1.blocks[0]
    assert torch.count_nonzero(blk.up.weight) == 0
    assert blk.down.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)  # Kaiming fan-in, linear gain
    assert blk.alpha.item() == pytest.approx(0.1)
    x = torch.randn(2, 3, 64)
    assert torch.allclose(l1.eval()(x), torch.nn.functional.layer_norm(x, (64,), eps=1e-5), atol=1e-6)
    l5 = create_adapter(AdapterConfig(level="L5"), 64)
    assert l5.pos_embed.shape == (1, 512, 64)
    assert l5.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)  # trunc_normal_(std=0.02), torch's default cut
    assert torch.allclose(l5.next_head.proj.weight, torch.eye(64))
    l5f = create_adapter(AdapterConfig(level="L5F"), 64)
    assert torch.count_nonzero(l5f.proj.bias) == 0
    ln = [m for m in l5f.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert ln and all(m.eps == 1e-5 for m in ln)
    drop = [m for m in l5f.modules() if isinstance(m, torch.nn.Dropout)]
    assert drop and all(m.p == 0.1 for m in drop)


@pytest.mark.parametrize("level", LEVELS)
def test_level_spec_describes_the_module_it_builds(level):
    """The registry is the one description of a level: what it builds reads what the spec says it
    reads, predicts the next row and attends across positions iff the spec says so, and the spec's
    research formula counts its parameters at other sizes too."""
    from egpt_core.adapters.modules import LEVEL_SPECS, level_spec

    spec = level_spec(level)
    assert spec is LEVEL_SPECS[level] and spec.name == level
    cfg = AdapterConfig(level=level, num_heads=2, ffn_dim=24, num_blocks=2, max_seq_len=16, dropout=0.0,
                        separate_prediction_head=False)
    module = spec.builder(cfg, 32).eval()
    assert (module.level or level, module.input_side, module.has_next_prediction) == (level, spec.inputs,
                                                                                    spec.predicts_next)
    assert spec.leaks_target == (level in ("B1", "L5F"))
    assert spec.research_params(32, cfg) == count_parameters(module)
    # attends: the module mixes positions (attention) exactly when the spec says so
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules()) == spec.attends
