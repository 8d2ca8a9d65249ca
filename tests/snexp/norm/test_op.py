"""The SN custom ops: opcheck, torch.compile(fullgraph=True) and torch.export against eager."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import snexp
from snexp.norm import _mixing, op


def _op_args(x, candidates="in,ln,bn", training=True, running=True, logits=True):
    c = x.shape[1]
    k = len(candidates.split(","))
    w = torch.randn(c, dtype=x.dtype, requires_grad=True)
    b = torch.randn(c, dtype=x.dtype, requires_grad=True)
    mw = torch.randn(k, dtype=x.dtype, requires_grad=True)
    vw = torch.randn(k, dtype=x.dtype, requires_grad=True)
    rm = torch.randn(c, dtype=x.dtype) if running else None
    rv = torch.rand(c, dtype=x.dtype) + 0.5 if running else None
    return (x, w, b, mw, vw, rm, rv, candidates, 1e-5, training, logits, False, False, "",
            op.SOURCE)


@pytest.mark.parametrize("candidates,training", [
    ("in,ln,bn", True), ("in,ln,bn", False), ("ln,gn2", True), ("bn", True), ("in", False),
])
def test_opcheck_switch_norm(candidates, training):
    # schema, fake (meta) implementation, autograd registration and AOT dispatch all agree
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op.switch_norm_op, _op_args(x, candidates, training))


def test_opcheck_backward_and_running_update():
    # the backward op and the mutating update op pass the same checks
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    args = _op_args(x)
    y, batch, n_bn, st, mixed, cands, probs = op.switch_norm_op(*args)
    dy = torch.randn_like(y)
    # (no input requires grad: the backward op itself has no derivative, by design)
    torch.library.opcheck(op.switch_norm_backward_op, (
        dy, x, args[1].detach(), st, mixed, cands, probs, n_bn, "in,ln,bn", 1e-5, True, False,
        False, "",
        True, [True, True, True, True, True]))
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch.library.opcheck(op.update_running_stats,
                          (rm, rv, batch, n_bn * 5, None, 0.1, True))


def test_running_update_is_bessel_corrected_lerp():
    # running = 0.9 old + 0.1 batch, the batch variance made unbiased by count / (count - 1)
    rm, rv = torch.zeros(2), torch.ones(2)
    batch = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    op.update_running_stats(rm, rv, batch, torch.tensor(5.0), None, 0.1, True)
    torch.testing.assert_close(rm, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(rv, torch.tensor([0.9 + 0.1 * 5.0, 0.9 + 0.1 * 10.0]))
    # momentum < 0: cumulative average, factor 1 / num_batches_tracked
    op.update_running_stats(rm, rv, batch, torch.tensor(5.0), torch.tensor(2), -1.0, False)
    torch.testing.assert_close(rm, torch.tensor([0.55, 1.1]))


@pytest.fixture
def fresh_dynamo():
    # each test compiles new modules of the same classes: start from an empty code cache, so
    # that their sum never reaches dynamo's recompile limit (8 per code object)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _net(norm="sn", **options):
    layer = snexp.norm_layer(norm, **options)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), layer(8))


def _step(model, x):
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("norm,options", [("sn", {}), ("ssn", {}),
                                          ("sn", {"candidates": ("ln", "gn4", "bn")})])
def test_compile_fullgraph_matches_eager_train_and_eval(norm, options, fresh_dynamo):
    # outputs, input and parameter gradients and running statistics equal eager's
    torch.manual_seed(0)
    eager = _net(norm, **options)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        eager.train(training)
        compiled_src.train(training)
        for _ in range(2):
            x1 = torch.randn(4, 3, 6, 6, requires_grad=True)
            x2 = x1.detach().clone().requires_grad_()
            y1, y2 = _step(eager, x1), _step(compiled, x2)
            torch.testing.assert_close(y2, y1)
            torch.testing.assert_close(x2.grad, x1.grad)
    for (name, p1), p2 in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)
    for (name, b1), b2 in zip(eager.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(b2, b1, msg=name)
    assert eager[1].num_batches_tracked.item() == 2


def test_compile_decomposes_the_op_with_dynamic_shapes(fresh_dynamo):
    # under torch.compile the ops decompose into ATen ops (what inductor fuses), also with
    # dynamic=True over changing batch sizes; outputs, gradients and buffers equal eager's
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    targets = []

    def graph(gm, _inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=graph, bw_compiler=graph)

    torch.manual_seed(0)
    eager = _net()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, fullgraph=True, dynamic=True, backend=backend)
    for n in (3, 5):
        x1 = torch.randn(n, 3, 6, 6, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        torch.testing.assert_close(_step(compiled, x2), _step(eager, x1))
        torch.testing.assert_close(x2.grad, x1.grad)
    for (name, p1), p2 in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)
    for (name, b1), b2 in zip(eager.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(b2, b1, msg=name)
    assert targets and not [t for t in targets if "snexp" in t]
    assert any("lerp" in t for t in targets)  # the running statistics, inside the graph


def test_compiled_backward_keeps_the_in_statistics_not_every_candidates(fresh_dynamo):
    # Under torch.compile a training step's backward derives the candidates' statistics again
    # from the IN statistics: the forward graph hands it no (2, K, N, C) tensor (each
    # intermediate is a buffer and an OpenMP barrier in inductor's CPU code). (In eval, BN's
    # running statistics are read from the saved candidates: the backward has no buffers.)
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    shapes = []

    def forward_graph(gm, _inputs):
        out = next(node for node in gm.graph.nodes if node.op == "output")
        shapes.extend(tuple(arg.meta["val"].shape) for arg in out.args[0]
                      if arg is not None and "val" in arg.meta)
        return make_boxed_func(gm)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=forward_graph,
                                     bw_compiler=lambda g, _inputs: make_boxed_func(g))

    torch.manual_seed(0)
    model = nn.Sequential(snexp.norm_layer("sn")(8))
    x1 = torch.randn(4, 8, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.testing.assert_close(_step(compiled, x2), _step(eager, x1))
    torch.testing.assert_close(x2.grad, x1.grad)
    assert (2, 4, 8) in shapes  # [mu_in; var_in]
    assert not [s for s in shapes if len(s) == 4 and s[:2] == (2, 3)]  # (2, K, N, C)


def test_compiled_graph_carries_the_digest_of_the_decomposed_code(fresh_dynamo):
    # torch.compile's on-disk caches key on dynamo's graph, where SN is one opaque op call: the
    # digest of the code it decomposes into is an argument there, so changed code recompiles
    files = Path(op.__file__).read_bytes() + Path(_mixing.__file__).read_bytes()
    digest = hashlib.sha256(files).hexdigest()[:16]
    calls = []

    def backend(gm, _inputs):
        calls.extend(node.args for node in gm.graph.nodes
                     if node.target is torch.ops.snexp.switch_norm.default)
        return gm.forward

    torch.compile(_net(), fullgraph=True, backend=backend)(torch.randn(2, 3, 6, 6))
    assert op.SOURCE == digest
    assert len(calls) == 2 and all(args[-1] == digest for args in calls)


@pytest.mark.slow
def test_compile_inductor_matches_eager(fresh_dynamo):
    # the default backend (inductor) compiles SN models in one graph and agrees with eager
    torch.manual_seed(0)
    eager = _net()
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, fullgraph=True)
    x1 = torch.randn(4, 3, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    torch.testing.assert_close(_step(compiled, x2), _step(eager, x1))
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(compiled_src[1].running_var, eager[1].running_var)


@pytest.mark.parametrize("training", [False, True])
def test_export_matches_eager(training):
    # torch.export keeps SN as one op (no decomposition there, as for triton ops); the exported
    # program computes what eager does
    torch.manual_seed(0)
    model = _net().train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    exported = torch.export.export(model, (x,))
    names = {str(node.target) for node in exported.graph.nodes}
    assert "snexp.switch_norm.default" in names
    module = exported.module()
    torch.testing.assert_close(module(x), reference(x))
    # running statistics: updated as eager updates them in training, untouched in eval
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(module.get_buffer(name), buffer, msg=name)
    if training:
        assert not torch.equal(reference[1].running_var, torch.ones(8))


def test_second_derivative_raises_instead_of_silently_wrong():
    # the closed-form backward builds no graph: create_graph must fail loudly
    layer = snexp.SwitchNorm2d(4)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_pieces_compose_to_the_reference_in_float64(monkeypatch):
    # stats -> mix -> normalize and grad_sums -> mix_backward -> input_grad, on the ATen
    # backend, give the plain-autograd reference's output and gradients
    from snexp import reference
    from snexp.norm import _cpu, _mixing

    monkeypatch.setitem(_cpu._state, "loaded", False)
    torch.manual_seed(0)
    x = (torch.randn(3, 8, 5, 4, dtype=torch.float64) * 2 + 3).requires_grad_()
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    mw, vw = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    params = [t.requires_grad_() for t in (w, b, mw, vw)]
    spec = _mixing.Options(("in", "ln", "gn2", "bn"))
    st, xc = _mixing.stats(x.detach(), spec)
    a, bb, batch, count, mixed, cands, probs = _mixing.mix(
        st, w.detach(), b.detach(), mw.detach(), vw.detach(), None, None, 20, spec=spec,
        logits=True)
    y = _mixing.normalize(x.detach(), xc, st[0], a, bb)
    want = reference.switch_norm(x, w, b, torch.softmax(mw, 0), torch.softmax(vw, 0), None,
                                 None, candidates=spec.candidates, training=True)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert count == 60 and batch.shape == (2, 8)
    dy = torch.randn_like(y)
    want.backward(dy)
    s1, s2 = _mixing.grad_sums(dy, x.detach(), st[0])
    a2, p, q, *grads = _mixing.mix_backward(s1, s2, (st, mixed, cands, probs), w.detach(),
                                           20, spec=spec, logits=True, n_total=3,
                                           need=(True,) * 5)
    dx = _mixing.input_grad(x.detach(), dy, a2, p, q)
    torch.testing.assert_close(dx, x.grad, rtol=1e-10, atol=1e-10)
    for got, t in zip(grads, params):
        # importance gradients are defined up to a constant shift (softmax Jacobian removes it)
        torch.testing.assert_close(got, t.grad, rtol=1e-10, atol=1e-10)


class _Traced(torch.Tensor):
    """A plain subclass: ``_mixing`` takes the branches it takes for traced (torch.compile)
    tensors, but on real values."""


@pytest.mark.parametrize("candidates,shape,official,running", [
    (("in", "ln", "bn"), (3, 8, 5, 4), False, False),
    (("in", "ln", "gn2", "bn"), (3, 8, 5, 4), True, False),
    (("in", "ln", "bn"), (3, 8, 5, 4), False, True),  # BN on running statistics
    # official (N, C) input, as the layer hands it to the op (N, C, 1): Bessel-corrected pools
    (("ln", "bn"), (6, 8, 1), True, False),
])
@pytest.mark.parametrize("logits", [True, False])  # softmax importance weights, or as given
def test_traced_branches_equal_the_eager_ones_in_float64(candidates, shape, official,
                                                          running, logits):
    # the traced forms of stats and mix_backward (candidates derived again from the IN
    # statistics, the grouped reductions) give the eager forms' values; outputs a traced
    # graph does not read (mixed, cands) are still what the other backends' backward needs
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(shape, dtype=dt) * 2 + 3
    n, c = shape[:2]
    m = x[0, 0].numel()
    spec = _mixing.Options(candidates, unbiased_in=official, official_2d=shape[2:] == (1,))
    k = len(candidates)
    w, b = torch.randn(c, dtype=dt), torch.randn(c, dtype=dt)
    mw, vw = torch.randn(k, dtype=dt), torch.randn(k, dtype=dt)
    if not logits:  # weights as given (sparse SN's): a distribution, as its sparsestmax gives
        mw, vw = mw.softmax(0), vw.softmax(0)
    bn = (torch.randn(c, dtype=dt), torch.rand(c, dtype=dt) + 0.5) if running else (None, None)
    dy = torch.randn(shape, dtype=dt)

    def run(wrap):
        xs, dys = wrap(x), wrap(dy)
        st, xc = _mixing.stats(xs, spec)
        a, bb, batch, count, mixed, cands, probs = _mixing.mix(
            st, *map(wrap, (w, b, mw, vw)), *(None if t is None else wrap(t) for t in bn), m,
            spec=spec, logits=logits)
        y = _mixing.normalize(xs, xc, st[0], a, bb)
        s1, s2 = _mixing.grad_sums(dys, xs, st[0])
        back = _mixing.mix_backward(s1, s2, (st, mixed, cands, probs), wrap(w), m, spec=spec,
                                    logits=logits, n_total=None if running else n,
                                    need=(True,) * 5)
        dx = _mixing.input_grad(xs, dys, *back[:3])
        return [t.as_subclass(torch.Tensor) for t in (st, y, mixed, cands, dx, *back[3:])]

    traced = run(lambda t: t.as_subclass(_Traced))
    assert type(_mixing.stats(x.as_subclass(_Traced), spec)[0]) is _Traced  # the traced path
    for got, want in zip(traced, run(lambda t: t)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_backend_setting_is_checked(monkeypatch):
    # a misspelt SNEXP_BACKEND names the valid ones instead of silently running something
    from snexp.norm import _backend

    monkeypatch.setenv("SNEXP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, aten, cpu, triton"):
        _backend.setting()
    monkeypatch.setenv("SNEXP_BACKEND", "ATEN")
    assert _backend.setting() == "aten"
    monkeypatch.delenv("SNEXP_BACKEND")
    monkeypatch.setenv("SNEXP_CPU_KERNEL", "0")
    assert _backend.setting() == "aten"
    from snexp.bench import describe_backend

    assert describe_backend(torch.zeros(2, 2, 2, dtype=torch.float16)) == "ATen ops"
