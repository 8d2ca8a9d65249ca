"""The transformation network and its style-conditional norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snexp
from stylize.cond import ConditionalAffine, ConditionalSwitchNorm2d
from stylize.config import ModelConfig
from stylize.net import MAX_BLOCKS, MAX_WIDTH, TransformerNet


@pytest.mark.parametrize("norm", ["sn", "ssn", "in", "bn", "ln", "gn", "none"])
@pytest.mark.parametrize("size", [(17, 23), (5, 6), (32, 33)])
def test_output_has_the_input_size_for_odd_sizes(norm, size):
    net = TransformerNet("gn(groups=2)" if norm == "gn" else norm, width=0.125, blocks=1)
    y = net(torch.rand(2, 3, *size))
    # the output has exactly the input's shape, whatever the divisibility by 4
    assert y.shape == (2, 3, *size)
    assert torch.isfinite(y).all()


def test_paper_network_has_johnsons_widths_and_parameter_count():
    net = TransformerNet("in")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # 9x9 3->32, 3x3 s2 ->64, ->128, 10 res convs, 2 upsample convs, 9x9 ->3
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == (
        [(3, 32, 9, 1), (32, 64, 3, 2), (64, 128, 3, 2)] + [(128, 128, 3, 1)] * 10
        + [(128, 64, 3, 1), (64, 32, 3, 1), (32, 3, 9, 1)])
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == 1_679_235


def test_width_multiplier_scales_channels_and_norms_are_named_neutrally():
    net = TransformerNet("sn", width=0.5)
    assert net.conv1.conv.out_channels == 16 and net.down2.conv.out_channels == 64
    keys = list(net.state_dict())
    # checkpoint keys name the norm "norm", never bn/in
    assert "res.0.block1.norm.mean_weight" in keys
    assert not any(".bn" in k or ".in" in k for k in keys)


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 5x5"):
        TransformerNet("in", width=0.125)(torch.rand(1, 3, 4, 9))


@pytest.mark.parametrize("training", [True, False])
def test_conditional_sn_with_one_hot_style_equals_plain_sn(training):
    torch.manual_seed(0)
    cond = ConditionalSwitchNorm2d(6, num_styles=3)
    plain = snexp.SwitchNorm2d(6)
    with torch.no_grad():
        for p in cond.parameters():
            p.normal_()
        plain.weight.copy_(cond.weight[2])
        plain.bias.copy_(cond.bias[2])
        plain.mean_weight.copy_(cond.mean_logits[2])
        plain.var_weight.copy_(cond.var_logits[2])
        cond.running_mean[2].copy_(torch.randn(6))
        plain.running_mean.copy_(cond.running_mean[2])
    cond.train(training)
    plain.train(training)
    x = torch.randn(4, 6, 5, 7)
    style = torch.tensor([0.0, 0.0, 1.0])
    # a one-hot style makes the conditional layer exactly the SN layer of that style
    torch.testing.assert_close(cond(x, style), plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.running_mean[2], plain.running_mean)
    # and only that style's running statistics move
    assert torch.equal(cond.running_mean[0], torch.zeros(6))


def test_conditional_sn_blends_affine_and_importance_of_styles():
    cond = ConditionalSwitchNorm2d(4, num_styles=2, candidates=("in", "ln")).eval()
    with torch.no_grad():
        cond.mean_logits.copy_(torch.tensor([[5.0, -5.0], [-5.0, 5.0]]))
        cond.var_logits.copy_(cond.mean_logits)
        cond.weight.copy_(torch.tensor([[1.0] * 4, [3.0] * 4]))
    x = torch.randn(2, 4, 6, 6)
    mean_p, _ = cond.importance_weights()
    mix = torch.tensor([0.5, 0.5])
    ref = snexp.SwitchNorm2d(4, candidates=("in", "ln")).eval()
    with torch.no_grad():
        ref.weight.fill_(2.0)
        p = 0.5 * mean_p[0] + 0.5 * mean_p[1]
        ref.mean_weight.copy_(p.log())
        ref.var_weight.copy_(p.log())
    # a 50/50 blend uses the average gamma and the average importance probabilities
    torch.testing.assert_close(cond(x, mix), ref(x), atol=1e-5, rtol=1e-5)


def test_conditional_sn_refuses_a_blend_while_training():
    cond = ConditionalSwitchNorm2d(4, num_styles=2)
    with pytest.raises(ValueError, match="one style at a time"):
        cond(torch.randn(2, 4, 3, 3), torch.tensor([0.5, 0.5]))


# What ConditionalSwitchNorm2d(4, 2, prior="bn:2") saved before it was built on
# snexp.SwitchNormBase: key, shape, dtype and the value a fresh layer starts from.
_COND_SN_SAVED = [
    ("weight", (2, 4), torch.float32, 1.0),
    ("bias", (2, 4), torch.float32, 0.0),
    ("mean_logits", (2, 3), torch.float32, [0.0, 0.0, 2.0]),
    ("var_logits", (2, 3), torch.float32, [0.0, 0.0, 2.0]),
    ("running_mean", (2, 4), torch.float32, 0.0),
    ("running_var", (2, 4), torch.float32, 1.0),
    ("num_batches_tracked", (2,), torch.int64, 0),
]


def test_conditional_sn_loads_the_state_dicts_of_its_earlier_version():
    cond = ConditionalSwitchNorm2d(4, 2, candidates=("in", "ln", "bn"), prior="bn:2",
                                   momentum=0.2)
    fresh = cond.state_dict()
    # the keys, shapes, dtypes and initial values are those old stylize model.pt files hold
    assert [(k, tuple(v.shape), v.dtype) for k, v in fresh.items()] == [
        (k, shape, dtype) for k, shape, dtype, _ in _COND_SN_SAVED]
    for key, shape, dtype, start in _COND_SN_SAVED:
        torch.testing.assert_close(fresh[key], torch.tensor(start, dtype=dtype).expand(shape))
    # a state dict as the earlier version saved it (seeded values) loads strictly ...
    g = torch.Generator().manual_seed(7)
    saved = {k: torch.randn(shape, generator=g) if dtype.is_floating_point
             else torch.tensor([3, 5]) for k, shape, dtype, _ in _COND_SN_SAVED}
    saved["running_var"] = saved["running_var"].abs() + 0.5
    cond.load_state_dict(saved)
    x = torch.randn(3, 4, 5, 5, generator=g)
    # ... and gives the outputs and running statistics the earlier version gave (recorded)
    y = cond.eval()(x, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(y.flatten()[:6], torch.tensor(
        [0.6491387, 2.2057769, 0.0828104, 0.7617874, 1.4605073, 1.4728497]))
    torch.testing.assert_close(y.sum(), torch.tensor(153.28532), rtol=1e-5, atol=1e-3)
    y = cond.train()(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(y.flatten()[:6], torch.tensor(
        [0.8319373, 3.2291451, -0.0402028, 1.0054152, 2.0814371, 2.1004443]))
    torch.testing.assert_close(y.sum(), torch.tensor(227.32071), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cond.running_mean[1], torch.tensor(
        [-0.7724923, -0.9793872, -0.1045742, 0.2246770]))
    torch.testing.assert_close(cond.running_var[1], torch.tensor(
        [2.1572652, 1.3950785, 1.1809583, 1.3140494]))
    assert cond.num_batches_tracked.tolist() == [3, 6]
    # the state dict round-trips unchanged
    assert list(cond.state_dict()) == [k for k, *_ in _COND_SN_SAVED]


def test_conditional_in_is_dumoulins_conditional_instance_norm():
    torch.manual_seed(0)
    cond = ConditionalAffine(nn.InstanceNorm2d(5), 5, num_styles=2)
    with torch.no_grad():
        cond.weight.normal_()
        cond.bias.normal_()
    ref = nn.InstanceNorm2d(5, affine=True)
    with torch.no_grad():
        ref.weight.copy_(cond.weight[1])
        ref.bias.copy_(cond.bias[1])
    x = torch.randn(3, 5, 4, 4)
    # style 1 uses gamma_1, beta_1 on instance-normalized input
    torch.testing.assert_close(cond(x, torch.tensor([0.0, 1.0])), ref(x))


@pytest.mark.parametrize("norm", ["sn", "in", "bn"])
def test_multi_style_network_gives_each_style_its_own_output(norm):
    torch.manual_seed(0)
    net = TransformerNet(norm, width=0.125, blocks=1, num_styles=2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    net.eval()
    x = torch.rand(1, 3, 16, 16)
    a, b = net(x, 0), net(x, 1)
    assert not torch.allclose(a, b, atol=1e-3)
    # the one-hot weight vector and the index are the same request
    torch.testing.assert_close(net(x, torch.tensor([0.0, 1.0])), b)
    with pytest.raises(ValueError, match="out of range"):
        net(x, 2)


def _reference_forward(state: dict, x255: torch.Tensor, blocks: int) -> torch.Tensor:
    """pytorch/examples' TransformerNet as equations, on 0-255 pixels, with IN layers.

    Written from the reference's structure (reflection-padded convs, affine instance norms,
    nearest x2 upsampling, residual blocks without a final ReLU), reading our weights.
    """
    import torch.nn.functional as F

    def conv(x, name, stride=1):
        w = state[f"{name}.conv.weight"]
        x = F.pad(x, [w.shape[-1] // 2] * 4, mode="reflect")
        return F.conv2d(x, w, state[f"{name}.conv.bias"], stride)

    def inorm(x, name):
        return F.instance_norm(x, weight=state[f"{name}.norm.weight"],
                               bias=state[f"{name}.norm.bias"], eps=1e-5)

    y = F.relu(inorm(conv(x255, "conv1"), "conv1"))
    y = F.relu(inorm(conv(y, "down1", 2), "down1"))
    y = F.relu(inorm(conv(y, "down2", 2), "down2"))
    for i in range(blocks):
        r = F.relu(inorm(conv(y, f"res.{i}.block1"), f"res.{i}.block1"))
        y = y + inorm(conv(r, f"res.{i}.block2"), f"res.{i}.block2")
    y = F.relu(inorm(conv(F.interpolate(y, scale_factor=2.0), "up1"), "up1"))
    y = F.relu(inorm(conv(F.interpolate(y, scale_factor=2.0), "up2"), "up2"))
    return conv(y, "conv_out")


def test_default_pixel_range_is_the_references_function_of_the_weights():
    torch.manual_seed(0)
    net = TransformerNet("in", width=0.25, blocks=2).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.rand(2, 3, 32, 36)
    reference = _reference_forward(net.state_dict(), 255 * x, blocks=2)  # 0-255 in and out
    # our [0, 1] images in and out are the reference's 0-255 ones divided by 255
    assert net.pixel_scale == 255.0
    torch.testing.assert_close(net(x) * 255, reference, atol=2e-3, rtol=1e-4)
    # the 0-1 parametrization (pixel_scale=1) of the same weights is another function
    same_weights = TransformerNet("in", width=0.25, blocks=2, pixel_scale=1.0).eval()
    same_weights.load_state_dict(net.state_dict())
    assert (same_weights(x) - net(x)).abs().max() > 1e-2


def test_default_network_starts_near_black_not_grey_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    out = TransformerNet("sn", width=0.25, blocks=1)(x)
    # at initialization the last conv's output (0-255 scale) is a few units: / 255 -> near 0
    assert out.abs().max() < 0.1


@pytest.mark.parametrize("blocks", [0, 2, 5])
def test_reach_bounds_the_receptive_field_measured_from_gradients(blocks):
    net = TransformerNet("none", width=0.125, blocks=blocks)
    x = torch.rand(1, 3, 136, 136, requires_grad=True)
    net(x)[0, :, 66, 67].sum().backward()
    rows, cols = x.grad.abs().sum((0, 1)).nonzero().unbind(1)
    measured = max(int((rows - 66).abs().max()), int((cols - 67).abs().max()))
    # 18 + 8 per block: never below the measured radius (which is 17 + 8 per block)
    assert net.reach == 18 + 8 * blocks
    assert measured <= net.reach <= measured + 2


@pytest.mark.parametrize("norm", ["sn", "bn"])
@pytest.mark.parametrize("num_styles", [1, 2])
def test_config_momentum_reaches_every_norm_layer(norm, num_styles):
    # the momentum of model.norm (PyTorch convention) is what every SN/BN layer uses
    model = ModelConfig(norm=f"{norm}(momentum=0.003)", width=0.125, blocks=1)
    net = TransformerNet(model.norm, width=0.125, blocks=1, num_styles=num_styles)
    layers = [m for m in net.modules() if hasattr(m, "running_mean")]
    assert len(layers) == 7 and all(m.momentum == 0.003 for m in layers)


def test_default_norm_builds_the_layers_of_sn_with_its_defaults():
    # the config's default spells out SN's defaults: the same layers as the bare kind
    from stylize.config import DEFAULT_NORM

    assert str(ModelConfig().norm) == "sn(candidates=in+ln+bn, momentum=0.1)"
    torch.manual_seed(0)
    spelled = TransformerNet(DEFAULT_NORM, width=0.125, blocks=1)
    torch.manual_seed(0)
    bare = TransformerNet("sn", width=0.125, blocks=1)
    assert repr(spelled) == repr(bare)
    mine, theirs = spelled.state_dict(), bare.state_dict()
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, theirs[key])
        else:  # the layers' extra state (their candidates)
            assert value == theirs[key]
    norm = spelled.res[0].block1.norm
    assert (norm.candidates, norm.momentum) == (("in", "ln", "bn"), 0.1)


def test_a_callable_norm_layer_builds_the_network_but_records_no_spec():
    # torchvision's convention: any norm_layer(channels) callable; only a spec can be saved
    net = TransformerNet(lambda c: nn.GroupNorm(2, c), width=0.125, blocks=1)
    assert net.norm is None and isinstance(net.res[0].block1.norm, nn.GroupNorm)
    assert TransformerNet("gn(groups=2)", width=0.125, blocks=1).norm == snexp.NormSpec(
        "gn", groups=2)


@pytest.mark.parametrize("field,value", [("width", 65.0), ("blocks", 257)])
def test_training_refuses_a_network_that_a_saved_model_could_not_describe(field, value):
    # stylize.saved refuses width > 64 and blocks > 256 on load; training refuses them first,
    # so every model.pt it writes can be applied
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})
    ModelConfig(**{field: value - 1})  # the limit itself is fine
    assert (MAX_WIDTH, MAX_BLOCKS) == (64, 256)  # the bounds stylize.saved checks on load
