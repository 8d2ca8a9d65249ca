"""The importance prior of the SN layers and the importance logits' optimizer group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snexp
from stylize.cond import style_norm_layer

# softmax of logits (0, 0, 4): BN's share is e^4 / (e^4 + 2)
BN4 = (0.0176684, 0.0176684, 0.9646632)


@pytest.mark.parametrize("build", [
    lambda: snexp.SwitchNorm2d(8, prior={"bn": 4.0}),
    lambda: snexp.SwitchNorm2d(8, prior="bn:4"),
    lambda: snexp.SwitchNorm3d(8, prior="BN:4"),
    lambda: snexp.SwitchNorm1d(8, candidates=("in", "ln", "bn"), prior="bn:4"),
    lambda: snexp.SparseSwitchNorm2d(8, prior="bn:4"),
    lambda: snexp.SyncSwitchNorm(8, prior="bn:4"),
    lambda: snexp.norm_layer("sn(prior=bn:4)")(8),
    lambda: snexp.NormSpec.parse("ssn(prior=bn:4)").layer()(8),
    lambda: snexp.make_norm("sn", 8, prior="bn:4"),
])
def test_prior_sets_both_logits_and_survives_reset(build):
    layer = build()
    # logits (in, ln, bn) = (0, 0, 4) in the mean and the variance logits alike
    for logits in (layer.mean_weight, layer.var_weight):
        torch.testing.assert_close(logits.detach(), torch.tensor([0.0, 0.0, 4.0]))
    with torch.no_grad():
        layer.mean_weight.zero_()
        layer.var_weight.fill_(-1)
    layer.reset_parameters()
    torch.testing.assert_close(layer.var_weight.detach(), torch.tensor([0.0, 0.0, 4.0]))
    if type(layer) is not snexp.SparseSwitchNorm2d:  # SSN's weights are sparsestmax, not softmax
        torch.testing.assert_close(layer.importance_weights()[0].detach(), torch.tensor(BN4))


def test_no_prior_is_the_papers_uniform_start():
    for prior in (None, ""):
        mean_p, var_p = snexp.SwitchNorm2d(4, prior=prior).importance_weights()
        torch.testing.assert_close(mean_p.detach(), torch.full((3,), 1 / 3))
        torch.testing.assert_close(var_p.detach(), torch.full((3,), 1 / 3))


def test_prior_follows_the_candidate_order():
    layer = snexp.SwitchNorm2d(8, candidates=("bn", "gn2", "ln"), prior="ln:1+bn:2")
    torch.testing.assert_close(layer.mean_weight.detach(), torch.tensor([2.0, 0.0, 1.0]))
    assert "prior='bn:2+ln:1'" in repr(layer)


@pytest.mark.parametrize("prior,words", [
    ("gn:4", ["'gn'", "in, ln, bn"]), ({"batch": 1}, ["'batch'", "in, ln, bn"]),
    ("bn", ["name:logit"]), ("bn:x", ["number"]), ({"bn": float("inf")}, ["finite"])])
def test_bad_prior_is_a_value_error_naming_the_valid_names(prior, words):
    with pytest.raises(ValueError) as info:
        snexp.SwitchNorm2d(8, prior=prior)
    for word in words:
        assert word in str(info.value)


def test_prior_not_a_candidate_of_a_two_candidate_layer():
    with pytest.raises(ValueError, match="valid names: ln, bn"):
        snexp.SwitchNorm1d(8, prior="in:2")


@pytest.mark.parametrize("text", ["sn(prior=bn:4)", "sn(momentum=0.003, prior=bn:4+ln:1)"])
def test_norm_spec_round_trips_the_prior(text):
    spec = snexp.NormSpec.parse(text)
    assert str(spec) == text and snexp.NormSpec.parse(str(spec)) == spec


def test_norm_spec_stores_a_mapping_prior_as_its_text():
    spec = snexp.NormSpec("sn", prior={"bn": 4.0})
    assert str(spec) == "sn(prior=bn:4)" and spec == snexp.NormSpec.parse("sn(prior=bn:4)")
    hash(spec)  # still a hashable value
    layer = snexp.NormSpec("sn", prior={"bn": 4.0, "ln": 1}).layer()(4)
    torch.testing.assert_close(layer.mean_weight.detach(), torch.tensor([0.0, 1.0, 4.0]))


def test_conditional_sn_starts_every_style_at_the_prior():
    layer = style_norm_layer("sn(prior=bn:4)", 3)(8)
    mean_p, var_p = layer.importance_weights()  # (S, K)
    torch.testing.assert_close(mean_p.detach(), torch.tensor([BN4] * 3))
    torch.testing.assert_close(var_p.detach(), torch.tensor([BN4] * 3))


def test_importance_param_groups_split_the_logits_with_their_own_lr_and_decay():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), snexp.SwitchNorm2d(8, prior="bn:4"),
                        snexp.SparseSwitchNorm2d(8), style_norm_layer("sn", 2)(8))
    rest, logits = snexp.importance_param_groups(net, lr=0.02, lr_scale=10, weight_decay=0)
    assert {id(p) for p in logits["params"]} == {
        id(net[1].mean_weight), id(net[1].var_weight), id(net[2].mean_weight),
        id(net[2].var_weight), id(net[3].mean_logits), id(net[3].var_logits)}
    assert len(rest["params"]) + len(logits["params"]) == len(list(net.parameters()))
    assert logits["lr"] == pytest.approx(0.2) and logits["lr_mult"] == 10.0
    assert logits["weight_decay"] == 0 and rest["lr"] == 0.02 and "weight_decay" not in rest
    opt = torch.optim.SGD([rest, logits], lr=0.02, weight_decay=1e-4)
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[1]["lr"] == 0.2


def test_importance_param_groups_without_sn_is_one_group():
    groups = snexp.importance_param_groups(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert len(groups) == 1 and len(groups[0]["params"]) == 4 and "lr" not in groups[0]
    with pytest.raises(ValueError, match="lr_scale"):
        snexp.importance_param_groups(nn.Linear(2, 2), lr_scale=-1)


# softmax of logits (0, 0, 6)
BN6 = (0.0024665, 0.0024665, 0.9950670)


@pytest.mark.parametrize("build", [
    lambda: snexp.SwitchNorm2d(8, prior="bn:4", var_prior={"bn": 6.0}),
    lambda: snexp.SparseSwitchNorm2d(8, prior="bn:4", var_prior="bn:6"),
    lambda: snexp.SyncSwitchNorm(8, prior="bn:4", var_prior="bn:6"),
    lambda: snexp.norm_layer("sn(prior=bn:4, var_prior=bn:6)")(8),
    lambda: snexp.SyncSwitchNorm.convert_sync_switchnorm(
        snexp.SwitchNorm2d(8, prior="bn:4", var_prior="bn:6")),
])
def test_var_prior_sets_the_variance_logits_alone_and_survives_reset(build):
    layer = build()
    torch.testing.assert_close(layer.mean_weight.detach(), torch.tensor([0.0, 0.0, 4.0]))
    torch.testing.assert_close(layer.var_weight.detach(), torch.tensor([0.0, 0.0, 6.0]))
    with torch.no_grad():
        layer.mean_weight.zero_()
        layer.var_weight.zero_()
    layer.reset_parameters()
    torch.testing.assert_close(layer.mean_weight.detach(), torch.tensor([0.0, 0.0, 4.0]))
    torch.testing.assert_close(layer.var_weight.detach(), torch.tensor([0.0, 0.0, 6.0]))
    assert "prior='bn:4', var_prior='bn:6'" in repr(layer)
    if type(layer) is not snexp.SparseSwitchNorm2d:
        mean_p, var_p = layer.importance_weights()
        torch.testing.assert_close(mean_p.detach(), torch.tensor(BN4))
        torch.testing.assert_close(var_p.detach(), torch.tensor(BN6))


def test_var_prior_alone_leaves_the_mean_logits_uniform_and_its_spec_round_trips():
    layer = snexp.SwitchNorm2d(8, candidates=("ln", "bn"), var_prior="bn:6")
    torch.testing.assert_close(layer.mean_weight.detach(), torch.zeros(2))
    torch.testing.assert_close(layer.var_weight.detach(), torch.tensor([0.0, 6.0]))
    assert "var_prior='bn:6'" in repr(layer) and "prior='" not in repr(layer).replace(
        "var_prior='", "")
    spec = snexp.NormSpec.parse("sn(prior=bn:4, var_prior=bn:6)")
    assert str(spec) == "sn(prior=bn:4, var_prior=bn:6)"
    assert snexp.NormSpec.parse(str(spec)) == spec
    with pytest.raises(ValueError, match="not a candidate of this layer"):
        snexp.SwitchNorm2d(8, candidates=("ln", "bn"), var_prior="in:1")


def test_conditional_sn_takes_the_variance_prior_for_every_style():
    layer = style_norm_layer("sn(prior=bn:4, var_prior=bn:6)", 2)(8)
    mean_p, var_p = layer.importance_weights()  # (S, K)
    torch.testing.assert_close(mean_p.detach(), torch.tensor([BN4] * 2))
    torch.testing.assert_close(var_p.detach(), torch.tensor([BN6] * 2))
