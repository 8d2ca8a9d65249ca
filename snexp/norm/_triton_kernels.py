"""The Triton kernels of Switchable Normalization; :mod:`snexp.norm._triton` launches them.

The equations are :mod:`snexp.norm._mixing`'s; :mod:`snexp.norm._triton`'s docstring says which
kernel computes what and in which order. Every full-size kernel runs one program per
``(sample, block of BC channels, chunk of the spatial positions)``, reading a ``(BC, BM)`` tile
at a time through the strides of an ``(N, C, M)`` view, so NCHW and channels_last are the same
code; statistics are in the dtype of the statistics buffers (float32, or float64).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _normalize_chunk(x_ptr, y_ptr, n, c, cm, mu, a, b, s, CHUNK, M, sxn, sxc, sxm, syn, syc,
                     sym, BM: tl.constexpr):
    # y = a (x - mu_in) + b over chunk s of rows c of sample n (mu, a, b: (BC, 1))
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
def _input_grad_chunk(x_ptr, dy_ptr, dx_ptr, n, c, cm, a, p, q, s, CHUNK, M, sxn, sxc, sxm,
                      sdn, sdc, sdm, son, soc, som, BM: tl.constexpr):
    # dx = a dy + p x + q over chunk s of rows c of sample n (a, p, q: (BC, 1))
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
    _normalize_chunk(x_ptr, y_ptr, n, c, cm, mu, a, b, s, CHUNK, M, sxn, sxc, sxm, syn, syc,
                     sym, BM)

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
    _normalize_chunk(x_ptr, y_ptr, n, c, cm, mu, a, b, s, CHUNK, M, sxn, sxc, sxm, syn, syc,
                     sym, BM)

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
    _input_grad_chunk(x_ptr, dy_ptr, dx_ptr, n, c, cm, a, p, q, s, CHUNK, M, sxn, sxc, sxm,
                      sdn, sdc, sdm, son, soc, som, BM)

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
    _input_grad_chunk(x_ptr, dy_ptr, dx_ptr, n, c, cm, a, p, q, s, CHUNK, M, sxn, sxc, sxm,
                      sdn, sdc, sdm, son, soc, som, BM)
