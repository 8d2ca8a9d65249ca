"""make_norm, norm_layer and convert_norm."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

import snexp


@pytest.mark.parametrize("kind,dims,cls", [
    ("sn", 2, snexp.SwitchNorm2d), ("sn", 1, snexp.SwitchNorm1d), ("sn", 3, snexp.SwitchNorm3d),
    ("ssn", 2, snexp.SparseSwitchNorm2d), ("bn", 2, nn.BatchNorm2d), ("bn", 3, nn.BatchNorm3d),
    ("in", 2, nn.InstanceNorm2d), ("ln", 2, nn.GroupNorm), ("gn", 2, nn.GroupNorm),
    ("none", 2, nn.Identity), ("SN", 2, snexp.SwitchNorm2d)])
def test_make_norm_kinds(kind, dims, cls):
    layer = snexp.make_norm(kind, 64, dims=dims)
    assert type(layer) is cls


def test_make_norm_options_and_details():
    assert snexp.make_norm("gn", 64, groups=8).num_groups == 8
    assert snexp.make_norm("ln", 64).num_groups == 1
    assert snexp.make_norm("in", 64).affine is True
    sn = snexp.make_norm("sn", 16, candidates=("ln", "bn"), momentum=0.003)
    assert sn.candidates == ("ln", "bn") and sn.momentum == 0.003


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        snexp.make_norm("batchnorm", 8)
    for kind in snexp.NORM_KINDS:
        assert kind in str(info.value)


def test_gn_groups_must_divide():
    with pytest.raises(ValueError, match="groups=32 does not divide num_features=20"):
        snexp.make_norm("gn", 20)


@pytest.mark.parametrize("momentum", [1.5, -0.1, True])
def test_bn_momentum_outside_unit_interval_is_refused(momentum):
    # BatchNorm itself takes any momentum (its running statistics then diverge): the registry
    # refuses what the SN layers refuse, so every kind reads momentum the same way
    with pytest.raises(ValueError, match=r"bn: momentum must be in \[0, 1\]"):
        snexp.make_norm("bn", 8, momentum=momentum)
    bn = snexp.make_norm("bn", 8, momentum=None, eps=1e-3)  # cumulative average, as torch
    assert type(bn) is nn.BatchNorm2d and bn.momentum is None and bn.eps == 1e-3
    assert snexp.make_norm("bn", 8, dims=1, momentum=0.01).momentum == 0.01
    with pytest.raises(ValueError, match=r"in: momentum must be in \[0, 1\]"):
        snexp.make_norm("in", 8, momentum=momentum)


def test_norm_layer_accepts_callables_and_none():
    layer = snexp.norm_layer(functools.partial(nn.GroupNorm, 4))
    assert isinstance(layer(8), nn.GroupNorm)
    assert isinstance(snexp.norm_layer(None)(8), nn.Identity)
    build = snexp.norm_layer("sn", candidates=("in", "ln"))
    assert build(8).candidates == ("in", "ln")


def _resnet18_with_trained_bn() -> nn.Module:
    """A ResNet-18 whose BN layers have non-trivial weights and running statistics."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return net


def test_convert_resnet_bn_to_sn_copies_parameters_and_statistics():
    net = _resnet18_with_trained_bn()
    bns = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {n: (m.weight.clone(), m.running_mean.clone()) for n, m in bns.items()}
    out = snexp.convert_norm(net, "sn")
    assert out is net
    sns = {n: m for n, m in net.named_modules() if isinstance(m, snexp.SwitchNorm2d)}
    assert set(sns) == set(bns) and not any(isinstance(m, nn.BatchNorm2d)
                                            for m in net.modules())
    for n, (w, rm) in saved.items():
        assert torch.equal(sns[n].weight, w) and torch.equal(sns[n].running_mean, rm)


def test_convert_bn_to_bn_only_sn_keeps_eval_outputs():
    # BN -> SN(candidates=("bn",)) is the same function in eval mode.
    net = _resnet18_with_trained_bn().eval()
    x = torch.randn(2, 3, 64, 64)
    want = net(x)
    got = snexp.convert_norm(net, "sn", candidates=("bn",))(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_convert_back_and_to_other_kinds():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
                        nn.GroupNorm(4, 8), nn.InstanceNorm2d(8))
    snexp.convert_norm(net, "sn")
    assert [type(m) for m in net if not isinstance(m, nn.Conv2d)] == [snexp.SwitchNorm2d] * 3
    snexp.convert_norm(net, "gn", groups=2)
    assert all(m.num_groups == 2 for m in net if isinstance(m, nn.GroupNorm))
    layer = snexp.convert_norm(nn.BatchNorm1d(4), "sn")
    assert isinstance(layer, snexp.SwitchNorm1d)
    with pytest.raises(ValueError, match="unknown norm kind"):
        snexp.convert_norm(net, "xx")


def test_norm_spec_reads_prints_and_builds():
    # one value carries the kind and its options; text round-trips; the layer gets the options
    spec = snexp.NormSpec.parse("SN(momentum=0.003, candidates=in+ln)")
    assert spec == snexp.NormSpec("sn", {"candidates": ("in", "ln"), "momentum": 0.003})
    assert str(spec) == "sn(candidates=in+ln, momentum=0.003)"
    assert snexp.NormSpec.parse(str(spec)) == spec
    layer = spec.layer()(8)
    assert isinstance(layer, snexp.SwitchNorm2d)
    assert layer.momentum == 0.003 and layer.candidates == ("in", "ln")
    assert snexp.norm_layer("gn(groups=4)")(8).num_groups == 4
    assert isinstance(snexp.make_norm(spec, 8, dims=1), snexp.SwitchNorm1d)
    assert snexp.norm_layer(spec, momentum=0.5)(8).momentum == 0.5  # explicit options win
    assert str(snexp.NormSpec.parse("bn")) == "bn"


@pytest.mark.parametrize("text,match", [("xx(a=1)", "unknown norm kind"),
                                        ("sn(momentum)", "key=value"),
                                        ("sn(momentum=0.1", "kind\\(key=value")])
def test_norm_spec_refuses_bad_text(text, match):
    # a mistyped spec names what is wrong and how it should look
    with pytest.raises(ValueError, match=match):
        snexp.NormSpec.parse(text)


def test_rare_layer_options_are_keyword_only():
    # moving_average, last_gamma, affine and compat cannot be passed by position
    with pytest.raises(TypeError):
        snexp.SwitchNorm2d(4, 1e-5, 0.1, ("in", "bn"), False)
    assert snexp.SwitchNorm2d(4, affine=False).weight is None
