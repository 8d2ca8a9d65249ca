"""SyncSwitchNorm on 2 CPU processes (gloo) equals SwitchNorm on the concatenated batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import snexp
from snexp.norm import _mixing

SIZES = (3, 5)  # unequal per-rank batches


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 6, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, dy


def _far_data():
    # |mean| >> std in float32: 100 +- 0.01, where mean(x^2) - mean^2 keeps no digit of the
    # variance 1e-4 (float32 resolves 1e4 to ~1e-3)
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(SIZES), 6, 4, 4, generator=g) * 1e-2 + 1e2


def _layer():
    m = snexp.SwitchNorm2d(6).double()
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.2, -0.3, 0.5]))
        m.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        m.weight.copy_(torch.linspace(0.5, 1.5, 6))
    return m


class _Traced(torch.Tensor):
    """A plain subclass: ``_mixing`` takes the branches it takes for traced (torch.compile)
    tensors, but on real values."""


def _traced_pieces(layer, xs, dys):
    """y, dx and the parameter gradients from ``_mixing``'s traced branches (what a compiled
    SyncSwitchNorm runs: the BN statistics and adjoints pooled across the ranks)."""
    spec = _mixing.Options(layer.candidates, eps=layer.eps, sync=True)
    mean_w, var_w = layer.importance_logits()
    x, dy, w, b, mw, vw = (t.detach().as_subclass(_Traced)
                           for t in (xs, dys, layer.weight, layer.bias, mean_w, var_w))
    m = x[0, 0].numel()
    st, xc = _mixing.stats(x, spec)
    a, bb, _batch, count, mixed, cands, probs = _mixing.mix(st, w, b, mw, vw, None, None, m,
                                                            spec=spec, logits=True)
    y = _mixing.normalize(x, xc, st[0], a, bb)
    s1, s2 = _mixing.grad_sums(dy, x, st[0])
    back = _mixing.mix_backward(s1, s2, (st, mixed, cands, probs), w, m, spec=spec,
                                logits=True, n_total=count / m, need=(True,) * 5)
    dx = _mixing.input_grad(x, dy, *back[:3])
    return [t.as_subclass(torch.Tensor) for t in (y, dx, *back[3:])]


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x, dy = _data()
        start = sum(SIZES[:rank])
        xs = x[start:start + SIZES[rank]].clone().requires_grad_()
        m = snexp.SyncSwitchNorm.convert_sync_switchnorm(_layer())
        y = m(xs)
        y.backward(dy[start:start + SIZES[rank]])
        grads = [p.grad.clone() for p in (m.weight, m.bias, m.mean_weight, m.var_weight)]
        for g in grads:  # what DDP does to parameter gradients (sum; DDP divides by world)
            dist.all_reduce(g)
        traced = _traced_pieces(_layer(), xs, dy[start:start + SIZES[rank]])
        for g in traced[2:]:
            dist.all_reduce(g)
        far = snexp.SyncSwitchNorm.convert_sync_switchnorm(_layer().float())
        xf = _far_data()[start:start + SIZES[rank]]
        torch.save({"y": y.detach(), "dx": xs.grad, "grads": grads, "traced": traced,
                    "running_mean": m.running_mean, "running_var": m.running_var,
                    "far_y": far(xf).detach(), "far_running_var": far.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_switchnorm_two_processes_equal_one_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    x, dy = _data()
    ref = _layer()
    xr = x.clone().requires_grad_()
    y = ref(xr)
    y.backward(dy)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), atol=1e-10,
                               rtol=0)
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), xr.grad, atol=1e-10, rtol=0)
    for g in got:
        for a, b in zip(g["grads"], (ref.weight, ref.bias, ref.mean_weight, ref.var_weight)):
            torch.testing.assert_close(a, b.grad, atol=1e-10, rtol=0)
        # the traced branches (a compiled SyncSwitchNorm) give what the eager layer gives
        want = [g["y"], g["dx"], *g["grads"]]
        for name, a, b in zip(("y", "dx", "dweight", "dbias", "dmean_w", "dvar_w"),
                              g["traced"], want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
        torch.testing.assert_close(g["running_mean"], ref.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(g["running_var"], ref.running_var, atol=1e-12, rtol=0)
    # far from zero, in float32: both ranks agree with SwitchNorm on the whole batch in float64
    far = _layer()
    y_far = far(_far_data().double())
    torch.testing.assert_close(torch.cat([g["far_y"] for g in got]).double(), y_far,
                               atol=5e-3, rtol=0)
    for g in got:
        torch.testing.assert_close(g["far_running_var"].double(), far.running_var,
                                   atol=0, rtol=1e-4)


def test_sync_without_process_group_equals_switchnorm():
    x, _ = _data()
    sync = snexp.SyncSwitchNorm.convert_sync_switchnorm(torch.nn.Sequential(_layer()))
    assert isinstance(sync[0], snexp.SyncSwitchNorm)
    torch.testing.assert_close(sync(x), _layer()(x))


def test_convert_refuses_sparse_layers():
    with pytest.raises(TypeError, match="cannot be synchronized"):
        snexp.SyncSwitchNorm.convert_sync_switchnorm(snexp.SparseSwitchNorm2d(4))


def test_convert_keeps_the_importance_prior_through_reset_parameters():
    # the converted layer restarts at the original's prior, not at equal weights
    sn = snexp.SwitchNorm2d(4, prior="bn:4")
    sync = snexp.SyncSwitchNorm.convert_sync_switchnorm(sn)
    with torch.no_grad():
        sync.mean_weight.zero_()
    sync.reset_parameters()
    torch.testing.assert_close(sync.mean_weight.detach(), torch.tensor([0.0, 0.0, 4.0]))
    torch.testing.assert_close(sync.var_weight.detach(), torch.tensor([0.0, 0.0, 4.0]))
