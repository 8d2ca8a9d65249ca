"""Switchable Normalization as Triton kernels: the CUDA backend of ``snexp::switch_norm``.

The equations are :mod:`snexp.norm._mixing`'s (its docstring states forward and closed-form
backward); this module launches the kernels of :mod:`snexp.norm._triton_kernels` that compute
them in a handful of launches, with nothing leaving the device:

forward   1. row statistics: per (n, c) and spatial chunk, the mean, then the centered sum of
             squares in a second read of the chunk (from cache) -> ``[mu_in; var_in]``;
          2. only where rows are split into chunks (few or long rows): Chan's combination;
          3. pool: BN statistics per channel (over N) and LN statistics per sample (over C),
             and the importance probabilities (softmax of the logits);
          4. mix and normalize: each program mixes its rows (every candidate's
             ``[mu_k - mu_in; var_k]``, the mixed ``[mu - mu_in; var]``, the scale and shift
             ``a``, ``b``; stored by the programs of the first chunk), then writes
             ``y = a (x - mu_in) + b`` in the dtype of ``x``.
backward  1. gradient sums ``s1 = sum dy``, ``s2 = sum dy (x - mu_in)`` per (n, c) and chunk;
          2. pool: ``dweight``, ``dbias``, the BN and LN adjoints of ``d = [a s1; a rstd h]``,
             per-block partials of ``dp = cands . d`` and the chunks' sums added up;
          3. mix and input gradient: each program computes its rows' ``a, p, q``, then
             ``dx = a dy + p x + q`` in the dtype of ``x``; the first one also finishes
             ``dmean_w``, ``dvar_w`` (softmax Jacobian).

That is 3 launches forward (4 where rows are split) and 3 backward, against cuDNN BN's 2-4.

Statistics are float32 (float64 for float64 input) whatever the input dtype. Candidates among
``in``, ``ln``, ``bn`` are mixed by the kernels above, with batch or running BN statistics and
per-(n, c) variances biased or not (``compat="official"``). Group candidates, SyncSwitchNorm
(its BN statistics are pooled across ranks) and official (N, C) input keep the full-size
kernels (statistics, normalize; gradient sums, input gradient) and mix with ``_mixing``'s
ATen helpers in between instead.

The full-size kernels take any strides that collapse the spatial dimensions to one (NCHW and
channels_last both do; channels_last reads whole channel vectors per spatial position); other
layouts are copied with ``.contiguous()`` first. ``usable`` says when this backend runs: CUDA
tensors when Triton imports, and with ``SNEXP_BACKEND=triton`` CPU tensors too when Triton's
interpreter is on (``TRITON_INTERPRET=1`` before Triton is imported: that is how the tests
run the kernels without a GPU); ``SNEXP_BACKEND=aten`` switches it off.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

from snexp.norm import _mixing

try:
    import triton

    from snexp.norm._triton_kernels import (
        _dp_kernel,
        _finish_kernel,
        _grad_sums_kernel,
        _input_grad_kernel,
        _mix_input_grad_kernel,
        _mix_normalize_kernel,
        _normalize_kernel,
        _pool_bwd_kernel,
        _pool_kernel,
        _stats_kernel,
    )
except ImportError:  # no Triton: usable() is False
    triton = None

__all__ = ["usable", "forward", "backward"]

# Elements per tile of the full-size kernels; the number of programs below which rows are
# split into chunks (Chan partials) so that few long rows still fill the GPU; the most
# elements one program reads, so that the statistics' second read finds them in cache. Tests
# shrink them to exercise tiling and splits on small tensors.
_BLOCK = 1024
_PROGRAMS = 1024
_CHUNK = 8192
_FUSED = frozenset({"in", "ln", "bn"})

def _interpreted() -> bool:
    return type(_stats_kernel).__name__ == "InterpretedFunction"


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels run ``x``: CUDA (or, with ``SNEXP_BACKEND=triton`` and the
    interpreter on, CPU) float tensors under 2**31 elements, Triton importable, not while
    ``torch.compile`` or ``torch.export`` traces; never with ``SNEXP_BACKEND=aten``."""
    backend = os.environ.get("SNEXP_BACKEND", "")
    if triton is None or backend == "aten":
        return False
    # fake, functional or traced tensors (torch.compile, export) take the ATen equations
    if type(x) not in (Tensor, torch.nn.Parameter) or torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        if backend != "triton" or not _interpreted():
            return False
    elif x.device.type != "cuda":
        return False
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            and x.dim() >= 2 and 0 < x.numel() < 2**31)


def _cdiv(a: int, b: int) -> int:
    # NOTE: not triton.cdiv: on the host it is a constexpr function, slow to call per launch
    return -(-a // b)


def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


class _Layout:
    """A tensor seen as (N, C, M) with strides, and the tiling of the full-size kernels."""

    def __init__(self, x: Tensor):
        n, c = x.shape[:2]
        m = math.prod(x.shape[2:])
        try:  # NCHW and channels_last both collapse the spatial dimensions into one stride
            v = x.view(n, c, m)
        except RuntimeError:  # NOTE: other layouts pay one copy
            v = x.contiguous().view(n, c, m)
        self.n, self.c, self.m, self.v = n, c, m, v
        _, sc, sm = v.stride()
        if sc == 1 and sm != 1 and c > 1 and m > 1:  # channels-last: tile along channels
            self.bc = min(_np2(c), 64)
            self.bm = max(1, min(_np2(m), _BLOCK // self.bc))
        else:
            self.bm = min(_np2(m), _BLOCK)
            self.bc = max(1, min(_np2(c), _BLOCK // self.bm))
        programs = n * _cdiv(c, self.bc)
        blocks = _cdiv(m, self.bm)
        splits = min(blocks, 65535, max(_cdiv(_PROGRAMS, programs),  # (grid y limit)
                                        _cdiv(m * self.bc, _CHUNK)))
        self.chunk = _cdiv(blocks, splits) * self.bm
        self.splits = _cdiv(m, self.chunk)
        self.grid = (programs, self.splits)

    def new_like(self) -> Tensor:
        """An empty (N, C, M) tensor laid out as the input's view (NCHW or channels_last)."""
        return torch.empty_like(self.v)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_stats(lay: _Layout, dt: torch.dtype, denom: int) -> Tensor:
    """[mu_in; var_in] (2, N, C) in ``dt``: per-chunk mean and M2, then Chan's combination
    (one launch when rows are not split)."""
    n, c, m, x = lay.n, lay.c, lay.m, lay.v
    stats = torch.empty((2, n, c), dtype=dt, device=x.device)
    if lay.splits == 1:
        _stats_kernel[lay.grid](x, stats[0], stats[1], c, m, lay.chunk, n * c, *x.stride(),
                                denom, BC=lay.bc, BM=lay.bm)
        return stats
    part = torch.empty((2, lay.splits, n, c), dtype=dt, device=x.device)
    _stats_kernel[lay.grid](x, part[0], part[1], c, m, lay.chunk, n * c, *x.stride(), 1,
                            BC=lay.bc, BM=lay.bm)
    _finish_kernel[(_cdiv(n * c, _BLOCK),)](part[0], part[1], stats, n * c, m, lay.splits,
                                            lay.chunk, denom, BLK=_BLOCK)
    return stats


def _fused(spec) -> bool:
    """Whether the (N, C) mixing runs as Triton kernels (else as ``_mixing``'s ATen helpers)."""
    return set(spec.candidates) <= _FUSED and not spec.sync and not spec.official_2d


def _device(x: Tensor):
    """x's GPU as the current device (Triton launches on the current one), else nothing."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _index(spec, cand: str) -> int:
    return spec.candidates.index(cand) if cand in spec.candidates else -1


def forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, *, spec, logits):
    """As :func:`snexp.norm._mixing.forward`, except that y is in the dtype of ``x``."""
    with _device(x):
        return _forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, spec, logits)


def _forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, spec, logits):
    # the kernels index the small tensors as dense vectors
    weight, bias, mean_w, var_w, bn_mean, bn_var = (
        None if t is None else t.contiguous() for t in (weight, bias, mean_w, var_w, bn_mean,
                                                        bn_var))
    lay = _Layout(x)
    n, c, m = lay.n, lay.c, lay.m
    dt = _stats_dtype(x.dtype)
    denom = _mixing.variance_denominator(spec, m)
    stats = _row_stats(lay, dt, denom)
    if _fused(spec):
        k = len(spec.candidates)
        i_bn = _index(spec, "bn")
        batch_bn = i_bn >= 0 and bn_mean is None
        do_ln = "ln" in spec.candidates
        new = stats.new_empty
        ln = new((2, n))
        batch = new((2, c)) if batch_bn else None
        probs = new((2, k))
        ncb = _cdiv(c, 64) if batch_bn else 0
        bnb = batch if batch_bn else stats
        _pool_kernel[(max(1, ncb + (n if do_ln else 0)),)](
            stats, ln, bnb, mean_w, var_w, probs, n, c, k, ncb, LOGITS=bool(logits),
            DO_BN=batch_bn, DO_LN=do_ln, KP=4, BN_=16, BC=64, BL=1024)
        mixed = new((2, n, c))
        cands = new((2, k, n, c))
        bm, bv = (bnb[0], bnb[1]) if bn_mean is None else (bn_mean, bn_var)
        count = n * m if batch_bn else 0
        y = lay.new_like()
        _mix_normalize_kernel[lay.grid](
            lay.v, y, stats, ln, bm, bv, probs, stats if weight is None else weight,
            stats if bias is None else bias, mixed, cands, n, c, k, float(spec.eps), m,
            lay.chunk, *lay.v.stride(), *y.stride(), I_IN=_index(spec, "in"),
            I_LN=_index(spec, "ln"), I_BN=i_bn, HAS_W=weight is not None,
            HAS_B=bias is not None, BC=lay.bc, BM=lay.bm)
        return y.view(x.shape), batch, count, (stats, mixed, cands, probs)
    # group candidates, sync, official (N, C): _mixing's own (N, C) mixing between the passes
    a, b, batch, count, mixed, cands, probs = _mixing.mix(
        stats, weight, bias, mean_w, var_w, bn_mean, bn_var, m, spec=spec, logits=logits)
    ab = torch.stack([a, b])
    mu = stats[0]
    y = lay.new_like()
    _normalize_kernel[lay.grid](lay.v, y, mu, ab, c, m, lay.chunk, n * c, *lay.v.stride(),
                                *y.stride(), BC=lay.bc, BM=lay.bm)
    return y.view(x.shape), batch, count, (stats, mixed, cands, probs)


def backward(saved, x, dy, weight, *, spec, logits, n_total, need):
    """As :func:`snexp.norm._mixing.backward`, except that dx is in the dtype of ``x``."""
    with _device(x):
        return _backward(saved, x, dy, weight, spec, logits, n_total, need)


def _backward(saved, x, dy, weight, spec, logits, n_total, need):
    st, mixed, cands, probs = (t.contiguous() for t in saved)
    mu = st[0]
    weight = None if weight is None else weight.contiguous()
    lay = _Layout(x)
    n, c, m = lay.n, lay.c, lay.m
    dt = mu.dtype
    try:
        dyv = dy.view(n, c, m)
    except RuntimeError:
        dyv = dy.contiguous().view(n, c, m)
    part = torch.empty((2, lay.splits, n, c), dtype=dt, device=x.device)
    _grad_sums_kernel[lay.grid](lay.v, dyv, mu, part[0], part[1], c, m, lay.chunk, n * c,
                                *lay.v.stride(), *dyv.stride(), BC=lay.bc, BM=lay.bm)
    k = probs.shape[1]
    if _fused(spec):
        new = mu.new_empty
        dweight, dbias, bnd, lnd = new(c), new(c), new((2, c)), new((2, n))
        ncb = _cdiv(c, 64)
        do_ln = "ln" in spec.candidates
        dpart = new((ncb, 2, 4))
        sums = new((2, n, c))
        w = mixed if weight is None else weight
        _pool_bwd_kernel[(ncb + (n if do_ln else 0),)](
            part[0], part[1], mixed, w, cands, dweight, dbias, bnd, lnd, dpart, sums, n, c,
            lay.splits, float(spec.eps), ncb, K=k, HAS_W=weight is not None, DO_LN=do_ln, KP=4,
            BN_=16, BC=64, BL=1024)
        dmw, dvw = new(k), new(k)
        grads = (dweight if need[1] else None, dbias if need[2] else None,
                 dmw if need[3] else None, dvw if need[4] else None)
        if not need[0]:
            _dp_kernel[(1,)](dpart, probs, dmw, dvw, k, ncb, LOGITS=bool(logits), KP=4)
            return (None, *grads)
        denom = _mixing.variance_denominator(spec, m)
        dx = lay.new_like()
        _mix_input_grad_kernel[lay.grid](
            lay.v, dyv, dx, sums[0], sums[1], mixed, w, mu, cands, probs, bnd, lnd, dpart, dmw,
            dvw, n, c, k, m, denom, float(spec.eps), ncb, lay.chunk, *lay.v.stride(),
            *dyv.stride(), *dx.stride(), I_IN=_index(spec, "in"), I_LN=_index(spec, "ln"),
            I_BN=_index(spec, "bn") if n_total is not None else -1, LOGITS=bool(logits),
            HAS_W=weight is not None, KP=4, BC=lay.bc, BM=lay.bm)
        return (dx.view(x.shape), *grads)
    s1, s2 = part.sum(1)
    a, p, q, *grads = _mixing.mix_backward(s1, s2, (st, mixed, cands, probs), weight, m,
                                           spec=spec, logits=logits, n_total=n_total,
                                           need=need)
    if not need[0]:
        return (None, *grads)
    if p is None:  # only BN on running statistics: dx = a dy
        p = q = torch.zeros_like(a)
    apq = torch.stack([a, p, q])
    dx = lay.new_like()
    _input_grad_kernel[lay.grid](lay.v, dyv, dx, apq, c, m, lay.chunk, n * c,
                                 *lay.v.stride(), *dyv.stride(), *dx.stride(),
                                 BC=lay.bc, BM=lay.bm)
    return (dx.view(x.shape), *grads)
