"""The Triton backend of the SN op against the ATen equations (``_mixing``) and the reference.

Without a GPU the kernels run in Triton's interpreter (numpy on the CPU). ``TRITON_INTERPRET=1``
is read whenever ``triton.jit`` decorates a function, Triton's own library included (at its
import and in lazy imports later), so it cannot be switched on for some tests of one process:
``test_the_kernels_run_in_tritons_interpreter`` runs this file again in a child process with it
set from the start, where the interpreter tests run and the rest of the suite is untouched.
With CUDA, the compiled kernels are checked the same way, also in float16/bfloat16.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snexp
from snexp import reference
from snexp.norm import _mixing

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[3]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the child process of "
    "test_the_kernels_run_in_tritons_interpreter (TRITON_INTERPRET=1 from the start)")


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(),
                    reason="the child process itself, or a GPU (the CUDA tests run instead)")
def test_the_kernels_run_in_tritons_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "SNEXP_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "test_interp_", str(Path(__file__).resolve())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    # every interpreter test ran and passed (a skip would mean the kernels were not checked)
    assert done.returncode == 0 and "skipped" not in summary, done.stdout[-6000:] + done.stderr[
        -2000:]


@pytest.fixture
def interp():
    """``snexp.norm._triton`` with its kernels in Triton's interpreter."""
    from snexp.norm import _triton

    assert _triton._interpreted()
    return _triton


@pytest.fixture
def backend(interp, monkeypatch):
    """Route the SN op through the interpreted kernels; ``calls`` counts forward launches."""
    calls = []
    forward = interp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setenv("SNEXP_BACKEND", "triton")
    monkeypatch.setattr(interp, "forward", counted)
    interp.calls = calls
    return interp


def _case(shape, candidates=("in", "ln", "bn"), *, dtype=torch.float64, eval_=False,
          affine=True, logits=True, channels_last=False, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, k = shape[1], len(candidates)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(2).add_(3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if transposed:  # dense, but H and W do not collapse into one stride
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight = torch.randn(c, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(c, generator=g, dtype=dtype) if affine else None
    mw, vw = (torch.randn(k, generator=g, dtype=dtype) for _ in range(2))
    if not logits:
        mw, vw = mw.softmax(0), vw.softmax(0)
    bn_mean = torch.randn(c, generator=g, dtype=dtype) if eval_ else None
    bn_var = torch.rand(c, generator=g, dtype=dtype) + 0.5 if eval_ else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, weight, bias, mw, vw, bn_mean, bn_var, dy


def _check_against_mixing(module, shape, candidates=("in", "ln", "bn"), *, atol=1e-12,
                          rtol=0.0, rel_small=0.0, unbiased=False, eval_=False, device="cpu",
                          **kw):
    """Forward outputs, saved tensors and every gradient of ``module`` equal ``_mixing``'s.

    ``rtol`` applies to the full-size outputs y and dx; ``rel_small``, if given, bounds the
    gradients of the small tensors (sums over many terms, in another order) relative to their
    largest value instead of by ``10 atol``."""
    affine = kw.get("affine", True)
    x, weight, bias, mw, vw, bn_mean, bn_var, dy = (
        None if t is None else t.to(device) for t in _case(shape, candidates, eval_=eval_, **kw))
    spec = _mixing.Options(tuple(candidates), 1e-5, unbiased_in=unbiased)
    want = _mixing.forward(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                           weight, bias, mw, vw, bn_mean, bn_var, spec=spec, logits=kw.get(
                               "logits", True))
    got = module.forward(x, weight, bias, mw, vw, bn_mean, bn_var, spec=spec,
                         logits=kw.get("logits", True))
    # y comes back in the dtype and memory layout of x (contiguous where the spatial dims do
    # not collapse); statistics in float32 or float64
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    assert got[0].stride() == (x.contiguous() if kw.get("transposed") else x).stride()
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=atol, rtol=rtol)
    assert (got[1] is None) == (want[1] is None) and got[2] == want[2]
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], atol=atol, rtol=0)
    for a, b in zip(got[3], want[3]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    n_total = None if (eval_ and "bn" in candidates) else shape[0]
    need = (True, affine, affine, True, True)
    xr = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    want_g = _mixing.backward(want[3], xr, dy.to(xr.dtype).contiguous(), weight, spec=spec,
                              logits=kw.get("logits", True), n_total=n_total, need=need)
    got_g = module.backward(got[3], x, dy, weight, spec=spec, logits=kw.get("logits", True),
                            n_total=n_total, need=need)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        assert (a is None) == (b is None)
        if a is None:
            continue
        a, b = a.double(), b.double()
        if i > 0 and rel_small:
            assert (a - b).abs().max() <= rel_small * b.abs().max(), (i, a, b)
        else:
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol if i == 0 else 0.0)


# -- the kernels against _mixing, in the interpreter ----------------------------------------


@interpreted
@pytest.mark.parametrize("shape, candidates, kw", [
    ((2, 3, 7, 1), ("in", "ln", "bn"), {}),  # odd C and H*W
    ((1, 3, 7), ("in", "ln", "bn"), {}),  # N = 1
    ((4, 5, 1, 1), ("in", "ln", "bn"), {}),  # H*W = 1
    ((2, 3, 5, 7), ("in", "ln", "bn"), {"channels_last": True}),
    ((2, 3, 5, 4), ("in", "ln", "bn"), {"transposed": True}),  # copied to NCHW first
    ((2, 4, 3, 3), ("in", "ln", "bn"), {"eval_": True}),  # BN on running statistics
    ((2, 4, 3, 3), ("bn",), {"eval_": True}),  # only constants to pool: dx = a dy
    ((2, 4, 3, 3), ("ln", "bn"), {"affine": False, "logits": False}),
    ((3, 4, 2, 3), ("bn", "in"), {}),  # any order of the candidates
    ((2, 4, 3, 3), ("in", "ln", "bn"), {"unbiased": True}),  # compat="official", 4-D
    ((2, 4, 3, 3), ("in", "gn2"), {}),  # group candidates: ATen mixing between the kernels
    ((2, 4, 3, 3), ("in", "ln", "bn"), {"dtype": torch.float32, "atol": 2e-5}),
])
def test_interp_kernels_equal_the_aten_equations(interp, shape, candidates, kw):
    # every output, saved tensor and gradient agrees to float64 rounding (float32: ~1e-6)
    _check_against_mixing(interp, shape, candidates, **kw)


@interpreted
@pytest.mark.parametrize("channels_last", [False, True])
def test_interp_split_rows_and_small_tiles_equal_the_aten_equations(interp, monkeypatch,
                                                             channels_last):
    # tiles of 4 elements and a high program target: rows split into chunks combined by
    # Chan's formula, several channel blocks and several (N, C) blocks
    monkeypatch.setattr(interp, "_BLOCK", 4)
    monkeypatch.setattr(interp, "_PROGRAMS", 64)
    lay = interp._Layout(torch.empty(2, 3, 5, 7))
    assert lay.splits > 1
    _check_against_mixing(interp, (2, 3, 5, 7), channels_last=channels_last)


@interpreted
@pytest.mark.parametrize("candidates", [("in", "ln", "bn"), ("in", "gn2")])
def test_interp_without_the_input_gradient_the_others_are_unchanged(interp, candidates):
    # need[0] False: no dx pass, and the importance gradients are finished on their own
    x, weight, bias, mw, vw, _, _, dy = _case((2, 4, 3, 5), candidates)
    spec = _mixing.Options(candidates, 1e-5)
    *_, saved = interp.forward(x, weight, bias, mw, vw, None, None, spec=spec, logits=True)
    *_, want = _mixing.forward(x, weight, bias, mw, vw, None, None, spec=spec, logits=True)
    need = (False, True, True, True, True)
    got = interp.backward(saved, x, dy, weight, spec=spec, logits=True, n_total=2, need=need)
    ref = _mixing.backward(want, x, dy, weight, spec=spec, logits=True, n_total=2, need=need)
    assert got[0] is None and ref[0] is None
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@interpreted
def test_interp_float16_input_keeps_float32_statistics(interp):
    # y in float16, statistics and gradients of the small tensors in float32
    _check_against_mixing(interp, (2, 4, 3, 5), dtype=torch.float16, atol=1e-5,
                          rtol=math.ldexp(1, -10))


@interpreted
def test_interp_variance_is_exact_when_the_mean_dwarfs_the_spread(interp):
    # float32, mean 1e3, std 0.1: a one-pass sum of squares would be off by ~10x the
    # variance; the centered read is off by the mean's rounding squared (~1e-7 relative)
    g = torch.Generator().manual_seed(0)
    x = (1e3 + 0.1 * torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)).float()
    spec = _mixing.Options(("in",), 1e-5)
    *_, (_st, mixed, _cands, _probs) = interp.forward(
        x, None, None, torch.ones(1), torch.ones(1), None, None, spec=spec, logits=False)
    var = x.double().var((2, 3), correction=0)
    torch.testing.assert_close(mixed[1].double(), var, rtol=1e-4, atol=0)


# -- the layers through the op, in the interpreter -------------------------------------------


def _layer_run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
              if p is not None]
    grads = torch.autograd.grad(y, [x, *params], dy)
    buffers = [b.clone() for b in layer.buffers()]
    return y.detach(), grads, buffers


@interpreted
@pytest.mark.parametrize("kw, training, channels_last", [
    ({}, True, False),
    ({"momentum": None}, True, True),  # cumulative running average
    ({}, False, False),
    ({"candidates": ("in", "gn2"), "affine": False}, True, False),
    ({"compat": "official"}, True, False),
])
def test_interp_switchnorm2d_equals_the_aten_path(backend, monkeypatch, kw, training,
                                                  channels_last):
    # outputs, all gradients and the running statistics equal SN's ATen path
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    layer = snexp.SwitchNorm2d(4, **kw).double().train(training)
    with torch.no_grad():
        if layer.running_mean is not None:
            layer.running_mean.normal_(generator=g)
            layer.running_var.uniform_(0.5, 1.5, generator=g)
        layer.mean_weight.normal_(generator=g)
        layer.var_weight.normal_(generator=g)
    twin = snexp.SwitchNorm2d(4, **kw).double().train(training)
    twin.load_state_dict(layer.state_dict())
    got = [_layer_run(layer, x, dy) for _ in range(2)]  # twice: the running average moves
    assert len(backend.calls) == 2
    monkeypatch.setenv("SNEXP_BACKEND", "aten")
    want = [_layer_run(twin, x, dy) for _ in range(2)]
    assert len(backend.calls) == 2  # SNEXP_BACKEND=aten kept the kernels out
    for (y, grads, bufs), (yw, grads_w, bufs_w) in zip(got, want):
        torch.testing.assert_close(y, yw, atol=1e-12, rtol=0)
        for a, b in zip(grads, grads_w):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
        for a, b in zip(bufs, bufs_w):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@interpreted
def test_interp_switchnorm2d_equals_the_reference(backend):
    # the plain-autograd equations (each candidate's statistics straight from x)
    g = torch.Generator().manual_seed(1)
    layer = snexp.SwitchNorm2d(3).double()
    x = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3 - 2).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
        layer.var_weight.copy_(torch.tensor([-0.4, 0.2, 0.5]))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    mean_p, var_p = layer.importance_weights()
    yr = reference.switch_norm(xr, layer.weight, layer.bias, mean_p, var_p, rm, rv,
                               candidates=layer.candidates, training=True)
    params = [layer.weight, layer.bias, layer.mean_weight, layer.var_weight]
    got = torch.autograd.grad(y, [x, *params], dy)
    want = torch.autograd.grad(yr, [xr, *params], dy)
    assert len(backend.calls) == 1
    torch.testing.assert_close(y, yr, atol=1e-12, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)


@interpreted
def test_interp_sync_switchnorm_one_rank_equals_switchnorm(backend, monkeypatch, tmp_path):
    # SyncSwitchNorm pools BN statistics with ATen collectives between the Triton passes
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) + 1
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        plain = snexp.SwitchNorm2d(4).double()
        sync = snexp.SyncSwitchNorm.convert_sync_switchnorm(plain).double()
        got = _layer_run(sync, x, dy)
        assert len(backend.calls) == 1
        want = _layer_run(plain, x, dy)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    for a, b in zip([*got[1], *got[2]], [*want[1], *want[2]]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


@interpreted
def test_interp_cpu_runs_aten_unless_triton_is_asked_for(interp, monkeypatch):
    # without SNEXP_BACKEND=triton a CPU tensor never reaches the kernels
    monkeypatch.delenv("SNEXP_BACKEND", raising=False)
    assert not interp.usable(torch.randn(2, 3, 4))
    monkeypatch.setenv("SNEXP_BACKEND", "triton")
    assert interp.usable(torch.randn(2, 3, 4))
    assert not interp.usable(torch.zeros(2, 3, 4, dtype=torch.int64))
    # tracing (fake tensors: torch.compile, export) keeps the ATen equations, which it can see
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 3, 4)
    assert not interp.usable(fake)


def test_import_snexp_and_a_cpu_layer_leave_the_triton_backend_unloaded():
    code = ("import sys, torch\nimport snexp\n"
            "snexp.SwitchNorm2d(4)(torch.randn(2, 4, 3, 3)).sum().backward()\n"
            "print('snexp.norm._triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "SNEXP_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=REPO).stdout.split()
    # on CPU the dispatch never imports the backend (torch's own dynamo may import triton)
    assert out == ["False"]


# -- compiled for a GPU without one ---------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float64: "*fp64"}


def _compile_instead_of_launching(compiled):
    """A ``JITFunction.run`` that compiles the launch for sm_90 (H100/H200) and launches
    nothing, specializing as the JIT does (an int equal to 1 becomes a constant)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constants = {}, {}
        for name, param in zip(self.arg_names, self.params):
            value = bound[name]
            if param.is_constexpr or (type(value) is int and value == 1):
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = _PTR[value.dtype]
            else:
                signature[name] = {bool: "i1", int: "i32", float: "fp32"}[type(value)]
        key = (self.fn.__name__, str(signature), str(constants))
        if key not in compiled:
            compiled[key] = triton.compile(ASTSource(self, signature, constants),
                                           target=GPUTarget("cuda", 90, 32))
    return run


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(),
                    reason="the child process (interpreted kernels), or a GPU (the CUDA tests "
                           "launch the kernels themselves)")
def test_every_launch_compiles_for_sm90_without_a_gpu(monkeypatch):
    # Triton's own compiler and ptxas turn each kernel, as launched, into a cubin for an
    # H100/H200: type and lowering errors show up here, not first on the GPU
    from triton.backends import backends
    from triton.runtime.jit import JITFunction

    from snexp.norm import _triton

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    compiled = {}
    monkeypatch.setattr(JITFunction, "run", _compile_instead_of_launching(compiled))
    cases = [((4, 6, 7, 5), {}), ((4, 6, 7, 5), {"dtype": torch.bfloat16,
                                                 "channels_last": True}),
             ((3, 5, 1, 1), {"eval_": True}), ((8, 32, 9, 9), {"affine": False,
                                                                 "logits": False}),
             ((2, 4, 3, 3), {"dtype": torch.float64}), ((2, 4), {"dtype": torch.float16}),
             ((2, 4, 64, 64), {})]  # long rows: split, then Chan's combination
    for shape, kw in cases:
        for candidates in (("in", "ln", "bn"), ("bn",), ("in", "gn1")):
            x, weight, bias, mw, vw, bn_mean, bn_var, dy = _case(shape, candidates, **kw)
            spec = _mixing.Options(candidates, 1e-5)
            *_, saved = _triton.forward(x, weight, bias, mw, vw, bn_mean, bn_var, spec=spec,
                                        logits=kw.get("logits", True))
            for need_x in (True, False):
                _triton.backward(saved, x, dy, weight, spec=spec,
                                 logits=kw.get("logits", True),
                                 n_total=None if kw.get("eval_") else shape[0],
                                 need=(need_x,) + (True,) * 4)
    names = {key[0] for key in compiled}
    assert names == {"_stats_kernel", "_finish_kernel", "_pool_kernel", "_mix_normalize_kernel",
                     "_normalize_kernel", "_grad_sums_kernel", "_pool_bwd_kernel", "_dp_kernel",
                     "_mix_input_grad_kernel", "_input_grad_kernel"}
    assert all(c.asm.get("cubin") for c in compiled.values())


# -- compiled kernels on a GPU ---------------------------------------------------------------


@cuda
@pytest.mark.parametrize("shape, kw", [
    ((4, 6, 7, 5), {}),
    ((2, 64, 56, 56), {"channels_last": True}),  # long rows: split into Chan chunks
    ((3, 5, 1, 1), {"eval_": True}),
    ((8, 32, 9, 9), {"affine": False, "logits": False, "unbiased": True}),
])
def test_cuda_kernels_equal_the_aten_equations(shape, kw, monkeypatch):
    from snexp.norm import _triton

    monkeypatch.setenv("SNEXP_BACKEND", "aten")  # _mixing's own passes for the expectation
    _check_against_mixing(_triton, shape, device="cuda", dtype=torch.float32, atol=5e-5,
                          rel_small=1e-4, **kw)
    _check_against_mixing(_triton, shape, ("in", "gn1"), device="cuda", dtype=torch.float64,
                          rel_small=1e-10)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs_keep_float32_statistics(dtype, monkeypatch):
    from snexp.norm import _triton

    monkeypatch.setenv("SNEXP_BACKEND", "aten")
    # y and dx in the input dtype (one rounding), everything else from float32 statistics
    _check_against_mixing(_triton, (4, 32, 14, 14), device="cuda", dtype=dtype, atol=1e-4,
                          rtol=math.ldexp(1, -7), rel_small=1e-4)


@cuda
def test_cuda_switchnorm2d_uses_the_kernels_and_equals_the_aten_path(monkeypatch):
    from snexp.norm import _triton

    calls = []
    forward = _triton.forward
    monkeypatch.setattr(_triton, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 16, 12, 12, device="cuda", generator=g) * 2 + 1
    dy = torch.randn(x.shape, device="cuda", generator=g)
    layer = snexp.SwitchNorm2d(16).cuda()
    twin = snexp.SwitchNorm2d(16).cuda()
    got = _layer_run(layer, x, dy)
    assert calls == [1]
    monkeypatch.setenv("SNEXP_BACKEND", "aten")
    want = _layer_run(twin, x, dy)
    assert calls == [1]
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
