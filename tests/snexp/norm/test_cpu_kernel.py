"""The C++ CPU passes (snexp/norm/csrc): they build where a compiler exists, and agree with the
ATen ops that run the same equations everywhere else."""

from __future__ import annotations

import pytest
import torch

import snexp
from snexp.norm import _cpu

needs_compiler = pytest.mark.skipif(_cpu._compiler() is None, reason="no C++ compiler here")


@needs_compiler
def test_builds_where_a_compiler_exists():
    # a broken source must fail here, not pass as "no compiler" (strict raises the build error)
    assert _cpu.load(strict=True)
    assert hasattr(torch.ops.snexp_cpu, "row_stats")


@needs_compiler
def test_row_passes_by_hand():
    # row_stats: mean and centered sum of squares; normalize: a (x - mu) + b; input_grad
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]], [[-1.0, -1.0, 1.0, 1.0]]])  # (2, 1, 4)
    mu, ss = torch.ops.snexp_cpu.row_stats(x)
    torch.testing.assert_close(mu, torch.tensor([[3.0], [0.0]]))
    torch.testing.assert_close(ss, torch.tensor([[14.0], [4.0]]))
    a, b = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    y = torch.ops.snexp_cpu.normalize(x, mu.view(-1), a, b)
    torch.testing.assert_close(y[0, 0], torch.tensor([-3.0, -1.0, 1.0, 7.0]))
    dy = torch.ones_like(x)
    p, q = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    dx = torch.ops.snexp_cpu.input_grad(x, dy, a, p, q)
    torch.testing.assert_close(dx[1, 0], torch.tensor([-0.5, -0.5, 3.5, 3.5]))


@needs_compiler
def test_row_passes_refuse_bad_tensors():
    # tensor checks, not silent garbage: a non-contiguous or half input is refused
    _cpu.load(strict=True)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.snexp_cpu.row_stats(torch.randn(4, 3, 5).transpose(0, 1))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.snexp_cpu.row_stats(torch.randn(2, 3, 5).half())


@needs_compiler
@pytest.mark.parametrize("shape,candidates", [
    ((4, 8, 5, 5), ("in", "ln", "bn")), ((3, 8, 7), ("ln", "bn")), ((2, 8, 3, 3, 3), ("in", "bn")),
    ((5, 8, 4, 4), ("in", "ln", "gn4", "bn")),
])
def test_cpp_and_aten_paths_agree(shape, candidates, monkeypatch):
    # the same equations with and without the C++ passes: outputs, all gradients, buffers
    _cpu.load(strict=True)
    torch.manual_seed(0)
    dims = len(shape) - 2
    results = []
    for loaded in (True, False):
        monkeypatch.setitem(_cpu._state, "loaded", loaded)
        torch.manual_seed(1)
        layer = snexp.make_norm("sn", 8, dims=dims, candidates=candidates).double()
        with torch.no_grad():
            layer.mean_weight.normal_()
            layer.var_weight.normal_()
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append([y, x.grad, layer.weight.grad, layer.mean_weight.grad,
                        layer.var_weight.grad, layer.running_var])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
