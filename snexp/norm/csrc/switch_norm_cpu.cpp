// The full-size passes of Switchable Normalization on CPU, one row (n, c) at a time.
//
// Registered as torch.ops.snexp_cpu.{row_stats, normalize, input_grad}; used by
// snexp/norm/_mixing.py for contiguous float32/float64 input on CPU. These are the only loops
// over every element: SN's equations (the mixing of IN/LN/BN/GN statistics on (N, C)-sized
// tensors, and its closed-form backward) stay in _mixing.py, the same on every device.
//
//   row_stats(x)                 -> (mu, ss)   mu = mean of the row, ss = sum (x - mu)^2
//   normalize(x, mu, a, b)       -> y          y = a (x - mu) + b
//   input_grad(x, dy, a, p, q)   -> dx         dx = a dy + p x + q
//
// x and dy are viewed as (R, M): R = N * C rows of M = H * W (* D) values; the per-row
// coefficients are (R,) tensors in the statistics dtype (float32 for float32 input).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

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

template <typename T>
void row_stats_impl(const T* xp, T* mup, T* ssp, int64_t rows, int64_t m) {
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
      ssp[r] = static_cast<T>(q);
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

std::tuple<at::Tensor, at::Tensor> row_stats(const at::Tensor& x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t m = rows ? x.numel() / rows : 0;
  auto mu = at::empty({x.size(0), x.size(1)}, x.options());
  auto ss = at::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    row_stats_impl<T>(x.const_data_ptr<T>(), mu.data_ptr<T>(), ss.data_ptr<T>(), rows, m);
  });
  return {mu, ss};
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

}  // namespace

TORCH_LIBRARY(snexp_cpu, m) {
  m.def("row_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("normalize(Tensor x, Tensor mu, Tensor a, Tensor b) -> Tensor");
  m.def("input_grad(Tensor x, Tensor dy, Tensor a, Tensor p, Tensor q) -> Tensor");
}

TORCH_LIBRARY_IMPL(snexp_cpu, CPU, m) {
  m.impl("row_stats", &row_stats);
  m.impl("normalize", &normalize);
  m.impl("input_grad", &input_grad);
}
