"""The compiled (N, C) mixing kernel: same numbers as the ATen path, clean fallback without it."""

from __future__ import annotations

import pytest
import torch

import snexp
from snexp.norm import _kernel
from snexp.norm.functional import NormSpec, switch_norm

needs_kernel = pytest.mark.skipif(_kernel.library() is None, reason="no C compiler here")


def _run(m: torch.nn.Module, x: torch.Tensor, training: bool):
    """Output, input and parameter gradients and running statistics after one step."""
    m.train(training)
    x = x.clone().requires_grad_()
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = [p for p in (m.weight, m.bias, m.mean_weight, m.var_weight) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], g)
    buffers = [b.clone() for b in (m.running_mean, m.running_var) if b is not None]
    return [y.detach(), *grads, *buffers]


def _layer(cls, candidates, compat, affine, seed=0):
    torch.manual_seed(seed)
    m = cls(6, candidates=candidates, compat=compat, affine=affine).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return m


@needs_kernel
@pytest.mark.parametrize("candidates", [("in", "ln", "bn"), ("bn", "in"), ("ln",), ("bn",)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (3, 6, 7), (5, 6, 1, 1), (5, 6)])
@pytest.mark.parametrize("passes", ["c", "c_mixing_inplace", "c_mixing_aten_passes"])
def test_kernel_equals_aten_path_float64(monkeypatch, candidates, training, compat, shape,
                                         passes):
    # Outputs, every gradient and the running statistics agree to float64 rounding, with the
    # full-size passes in C (small tensors, one thread) or in ATen (large tensors).
    if len(shape) == 2 and "in" in candidates:
        pytest.skip("IN is undefined for (N, C) input")
    if passes != "c":
        monkeypatch.setattr(_kernel, "_one_pass", lambda t, dtype: False)
    if passes == "c_mixing_aten_passes":
        monkeypatch.setattr(_kernel, "_small", lambda numel: False)
    cls = snexp.SwitchNorm2d if len(shape) == 4 else snexp.SwitchNorm1d
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    m = _layer(cls, candidates, compat, affine=len(shape) != 3)
    # official (N, C) statistics are unbiased over the pooled sets: ATen path only
    assert _kernel.usable(x, m._spec(x)) == (len(shape) > 2 or compat == "paper")
    fast = _run(m, x, training)
    monkeypatch.setattr(_kernel, "usable", lambda x, spec: False)
    slow = _run(_layer(cls, candidates, compat, affine=len(shape) != 3), x, training)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@needs_kernel
def test_kernel_equals_aten_path_float32_and_probabilities(monkeypatch):
    # The functional API with given probabilities (no softmax inside), float32 input.
    x = torch.randn(8, 16, 6, 6) * 2 - 1
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    p = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    q = torch.tensor([0.6, 0.1, 0.3], requires_grad=True)
    spec = NormSpec(("in", "ln", "bn"))

    def run():
        xg = x.clone().requires_grad_()
        rm, rv = torch.zeros(16), torch.ones(16)
        y = switch_norm(xg, w, b, p, q, rm, rv, spec=spec, training=True)
        grads = torch.autograd.grad(y, [xg, p, q], torch.cos(y.detach()))
        return [y.detach(), *grads, rm, rv]

    fast = run()
    monkeypatch.setattr(_kernel, "usable", lambda x, spec: False)
    for a, b_ in zip(fast, run()):
        torch.testing.assert_close(a, b_, atol=2e-5, rtol=1e-5)


def test_kernel_is_skipped_where_it_does_not_apply():
    # GN candidates, synchronized or official (N, C) statistics take the ATen path.
    x = torch.randn(2, 8, 3, 3)
    assert not _kernel.usable(x, NormSpec(("in", "gn2")))
    assert not _kernel.usable(x, NormSpec(("ln", "bn"), official_2d=True))
    assert not _kernel.usable(x, NormSpec(("ln", "bn"), sync=True))
    assert not _kernel.usable(x.to("meta"), NormSpec(("ln", "bn")))


def test_without_compiler_falls_back_to_aten(monkeypatch, tmp_path):
    # No compiler: no library, no error, and SN still computes the same output.
    m = snexp.SwitchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    want = m(x)
    monkeypatch.setattr(_kernel, "_lib", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert _kernel.library() is None
    assert not _kernel.usable(x, m._spec(x))
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)
    monkeypatch.setattr(_kernel, "_lib", None)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("SNEXP_NO_KERNEL", "1")
    assert _kernel.library() is None


@needs_kernel
def test_build_writes_one_library_into_the_cache(monkeypatch, tmp_path):
    # A fresh cache gets exactly the compiled library (temporary files are gone).
    monkeypatch.setattr(_kernel, "_lib", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _kernel.library() is not None
    files = list((tmp_path / "snexp").iterdir())
    assert len(files) == 1 and files[0].name.startswith("sn_kernel_")
    assert files[0].suffix == ".so"


def test_running_statistics_written_in_c_bump_their_version():
    # In-place writes autograd cannot see are announced (saved-tensor checks stay sound).
    m = snexp.SwitchNorm2d(4)
    before = (m.running_mean._version, m.running_var._version)
    m(torch.randn(3, 4, 5, 5))
    assert m.running_mean._version > before[0] and m.running_var._version > before[1]
    assert not torch.equal(m.running_mean, torch.zeros(4))


@pytest.mark.parametrize("kernel", [True, False])
def test_double_backward_is_refused(monkeypatch, kernel):
    # The hand-written backward builds no graph: a second derivative is an error, not zeros.
    if not kernel:
        monkeypatch.setattr(_kernel, "usable", lambda x, spec: False)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    (g,) = torch.autograd.grad(snexp.SwitchNorm2d(4)(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
