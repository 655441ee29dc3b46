// RAA on the CPU, GELU base, vector shift, features last: one pass over x forward, one over x and g backward.
// Rows of d features are split among ATen's threads; each row's shift s = w·x + b and backward sum
// u = Σ g·x·φ(z) are row reductions done while the row is in L1, and each thread keeps its share of ∂L/∂w.
// Φ uses the same Abramowitz–Stegun erf as ATen's vectorised GELU; backward takes it from φ's exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr int64_t kGrainElements = 32768;

float hsum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

float row_dot(const float* x, const float* w, int64_t d) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= d; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(w + j), acc);
  float total = hsum(acc);
  for (; j < d; ++j) total += x[j] * w[j];
  return total;
}

// Φ(z) = (1 + erf(z/√2)) / 2 by the erf of ATen's vectorised GELU, given e = exp(-z²/2) = exp(-(z/√2)²).
Vec cdf_from_exp(const Vec& z, const Vec& e) {
  const Vec one(1.f), half(0.5f);
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), z.abs() * Vec(kSqrtHalf), one);
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec erf_abs = one - r * t * e;
  return at::vec::fmadd(half, Vec::blendv(erf_abs, Vec(0.f) - erf_abs, z < Vec(0.f)), half);
}

float cdf(float z) { return 0.5f * (1.f + std::erf(z * kSqrtHalf)); }

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "dnrt::raa_gelu: ", name,
              " must be a contiguous float32 CPU tensor");
}

int64_t grain(int64_t d) { return std::max<int64_t>(1, kGrainElements / d); }

// Returns y and s; while it computes row i's activation it already sums row i + 1's shift, so the loads
// that the shift needs overlap with erf's arithmetic.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check(x, "x");
  check(w, "w");
  const int64_t d = w.numel();
  TORCH_CHECK(d > 0 && x.dim() > 0 && x.size(-1) == d, "dnrt::raa_gelu_forward: x's last dim must equal w's size");
  const int64_t n = x.numel() / d;
  at::Tensor y = at::empty_like(x), s = at::empty({n}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  float* sp = s.mutable_data_ptr<float>();
  const float bias = b.item().toFloat();
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    float si = row_dot(xp + begin * d, wp, d) + bias;
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * d;
      const float* next = i + 1 < end ? xr + d : xr;
      float* yr = yp + i * d;
      sp[i] = si;
      const Vec sv(si);
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + Vec::size() <= d; j += Vec::size()) {
        acc = at::vec::fmadd(Vec::loadu(next + j), Vec::loadu(wp + j), acc);
        const Vec xv = Vec::loadu(xr + j);
        const Vec phi = at::vec::fmadd(((xv + sv) * Vec(kSqrtHalf)).erf(), Vec(0.5f), Vec(0.5f));
        (xv * phi).store(yr + j);
      }
      float next_s = hsum(acc) + bias;
      for (; j < d; ++j) {
        next_s += next[j] * wp[j];
        yr[j] = xr[j] * cdf(xr[j] + si);
      }
      si = next_s;
    }
  });
  return {y, s};
}

// Returns ∂L/∂x, ∂L/∂w and ∂L/∂b = Σu; exp(-z²/2) is computed once per element and serves φ and Φ.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& s,
                                                        const at::Tensor& w) {
  check(g, "grad");
  check(x, "x");
  check(s, "s");
  check(w, "w");
  const int64_t d = w.numel();
  TORCH_CHECK(d > 0 && g.sizes() == x.sizes() && x.size(-1) == d && s.numel() * d == x.numel(),
              "dnrt::raa_gelu_backward: mismatched shapes");
  const int64_t n = s.numel();
  at::Tensor gx = at::empty_like(x), u = at::empty({n}, x.options());
  at::Tensor gw_parts = at::zeros({at::get_num_threads(), d}, x.options());
  const float* gp = g.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* gxp = gx.mutable_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  float* gw_base = gw_parts.mutable_data_ptr<float>();
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    float* gw = gw_base + at::get_thread_num() * d;
    std::vector<float> pdf_term(d), gauss(d);  // g·x·φ(z) and exp(-z²/2) of the current row
    for (int64_t i = begin; i < end; ++i) {
      const float* gr = gp + i * d;
      const float* xr = xp + i * d;
      float* gxr = gxp + i * d;
      const float si = sp[i];
      const Vec sv(si);
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + Vec::size() <= d; j += Vec::size()) {
        const Vec xv = Vec::loadu(xr + j), z = xv + sv;
        const Vec e = (z * z * Vec(-0.5f)).exp();
        const Vec term = Vec::loadu(gr + j) * xv * e * Vec(kInvSqrt2Pi);
        e.store(gauss.data() + j);
        term.store(pdf_term.data() + j);
        acc = acc + term;
      }
      float ui = hsum(acc);
      for (; j < d; ++j) {
        const float z = xr[j] + si;
        gauss[j] = std::exp(-0.5f * z * z);
        pdf_term[j] = gr[j] * xr[j] * gauss[j] * kInvSqrt2Pi;
        ui += pdf_term[j];
      }
      up[i] = ui;
      const Vec uv(ui);
      j = 0;
      for (; j + Vec::size() <= d; j += Vec::size()) {
        const Vec xv = Vec::loadu(xr + j);
        const Vec phi = cdf_from_exp(xv + sv, Vec::loadu(gauss.data() + j));
        const Vec out = at::vec::fmadd(Vec::loadu(gr + j), phi, Vec::loadu(pdf_term.data() + j));
        at::vec::fmadd(uv, Vec::loadu(wp + j), out).store(gxr + j);
        at::vec::fmadd(xv, uv, Vec::loadu(gw + j)).store(gw + j);
      }
      for (; j < d; ++j) {
        gxr[j] = gr[j] * cdf(xr[j] + si) + pdf_term[j] + ui * wp[j];
        gw[j] += xr[j] * ui;
      }
    }
  });
  return {gx, gw_parts.sum(0), u.sum()};
}

}  // namespace

TORCH_LIBRARY(dnrt, m) {
  m.def("raa_gelu_forward(Tensor x, Tensor w, Tensor b) -> (Tensor, Tensor)", forward);
  m.def("raa_gelu_backward(Tensor grad, Tensor x, Tensor s, Tensor w) -> (Tensor, Tensor, Tensor)", backward);
}
