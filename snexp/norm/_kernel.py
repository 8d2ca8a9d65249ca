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

__all__: list[str] = []

CODES = {"in": 0, "ln": 1, "bn": 2}
BN_FIXED = 3

_BODY = r"""
/* Pooled (LN over c per row, BN over n per column) means and variances of the IN statistics. */
static void NAME(stats)(int n, int c, int has_ln, int has_bn, const real *mu, const real *var,
                        const real *rm, const real *rv, double *mln, double *vln,
                        double *mbn, double *vbn) {
    if (has_ln) for (int i = 0; i < n; i++) {
        const real *m = mu + (long)i * c, *v = var + (long)i * c;
        double ref = m[0], s = 0, sv = 0, ss = 0;
        for (int j = 0; j < c; j++) { s += m[j] - ref; sv += v[j]; }
        double mean = ref + s / c;
        for (int j = 0; j < c; j++) { double d = m[j] - mean; ss += d * d; }
        mln[i] = mean; vln[i] = sv / c + ss / c;
    }
    if (has_bn == 1) for (int j = 0; j < c; j++) {
        double ref = mu[j], s = 0, sv = 0, ss = 0;
        for (int i = 0; i < n; i++) { s += mu[(long)i * c + j] - ref; sv += var[(long)i * c + j]; }
        double mean = ref + s / n;
        for (int i = 0; i < n; i++) { double d = mu[(long)i * c + j] - mean; ss += d * d; }
        mbn[j] = mean; vbn[j] = sv / n + ss / n;
    }
    if (has_bn == 2) for (int j = 0; j < c; j++) { mbn[j] = rm[j]; vbn[j] = rv[j]; }
}

/* Importance weights (2, k): softmax of the logits rows, or the probabilities as given. */
static void NAME(weights)(int k, const real *mw, const real *vw, int softmax, double *pw) {
    for (int t = 0; t < k; t++) { pw[t] = mw[t]; pw[k + t] = vw[t]; }
    if (!softmax) return;
    for (int r = 0; r < 2; r++) {
        double *w = pw + r * k, top = w[0], s = 0;
        for (int t = 1; t < k; t++) if (w[t] > top) top = w[t];
        for (int t = 0; t < k; t++) { w[t] = exp(w[t] - top); s += w[t]; }
        for (int t = 0; t < k; t++) w[t] /= s;
    }
}

/* Candidate t's mean offset mu_k - mu_in and variance at (i, j). */
#define CAND(t, i, j, off, vk) do { \
    int code_ = codes[t]; \
    if (code_ == 0) { off = 0; vk = var[(long)(i) * c + (j)]; } \
    else if (code_ == 1) { off = mln[i] - mu[(long)(i) * c + (j)]; vk = vln[i]; } \
    else { off = mbn[j] - mu[(long)(i) * c + (j)]; vk = vbn[j]; } \
} while (0)

static int NAME(setup)(int n, int c, int k, const int *codes, double **ws, int *has_ln,
                       int *has_bn) {
    *has_ln = 0; *has_bn = 0;
    for (int t = 0; t < k; t++) {
        if (codes[t] == 1) *has_ln = 1;
        if (codes[t] == 2) *has_bn = 1;
        if (codes[t] == 3) *has_bn = 2;
    }
    *ws = (double *)malloc(sizeof(double) * (4 * (size_t)(n + c) + 4 * (size_t)c + 8));
    return *ws ? 0 : -1;
}

/* a, b (n, c): y = a * (x - mu_in) + b; batch (2, c): BN batch mean and biased variance. */
int NAME(sn_forward)(int n, int c, int k, const int *codes, const real *mu, const real *var,
                     const real *rm, const real *rv, const real *mw, const real *vw,
                     int softmax, const real *weight, const real *bias, double eps,
                     real *a, real *b, real *batch) {
    double *ws, pw[16];
    int has_ln, has_bn;
    if (k > 8 || NAME(setup)(n, c, k, codes, &ws, &has_ln, &has_bn)) return -1;
    double *mln = ws, *vln = ws + n, *mbn = ws + 2 * n, *vbn = ws + 2 * n + c;
    NAME(weights)(k, mw, vw, softmax, pw);
    NAME(stats)(n, c, has_ln, has_bn, mu, var, rm, rv, mln, vln, mbn, vbn);
    for (int i = 0; i < n; i++) for (int j = 0; j < c; j++) {
        double shift = 0, v = 0, off, vk;
        for (int t = 0; t < k; t++) { CAND(t, i, j, off, vk); shift += pw[t] * off;
                                      v += pw[k + t] * vk; }
        double rstd = 1.0 / sqrt(v + eps), aa = weight ? weight[j] * rstd : rstd;
        a[(long)i * c + j] = (real)aa;
        b[(long)i * c + j] = (real)((bias ? (double)bias[j] : 0.0) - shift * aa);
    }
    if (batch && has_bn == 1)
        for (int j = 0; j < c; j++) { batch[j] = (real)mbn[j]; batch[c + j] = (real)vbn[j]; }
    free(ws);
    return 0;
}

/* From s1 = sum dy and s2 = sum dy (x - mu_in) per (n, c): the gradients of weight, bias and
   the importance logits (or probabilities), and a, p, q with dx = a dy + p x + q. */
int NAME(sn_backward)(int n, int c, int k, const int *codes, const real *mu, const real *var,
                      const real *rm, const real *rv, const real *mw, const real *vw,
                      int softmax, const real *weight, double eps, double m, double denom,
                      const real *s1, const real *s2, real *dweight, real *dbias,
                      real *dmw, real *dvw, real *a, real *p, real *q) {
    double *ws, pw[16], dp[16] = {0};
    int has_ln, has_bn;
    if (k > 8 || NAME(setup)(n, c, k, codes, &ws, &has_ln, &has_bn)) return -1;
    double *mln = ws, *vln = ws + n, *mbn = ws + 2 * n, *vbn = ws + 2 * n + c;
    double *rsum = ws + 2 * (n + c), *csum = rsum + 2 * n, *dwb = csum + 2 * c;
    for (size_t u = 0; u < 2 * (size_t)(n + c) + 2 * (size_t)c; u++) rsum[u] = 0;
    NAME(weights)(k, mw, vw, softmax, pw);
    NAME(stats)(n, c, has_ln, has_bn, mu, var, rm, rv, mln, vln, mbn, vbn);
    for (int i = 0; i < n; i++) for (int j = 0; j < c; j++) {
        long ij = (long)i * c + j;
        double shift = 0, v = 0, off, vk;
        for (int t = 0; t < k; t++) { CAND(t, i, j, off, vk); shift += pw[t] * off;
                                      v += pw[k + t] * vk; }
        double rstd = 1.0 / sqrt(v + eps), aa = weight ? weight[j] * rstd : rstd;
        double g = s2[ij] - shift * s1[ij];  /* sum dy (x - mu) */
        double dmu = -aa * s1[ij], dvar = -0.5 * rstd * rstd * aa * g;
        dwb[j] += g * rstd; dwb[c + j] += s1[ij];
        for (int t = 0; t < k; t++) { CAND(t, i, j, off, vk); dp[t] += off * dmu;
                                      dp[k + t] += vk * dvar; }
        rsum[i] += dmu; rsum[n + i] += dvar; csum[j] += dmu; csum[c + j] += dvar;
        if (a) { a[ij] = (real)aa; p[ij] = (real)dmu; q[ij] = (real)dvar; }
    }
    if (a) for (int i = 0; i < n; i++) for (int j = 0; j < c; j++) {
        long ij = (long)i * c + j;
        double dmu = p[ij], dvar = q[ij], dmu_in = 0, dvar_in = 0;
        for (int t = 0; t < k; t++) {
            int code = codes[t];
            double pm, pv, mk;
            if (code == 0) { dmu_in += pw[t] * dmu; dvar_in += pw[k + t] * dvar; continue; }
            if (code == 3) continue;  /* running statistics are constants */
            if (code == 1) { pm = rsum[i] / c; pv = rsum[n + i] / c; mk = mln[i]; }
            else { pm = csum[j] / n; pv = csum[c + j] / n; mk = mbn[j]; }
            double pdv = pw[k + t] * pv;
            dmu_in += pw[t] * pm + 2 * (mu[ij] - mk) * pdv;
            dvar_in += pdv;
        }
        double pp = dvar_in * 2 / denom;
        p[ij] = (real)pp;
        q[ij] = (real)(dmu_in / m - pp * mu[ij]);
    }
    if (softmax) for (int r = 0; r < 2; r++) {
        double s = 0;
        for (int t = 0; t < k; t++) s += pw[r * k + t] * dp[r * k + t];
        for (int t = 0; t < k; t++) dp[r * k + t] = pw[r * k + t] * (dp[r * k + t] - s);
    }
    for (int t = 0; t < k; t++) {
        if (dmw) dmw[t] = (real)dp[t];
        if (dvw) dvw[t] = (real)dp[k + t];
    }
    for (int j = 0; j < c; j++) {
        if (dweight) dweight[j] = (real)dwb[j];
        if (dbias) dbias[j] = (real)dwb[c + j];
    }
    free(ws);
    return 0;
}
"""

_SOURCE = ("#include <math.h>\n#include <stdlib.h>\n"
           + "".join(f"#define real {t}\n#define NAME(x) x##_{s}\n{_BODY}\n#undef real\n"
                     f"#undef NAME\n#undef CAND\n" for t, s in (("float", "f"), ("double", "d"))))

_P, _I, _D = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
_FORWARD_ARGS = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _D, _P, _P, _P]
_BACKWARD_ARGS = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _D, _D, _D, _P, _P, _P, _P,
                  _P, _P, _P, _P, _P]
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
                subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src),
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


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(mu, var, mean_w, var_w, bn_mean, bn_var, weight, bias, *, spec, logits, m, shape):
    """As ``snexp.norm._mixing.forward``, in C."""
    n, c = mu.shape
    dt = mu.dtype
    args = [_as(t, dt) for t in (mean_w, var_w, bn_mean, bn_var, weight, bias)]
    mw, vw, rm, rv, w, b = args
    ab = torch.empty((2,) + tuple(shape), dtype=dt)  # a and b, broadcastable to the input
    batch = torch.empty((2, c), dtype=dt) if ("bn" in spec.candidates and rm is None) else None
    step = n * c * ab.element_size()
    fn = getattr(_lib, f"sn_forward_{_SUFFIX[dt]}")
    if fn(n, c, len(spec.candidates), _codes(spec.candidates, rm is not None), mu.data_ptr(),
          var.data_ptr(), _ptr(rm), _ptr(rv), mw.data_ptr(), vw.data_ptr(), int(logits),
          _ptr(w), _ptr(b), spec.eps, ab.data_ptr(), ab.data_ptr() + step, _ptr(batch)):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    a, b = ab.unbind()
    return a, b, batch, (n * m if batch is not None else 0), (mu, var, mw, vw, rm, rv)


def backward(saved, weight, s1, s2, *, spec, logits, m, n_total, need):
    """As ``snexp.norm._mixing.backward``, in C."""
    mu, var, mw, vw, rm, rv = saved
    n, c = mu.shape
    dt = mu.dtype
    w = _as(weight, dt)
    k = len(spec.candidates)
    grads = torch.empty((2, c), dtype=dt) if (need[1] or need[2]) else None
    dlog = torch.empty((2, k), dtype=dt) if (need[3] or need[4]) else None
    apq = torch.empty((3, n, c), dtype=dt) if need[0] else None
    s1, s2 = _as(s1, dt), _as(s2, dt)
    size = dt.itemsize

    def at(t, i, rows):
        return None if t is None else t.data_ptr() + i * rows * size

    denom = m - 1 if (spec.unbiased_in and m > 1) else m
    fn = getattr(_lib, f"sn_backward_{_SUFFIX[dt]}")
    if fn(n, c, k, _codes(spec.candidates, rm is not None), mu.data_ptr(), var.data_ptr(),
          _ptr(rm), _ptr(rv), mw.data_ptr(), vw.data_ptr(), int(logits), _ptr(w), spec.eps,
          float(m), float(denom), s1.data_ptr(), s2.data_ptr(),
          at(grads, 0, c) if need[1] else None, at(grads, 1, c) if need[2] else None,
          at(dlog, 0, k) if need[3] else None, at(dlog, 1, k) if need[4] else None,
          at(apq, 0, n * c), at(apq, 1, n * c), at(apq, 2, n * c)):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    dweight, dbias = grads.unbind() if grads is not None else (None, None)
    dmean_w, dvar_w = dlog.unbind() if dlog is not None else (None, None)
    a, p, q = apq.unbind() if apq is not None else (None, None, None)
    return dweight, dbias, dmean_w, dvar_w, a, p, q
