"""gradcheck of every SN variant in float64: fused backward vs finite differences."""

from __future__ import annotations

import pytest
import torch

import snexp

VARIANTS = {
    "2d_paper_train": (snexp.SwitchNorm2d, {}, (3, 4, 3, 3), True),
    "2d_paper_eval": (snexp.SwitchNorm2d, {}, (3, 4, 3, 3), False),
    "2d_official": (snexp.SwitchNorm2d, {"compat": "official"}, (3, 4, 3, 3), True),
    "2d_gn_ln": (snexp.SwitchNorm2d, {"candidates": ("ln", "gn2", "in")}, (2, 4, 3, 2), True),
    "2d_no_affine": (snexp.SwitchNorm2d, {"affine": False}, (3, 4, 2, 3), True),
    "2d_spatial_1": (snexp.SwitchNorm2d, {}, (4, 4, 1, 1), True),
    "1d_nc": (snexp.SwitchNorm1d, {}, (5, 4), True),
    "1d_nc_official": (snexp.SwitchNorm1d, {"compat": "official"}, (5, 4), True),
    "1d_ncl": (snexp.SwitchNorm1d, {"candidates": ("in", "ln", "bn")}, (3, 4, 5), True),
    "3d": (snexp.SwitchNorm3d, {}, (2, 4, 2, 2, 2), True),
    "ssn_2d": (snexp.SparseSwitchNorm2d, {}, (3, 4, 3, 3), True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradcheck(name):
    # Analytic gradients of input, weight, bias and importance logits match finite differences.
    cls, options, shape, training = VARIANTS[name]
    torch.manual_seed(0)
    m = cls(shape[1], **options).double().train(training)
    with torch.no_grad():
        m.mean_weight.normal_()
        m.var_weight.normal_()
        if m.weight is not None:
            m.weight.normal_()
            m.bias.normal_()
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    # Keep running statistics fixed while finite differences call forward many times.
    m.moving_average = False
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    names = [n for n in ("weight", "bias", "mean_weight", "var_weight")
             if getattr(m, n) is not None]

    def fn(x, *values):
        return torch.func.functional_call(m, dict(zip(names, values)), (x,))

    inputs = (x, *[getattr(m, n).detach().clone().requires_grad_() for n in names])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
