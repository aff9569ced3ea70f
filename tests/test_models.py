"""attn5: parameter count (the formula of the paper's layers), shapes, layer order, errors."""

import pytest
import torch
from numpy.testing import assert_allclose
from torch import nn

from rtcnn.models import Attn5, n_parameters
from rtcnn.models.attn5 import ConvBlock, SpatialAttention


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_count_matches_paper_layers():
    # five blocks 2->32->64->128->128->256 (3x3 conv + bias, BN gamma/beta), 1x1 attention
    # conv 256->1, Dense 256->128, Dense 128->2, computed by hand:
    conv = (9 * 2 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) \
        + (9 * 128 * 128 + 128) + (9 * 128 * 256 + 256)
    bn = 2 * (32 + 64 + 128 + 128 + 256)
    expected = conv + bn + (256 + 1) + (256 * 128 + 128) + (128 * 2 + 2)
    assert expected == 570_339
    assert count(Attn5()) == expected == n_parameters()


@pytest.mark.parametrize(
    "kwargs",
    [dict(filters=[8, 16, 16]), dict(filters=[4] * 6, attention_kernel=3, hidden=16),
     dict(in_channels=3, filters=[16, 32, 32, 64, 64], kernel_size=5)],
)
def test_parameter_count_formula_for_other_configs(kwargs):
    assert count(Attn5(**kwargs)) == n_parameters(**kwargs)


def test_forward_shape_and_layers():
    torch.manual_seed(0)
    model = Attn5().eval()
    out = model(torch.randn(5, 2, 64, 64))
    assert out.shape == (5, 2) and out.dtype == torch.float32
    # five blocks, each Conv 3x3 -> ReLU -> BatchNorm -> MaxPool 2 -> Dropout 0.2
    assert len(model.features) == 5
    for block in model.features:
        assert isinstance(block, ConvBlock)
        conv, relu, bn, pool, drop = block
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert isinstance(relu, nn.ReLU) and isinstance(bn, nn.BatchNorm2d)
        assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2
        assert isinstance(drop, nn.Dropout) and drop.p == 0.2
    # the attention map is (B, 1, 2, 2) after 5 poolings of 64 px, values in (0, 1)
    amap = model.attention.last_map
    assert amap.shape == (5, 1, 2, 2)
    assert torch.all((amap > 0) & (amap < 1))
    # dense head: GAP -> 128 -> ReLU -> Dropout -> 2
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 128), (128, 2)]


def test_attention_multiplies_features_by_sigmoid_map():
    att = SpatialAttention(3, kernel_size=1)
    with torch.no_grad():
        att.conv.weight.zero_()
        att.conv.bias.fill_(0.0)  # sigmoid(0) = 0.5 everywhere
    x = torch.randn(2, 3, 4, 4)
    assert_allclose(att(x).detach().numpy(), 0.5 * x.numpy(), atol=1e-7)


def test_linear_head_is_unbounded_and_sigmoid_head_bounded():
    torch.manual_seed(1)
    lin = Attn5(filters=[4, 4], hidden=8)
    sig = Attn5(filters=[4, 4], hidden=8, out_activation="sigmoid")
    sig.load_state_dict(lin.state_dict())
    x = torch.randn(3, 2, 16, 16)
    lin.eval(), sig.eval()
    assert_allclose(sig(x).detach().numpy(), torch.sigmoid(lin(x)).detach().numpy(), atol=1e-6)


def test_depth_is_configurable():
    model = Attn5(filters=[8, 16, 32])
    assert model(torch.randn(2, 2, 64, 64)).shape == (2, 2)
    assert model.min_size == 8
    assert model(torch.randn(1, 2, 24, 24)).shape == (1, 2)  # any multiple of 2**depth


def test_config_round_trip():
    model = Attn5(filters=[8, 16], hidden=32, dropout=0.1)
    again = Attn5(**model.config)
    assert again.config == model.config
    assert count(again) == count(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(filters=[]), "filters must be a non-empty"),
     (dict(filters=[8, 0]), "filters must be a non-empty"),
     (dict(kernel_size=2), "kernel_size must be a positive odd int"),
     (dict(attention_kernel=0), "attention_kernel must be a positive odd int"),
     (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
     (dict(hidden=0), "hidden must be >= 1"),
     (dict(out_activation="tanh"), "out_activation must be one of")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attn5(**kwargs)


def test_bad_input_shapes():
    model = Attn5()
    with pytest.raises(ValueError, match=r"expected input \(B, 2, H, W\), got \(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="must be divisible by 32"):
        model(torch.zeros(1, 2, 48, 48))  # 2 ** 5 = 32 does not divide 48


# ---------------------------------------------------------------- soft-argmax readout
def test_softargmax_parameter_count_and_shapes():
    kw = dict(filters=[16, 32, 64, 64, 128], head="softargmax", pool_blocks=3)
    model = Attn5(**kw).eval()
    assert count(model) == n_parameters(filters=kw["filters"], head="softargmax")
    out = model(torch.randn(4, 2, 64, 64))
    assert out.shape == (4, 2)
    amap = model.attention.last_map
    assert amap.shape == (4, 1, 8, 8)  # 3 pools: 8x8 cells of 8 px
    assert_allclose(amap.sum(dim=(1, 2, 3)).numpy(), 1.0, rtol=1e-5)
    # block 4 and 5 keep the 8x8 resolution: no MaxPool in them
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.features[3])


def test_softargmax_uniform_map_gives_tile_centre_and_peak_gives_cell_centre():
    model = Attn5(filters=[4, 4, 4], head="softargmax", pool_blocks=3).eval()
    head = model.attention
    with torch.no_grad():
        for conv in (head.conv, head.offset):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.randn(2, 2, 64, 64)
    # uniform attention, zero offset: the mean cell centre = 31.5 px, the tile centre
    assert_allclose(model(x).detach().numpy() * 64, 31.5, atol=1e-4)
    # all weight on cell (row 2, column 5), offset +1 cell in x: (5.5 * 8 - 0.5 + 8) px
    f = torch.zeros(1, 4, 8, 8)
    f[0, 0, 2, 5] = 1.0
    with torch.no_grad():
        head.conv.weight[0, 0] = 100.0
        head.offset.bias[0] = 20.0  # tanh(20) = 1 cell
    xy = head(f, (64, 64)).detach().numpy()[0] * 64
    assert_allclose(xy, [5.5 * 8 - 0.5 + 8, 2.5 * 8 - 0.5], atol=1e-3)


def test_softargmax_rejects_sigmoid_and_bad_pool_blocks():
    with pytest.raises(ValueError, match="out_activation applies to head='gap' only"):
        Attn5(head="softargmax", out_activation="sigmoid")
    with pytest.raises(ValueError, match=r"pool_blocks must be in \[0, 5\]"):
        Attn5(pool_blocks=6)
    with pytest.raises(ValueError, match="head must be one of"):
        Attn5(head="flatten")
