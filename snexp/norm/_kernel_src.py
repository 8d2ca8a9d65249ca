"""C source of the Switchable Normalization kernel (``snexp.norm._kernel`` builds and calls it).

Luo et al., arXiv 1806.10779, eq. 3-5, with the closed-form backward of ``snexp.norm._mixing``
(the same equations in ATen ops, and the documentation of the symbols used here). ``real`` is
float or double; the (N, C) math is in double. Pooled means are offsets from the first pooled
value, so a constant input gives exactly zero offsets (and an output of exactly ``bias``).
Candidate codes: 0 IN, 1 LN, 2 BN from the batch, 3 BN from running statistics (a constant).
Full-size reductions use LANES independent float accumulators, which the compiler vectorizes
(the summation order is a fixed tree, as in ATen's cascade sums).
"""

from __future__ import annotations

__all__ = ["SOURCE"]

_BODY = r"""
/* Per row of x (rows of length len): mean, taken as an offset from the row's first value, and
   the centered sum of squares / denom. */
static void NAME(row_stats)(long rows, long len, const real *x, real *mu, real *var,
                            double denom) {
    for (long r = 0; r < rows; r++) {
        const real *p = x + r * len, x0 = p[0];
        real acc[LANES] = {0}, acc2[LANES] = {0};
        long i = 0;
        for (; i + LANES <= len; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += p[i + l] - x0;
        double s = 0, ss = 0;
        for (int l = 0; l < LANES; l++) s += acc[l];
        for (; i < len; i++) s += p[i] - x0;
        const real mf = (real)(x0 + s / len);
        for (i = 0; i + LANES <= len; i += LANES)
            for (int l = 0; l < LANES; l++) { real d = p[i + l] - mf; acc2[l] += d * d; }
        for (int l = 0; l < LANES; l++) ss += acc2[l];
        for (; i < len; i++) { double d = p[i] - mf; ss += d * d; }
        mu[r] = mf;
        var[r] = (real)(ss / denom);
    }
}

/* Per row: s1 = sum dy and s2 = sum dy (x - mu). */
static void NAME(row_sums)(long rows, long len, const real *dy, const real *x, const real *mu,
                           real *s1, real *s2) {
    for (long r = 0; r < rows; r++) {
        const real *g = dy + r * len, *p = x + r * len, mm = mu[r];
        real a[LANES] = {0}, b[LANES] = {0};
        long i = 0;
        for (; i + LANES <= len; i += LANES) for (int l = 0; l < LANES; l++) a[l] += g[i + l];
        for (i = 0; i + LANES <= len; i += LANES)
            for (int l = 0; l < LANES; l++) b[l] += g[i + l] * (p[i + l] - mm);
        double sa = 0, sb = 0;
        for (int l = 0; l < LANES; l++) { sa += a[l]; sb += b[l]; }
        for (; i < len; i++) { sa += g[i]; sb += g[i] * (p[i] - mm); }
        s1[r] = (real)sa;
        s2[r] = (real)sb;
    }
}

/* Kind weights (IN, LN, BN) from the candidates, and the LN/BN statistics. Absent candidates
   get weight 0 (and zero statistics), so the loops below have no branches. */
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
        double *sv = s->vbn, *ss = s->ws + 2 * (size_t)(n + c);  /* extra >= c, zeroed */
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

/* Forward. With x: mu, var are computed from x (rows of length len) and y = a (x - mu) + b is
   written to dst. Without x: var holds the rows' L2 norms of x - mu on entry (variances on
   return) and dst, if given, is that centered buffer, normalized in place; with dst NULL the
   coefficients go to a, b (n, c). batch (2, c): BN batch mean and variance; run_mean/run_var:
   running statistics blended in place (torch.lerp) with the unbiased variance var_scale * var. */
int NAME(sn_forward)(int n, int c, int k, const int *codes, const real *x, long len, real *mu,
                     real *var, double denom, const real *rm, const real *rv, const real *mw,
                     const real *vw, int softmax, const real *weight, const real *bias,
                     double eps, real *a, real *b, real *dst, real *batch, real *run_mean,
                     real *run_var, double factor, double var_scale) {
    double pw[16];
    NAME(mix_t) s;
    long nc = (long)n * c;
    if (x) NAME(row_stats)(nc, len, x, mu, var, denom);
    else for (long ij = 0; ij < nc; ij++) var[ij] = (real)((double)var[ij] * var[ij] / denom);
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
            if (dst) {
                const real *src = (x ? x : dst) + ij * len, m0 = x ? mu[ij] : 0;
                real *o = dst + ij * len, ra = (real)aa, rb = (real)bb;
                for (long t = 0; t < len; t++) o[t] = (src[t] - m0) * ra + rb;
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

/* Backward, from s1 = sum dy and s2 = sum dy (x - mu) per (n, c) (computed here from dy and x
   when s1 is NULL): the gradients of weight, bias and the importance logits (or probabilities),
   and dx = a dy + p x + q, written into dx (rows of length len) or, with dx NULL, returned as
   the coefficients a, p, q (n, c). */
int NAME(sn_backward)(int n, int c, int k, const int *codes, const real *mu, const real *var,
                      const real *rm, const real *rv, const real *mw, const real *vw,
                      int softmax, const real *weight, double eps, double m, double denom,
                      const real *s1, const real *s2, const real *x, const real *dy, long len,
                      real *dweight, real *dbias, real *dmw, real *dvw, real *a, real *p,
                      real *q, real *dx) {
    double pw[16], dpk[3] = {0}, dqk[3] = {0};
    long nc = (long)n * c;
    real *sums = NULL;
    NAME(mix_t) s;
    if (!s1) {
        if (!(sums = (real *)malloc(2 * nc * sizeof(real)))) return -1;
        NAME(row_sums)(nc, len, dy, x, mu, sums, sums + nc);
        s1 = sums; s2 = sums + nc;
    }
    if (k > 8 || NAME(setup)(&s, n, c, k, codes, mu, var, rm, rv, mw, vw, softmax, pw,
                             2 * (size_t)(n + c) + 2 * (size_t)c + 3 * (size_t)nc)) {
        free(sums);
        return -1;
    }
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
        /* pooled adjoints: p_k P_k(dmu) and q_k P_k(dvar), per row (LN), per column (BN) */
        const double inv_c = 1.0 / c, inv_n = 1.0 / n, two_d = 2.0 / denom, inv_m = 1.0 / m;
        const double plb = s.bn_live ? pb * inv_n : 0, qlb = s.bn_live ? qb * inv_n : 0;
        for (int j = 0; j < c; j++) { csum[j] *= plb; csum[c + j] *= qlb; }
        for (int i = 0; i < n; i++) {
            const double ml = s.mln[i], pml = pl * rsum[i] * inv_c, pvl = ql * rsum[n + i] * inv_c;
            for (int j = 0; j < c; j++) {
                long ij = (long)i * c + j;
                double mm = mu[ij], dmu = tmu[ij], dvar = tvar[ij], pvb = csum[c + j];
                double dmu_in = pi * dmu + pml + 2 * (mm - ml) * pvl
                                + csum[j] + 2 * (mm - s.mbn[j]) * pvb;
                double pp = (qi * dvar + pvl + pvb) * two_d, qq = dmu_in * inv_m - pp * mm;
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
    free(sums);
    return 0;
}
"""

_HEAD = r"""#include <math.h>
#include <stdlib.h>
#define LANES 16
/* torch.lerp: start + w (end - start), from the nearer end for w >= 1/2 */
#define LERP(s0, e, w) ((w) < 0.5 ? (s0) + (w) * ((e) - (s0)) : (e) - ((e) - (s0)) * (1 - (w)))
"""

SOURCE = _HEAD + "".join(f"#define real {t}\n#define NAME(x) x##_{s}\n{_BODY}\n#undef real\n"
                         f"#undef NAME\n" for t, s in (("float", "f"), ("double", "d")))
