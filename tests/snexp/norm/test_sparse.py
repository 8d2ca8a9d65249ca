"""sparsemax, sparsestmax and SparseSwitchNorm (Shao et al., CVPR 2019)."""

from __future__ import annotations

import pytest
import torch

import snexp
from snexp import reference


def _project_bisection(z: torch.Tensor) -> torch.Tensor:
    """Simplex projection by bisection on tau: an independent oracle for sparsemax."""
    lo, hi = z.min() - 1, z.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if torch.clamp(z - tau, min=0).sum() > 1:
            lo = tau
        else:
            hi = tau
    return torch.clamp(z - (lo + hi) / 2, min=0)


def test_sparsemax_known_values():
    torch.testing.assert_close(snexp.sparsemax(torch.tensor([1.0, 0.2, -1.0])),
                               torch.tensor([0.9, 0.1, 0.0]))
    torch.testing.assert_close(snexp.sparsemax(torch.tensor([0.0, 0.0, 0.0])),
                               torch.full((3,), 1 / 3))


@pytest.mark.parametrize("seed", range(5))
def test_sparsemax_is_the_simplex_projection(seed):
    z = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(snexp.sparsemax(z), _project_bisection(z), atol=1e-9, rtol=0)


def test_sparsestmax_radius_zero_is_sparsemax_and_one_is_one_hot():
    z = torch.tensor([0.3, 0.1, 0.25])
    torch.testing.assert_close(snexp.sparsestmax(z, 0.0), snexp.sparsemax(z))
    w = snexp.sparsestmax(z, 1.0)
    assert torch.equal(w, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("radius", [0.2, 0.5, 0.7])
def test_sparsestmax_lies_on_simplex_outside_radius(radius):
    # Result is a probability vector at distance >= r from the uniform point of its support,
    # or one-hot.
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = torch.randn(3, generator=g) * 0.3
        w = snexp.sparsestmax(z, radius)
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-6
        support = w > 0
        u = support.float() / support.sum()
        assert support.sum() == 1 or float((w - u).norm()) >= radius - 1e-6


def test_sparsestmax_gradcheck():
    z = torch.tensor([0.3, 0.1, 0.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: snexp.sparsestmax(v, 0.3), (z,))


def test_ssn_matches_reference_with_its_weights():
    torch.manual_seed(0)
    m = snexp.SparseSwitchNorm2d(6).double()
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.5, 0.2, 0.1]))
        m.var_weight.copy_(torch.tensor([0.1, 0.4, 0.3]))
    snexp.set_sparsity(m, 0.3)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    mean_p, var_p = m.importance_weights()
    want = reference.switch_norm(x, m.weight, m.bias, mean_p, var_p, m.running_mean.clone(),
                                 m.running_var.clone(), candidates=m.candidates, training=True)
    torch.testing.assert_close(m(x), want, atol=1e-10, rtol=0)


def test_ssn_reaches_one_hot_at_radius_one_and_freezes():
    # With r = 1 every layer selects exactly one normalizer, which then stays fixed.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), snexp.SparseSwitchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                snexp.SparseSwitchNorm2d(8))
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.mean_weight.copy_(torch.tensor([0.2, 0.5, 0.1]))
            m.var_weight.copy_(torch.tensor([0.4, 0.1, 0.3]))
    assert snexp.set_sparsity(model, 1.0) == 2
    model(torch.randn(4, 3, 10, 10)).sum().backward()
    for m in (model[1], model[4]):
        assert torch.equal(m.mean_fixed, torch.tensor([0.0, 1.0, 0.0]))
        assert torch.equal(m.var_fixed, torch.tensor([1.0, 0.0, 0.0]))
        assert float(m.mean_weight.grad.abs().sum()) == 0.0
        with torch.no_grad():
            m.mean_weight.copy_(torch.tensor([5.0, 0.0, 0.0]))
        snexp.set_sparsity(m, 0.0)
        assert torch.equal(m.importance_weights()[0], torch.tensor([0.0, 1.0, 0.0]))
    imp = snexp.importance(model)
    assert imp["1"].mean == (0.0, 1.0, 0.0)


def test_ssn_inference_weights_of_frozen_and_half_frozen_layers():
    # under no_grad a fully frozen layer skips sparsestmax; the weights and outputs are the
    # ones the full computation gives, and a layer with one free row still computes it
    m = snexp.SparseSwitchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, 0.1, 0.2]))
        m.var_weight.copy_(torch.tensor([0.1, 0.5, 0.2]))
        m.var_fixed.copy_(torch.tensor([0.0, 0.0, 1.0]))
    snexp.set_sparsity(m, 0.1)
    full = [w.detach() for w in m.importance_weights()]  # grad enabled: the full computation
    with torch.no_grad():
        half = m.importance_weights()
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], torch.tensor([0.0, 0.0, 1.0]))
    assert float(full[0].max()) < 1.0  # the free row is sparsestmax, not a frozen one-hot
    with torch.no_grad():
        m.mean_fixed.copy_(torch.tensor([0.0, 1.0, 0.0]))
        y_fast = m(x)
        assert torch.equal(m.importance_weights()[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(y_fast, m(x).detach(), atol=0, rtol=0)


def test_set_sparsity_validates_radius():
    with pytest.raises(ValueError, match="radius"):
        snexp.set_sparsity(snexp.SparseSwitchNorm2d(4), 1.5)


def test_ssn_state_dict_holds_radius_and_choice():
    m = snexp.SparseSwitchNorm2d(4)
    snexp.set_sparsity(m, 0.4)
    m2 = snexp.SparseSwitchNorm2d(4)
    m2.load_state_dict(m.state_dict())
    assert float(m2.radius) == pytest.approx(0.4)
