// The full-size passes of Switchable Normalization on CPU, one row (n, c) at a time.
//
// Registered as torch.ops.snexp_cpu.{in_stats, normalize, input_grad, mix, mix_backward, blend};
// used by snexp/norm/_mixing.py for contiguous float32/float64 input on CPU.
//
//   in_stats(x, denom)           -> st         [mu; ss / denom] as one (2, N, C) tensor, with
//                                              mu the mean of each row, ss = sum (x - mu)^2
//   normalize(x, mu, a, b)       -> y          y = a (x - mu) + b
//   input_grad(x, dy, a, p, q)   -> dx         dx = a dy + p x + q
//
// x and dy are viewed as (R, M): R = N * C rows of M = H * W (* D) values; the per-row
// coefficients are (R,) tensors in the statistics dtype (float32 for float32 input).
//
//   mix(...)                     the (N, C)-sized middle of the forward
//   mix_backward(...)            the (N, C)-sized middle of the backward
//   blend(...)                   the running statistics' update (in place)
//
// SN's equations are stated once, in the docstring of snexp/norm/_mixing.py; its Python
// `mix` and `mix_backward` are the reference that these two are tested against
// (tests/snexp/norm/test_cpu_mix.py) and return the same tuples. They are plain
// single-threaded loops: on (N, C) values, ~60 ATen calls per direction cost far more than
// the arithmetic, and a parallel region would wait on busy threads for longer than the work.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "snexp_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "snexp_cpu: ", name, " must be contiguous");
  TORCH_CHECK(t.dim() >= 2, "snexp_cpu: ", name, " must be (N, C, *), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "snexp_cpu: ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_coef(const at::Tensor& t, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == rows &&
                  t.scalar_type() == dtype,
              "snexp_cpu: ", name, " must be a contiguous CPU tensor of ", rows, " values of ",
              dtype, ", got ", t.sizes(), " ", t.scalar_type());
}

// Rows per parallel task: enough values per task to amortize the scheduling.
int64_t grain(int64_t m) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1)); }

// ss = sum (x - mu)^2 / denom per row (denom 1: the plain sum).
template <typename T>
void row_stats_impl(const T* xp, T* mup, T* ssp, int64_t rows, int64_t m, T denom) {
  at::parallel_for(0, rows, grain(m), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * m;
      // Vector-lane partial sums in the element type (as ATen's reductions); the variance
      // is summed around the mean (a second read of the row, from cache), never as
      // sum(x^2) - m mean^2, which loses every digit when |mean| >> std.
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < m; ++i) s += row[i];
      const T mean = m ? s / static_cast<T>(m) : T(0);
      T q = 0;
#pragma omp simd reduction(+ : q)
      for (int64_t i = 0; i < m; ++i) {
        const T d = row[i] - mean;
        q += d * d;
      }
      mup[r] = static_cast<T>(mean);
      ssp[r] = q / denom;
    }
  });
}

template <typename T>
void normalize_impl(const T* xp, const T* mup, const T* ap, const T* bp, T* yp, int64_t rows,
                    int64_t m) {
  at::parallel_for(0, rows, grain(m), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * m;
      T* out = yp + r * m;
      const T mean = mup[r], scale = ap[r], shift = bp[r];
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) out[i] = scale * (row[i] - mean) + shift;
    }
  });
}

template <typename T>
void input_grad_impl(const T* xp, const T* gp, const T* ap, const T* pp, const T* qp, T* dp,
                     int64_t rows, int64_t m) {
  at::parallel_for(0, rows, grain(m), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * m;
      const T* gr = gp + r * m;
      T* out = dp + r * m;
      const T ar = ap[r], pr = pp[r], qr = qp[r];
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) out[i] = ar * gr[i] + pr * xr[i] + qr;
    }
  });
}

// Calls fn with a null pointer of the tensor's element type (float or double).
template <typename Fn>
void dispatch(const at::Tensor& t, Fn&& fn) {
  if (t.scalar_type() == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<double*>(nullptr));
  }
}

at::Tensor in_stats(const at::Tensor& x, int64_t denom) {
  check_rows(x, "x");
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t m = rows ? x.numel() / rows : 0;
  auto st = at::empty({2, x.size(0), x.size(1)}, x.options());
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* out = st.data_ptr<T>();
    row_stats_impl<T>(x.const_data_ptr<T>(), out, out + rows, rows, m, static_cast<T>(denom));
  });
  return st;
}

at::Tensor normalize(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& a,
                     const at::Tensor& b) {
  check_rows(x, "x");
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t m = rows ? x.numel() / rows : 0;
  for (auto* t : {&mu, &a, &b}) check_coef(*t, rows, x.scalar_type(), "coefficient");
  auto y = at::empty_like(x);
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    normalize_impl<T>(x.const_data_ptr<T>(), mu.const_data_ptr<T>(), a.const_data_ptr<T>(),
                      b.const_data_ptr<T>(), y.data_ptr<T>(), rows, m);
  });
  return y;
}

at::Tensor input_grad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& a,
                      const at::Tensor& p, const at::Tensor& q) {
  check_rows(x, "x");
  check_rows(dy, "dy");
  TORCH_CHECK(x.sizes() == dy.sizes() && x.scalar_type() == dy.scalar_type(),
              "snexp_cpu: dy must match x, got ", dy.sizes(), " and ", x.sizes());
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t m = rows ? x.numel() / rows : 0;
  for (auto* t : {&a, &p, &q}) check_coef(*t, rows, x.scalar_type(), "coefficient");
  auto dx = at::empty_like(x);
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    input_grad_impl<T>(x.const_data_ptr<T>(), dy.const_data_ptr<T>(), a.const_data_ptr<T>(),
                       p.const_data_ptr<T>(), q.const_data_ptr<T>(), dx.data_ptr<T>(), rows, m);
  });
  return dx;
}


// ---- The (N, C)-sized middle ----------------------------------------------------------
//
// Candidates come as codes: 0 = in, 1 = ln, 2 = bn, 2 + G = gn<G>. IN, LN and GN all pool
// over groups of channels within a sample (IN: C groups of one channel, LN: one group of C),
// BN over the samples of a channel.

constexpr int64_t kIn = 0, kLn = 1, kBn = 2;

int64_t channel_groups(int64_t code, int64_t c) {
  return code == kIn ? c : code == kLn ? 1 : code - kBn;
}

void check_codes(at::IntArrayRef codes, int64_t c) {
  TORCH_CHECK(!codes.empty(), "snexp_cpu: no candidates");
  for (int64_t code : codes) {
    TORCH_CHECK(code >= 0, "snexp_cpu: bad candidate code ", code);
    if (code != kBn) {
      const int64_t g = channel_groups(code, c);
      TORCH_CHECK(g > 0 && c % g == 0, "snexp_cpu: ", g, " groups do not divide ", c,
                  " channels");
    }
  }
}

void check_stats(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                 const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape,
              "snexp_cpu: ", name, " must be a CPU tensor of shape ", shape, " and dtype ",
              dtype, ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// A small tensor as a contiguous vector of `dtype` with `numel` values (a no-op when it is).
at::Tensor vec(const at::Tensor& t, int64_t numel, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == numel, "snexp_cpu: ", name, " must be a CPU ",
              "tensor of ", numel, " values, got ", t.sizes(), " on ", t.device());
  return t.to(dtype).contiguous();
}

// Pooling over channel groups of one candidate: offsets mu_k - mu_in and variances
// var_k = mean(var_in) + mean((mu_in - mu_k)^2) over each group (the centered form).
template <typename T>
void pool_groups(const T* mu, const T* var, T* off, T* v, int64_t n, int64_t c, int64_t g) {
  const int64_t w = c / g;
  for (int64_t i = 0; i < n * c; i += w) {
    T s = 0, sv = 0;
    for (int64_t t = 0; t < w; ++t) {
      s += mu[i + t];
      sv += var[i + t];
    }
    const T mean = s / static_cast<T>(w);
    T sd = 0;
    for (int64_t t = 0; t < w; ++t) {
      const T d = mu[i + t] - mean;
      sd += d * d;
    }
    const T vk = sv / static_cast<T>(w) + sd / static_cast<T>(w);
    for (int64_t t = 0; t < w; ++t) {
      off[i + t] = mean - mu[i + t];
      v[i + t] = vk;
    }
  }
}

// BN pooling over the samples of each channel: batch [mean; var] (2, C), offsets, variances.
template <typename T>
void pool_batch(const T* mu, const T* var, T* batch, T* off, T* v, int64_t n, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    T s = 0, sv = 0;
    for (int64_t i = 0; i < n; ++i) {
      s += mu[i * c + j];
      sv += var[i * c + j];
    }
    const T mean = s / static_cast<T>(n);
    T sd = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T d = mu[i * c + j] - mean;
      sd += d * d;
    }
    batch[j] = mean;
    batch[c + j] = sv / static_cast<T>(n) + sd / static_cast<T>(n);
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      off[i * c + j] = batch[j] - mu[i * c + j];
      v[i * c + j] = batch[c + j];
    }
  }
}

// Softmax of each of the two rows of (2, K) weights, with the row maximum subtracted.
template <typename T>
void softmax_rows(T* w, int64_t k) {
  for (int64_t r = 0; r < 2; ++r) {
    T* row = w + r * k;
    T mx = row[0];
    for (int64_t t = 1; t < k; ++t) mx = std::max(mx, row[t]);
    T s = 0;
    for (int64_t t = 0; t < k; ++t) {
      row[t] = std::exp(row[t] - mx);
      s += row[t];
    }
    for (int64_t t = 0; t < k; ++t) row[t] /= s;
  }
}

template <typename T>
void mix_impl(const T* st, const T* weight, const T* bias, const T* bn_mean, const T* bn_var,
              at::IntArrayRef codes, int64_t n, int64_t c, T eps, T* a, T* b, T* batch,
              T* mixed, T* cands, const T* probs) {
  const int64_t nc = n * c, k = static_cast<int64_t>(codes.size());
  const T* mu = st;
  const T* var = st + nc;
  for (int64_t t = 0; t < k; ++t) {
    T* off = cands + t * nc;
    T* v = cands + (k + t) * nc;
    const int64_t code = codes[t];
    if (code == kIn) {
      std::fill(off, off + nc, T(0));
      std::copy(var, var + nc, v);
    } else if (code == kBn && bn_mean != nullptr) {  // running statistics (eval)
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < c; ++j) {
          off[i * c + j] = bn_mean[j] - mu[i * c + j];
          v[i * c + j] = bn_var[j];
        }
      }
    } else if (code == kBn) {
      pool_batch(mu, var, batch, off, v, n, c);
    } else {
      pool_groups(mu, var, off, v, n, c, channel_groups(code, c));
    }
  }
  // [mu - mu_in; var]: each row mixed by its own weights
  T* m0 = mixed;
  T* m1 = mixed + nc;
  std::fill(mixed, mixed + 2 * nc, T(0));
  for (int64_t t = 0; t < k; ++t) {
    const T pt = probs[t], qt = probs[k + t];
    const T* off = cands + t * nc;
    const T* v = cands + (k + t) * nc;
#pragma omp simd
    for (int64_t i = 0; i < nc; ++i) {
      m0[i] += pt * off[i];
      m1[i] += qt * v[i];
    }
  }
  // a = weight / sqrt(var + eps), b = bias - (mu - mu_in) a
  for (int64_t i = 0; i < nc; i += c) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const T ai = T(1) / std::sqrt(m1[i + j] + eps) * (weight ? weight[j] : T(1));
      a[i + j] = ai;
      b[i + j] = -(m0[i + j] * ai) + (bias ? bias[j] : T(0));
    }
  }
}

// -> (a, b, batch, mixed, cands, probs) as _mixing.mix returns them (batch: (2, C) where BN
// pools the batch, else (2, 0)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix(
    const at::Tensor& st, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_w, const at::Tensor& var_w,
    const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
    at::IntArrayRef codes, double eps, bool logits) {
  TORCH_CHECK(st.dim() == 3 && st.size(0) == 2, "snexp_cpu: st must be (2, N, C), got ",
              st.sizes());
  TORCH_CHECK(st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble,
              "snexp_cpu: st must be float32 or float64, got ", st.scalar_type());
  TORCH_CHECK(bn_mean.has_value() == bn_var.has_value(),
              "snexp_cpu: give both bn_mean and bn_var, or neither");
  const int64_t n = st.size(1), c = st.size(2), k = static_cast<int64_t>(codes.size());
  check_codes(codes, c);
  const auto dt = st.scalar_type();
  const at::Tensor s = st.contiguous();
  const auto opt = [&](const std::optional<at::Tensor>& t, const char* name) {
    return t.has_value() ? vec(*t, c, dt, name) : at::Tensor();
  };
  const at::Tensor w = opt(weight, "weight"), bb = opt(bias, "bias");
  const at::Tensor rm = opt(bn_mean, "bn_mean"), rv = opt(bn_var, "bn_var");
  const bool pools_batch =
      !rm.defined() && std::find(codes.begin(), codes.end(), kBn) != codes.end();
  auto opts = s.options();
  const at::Tensor mw = vec(mean_w, k, dt, "mean_w"), vw = vec(var_w, k, dt, "var_w");
  at::Tensor probs = at::empty({2, k}, opts);
  auto a = at::empty({n, c}, opts), b = at::empty({n, c}, opts);
  auto batch = at::empty({2, pools_batch ? c : 0}, opts);
  auto mixed = at::empty({2, n, c}, opts), cands = at::empty({2, k, n, c}, opts);
  dispatch(s, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<T>() : static_cast<const T*>(nullptr);
    };
    T* pr = probs.data_ptr<T>();
    std::copy(mw.const_data_ptr<T>(), mw.const_data_ptr<T>() + k, pr);
    std::copy(vw.const_data_ptr<T>(), vw.const_data_ptr<T>() + k, pr + k);
    if (logits) softmax_rows(pr, k);
    mix_impl<T>(s.const_data_ptr<T>(), ptr(w), ptr(bb), ptr(rm), ptr(rv), codes, n, c,
                static_cast<T>(eps), a.data_ptr<T>(), b.data_ptr<T>(), batch.data_ptr<T>(),
                mixed.data_ptr<T>(), cands.data_ptr<T>(), probs.const_data_ptr<T>());
  });
  return {a, b, batch, mixed, cands, probs};
}

// Running statistics blended with the BN candidate's batch [mean; var] (2, C), in place:
// running += momentum (batch - running), the variance scaled by var_factor first (Bessel's
// correction), with torch.lerp's two-sided formula (equal to its result up to rounding: ATen's
// vectorized lerp fuses the multiply-add). One call for
// what took ~25 us of small ATen calls per SN layer and step at small shapes.
void blend(const at::Tensor& running_mean, const at::Tensor& running_var,
           const at::Tensor& batch, double momentum, double var_factor) {
  TORCH_CHECK(batch.dim() == 2 && batch.size(0) == 2, "snexp_cpu: batch must be (2, C), got ",
              batch.sizes());
  const int64_t c = batch.size(1);
  const auto dt = batch.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "snexp_cpu: batch must be float32 or float64, got ", dt);
  check_stats(running_mean, {c}, dt, "running_mean");
  check_stats(running_var, {c}, dt, "running_var");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "snexp_cpu: running statistics must be contiguous");
  const at::Tensor bt = batch.contiguous();
  dispatch(bt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T w = static_cast<T>(momentum), f = static_cast<T>(var_factor);
    const auto lerp = [w](T start, T end) {  // at::lerp's two-sided form
      const T diff = end - start;
      return std::abs(w) < T(0.5) ? start + w * diff : end - diff * (T(1) - w);
    };
    const T* bm = bt.const_data_ptr<T>();
    T* rm = running_mean.data_ptr<T>();
    T* rv = running_var.data_ptr<T>();
    for (int64_t j = 0; j < c; ++j) {
      rm[j] = lerp(rm[j], bm[j]);
      rv[j] = lerp(rv[j], bm[c + j] * f);
    }
  });
}

// -> (a, p, q, dweight, dbias, dmean_w, dvar_w) as _mixing.mix_backward returns them
// (undefined, i.e. None, where `need` says so, and p, q where dx = a dy).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mix_backward(const at::Tensor& s1_, const at::Tensor& s2_, const at::Tensor& mu_,
             const at::Tensor& mixed_, const at::Tensor& cands_, const at::Tensor& probs_,
             const std::optional<at::Tensor>& weight, at::IntArrayRef codes, double eps,
             bool logits, int64_t m, int64_t denom, bool bn_batch, std::array<bool, 5> need) {
  TORCH_CHECK(mu_.dim() == 2, "snexp_cpu: mu must be (N, C), got ", mu_.sizes());
  const auto dt = mu_.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "snexp_cpu: mu must be float32 or float64, got ", dt);
  const int64_t n = mu_.size(0), c = mu_.size(1), nc = n * c;
  const int64_t k = static_cast<int64_t>(codes.size());
  check_codes(codes, c);
  check_stats(mu_, {n, c}, dt, "mu");
  check_stats(s1_, {n, c}, dt, "s1");
  check_stats(s2_, {n, c}, dt, "s2");
  check_stats(mixed_, {2, n, c}, dt, "mixed");
  check_stats(cands_, {2, k, n, c}, dt, "cands");
  check_stats(probs_, {2, k}, dt, "probs");
  const at::Tensor s1 = s1_.contiguous(), s2 = s2_.contiguous(), mu = mu_.contiguous();
  const at::Tensor mixed = mixed_.contiguous(), cands = cands_.contiguous();
  const at::Tensor probs = probs_.contiguous();
  const at::Tensor w = weight.has_value() ? vec(*weight, c, dt, "weight") : at::Tensor();
  auto opts = mu.options();
  auto a = at::empty({n, c}, opts);
  at::Tensor dweight = need[1] ? at::empty({c}, opts) : at::Tensor();
  at::Tensor dbias = need[2] ? at::empty({c}, opts) : at::Tensor();
  // both importance gradients come from one dp (2, K): given as soon as one is needed
  const bool need_w = need[3] || need[4];
  at::Tensor dmean_w = need_w ? at::empty({k}, opts) : at::Tensor();
  at::Tensor dvar_w = need_w ? at::empty({k}, opts) : at::Tensor();
  // dx = a dy unless some candidate's statistics depend on x (all but BN on running stats)
  bool depends = false;
  for (int64_t code : codes) depends = depends || code != kBn || bn_batch;
  at::Tensor p, q;
  if (need[0] && depends) {
    p = at::empty({n, c}, opts);
    q = at::empty({n, c}, opts);
  }
  dispatch(mu, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* s1p = s1.const_data_ptr<T>();
    const T* s2p = s2.const_data_ptr<T>();
    const T* m0 = mixed.const_data_ptr<T>();
    const T* m1 = m0 + nc;
    const T* cp = cands.const_data_ptr<T>();
    const T* pp = probs.const_data_ptr<T>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    T* ap = a.data_ptr<T>();
    // d = [a s1; a rstd h] = -[dmu; 2 dvar], h = g rstd with g = s2 - (mu - mu_in) s1
    std::vector<T> d0(nc), d1(nc), dw(c, T(0)), db(c, T(0));
    for (int64_t r = 0; r < nc; r += c) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const int64_t i = r + j;
        const T rstd = T(1) / std::sqrt(m1[i] + static_cast<T>(eps));
        const T ai = rstd * (wp ? wp[j] : T(1));
        const T h = (s2p[i] - m0[i] * s1p[i]) * rstd;
        ap[i] = ai;
        dw[j] += h;
        db[j] += s1p[i];
        d0[i] = s1p[i] * ai;
        d1[i] = h * rstd * ai;
      }
    }
    if (need[1]) std::copy(dw.begin(), dw.end(), dweight.data_ptr<T>());
    if (need[2]) std::copy(db.begin(), db.end(), dbias.data_ptr<T>());
    if (need_w) {
      std::vector<T> dp(2 * k);
      for (int64_t t = 0; t < k; ++t) {
        T s0 = 0, sv = 0;
        const T* off = cp + t * nc;
        const T* v = cp + (k + t) * nc;
#pragma omp simd reduction(+ : s0, sv)
        for (int64_t i = 0; i < nc; ++i) {
          s0 += off[i] * d0[i];
          sv += v[i] * d1[i];
        }
        dp[t] = s0;
        dp[k + t] = sv;
      }
      if (logits) {  // softmax Jacobian, row by row
        for (int64_t r = 0; r < 2; ++r) {
          T dot = 0;
          for (int64_t t = 0; t < k; ++t) dot += pp[r * k + t] * dp[r * k + t];
          for (int64_t t = 0; t < k; ++t) dp[r * k + t] = pp[r * k + t] * (dp[r * k + t] - dot);
        }
      }
      T* dm = dmean_w.data_ptr<T>();
      T* dv = dvar_w.data_ptr<T>();
      for (int64_t t = 0; t < k; ++t) {
        dm[t] = -dp[t];
        dv[t] = dp[k + t] * T(-0.5);
      }
    }
    if (!p.defined()) return;
    // e = -[mixed adjoint of dmu; 2 dvar_in] = sum_k [p_k P_k(d0); q_k P_k(d1)], and
    // corr = sum_k 2 (mu_in - mu_k) q_k P_k(dvar) = sum_k (mu_k - mu_in) q_k P_k(d1)
    std::vector<T> e0(nc, T(0)), e1(nc, T(0)), corr(nc, T(0)), col0(c), col1(c);
    for (int64_t t = 0; t < k; ++t) {
      const int64_t code = codes[t];
      const T pk = pp[t], qk = pp[k + t];
      const T* off = cp + t * nc;
      if (code == kBn) {
        if (!bn_batch) continue;  // running statistics: constants of the backward
        std::fill(col0.begin(), col0.end(), T(0));
        std::fill(col1.begin(), col1.end(), T(0));
        for (int64_t r = 0; r < nc; r += c) {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            col0[j] += d0[r + j];
            col1[j] += d1[r + j];
          }
        }
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
          col0[j] = pk * (col0[j] / static_cast<T>(n));
          col1[j] = qk * (col1[j] / static_cast<T>(n));
        }
        for (int64_t r = 0; r < nc; r += c) {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            e0[r + j] += col0[j];
            e1[r + j] += col1[j];
            corr[r + j] += off[r + j] * col1[j];
          }
        }
        continue;
      }
      if (code == kIn) {  // P_k is the identity
#pragma omp simd
        for (int64_t i = 0; i < nc; ++i) {
          const T g1 = qk * d1[i];
          e0[i] += pk * d0[i];
          e1[i] += g1;
          corr[i] += off[i] * g1;
        }
        continue;
      }
      const int64_t width = c / channel_groups(code, c);
      for (int64_t i = 0; i < nc; i += width) {
        T g0 = 0, g1 = 0;
        for (int64_t u = 0; u < width; ++u) {
          g0 += d0[i + u];
          g1 += d1[i + u];
        }
        g0 = pk * (g0 / static_cast<T>(width));
        g1 = qk * (g1 / static_cast<T>(width));
        for (int64_t u = 0; u < width; ++u) {
          e0[i + u] += g0;
          e1[i + u] += g1;
          corr[i + u] += off[i + u] * g1;
        }
      }
    }
    // dx = a dy + p x + q: p = 2 dvar_in / M', q = dmu_in / M - p mu_in
    const T* mup = mu.const_data_ptr<T>();
    T* ppo = p.data_ptr<T>();
    T* qpo = q.data_ptr<T>();
    const T inv_m = T(1) / static_cast<T>(m), inv_d = T(1) / static_cast<T>(denom);
#pragma omp simd
    for (int64_t i = 0; i < nc; ++i) {
      ppo[i] = e1[i] * (T(-1) / static_cast<T>(denom));
      qpo[i] = (corr[i] - e0[i]) * inv_m + inv_d * (e1[i] * mup[i]);
    }
  });
  return {a, p, q, dweight, dbias, dmean_w, dvar_w};
}

}  // namespace

TORCH_LIBRARY(snexp_cpu, m) {
  m.def("normalize(Tensor x, Tensor mu, Tensor a, Tensor b) -> Tensor");
  m.def("input_grad(Tensor x, Tensor dy, Tensor a, Tensor p, Tensor q) -> Tensor");
  m.def("in_stats(Tensor x, int denom) -> Tensor");
  m.def("mix(Tensor st, Tensor? weight, Tensor? bias, Tensor mean_w, Tensor var_w, "
        "Tensor? bn_mean, Tensor? bn_var, int[] codes, float eps, bool logits) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("blend(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor batch, float momentum, "
        "float var_factor) -> ()");
  m.def("mix_backward(Tensor s1, Tensor s2, Tensor mu, Tensor mixed, Tensor cands, "
        "Tensor probs, Tensor? weight, int[] codes, float eps, bool logits, int m, int denom, "
        "bool bn_batch, bool[5] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(snexp_cpu, CPU, m) {
  m.impl("normalize", &normalize);
  m.impl("input_grad", &input_grad);
  m.impl("in_stats", &in_stats);
  m.impl("mix", &mix);
  m.impl("mix_backward", &mix_backward);
  m.impl("blend", &blend);
}
