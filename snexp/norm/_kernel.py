"""Optional compiled kernel for the small (N, C) mixing math of Switchable Normalization.

The fused SN function (``snexp.norm.functional``) reduces the input to per-(n, c) statistics
once; everything after that (LN/BN statistics, the importance softmax, the mixing, and in
backward the closed-form adjoints of Luo et al., arXiv 1806.10779, eq. 3-5) works on (N, C)
tensors. In ATen that is ~100 tiny ops per forward + backward whose dispatch cost dominates at
small shapes; here it is two C loops. The C source below is compiled with the system C compiler
on first use (well under a second; no PyTorch headers) into the user cache directory and loaded
with ``ctypes``. Without a compiler, on CUDA, under ``torch.compile``, for GN candidates, with
``SyncSwitchNorm`` statistics or with ``SNEXP_NO_KERNEL=1`` the ATen path runs instead; both
compute the same equations (tests compare them to 1e-10 in float64).

Candidate codes: 0 IN, 1 LN, 2 BN from the batch, 3 BN from running statistics (a constant).
All arithmetic is in double; pooled means are taken as offsets from the first pooled value, so
a constant input gives exactly zero offsets (the output is then exactly ``bias``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from snexp.norm import _mixing

__all__: list[str] = []

CODES = {"in": 0, "ln": 1, "bn": 2}
BN_FIXED = 3

_BODY = r"""
/* torch.lerp: start + w (end - start), from the nearer end for w >= 1/2 */
#define LERP(s0, e, w) ((w) < 0.5 ? (s0) + (w) * ((e) - (s0)) : (e) - ((e) - (s0)) * (1 - (w)))

/* Setup: kind weights (IN, LN, BN) from the candidates, and the LN/BN statistics. Absent
   candidates get weight 0 (and zero statistics), so the loops below have no branches. */
typedef struct { double p[3], q[3]; int ln, bn, bn_live; double *mln, *vln, *mbn, *vbn, *ws; }
    NAME(mix_t);

static int NAME(setup)(NAME(mix_t) *s, int n, int c, int k, const int *codes, const real *mu,
                       const real *var, const real *rm, const real *rv, const real *mw,
                       const real *vw, int softmax, double *pw, size_t extra) {
    for (int t = 0; t < k; t++) { pw[t] = mw[t]; pw[k + t] = vw[t]; }
    if (softmax) for (int r = 0; r < 2; r++) {
        double *w = pw + r * k, top = w[0], sum = 0;
        for (int t = 1; t < k; t++) if (w[t] > top) top = w[t];
        for (int t = 0; t < k; t++) { w[t] = exp(w[t] - top); sum += w[t]; }
        for (int t = 0; t < k; t++) w[t] /= sum;
    }
    s->ln = s->bn = s->bn_live = 0;
    for (int u = 0; u < 3; u++) s->p[u] = s->q[u] = 0;
    for (int t = 0; t < k; t++) {
        int kind = codes[t] == 3 ? 2 : codes[t];
        s->p[kind] = pw[t]; s->q[kind] = pw[k + t];
        if (codes[t] == 1) s->ln = 1;
        if (codes[t] >= 2) s->bn = 1;
        if (codes[t] == 2) s->bn_live = 1;
    }
    s->ws = (double *)calloc(2 * (size_t)(n + c) + extra, sizeof(double));
    if (!s->ws) return -1;
    s->mln = s->ws; s->vln = s->ws + n; s->mbn = s->ws + 2 * n; s->vbn = s->mbn + c;
    if (s->ln) for (int i = 0; i < n; i++) {
        const real *m = mu + (long)i * c, *v = var + (long)i * c;
        double ref = m[0], sum = 0, sv = 0, ss = 0;
        for (int j = 0; j < c; j++) { sum += m[j] - ref; sv += v[j]; }
        double mean = ref + sum / c;
        for (int j = 0; j < c; j++) { double d = m[j] - mean; ss += d * d; }
        s->mln[i] = mean; s->vln[i] = sv / c + ss / c;
    }
    if (s->bn_live) {
        double *sv = s->vbn, *ss = s->ws + 2 * (size_t)(n + c);  /* extra >= c */
        for (int j = 0; j < c; j++) s->mbn[j] = mu[j];
        for (int i = 1; i < n; i++) for (int j = 0; j < c; j++)
            ss[j] += mu[(long)i * c + j] - mu[j];
        for (int j = 0; j < c; j++) { s->mbn[j] += ss[j] / n; ss[j] = 0; }
        for (int i = 0; i < n; i++) for (int j = 0; j < c; j++) {
            double d = mu[(long)i * c + j] - s->mbn[j];
            ss[j] += d * d; sv[j] += var[(long)i * c + j];
        }
        for (int j = 0; j < c; j++) { sv[j] = sv[j] / n + ss[j] / n; ss[j] = 0; }
    } else if (s->bn) {
        for (int j = 0; j < c; j++) { s->mbn[j] = rm[j]; s->vbn[j] = rv[j]; }
    }
    return 0;
}

/* var holds each row's L2 norm of x - mu_in on entry and its variance (norm^2 / denom) on
   return. Then either y = a (x - mu_in) + b is written over xc = x - mu_in (rows of length len)
   or, with xc NULL, the coefficients a, b (n, c). batch (2, c): BN batch mean and variance. */
int NAME(sn_forward)(int n, int c, int k, const int *codes, const real *mu, real *var,
                     double denom, const real *rm, const real *rv, const real *mw,
                     const real *vw, int softmax, const real *weight, const real *bias,
                     double eps, real *a, real *b, real *batch, real *xc, long len,
                     real *run_mean, real *run_var, double factor, double var_scale) {
    double pw[16];
    NAME(mix_t) s;
    for (long ij = 0; ij < (long)n * c; ij++) var[ij] = (real)((double)var[ij] * var[ij] / denom);
    if (k > 8 || NAME(setup)(&s, n, c, k, codes, mu, var, rm, rv, mw, vw, softmax, pw, c))
        return -1;
    const double pl = s.p[1], pb = s.p[2], qi = s.q[0], ql = s.q[1], qb = s.q[2];
    for (int i = 0; i < n; i++) {
        const double ml = s.mln[i], vl = s.vln[i];
        for (int j = 0; j < c; j++) {
            long ij = (long)i * c + j;
            double m = mu[ij];
            double shift = pl * (ml - m) + pb * (s.mbn[j] - m);  /* mu - mu_in */
            double v = qi * var[ij] + ql * vl + qb * s.vbn[j];
            double rstd = 1.0 / sqrt(v + eps), aa = weight ? weight[j] * rstd : rstd;
            double bb = (bias ? (double)bias[j] : 0.0) - shift * aa;
            if (xc) {
                real *row = xc + ij * len, ra = (real)aa, rb = (real)bb;
                for (long t = 0; t < len; t++) row[t] = row[t] * ra + rb;
            } else {
                a[ij] = (real)aa;
                b[ij] = (real)bb;
            }
        }
    }
    if (batch && s.bn_live)
        for (int j = 0; j < c; j++) { batch[j] = (real)s.mbn[j]; batch[c + j] = (real)s.vbn[j]; }
    if (run_mean && s.bn_live) for (int j = 0; j < c; j++) {
        run_mean[j] = (real)LERP((double)run_mean[j], s.mbn[j], factor);
        run_var[j] = (real)LERP((double)run_var[j], s.vbn[j] * var_scale, factor);
    }
    free(s.ws);
    return 0;
}

/* From s1 = sum dy and s2 = sum dy (x - mu_in) per (n, c): the gradients of weight, bias and
   the importance logits (or probabilities), and dx = a dy + p x + q, either written into dx
   (rows of length len, from x and dy) or, with dx NULL, as the coefficients a, p, q (n, c). */
int NAME(sn_backward)(int n, int c, int k, const int *codes, const real *mu, const real *var,
                      const real *rm, const real *rv, const real *mw, const real *vw,
                      int softmax, const real *weight, double eps, double m, double denom,
                      const real *s1, const real *s2, real *dweight, real *dbias,
                      real *dmw, real *dvw, real *a, real *p, real *q, const real *x,
                      const real *dy, real *dx, long len) {
    double pw[16], dpk[3] = {0}, dqk[3] = {0};
    long nc = (long)n * c;
    NAME(mix_t) s;
    if (k > 8 || NAME(setup)(&s, n, c, k, codes, mu, var, rm, rv, mw, vw, softmax, pw,
                             2 * (size_t)(n + c) + 2 * (size_t)c + 3 * (size_t)nc))
        return -1;
    double *rsum = s.ws + 2 * (size_t)(n + c), *csum = rsum + 2 * n, *dwb = csum + 2 * c;
    double *ta = dwb + 2 * c, *tmu = ta + nc, *tvar = tmu + nc;  /* a, dL/dmu, dL/dvar */
    const double pi = s.p[0], pl = s.p[1], pb = s.p[2], qi = s.q[0], ql = s.q[1], qb = s.q[2];
    for (int i = 0; i < n; i++) {
        const double ml = s.mln[i], vl = s.vln[i];
        double rmu = 0, rvar = 0;
        for (int j = 0; j < c; j++) {
            long ij = (long)i * c + j;
            double mm = mu[ij], ol = ml - mm, ob = s.mbn[j] - mm, vi = var[ij];
            double shift = pl * ol + pb * ob, v = qi * vi + ql * vl + qb * s.vbn[j];
            double rstd = 1.0 / sqrt(v + eps), aa = weight ? weight[j] * rstd : rstd;
            double g = s2[ij] - shift * s1[ij];  /* sum dy (x - mu) */
            double dmu = -aa * s1[ij], dvar = -0.5 * rstd * rstd * aa * g;
            dwb[j] += g * rstd; dwb[c + j] += s1[ij];
            dpk[1] += ol * dmu; dpk[2] += ob * dmu;
            dqk[0] += vi * dvar; dqk[1] += vl * dvar; dqk[2] += s.vbn[j] * dvar;
            rmu += dmu; rvar += dvar; csum[j] += dmu; csum[c + j] += dvar;
            ta[ij] = aa; tmu[ij] = dmu; tvar[ij] = dvar;
        }
        rsum[i] = rmu; rsum[n + i] = rvar;
    }
    if (a || dx) {
        const double plb = s.bn_live ? pb : 0, qlb = s.bn_live ? qb : 0;
        for (int i = 0; i < n; i++) {
            const double ml = s.mln[i], pml = rsum[i] / c, pvl = ql * (rsum[n + i] / c);
            for (int j = 0; j < c; j++) {
                long ij = (long)i * c + j;
                double mm = mu[ij], dmu = tmu[ij], dvar = tvar[ij];
                double pvb = qlb * (csum[c + j] / n);
                double dmu_in = pi * dmu + pl * pml + 2 * (mm - ml) * pvl
                                + plb * (csum[j] / n) + 2 * (mm - s.mbn[j]) * pvb;
                double pp = (qi * dvar + pvl + pvb) * 2 / denom, qq = dmu_in / m - pp * mm;
                if (dx) {
                    const real *g = dy + ij * len, *xr = x + ij * len;
                    real *o = dx + ij * len, ra = (real)ta[ij], rp = (real)pp, rq = (real)qq;
                    for (long t = 0; t < len; t++) o[t] = ra * g[t] + rp * xr[t] + rq;
                } else {
                    a[ij] = (real)ta[ij]; p[ij] = (real)pp; q[ij] = (real)qq;
                }
            }
        }
    }
    double dp[16];
    for (int t = 0; t < k; t++) {
        int kind = codes[t] == 3 ? 2 : codes[t];
        dp[t] = dpk[kind]; dp[k + t] = dqk[kind];
    }
    if (softmax) for (int r = 0; r < 2; r++) {
        double sum = 0;
        for (int t = 0; t < k; t++) sum += pw[r * k + t] * dp[r * k + t];
        for (int t = 0; t < k; t++) dp[r * k + t] = pw[r * k + t] * (dp[r * k + t] - sum);
    }
    for (int t = 0; t < k; t++) {
        if (dmw) dmw[t] = (real)dp[t];
        if (dvw) dvw[t] = (real)dp[k + t];
    }
    for (int j = 0; j < c; j++) {
        if (dweight) dweight[j] = (real)dwb[j];
        if (dbias) dbias[j] = (real)dwb[c + j];
    }
    free(s.ws);
    return 0;
}
"""

_SOURCE = ("#include <math.h>\n#include <stdlib.h>\n"
           + "".join(f"#define real {t}\n#define NAME(x) x##_{s}\n{_BODY}\n#undef real\n"
                     f"#undef NAME\n" for t, s in (("float", "f"), ("double", "d"))))

_P, _I, _D, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_long
_FORWARD_ARGS = [_I, _I, _I, _P, _P, _P, _D, _P, _P, _P, _P, _I, _P, _P, _D, _P, _P, _P, _P, _L,
                 _P, _P, _D, _D]
_BACKWARD_ARGS = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _D, _D, _D, _P, _P, _P, _P,
                  _P, _P, _P, _P, _P, _P, _P, _P, _L]
# Below ATen's grain size its elementwise ops run on one thread, and the C loop that fuses
# them (one pass instead of two or three) is faster; above it ATen's threads win.
_GRAIN = 32768
_SUFFIX = {torch.float32: "f", torch.float64: "d"}

_lib: object = None  # None: not tried yet; False: unavailable


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "snexp"


def _build() -> ctypes.CDLL | bool:
    """Compile (once per source and compiler) and load the kernel library; False if impossible."""
    if os.environ.get("SNEXP_NO_KERNEL", "") not in ("", "0") or sys.platform == "win32":
        return False
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return False
    tag = hashlib.sha256((_SOURCE + compiler + sys.platform).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sn_kernel_{tag}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "sn_kernel.c", Path(tmp) / "sn_kernel.so"
                src.write_text(_SOURCE)
                subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(out), str(src),
                                "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(target))
        for s in _SUFFIX.values():
            getattr(lib, f"sn_forward_{s}").argtypes = _FORWARD_ARGS
            getattr(lib, f"sn_backward_{s}").argtypes = _BACKWARD_ARGS
        return lib
    except (OSError, subprocess.SubprocessError, AttributeError):
        return False


def library():
    """The loaded kernel library, or ``None`` when it cannot be built here."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib or None


def usable(x: torch.Tensor, spec) -> bool:
    """Whether the C mixing applies: CPU, eager mode, IN/LN/BN candidates, local statistics."""
    return (x.device.type == "cpu" and not spec.sync and not spec.official_2d
            and all(cand in CODES for cand in spec.candidates)
            and not torch.compiler.is_compiling() and library() is not None)


_codes_cache: dict[tuple, tuple[ctypes.Array, int]] = {}


def _codes(candidates: tuple[str, ...], fixed_bn: bool) -> int:
    key = (candidates, fixed_bn)
    if key not in _codes_cache:
        codes = [BN_FIXED if (c == "bn" and fixed_bn) else CODES[c] for c in candidates]
        arr = (ctypes.c_int * len(codes))(*codes)
        _codes_cache[key] = (arr, ctypes.addressof(arr))
    return _codes_cache[key][1]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _one_pass(numel: int) -> bool:
    """Whether a full-size elementwise pass runs in C (else in ATen, multi-threaded)."""
    return numel <= _GRAIN or torch.get_num_threads() == 1


def forward(mu, nrm, xc, mean_w, var_w, bn_mean, bn_var, weight, bias, *, spec, logits, m,
            denom, update=None):
    """As ``snexp.norm._mixing.forward``, in C.

    ``update`` = (running_mean, running_var, factor, unbiased): blend the BN batch statistics
    into the running buffers here (then no batch statistics are returned), as
    ``snexp.norm.functional.switch_norm`` would.
    """
    n, c = mu.shape
    dt = mu.dtype
    mw, vw, rm, rv, w, b = (t if t is None or (t.dtype == dt and t.is_contiguous())
                            else t.to(dt).contiguous()
                            for t in (mean_w, var_w, bn_mean, bn_var, weight, bias))
    batch_norm = "bn" in spec.candidates and rm is None
    run = None
    if (update is not None and batch_norm and update[0].dtype == dt == update[1].dtype
            and update[0].is_contiguous() and update[1].is_contiguous()):
        count = n * m
        run = (update[0].data_ptr(), update[1].data_ptr(), float(update[2]),
               count / (count - 1) if (update[3] and count > 1) else 1.0)
    batch = torch.empty((2, c), dtype=dt) if (batch_norm and run is None) else None
    fused = xc.is_contiguous() and _one_pass(xc.numel())
    ab = None if fused else torch.empty((2,) + xc.shape[:2] + (1,) * (xc.dim() - 2), dtype=dt)
    step = n * c * dt.itemsize
    fn = _lib.sn_forward_f if dt == torch.float32 else _lib.sn_forward_d
    if fn(n, c, len(spec.candidates), _codes(spec.candidates, rm is not None), mu.data_ptr(),
          nrm.data_ptr(), float(denom), _ptr(rm), _ptr(rv), mw.data_ptr(), vw.data_ptr(),
          int(logits), _ptr(w), _ptr(b), spec.eps, None if fused else ab.data_ptr(),
          None if fused else ab.data_ptr() + step, _ptr(batch),
          xc.data_ptr() if fused else None, m, *(run or (None, None, 0.0, 1.0))):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    if run is not None:  # written in place behind autograd's back: tell it
        torch.autograd.graph.increment_version(update[0])
        torch.autograd.graph.increment_version(update[1])
    y = xc if fused else _mixing.normalize(xc, *ab.unbind())
    return y, batch, (n * m if batch_norm else 0), (mu, nrm, mw, vw, rm, rv)


def backward(saved, x, dy, s1, s2, weight, *, spec, logits, m, n_total, need):
    """As ``snexp.norm._mixing.backward``, in C."""
    mu, var, mw, vw, rm, rv = saved
    n, c = mu.shape
    dt = mu.dtype
    w = weight if weight is None or weight.dtype == dt else weight.to(dt)
    k = len(spec.candidates)
    grads = torch.empty((2, c), dtype=dt) if (need[1] or need[2]) else None
    dlog = torch.empty((2, k), dtype=dt) if (need[3] or need[4]) else None
    fused = (need[0] and x.dtype == dt and dy.dtype == dt and x.is_contiguous()
             and dy.is_contiguous() and _one_pass(x.numel()))
    dx = torch.empty_like(x) if fused else None
    apq = (torch.empty((3,) + x.shape[:2] + (1,) * (x.dim() - 2), dtype=dt)
           if need[0] and not fused else None)
    size = dt.itemsize

    def at(t, i, rows):
        return None if t is None else t.data_ptr() + i * rows * size

    denom = m - 1 if (spec.unbiased_in and m > 1) else m
    fn = _lib.sn_backward_f if dt == torch.float32 else _lib.sn_backward_d
    if fn(n, c, k, _codes(spec.candidates, rm is not None), mu.data_ptr(), var.data_ptr(),
          _ptr(rm), _ptr(rv), mw.data_ptr(), vw.data_ptr(), int(logits), _ptr(w), spec.eps,
          float(m), float(denom), s1.data_ptr(), s2.data_ptr(),
          at(grads, 0, c) if need[1] else None, at(grads, 1, c) if need[2] else None,
          at(dlog, 0, k) if need[3] else None, at(dlog, 1, k) if need[4] else None,
          at(apq, 0, n * c), at(apq, 1, n * c), at(apq, 2, n * c),
          x.data_ptr() if fused else None, dy.data_ptr() if fused else None,
          dx.data_ptr() if fused else None, m):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    if apq is not None:
        dx = _mixing.input_grad(x, dy, *apq.unbind())
    dweight, dbias = grads.unbind() if grads is not None else (None, None)
    dmean_w, dvar_w = dlog.unbind() if dlog is not None else (None, None)
    return dx, dweight, dbias, dmean_w, dvar_w
