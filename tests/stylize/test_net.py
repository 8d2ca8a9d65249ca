"""The transformation network and its style-conditional norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snexp
from stylize.cond import ConditionalAffine, ConditionalSwitchNorm2d
from stylize.net import TransformerNet


@pytest.mark.parametrize("norm", ["sn", "ssn", "in", "bn", "ln", "gn", "none"])
@pytest.mark.parametrize("size", [(17, 23), (5, 6), (32, 33)])
def test_output_has_the_input_size_for_odd_sizes(norm, size):
    net = TransformerNet(norm, width=0.125, blocks=1, norm_options={"groups": 2}
                         if norm == "gn" else None)
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
