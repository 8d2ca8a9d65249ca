"""The C++ (N, C)-sized middle (``snexp_cpu.mix``, ``snexp_cpu.mix_backward``): it returns what
the Python pieces of ``snexp.norm._mixing`` (the reference) return, in every covered case, and
leaves the rest to them."""

from __future__ import annotations

import itertools

import pytest
import torch

import snexp
from snexp.norm import _cpu, _mixing

pytestmark = pytest.mark.skipif(_cpu._compiler() is None, reason="no C++ compiler here")

CANDIDATES = [("in", "ln", "bn"), ("ln", "bn"), ("bn",), ("in",), ("gn2", "bn"),
              ("in", "ln", "bn", "gn4")]
NEEDS = [(True,) * 5, (False, True, True, True, True), (True, False, False, False, False),
         (False, False, True, False, True), (True, True, False, True, False)]


def _both(monkeypatch, fn):
    """fn() with the C++ middle, then with the Python pieces (C++ passes off)."""
    _cpu.load(strict=True)
    monkeypatch.setitem(_cpu._state, "loaded", True)
    native = fn()
    monkeypatch.setitem(_cpu._state, "loaded", False)
    python = fn()
    monkeypatch.setitem(_cpu._state, "loaded", True)
    return native, python


def _same(got, want, tol=1e-12):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None or isinstance(w, int):
            assert g == w, f"item {i}: {g} != {w}"
        else:
            assert g is not None and g.dtype == w.dtype, f"item {i}"
            torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=f"item {i}")


def _inputs(n, candidates, *, affine, logits, running, unbiased_in, dtype=torch.float64):
    c, k, m = 8, len(candidates), 12
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(n, c, 3, 4, dtype=dtype, generator=g) * 2 + torch.randn(
        n, c, 1, 1, dtype=dtype, generator=g)
    spec = _mixing.Options(candidates, unbiased_in=unbiased_in)
    st = torch.stack([x.mean((2, 3)), x.var((2, 3), correction=1 if unbiased_in else 0)])
    weight = torch.randn(c, dtype=dtype, generator=g) if affine[0] else None
    bias = torch.randn(c, dtype=dtype, generator=g) if affine[1] else None
    w = torch.randn(2, k, dtype=dtype, generator=g)
    if not logits:  # points of the simplex, some weights exactly zero (as sparsemax gives)
        w = torch.softmax(w, 1)
        if k > 1:
            w[:, 0] = 0
            w = w / w.sum(1, keepdim=True)
    bn_mean = torch.randn(c, dtype=dtype, generator=g) if running else None
    bn_var = torch.rand(c, dtype=dtype, generator=g) + 0.5 if running else None
    s1 = torch.randn(n, c, dtype=dtype, generator=g) * m
    s2 = torch.randn(n, c, dtype=dtype, generator=g) * m
    return spec, st, (weight, bias, w[0], w[1], bn_mean, bn_var), m, s1, s2


@pytest.mark.parametrize("candidates", CANDIDATES, ids="+".join)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("logits,running,unbiased_in",
                         list(itertools.product([True, False], repeat=3)))
def test_cpp_middle_matches_the_python_pieces(candidates, n, affine, logits, running,
                                              unbiased_in, monkeypatch):
    # mix and mix_backward: the same tuples, values to float64 rounding, None where Python has
    spec, st, args, m, s1, s2 = _inputs(n, candidates, affine=affine, logits=logits,
                                        running=running, unbiased_in=unbiased_in)
    assert _cpu.load(strict=True) and _mixing._native(spec, st)
    fwd = _both(monkeypatch, lambda: _mixing.mix(st, *args, m, spec=spec, logits=logits))
    _same(*fwd)
    _, _, batch, count, mixed, cands, probs = fwd[1]
    assert (batch is None) == (running or "bn" not in candidates)
    saved = (st, mixed, cands, probs)
    n_total = None if batch is None else n
    for need in NEEDS:
        bwd = _both(monkeypatch, lambda: _mixing.mix_backward(
            s1, s2, saved, args[0], m, spec=spec, logits=logits, n_total=n_total, need=need))
        _same(*bwd)


def test_cpp_middle_in_float32(monkeypatch):
    # float32 statistics: the same values to float32 rounding
    spec, st, args, m, s1, s2 = _inputs(4, ("in", "ln", "bn", "gn4"), affine=(True, True),
                                        logits=True, running=False, unbiased_in=False,
                                        dtype=torch.float32)
    fwd = _both(monkeypatch, lambda: _mixing.mix(st, *args, m, spec=spec, logits=True))
    _same(*fwd, tol=1e-5)
    saved = (st, *fwd[1][4:])
    bwd = _both(monkeypatch, lambda: _mixing.mix_backward(
        s1, s2, saved, args[0], m, spec=spec, logits=True, n_total=4, need=(True,) * 5))
    _same(*bwd, tol=1e-5)


def test_saved_tensors_interchange(monkeypatch):
    # a forward by one middle and a backward by the other give the same gradients
    spec, st, args, m, s1, s2 = _inputs(3, ("in", "ln", "bn"), affine=(True, True),
                                        logits=True, running=False, unbiased_in=True)
    fwd = _both(monkeypatch, lambda: _mixing.mix(st, *args, m, spec=spec, logits=True))
    grads = []
    for out in fwd:
        saved = (st, *out[4:])
        grads.append(_mixing.mix_backward(s1, s2, saved, args[0], m, spec=spec, logits=True,
                                          n_total=3, need=(True,) * 5))
    _same(*grads)


def test_uncovered_cases_keep_the_python_pieces():
    # SyncSwitchNorm, official (N, C) input and traced tensors take the ATen equations
    _cpu.load(strict=True)
    st = torch.rand(2, 4, 8)
    assert _mixing._native(_mixing.Options(("in", "bn")), st)
    assert not _mixing._native(_mixing.Options(("in", "bn"), sync=True), st)
    assert not _mixing._native(_mixing.Options(("ln", "bn"), official_2d=True), st)
    assert not _mixing._native(_mixing.Options(("in", "bn")), st.half())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(st)
        assert not _mixing._native(_mixing.Options(("in", "bn")), fake)


@pytest.mark.parametrize("env", [("SNEXP_CPU_KERNEL", "0"), ("SNEXP_BACKEND", "aten")])
def test_aten_setting_switches_the_cpp_middle_off(env, monkeypatch):
    # SNEXP_CPU_KERNEL=0 (or SNEXP_BACKEND=aten) turns off every C++ piece, the middle too
    monkeypatch.delenv("SNEXP_BACKEND", raising=False)
    monkeypatch.setenv(*env)
    monkeypatch.setattr(_cpu, "_state", {})
    assert not _mixing._native(_mixing.Options(("in", "bn")), torch.rand(2, 4, 8))


def test_cpp_middle_refuses_bad_arguments():
    # shape, dtype and group checks raise instead of reading out of bounds
    _cpu.load(strict=True)
    st = torch.rand(2, 3, 6, dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="4 groups do not divide 6"):
        torch.ops.snexp_cpu.mix(st, None, None, w, w, None, None, [0, 6], 1e-5, True)
    with pytest.raises(RuntimeError, match="mean_w must be"):
        torch.ops.snexp_cpu.mix(st, None, None, w[:1], w, None, None, [0, 2], 1e-5, True)
    with pytest.raises(RuntimeError, match=r"st must be \(2, N, C\)"):
        torch.ops.snexp_cpu.mix(st[0], None, None, w, w, None, None, [0, 2], 1e-5, True)


@pytest.mark.parametrize("kind,options", [
    ("sn", {}), ("sn", {"candidates": ("in", "ln", "bn", "gn4")}),
    ("sn", {"candidates": ("ln", "bn"), "compat": "official"}), ("ssn", {}),
])
@pytest.mark.parametrize("training", [True, False])
def test_layer_unchanged_by_the_cpp_middle(kind, options, training, monkeypatch):
    # the eager layer's output, every gradient and the running statistics are the same with
    # the C++ middle as with the Python one (the full-size C++ passes on in both)
    results = []
    for native in (True, False):
        monkeypatch.setattr(_mixing, "_native",
                            _mixing._native if native else (lambda spec, t: False))
        torch.manual_seed(0)
        layer = snexp.make_norm(kind, 8, **options).double().train(training)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
            if kind == "sn":
                layer.mean_weight.normal_()
                layer.var_weight.normal_()
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
        x = (torch.randn(4, 8, 5, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        params = [p.grad for p in layer.parameters()]
        results.append([y, x.grad, *params, layer.running_mean, layer.running_var])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum,count,bessel", [(0.1, 784, True), (0.1, 1, True),
                                                   (0.7, 50, True), (0.0, 9, False),
                                                   (1.0, 9, True)])
def test_cpu_blend_equals_the_aten_blend(monkeypatch, dtype, momentum, count, bessel):
    # the running statistics' update in one C++ call (snexp_cpu.blend) gives what op._blend's
    # ATen calls give, to rounding (Bessel factor, torch.lerp's two-sided formula: momentum
    # below and above 0.5), float32 and float64
    from snexp.norm import op

    torch.manual_seed(0)
    start = torch.randn(2, 12, dtype=dtype) + torch.tensor([[0.0], [3.0]], dtype=dtype)
    batch = torch.randn(2, 12, dtype=dtype).abs() * 5

    def run():
        rm, rv = start[0].clone(), start[1].clone()
        op._blend(rm, rv, batch, count, None, momentum, bessel)
        return rm, rv

    native, python = _both(monkeypatch, run)
    for got, want in zip(native, python):
        torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert not torch.equal(native[0], start[0]) or momentum == 0.0  # it did update
