"""Switchable Normalization as Triton kernels: the CUDA backend of ``snexp::switch_norm``.

The equations are :mod:`snexp.norm._mixing`'s (its docstring states forward and closed-form
backward); this module computes them in a handful of launches with nothing leaving the device:

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
interpreter is on (``TRITON_INTERPRET=1`` before this module is imported: that is how the tests
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
    import triton.language as tl
except ImportError:  # no Triton: usable() is False and nothing below is defined
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

if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, C, M, CHUNK, NC, sxn, sxc, sxm, DEN,
                      BC: tl.constexpr, BM: tl.constexpr):
        # one program: channels [c, c + BC) of sample n, spatial chunk s; the sum of squares
        # is divided by DEN (1 for the partials of split rows, the variance's for whole rows)
        pid = tl.program_id(0)
        s = tl.program_id(1)
        ncb = tl.cdiv(C, BC)
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        base = x_ptr + n * sxn + c[:, None] * sxc
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        acc = tl.zeros([BC, BM], dtype=mean_ptr.dtype.element_ty)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            acc += tl.load(base + j[None, :] * sxm, mask=msk, other=0.0).to(acc.dtype)
        mean = tl.sum(acc, axis=1) / (hi - lo)
        # second, centered read (from cache): exact where |mean| >> std, unlike sum of squares
        acc = tl.zeros([BC, BM], dtype=mean_ptr.dtype.element_ty)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(base + j[None, :] * sxm, mask=msk, other=0.0).to(acc.dtype)
            d = tl.where(msk, v - mean[:, None], 0.0)
            acc += d * d
        out = s * NC + n * C + c
        tl.store(mean_ptr + out, mean, mask=cm)
        tl.store(m2_ptr + out, tl.sum(acc, axis=1) / DEN, mask=cm)

    @triton.jit
    def _finish_kernel(mean_ptr, m2_ptr, stats_ptr, NC, M, S, CHUNK, DEN,
                       BLK: tl.constexpr):
        # Chan: mean = sum_s n_s mean_s / M, M2 = sum_s M2_s + n_s (mean_s - mean)^2
        i = tl.program_id(0) * BLK + tl.arange(0, BLK)
        msk = i < NC
        tot = tl.load(mean_ptr + i, mask=msk, other=0.0) * tl.minimum(CHUNK, M)
        for s in range(1, S):
            cnt = tl.minimum(CHUNK, M - s * CHUNK)
            tot += tl.load(mean_ptr + s * NC + i, mask=msk, other=0.0) * cnt
        mu = tot / M
        if S == 1:  # one chunk: its mean as is (no multiply-divide rounding)
            mu = tl.load(mean_ptr + i, mask=msk, other=0.0)
        m2 = tl.zeros_like(mu)
        for s in range(0, S):
            cnt = tl.minimum(CHUNK, M - s * CHUNK)
            d = tl.load(mean_ptr + s * NC + i, mask=msk, other=0.0) - mu
            m2 += tl.load(m2_ptr + s * NC + i, mask=msk, other=0.0) + cnt * d * d
        tl.store(stats_ptr + i, mu, mask=msk)
        tl.store(stats_ptr + NC + i, m2 / DEN, mask=msk)

    @triton.jit
    def _pool_kernel(stats_ptr, ln_ptr, bn_ptr, mw_ptr, vw_ptr, probs_ptr, N, C, K, ROW0,
                     LOGITS: tl.constexpr, DO_BN: tl.constexpr, DO_LN: tl.constexpr,
                     KP: tl.constexpr, BN_: tl.constexpr, BC: tl.constexpr,
                     BL: tl.constexpr):
        pid = tl.program_id(0)
        NC = N * C
        dt = stats_ptr.dtype.element_ty
        if pid == 0:  # the importance probabilities (2, K)
            kk = tl.arange(0, KP)
            km = kk < K
            pm = tl.load(mw_ptr + kk, mask=km, other=0.0).to(dt)
            pv = tl.load(vw_ptr + kk, mask=km, other=0.0).to(dt)
            if LOGITS:  # softmax over the K valid entries
                pm = tl.where(km, tl.exp(pm - tl.max(tl.where(km, pm, -1e30), 0)), 0.0)
                pm = pm / tl.sum(pm, 0)
                pv = tl.where(km, tl.exp(pv - tl.max(tl.where(km, pv, -1e30), 0)), 0.0)
                pv = pv / tl.sum(pv, 0)
            tl.store(probs_ptr + kk, pm, mask=km)
            tl.store(probs_ptr + K + kk, pv, mask=km)
        if DO_BN:
            if pid < ROW0:  # BN over n for channels [c, c + BC): mean, then centered
                c = pid * BC + tl.arange(0, BC)
                cm = c < C
                acc = tl.zeros([BN_, BC], dtype=dt)
                for n0 in range(0, N, BN_):
                    n = n0 + tl.arange(0, BN_)
                    msk = (n[:, None] < N) & cm[None, :]
                    acc += tl.load(stats_ptr + n[:, None] * C + c[None, :], mask=msk, other=0.0)
                mean = tl.sum(acc, axis=0) / N
                acc = tl.zeros([BN_, BC], dtype=dt)
                for n0 in range(0, N, BN_):
                    n = n0 + tl.arange(0, BN_)
                    msk = (n[:, None] < N) & cm[None, :]
                    off = n[:, None] * C + c[None, :]
                    d = tl.where(msk, tl.load(stats_ptr + off, mask=msk, other=0.0)
                                 - mean[None, :], 0.0)
                    acc += tl.load(stats_ptr + NC + off, mask=msk, other=0.0) + d * d
                tl.store(bn_ptr + c, mean, mask=cm)
                tl.store(bn_ptr + C + c, tl.sum(acc, axis=0) / N, mask=cm)
        if DO_LN:
            if pid >= ROW0:  # LN over c for sample n
                n = pid - ROW0
                acc1 = tl.zeros([BL], dtype=dt)
                for c0 in range(0, C, BL):
                    c = c0 + tl.arange(0, BL)
                    acc1 += tl.load(stats_ptr + n * C + c, mask=c < C, other=0.0)
                mean = tl.sum(acc1, axis=0) / C
                acc1 = tl.zeros([BL], dtype=dt)
                for c0 in range(0, C, BL):
                    c = c0 + tl.arange(0, BL)
                    cm = c < C
                    d = tl.where(cm, tl.load(stats_ptr + n * C + c, mask=cm, other=0.0) - mean,
                                 0.0)
                    acc1 += tl.load(stats_ptr + NC + n * C + c, mask=cm, other=0.0) + d * d
                tl.store(ln_ptr + n, mean)
                tl.store(ln_ptr + N + n, tl.sum(acc1, axis=0) / C)

    @triton.jit
    def _mix_rows(stats_ptr, ln_ptr, bm_ptr, bv_ptr, probs_ptr, w_ptr, b_ptr, mixed_ptr,
                  cands_ptr, i, msk, smsk, N, C, K, eps, I_IN: tl.constexpr,
                  I_LN: tl.constexpr, I_BN: tl.constexpr, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr):
        # at flat (n, c) indices i: mu_in and the scale and shift a, b; the candidates'
        # [mu_k - mu_in; var_k] and the mixed [mu - mu_in; var] are stored where smsk
        NC = N * C
        n = i // C
        c = i % C
        dt = stats_ptr.dtype.element_ty
        mu = tl.load(stats_ptr + i, mask=msk, other=0.0)
        var = tl.load(stats_ptr + NC + i, mask=msk, other=0.0)
        off_mix = tl.zeros_like(mu)
        var_mix = tl.zeros_like(mu)
        if I_IN >= 0:
            q = tl.load(probs_ptr + K + I_IN)
            tl.store(cands_ptr + I_IN * NC + i, off_mix, mask=smsk)
            tl.store(cands_ptr + (K + I_IN) * NC + i, var, mask=smsk)
            var_mix += q * var
        if I_LN >= 0:
            p = tl.load(probs_ptr + I_LN)
            q = tl.load(probs_ptr + K + I_LN)
            off = tl.load(ln_ptr + n, mask=msk, other=0.0) - mu
            v = tl.load(ln_ptr + N + n, mask=msk, other=0.0)
            tl.store(cands_ptr + I_LN * NC + i, off, mask=smsk)
            tl.store(cands_ptr + (K + I_LN) * NC + i, v, mask=smsk)
            off_mix += p * off
            var_mix += q * v
        if I_BN >= 0:
            p = tl.load(probs_ptr + I_BN)
            q = tl.load(probs_ptr + K + I_BN)
            off = tl.load(bm_ptr + c, mask=msk, other=0.0).to(dt) - mu
            v = tl.load(bv_ptr + c, mask=msk, other=0.0).to(dt)
            tl.store(cands_ptr + I_BN * NC + i, off, mask=smsk)
            tl.store(cands_ptr + (K + I_BN) * NC + i, v, mask=smsk)
            off_mix += p * off
            var_mix += q * v
        tl.store(mixed_ptr + i, off_mix, mask=smsk)
        tl.store(mixed_ptr + NC + i, var_mix, mask=smsk)
        a = 1.0 / tl.sqrt(var_mix + eps)
        if HAS_W:
            a = a * tl.load(w_ptr + c, mask=msk, other=0.0).to(dt)
        b = -(off_mix * a)
        if HAS_B:
            b = b + tl.load(b_ptr + c, mask=msk, other=0.0).to(dt)
        return mu, a, b

    @triton.jit
    def _mix_normalize_kernel(x_ptr, y_ptr, stats_ptr, ln_ptr, bm_ptr, bv_ptr, probs_ptr,
                              w_ptr, b_ptr, mixed_ptr, cands_ptr, N, C, K, eps, M, CHUNK,
                              sxn, sxc, sxm, syn, syc, sym,
                              I_IN: tl.constexpr, I_LN: tl.constexpr, I_BN: tl.constexpr,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                              BC: tl.constexpr, BM: tl.constexpr):
        # the mixing of rows [c, c + BC) of sample n (stored by the first chunk's program),
        # then y = a (x - mu_in) + b over this program's chunk
        pid = tl.program_id(0)
        s = tl.program_id(1)
        ncb = (C + BC - 1) // BC
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        mu, a, b = _mix_rows(stats_ptr, ln_ptr, bm_ptr, bv_ptr, probs_ptr, w_ptr, b_ptr,
                             mixed_ptr, cands_ptr, n * C + c, cm, cm & (s == 0), N, C, K, eps,
                             I_IN, I_LN, I_BN, HAS_W, HAS_B)
        mu = mu[:, None]
        a = a[:, None]
        b = b[:, None]
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + j[None, :] * sxm, mask=msk,
                        other=0.0).to(mu.dtype)
            tl.store(y_ptr + n * syn + c[:, None] * syc + j[None, :] * sym,
                     (a * (v - mu) + b).to(y_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _normalize_kernel(x_ptr, y_ptr, mu_ptr, ab_ptr, C, M, CHUNK, NC, sxn, sxc, sxm,
                          syn, syc, sym, BC: tl.constexpr, BM: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        ncb = tl.cdiv(C, BC)
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        row = n * C + c
        mu = tl.load(mu_ptr + row, mask=cm, other=0.0)[:, None]
        a = tl.load(ab_ptr + row, mask=cm, other=0.0)[:, None]
        b = tl.load(ab_ptr + NC + row, mask=cm, other=0.0)[:, None]
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + j[None, :] * sxm, mask=msk,
                        other=0.0).to(mu.dtype)
            tl.store(y_ptr + n * syn + c[:, None] * syc + j[None, :] * sym,
                     (a * (v - mu) + b).to(y_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _grad_sums_kernel(x_ptr, dy_ptr, mu_ptr, s1_ptr, s2_ptr, C, M, CHUNK, NC, sxn, sxc,
                          sxm, sdn, sdc, sdm, BC: tl.constexpr, BM: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        ncb = tl.cdiv(C, BC)
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        mu = tl.load(mu_ptr + n * C + c, mask=cm, other=0.0)[:, None]
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        acc1 = tl.zeros([BC, BM], dtype=mu.dtype)
        acc2 = tl.zeros([BC, BM], dtype=mu.dtype)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + j[None, :] * sxm, mask=msk,
                        other=0.0).to(mu.dtype)
            g = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + j[None, :] * sdm, mask=msk,
                        other=0.0).to(mu.dtype)
            acc1 += g
            acc2 += g * tl.where(msk, v - mu, 0.0)
        out = s * NC + n * C + c
        tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=cm)
        tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=cm)

    @triton.jit
    def _d_terms(s1_ptr, s2_ptr, mixed_ptr, w_ptr, i, msk, C, NC, S, eps,
                 HAS_W: tl.constexpr):
        # s1, s2, h = g rstd, d = [a s1; a rstd h] and a at flat (n, c) indices i (0 where
        # masked), s1 and s2 summed over the S chunks
        s1 = tl.load(s1_ptr + i, mask=msk, other=0.0)
        s2 = tl.load(s2_ptr + i, mask=msk, other=0.0)
        for s in range(1, S):
            s1 += tl.load(s1_ptr + s * NC + i, mask=msk, other=0.0)
            s2 += tl.load(s2_ptr + s * NC + i, mask=msk, other=0.0)
        m0 = tl.load(mixed_ptr + i, mask=msk, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.load(mixed_ptr + NC + i, mask=msk, other=0.0) + eps)
        a = rstd
        if HAS_W:
            a = a * tl.load(w_ptr + i % C, mask=msk, other=0.0).to(rstd.dtype)
        h = (s2 - m0 * s1) * rstd
        return s1, s2, h, a * s1, a * rstd * h, a

    @triton.jit
    def _pool_bwd_kernel(s1_ptr, s2_ptr, mixed_ptr, w_ptr, cands_ptr, dw_ptr, db_ptr, bnd_ptr,
                         lnd_ptr, dpart_ptr, sum_ptr, N, C, S, eps, ROW0, K: tl.constexpr,
                         HAS_W: tl.constexpr, DO_LN: tl.constexpr, KP: tl.constexpr,
                         BN_: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr):
        pid = tl.program_id(0)
        NC = N * C
        dt = mixed_ptr.dtype.element_ty
        if pid < ROW0:  # channels [c, c + BC): sums over n, this block's share of dp, and
            # s1, s2 summed over the chunks for the input gradient
            c = pid * BC + tl.arange(0, BC)
            cm = c < C
            acc_h = tl.zeros([BN_, BC], dtype=dt)
            acc_s = tl.zeros([BN_, BC], dtype=dt)
            acc_0 = tl.zeros([BN_, BC], dtype=dt)
            acc_1 = tl.zeros([BN_, BC], dtype=dt)
            kk = tl.arange(0, KP)
            dp = tl.zeros([KP], dtype=dt)
            dq = tl.zeros([KP], dtype=dt)
            for n0 in range(0, N, BN_):
                n = n0 + tl.arange(0, BN_)
                msk = (n[:, None] < N) & cm[None, :]
                i = n[:, None] * C + c[None, :]
                s1, s2, h, d0, d1, a = _d_terms(s1_ptr, s2_ptr, mixed_ptr, w_ptr, i, msk, C,
                                                NC, S, eps, HAS_W)
                tl.store(sum_ptr + i, s1, mask=msk)
                tl.store(sum_ptr + NC + i, s2, mask=msk)
                acc_h += h
                acc_s += s1
                acc_0 += d0
                acc_1 += d1
                for k in tl.static_range(KP):
                    if k < K:
                        off = tl.load(cands_ptr + k * NC + i, mask=msk, other=0.0)
                        v = tl.load(cands_ptr + (K + k) * NC + i, mask=msk, other=0.0)
                        dp += tl.where(kk == k, tl.sum(tl.sum(off * d0, axis=1), axis=0), 0.0)
                        dq += tl.where(kk == k, tl.sum(tl.sum(v * d1, axis=1), axis=0), 0.0)
            tl.store(dw_ptr + c, tl.sum(acc_h, axis=0), mask=cm)
            tl.store(db_ptr + c, tl.sum(acc_s, axis=0), mask=cm)
            tl.store(bnd_ptr + c, tl.sum(acc_0, axis=0) / N, mask=cm)
            tl.store(bnd_ptr + C + c, tl.sum(acc_1, axis=0) / N, mask=cm)
            tl.store(dpart_ptr + pid * 2 * KP + kk, dp)
            tl.store(dpart_ptr + pid * 2 * KP + KP + kk, dq)
        if DO_LN:
            if pid >= ROW0:  # sample n: means of d over c
                n = pid - ROW0
                acc_0 = tl.zeros([BL], dtype=dt)
                acc_1 = tl.zeros([BL], dtype=dt)
                for c0 in range(0, C, BL):
                    c = c0 + tl.arange(0, BL)
                    cm = c < C
                    s1, s2, h, d0, d1, a = _d_terms(s1_ptr, s2_ptr, mixed_ptr, w_ptr, n * C + c,
                                                    cm, C, NC, S, eps, HAS_W)
                    acc_0 += d0
                    acc_1 += d1
                tl.store(lnd_ptr + n, tl.sum(acc_0, axis=0) / C)
                tl.store(lnd_ptr + N + n, tl.sum(acc_1, axis=0) / C)

    @triton.jit
    def _dp_final(dpart_ptr, probs_ptr, dmw_ptr, dvw_ptr, K, NPART, LOGITS: tl.constexpr,
                  KP: tl.constexpr):
        # dmean_w, dvar_w: the blocks' partials of dp summed, then the softmax Jacobian
        kk = tl.arange(0, KP)
        km = kk < K
        dp = tl.load(dpart_ptr + kk)
        dq = tl.load(dpart_ptr + KP + kk)
        for j in range(1, NPART):
            dp += tl.load(dpart_ptr + j * 2 * KP + kk)
            dq += tl.load(dpart_ptr + j * 2 * KP + KP + kk)
        if LOGITS:
            pm = tl.load(probs_ptr + kk, mask=km, other=0.0)
            pv = tl.load(probs_ptr + K + kk, mask=km, other=0.0)
            dp = pm * (dp - tl.sum(pm * dp, 0))
            dq = pv * (dq - tl.sum(pv * dq, 0))
        tl.store(dmw_ptr + kk, -dp, mask=km)
        tl.store(dvw_ptr + kk, -0.5 * dq, mask=km)

    @triton.jit
    def _dp_kernel(dpart_ptr, probs_ptr, dmw_ptr, dvw_ptr, K, NPART, LOGITS: tl.constexpr,
                   KP: tl.constexpr):
        _dp_final(dpart_ptr, probs_ptr, dmw_ptr, dvw_ptr, K, NPART, LOGITS, KP)

    @triton.jit
    def _apq_rows(s1_ptr, s2_ptr, mixed_ptr, w_ptr, mu_ptr, cands_ptr, probs_ptr, bnd_ptr,
                  lnd_ptr, i, msk, N, C, K, M, DEN, eps, I_IN: tl.constexpr,
                  I_LN: tl.constexpr, I_BN: tl.constexpr, HAS_W: tl.constexpr):
        # dx = a dy + p x + q at flat (n, c) indices i, from the summed s1, s2
        NC = N * C
        n = i // C
        c = i % C
        s1, s2, h, d0, d1, a = _d_terms(s1_ptr, s2_ptr, mixed_ptr, w_ptr, i, msk, C, NC, 1,
                                        eps, HAS_W)
        e0 = tl.zeros_like(d0)
        e1 = tl.zeros_like(d0)
        corr = tl.zeros_like(d0)
        if I_IN >= 0:  # the IN candidate's offset mu_k - mu_in is 0: no correction term
            e0 += tl.load(probs_ptr + I_IN) * d0
            e1 += tl.load(probs_ptr + K + I_IN) * d1
        if I_LN >= 0:
            t = tl.load(probs_ptr + K + I_LN) * tl.load(lnd_ptr + N + n, mask=msk, other=0.0)
            e0 += tl.load(probs_ptr + I_LN) * tl.load(lnd_ptr + n, mask=msk, other=0.0)
            e1 += t
            corr += tl.load(cands_ptr + I_LN * NC + i, mask=msk, other=0.0) * t
        if I_BN >= 0:  # (only when BN used batch statistics: running ones are constants)
            t = tl.load(probs_ptr + K + I_BN) * tl.load(bnd_ptr + C + c, mask=msk, other=0.0)
            e0 += tl.load(probs_ptr + I_BN) * tl.load(bnd_ptr + c, mask=msk, other=0.0)
            e1 += t
            corr += tl.load(cands_ptr + I_BN * NC + i, mask=msk, other=0.0) * t
        mu = tl.load(mu_ptr + i, mask=msk, other=0.0)
        return a, -e1 / DEN, (corr - e0) / M + e1 * mu / DEN

    @triton.jit
    def _mix_input_grad_kernel(x_ptr, dy_ptr, dx_ptr, s1_ptr, s2_ptr, mixed_ptr, w_ptr, mu_ptr,
                               cands_ptr, probs_ptr, bnd_ptr, lnd_ptr, dpart_ptr, dmw_ptr,
                               dvw_ptr, N, C, K, M, DEN, eps, NPART, CHUNK, sxn, sxc, sxm,
                               sdn, sdc, sdm, son, soc, som,
                               I_IN: tl.constexpr, I_LN: tl.constexpr, I_BN: tl.constexpr,
                               LOGITS: tl.constexpr, HAS_W: tl.constexpr, KP: tl.constexpr,
                               BC: tl.constexpr, BM: tl.constexpr):
        # a, p, q of rows [c, c + BC) of sample n, then dx over this program's chunk; the
        # first program also finishes dmean_w, dvar_w
        pid = tl.program_id(0)
        s = tl.program_id(1)
        if pid + s == 0:
            _dp_final(dpart_ptr, probs_ptr, dmw_ptr, dvw_ptr, K, NPART, LOGITS, KP)
        ncb = (C + BC - 1) // BC
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        a, p, q = _apq_rows(s1_ptr, s2_ptr, mixed_ptr, w_ptr, mu_ptr, cands_ptr, probs_ptr,
                            bnd_ptr, lnd_ptr, n * C + c, cm, N, C, K, M, DEN, eps, I_IN, I_LN,
                            I_BN, HAS_W)
        a = a[:, None]
        p = p[:, None]
        q = q[:, None]
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + j[None, :] * sxm, mask=msk,
                        other=0.0).to(a.dtype)
            g = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + j[None, :] * sdm, mask=msk,
                        other=0.0).to(a.dtype)
            tl.store(dx_ptr + n * son + c[:, None] * soc + j[None, :] * som,
                     (a * g + p * v + q).to(dx_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _input_grad_kernel(x_ptr, dy_ptr, dx_ptr, apq_ptr, C, M, CHUNK, NC, sxn, sxc, sxm,
                           sdn, sdc, sdm, son, soc, som, BC: tl.constexpr, BM: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        ncb = tl.cdiv(C, BC)
        n = pid // ncb
        c = (pid % ncb) * BC + tl.arange(0, BC)
        cm = c < C
        row = n * C + c
        a = tl.load(apq_ptr + row, mask=cm, other=0.0)[:, None]
        p = tl.load(apq_ptr + NC + row, mask=cm, other=0.0)[:, None]
        q = tl.load(apq_ptr + 2 * NC + row, mask=cm, other=0.0)[:, None]
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, M)
        for start in range(0, CHUNK, BM):
            j = lo + start + tl.arange(0, BM)
            msk = cm[:, None] & (j[None, :] < hi)
            v = tl.load(x_ptr + n * sxn + c[:, None] * sxc + j[None, :] * sxm, mask=msk,
                        other=0.0).to(a.dtype)
            g = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + j[None, :] * sdm, mask=msk,
                        other=0.0).to(a.dtype)
            tl.store(dx_ptr + n * son + c[:, None] * soc + j[None, :] * som,
                     (a * g + p * v + q).to(dx_ptr.dtype.element_ty), mask=msk)


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
    # NOTE: not triton.cdiv: on the host it is a constexpr function costing ~5 us a call
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


def _mix_aten(stats, weight, bias, mean_w, var_w, bn_mean, bn_var, m, spec, logits):
    """The forward mixing with ``_mixing``'s helpers (group candidates, sync, official 2-D)."""
    n, c = stats.shape[1:]
    cands, batch, count = _mixing._candidate_stats(stats, bn_mean, bn_var, m, spec)
    k = cands.shape[1]
    probs = torch.stack([mean_w, var_w]).to(stats.dtype)  # (2, K)
    if logits:
        probs = torch.softmax(probs, 1)
    mixed = torch.bmm(probs.view(2, 1, k), cands.view(2, k, n * c)).view(2, n, c)
    a = torch.rsqrt(mixed[1] + spec.eps)
    if weight is not None:
        a = a * weight.to(a.dtype)
    b = torch.mul(mixed[0], a).neg_()
    if bias is not None:
        b = b + bias.to(b.dtype)
    return torch.stack([a, b]), batch, count, mixed, cands, probs


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
    denom = m - 1 if (spec.unbiased_in and m > 1) else m
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
        return y.view(x.shape), batch, count, (stats[0], mixed, cands, probs)
    ab, batch, count, mixed, cands, probs = _mix_aten(
        stats, weight, bias, mean_w, var_w, bn_mean, bn_var, m, spec, logits)
    mu = stats[0]
    y = lay.new_like()
    _normalize_kernel[lay.grid](lay.v, y, mu, ab, c, m, lay.chunk, n * c, *lay.v.stride(),
                                *y.stride(), BC=lay.bc, BM=lay.bm)
    return y.view(x.shape), batch, count, (mu, mixed, cands, probs)


def _mix_bwd_aten(s1, s2, mu, mixed, cands, probs, weight, m, spec, logits, n_total, need):
    """The backward mixing with ``_mixing``'s helpers: (a, p, q) (3, N, C) and the small grads.

    The same steps as :func:`snexp.norm._mixing.backward` between its gradient sums and its
    input gradient.
    """
    k = probs.shape[1]
    n, c = mu.shape
    rstd = torch.rsqrt(mixed[1] + spec.eps)
    a = rstd if weight is None else rstd * weight.to(rstd.dtype)
    h = torch.mul(mixed[0], s1).neg_().add_(s2).mul_(rstd)  # g rstd
    dweight = h.sum(0) if need[1] else None
    dbias = s1.sum(0) if need[2] else None
    d = torch.stack([s1, h * rstd]).mul_(a)  # (2, N, C) = -[dmu; 2 dvar]
    dmean_w = dvar_w = None
    if need[3] or need[4]:
        dp = torch.bmm(cands.view(2, k, -1), d.view(2, -1, 1)).view(2, k)
        if logits:
            dp = probs * (dp - (probs * dp).sum(1, keepdim=True))
        dmean_w, dvar_w = dp[0].neg(), dp[1].mul(-0.5)
    pooled, kept = _mixing._pooled_grads(d, spec, n_total)
    if not kept:  # only BN on running statistics: dx = a dy
        zero = torch.zeros_like(a)
        return torch.stack([a, zero, zero]), dweight, dbias, dmean_w, dvar_w
    offsets, w = cands[0], probs
    if len(kept) < k:
        offsets, w = offsets[kept], probs[:, kept]
    if spec.official_2d:
        w = w * torch.tensor([[1.0] * len(kept),
                              [_mixing.bessel(spec.candidates[i], n, c) for i in kept]],
                             dtype=w.dtype, device=w.device)
    pooled.mul_(w.view(2, -1, 1, 1))
    e = pooled.sum(1)
    corr = (offsets * pooled[1]).sum(0)
    denom = m - 1 if (spec.unbiased_in and m > 1) else m
    p = e[1] * (-1.0 / denom)
    q = torch.sub(corr, e[0]).mul_(1.0 / m).add_(e[1] * mu, alpha=1.0 / denom)
    return torch.stack([a, p, q]), dweight, dbias, dmean_w, dvar_w


def backward(saved, x, dy, weight, *, spec, logits, n_total, need):
    """As :func:`snexp.norm._mixing.backward`, except that dx is in the dtype of ``x``."""
    with _device(x):
        return _backward(saved, x, dy, weight, spec, logits, n_total, need)


def _backward(saved, x, dy, weight, spec, logits, n_total, need):
    mu, mixed, cands, probs = (t.contiguous() for t in saved)
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
        denom = m - 1 if (spec.unbiased_in and m > 1) else m
        dx = lay.new_like()
        _mix_input_grad_kernel[lay.grid](
            lay.v, dyv, dx, sums[0], sums[1], mixed, w, mu, cands, probs, bnd, lnd, dpart, dmw,
            dvw, n, c, k, m, denom, float(spec.eps), ncb, lay.chunk, *lay.v.stride(),
            *dyv.stride(), *dx.stride(), I_IN=_index(spec, "in"), I_LN=_index(spec, "ln"),
            I_BN=_index(spec, "bn") if n_total is not None else -1, LOGITS=bool(logits),
            HAS_W=weight is not None, KP=4, BC=lay.bc, BM=lay.bm)
        return (dx.view(x.shape), *grads)
    s1, s2 = part.sum(1)
    apq, *grads = _mix_bwd_aten(s1, s2, mu, mixed, cands, probs, weight, m, spec, logits,
                                n_total, need)
    if not need[0]:
        return (None, *grads)
    dx = lay.new_like()
    _input_grad_kernel[lay.grid](lay.v, dyv, dx, apq, c, m, lay.chunk, n * c,
                                 *lay.v.stride(), *dyv.stride(), *dx.stride(),
                                 BC=lay.bc, BM=lay.bm)
    return (dx.view(x.shape), *grads)
