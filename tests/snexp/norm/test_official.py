"""compat="official" and load_official_state_dict (the authors' released code's conventions)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import snexp


def _official_layer_forward(x, w, b, mean_logits, var_logits, eps=1e-5):
    """The authors' training-mode equations for a 2d layer, written out independently."""
    n, c = x.shape[:2]
    v = x.reshape(n, c, -1)
    mean_in = v.mean(-1, keepdim=True)
    var_in = v.var(-1, keepdim=True)  # unbiased
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in ** 2
    var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
    pm, pv = torch.softmax(mean_logits, 0), torch.softmax(var_logits, 0)
    mean = pm[0] * mean_in + pm[1] * mean_ln + pm[2] * mean_bn
    var = pv[0] * var_in + pv[1] * var_ln + pv[2] * var_bn
    out = ((v - mean) / (var + eps).sqrt()).view_as(x)
    return out * w.view(1, c, 1, 1) + b.view(1, c, 1, 1), var_bn.flatten()


def test_official_numbers_float64():
    # compat="official" reproduces the authors' equations to 1e-6 (float64), buffers included.
    torch.manual_seed(0)
    m = snexp.SwitchNorm2d(5, compat="official").double()
    with torch.no_grad():
        m.mean_weight.normal_()
        m.var_weight.normal_()
        m.weight.normal_()
    x = torch.randn(4, 5, 6, 3, dtype=torch.float64) * 2 + 1
    want, var_bn = _official_layer_forward(x, m.weight, m.bias, m.mean_weight, m.var_weight)
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var_bn, atol=1e-6, rtol=0)


def test_official_1d_uses_unbiased_ln_and_bn():
    m = snexp.SwitchNorm1d(6, compat="official").double()
    x = torch.randn(5, 6, dtype=torch.float64)
    mean_ln, var_ln = x.mean(1, keepdim=True), x.var(1, keepdim=True)
    mean_bn, var_bn = x.mean(0, keepdim=True), x.var(0, keepdim=True)
    want = (x - (mean_ln + mean_bn) / 2) / ((var_ln + var_bn) / 2 + 1e-5).sqrt()
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=0)


def _as_official(state: dict) -> dict:
    """Rename/reshape a torchvision-named SN state dict the way the authors' code saves it."""
    out = {}
    for key, value in state.items():
        if key.endswith(("num_batches_tracked", "_extra_state")):
            continue
        parts = key.split(".")
        parts = [p.replace("bn", "sn") if p.startswith("bn") else p for p in parts]
        name = "module." + ".".join(parts)
        if key.endswith(("weight", "bias")) and value.dim() == 1 and "fc" not in key:
            value = value.view(1, -1, 1, 1)
        elif key.endswith(("running_mean", "running_var")):
            value = value.view(1, -1, 1)
        out[name] = value.clone()
    return out


def test_load_official_resnet50_checkpoint():
    # A checkpoint in the authors' layout (sn1 names, (1,C,1,1) shapes, [IN, LN, BN] logits,
    # DataParallel prefix) loads into convert_norm(resnet50(), "sn", compat="official"),
    # also when our layers order their candidates differently.
    torch.manual_seed(0)
    src = snexp.convert_norm(torchvision.models.resnet50(), "sn", compat="official")
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, snexp.SwitchNorm2d):
                m.mean_weight.normal_()
                m.var_weight.normal_()
                m.running_mean.normal_()
    ckpt = {"state_dict": _as_official(src.state_dict()), "epoch": 100}
    dst = snexp.convert_norm(torchvision.models.resnet50(), "sn", compat="official",
                             candidates=("bn", "in", "ln"))
    snexp.load_official_state_dict(dst, ckpt)
    a, b = src.layer2[0].bn3, dst.layer2[0].bn3
    torch.testing.assert_close(b.mean_weight, a.mean_weight[[2, 0, 1]])
    torch.testing.assert_close(b.running_mean, a.running_mean)
    src.eval()
    dst.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x), atol=1e-4, rtol=1e-4)


def test_load_official_rejects_mismatch():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), snexp.SwitchNorm2d(4))
    with pytest.raises(ValueError, match="unexpected keys"):
        snexp.load_official_state_dict(net, {"2.weight": torch.ones(1, 4, 1, 1)})
    bad = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    bad["1.mean_weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="candidates"):
        snexp.load_official_state_dict(net, bad)
