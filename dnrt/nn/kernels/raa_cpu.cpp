// RAA on the CPU: one pass over x forward, one over x and g backward; float32, bfloat16 or float16 input with
// float32 arithmetic; GELU or ReLU base; vector shift s = w·x + b or scalar shift s = b.
// Two layouts of the feature vectors, seen as [outer, C, inner]:
// - rows (inner = 1, features last): each vector is one contiguous row of C, vectorised along it; its shift
//   and backward's u = Σ g·∂y/∂s are row sums taken while the row is in L1;
// - planes (inner = H·W, channels first; also the scalar shift, as [1, 1, numel]): vectorised along the
//   positions, one vector of positions at a time walks the C channels with its shifts and sums u in registers.
// Threads share out rows or tiles of positions; rows and tiles of 16-bit input are converted to float32
// buffers on the way in and out. Each thread keeps its own share of ∂L/∂w (and of ∂L/∂b for the scalar
// shift). GELU's Φ is the Abramowitz–Stegun erf of ATen's vectorised GELU, built on exp(-z²/2), which
// backward's φ shares. Non-finite input as docs/method.md §1 defines it: a shift that is not finite makes its
// vector NaN; otherwise x·Φ(z) and x·φ(z) are 0 where Φ(z) or φ(z) is 0 (their limits at x = ±∞).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The per-element functions must inline into the loops: a call passes its vectors through memory.
#define DNRT_INLINE inline __attribute__((always_inline))

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr int64_t kGrainElements = 32768;  // elements per parallel task
constexpr int64_t kTileElements = 8192;    // a planes tile, C × T floats: 32 KiB

float hsum(const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  float total = 0.f;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Φ(z) = (1 + erf(z/√2)) / 2 by the erf of ATen's vectorised GELU, given e = exp(-z²/2) = exp(-(z/√2)²).
DNRT_INLINE Vec cdf(const Vec& z, const Vec& e) {
  const Vec one(1.f), half(0.5f);
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), z.abs() * Vec(kSqrtHalf), one);
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec erf_abs = one - r * t * e;
  return at::vec::fmadd(half, Vec::blendv(erf_abs, Vec(0.f) - erf_abs, z < Vec(0.f)), half);
}
DNRT_INLINE float cdf(float z, float) { return 0.5f * (1.f + std::erf(z * kSqrtHalf)); }

DNRT_INLINE Vec v_fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
DNRT_INLINE float v_fma(float a, float b, float c) { return a * b + c; }
// exp(-z²/2) for z's φ and Φ: ATen's inline exp of 20 ulp (Sleef's costs a call that spills every register).
// That exp turns NaN into a finite value: Φ is NaN all the same (through t), φ needs it put back.
DNRT_INLINE Vec gauss(const Vec& z) { return (z * z * Vec(-0.5f)).exp_u20(); }
DNRT_INLINE float gauss(float z) { return std::exp(-0.5f * z * z); }
DNRT_INLINE Vec keep_nan(const Vec& e, const Vec& z) { return Vec::blendv(e, z, z.isnan()); }
DNRT_INLINE float keep_nan(float e, float) { return e; }
DNRT_INLINE Vec positive(const Vec& a) { return a.gt(Vec(0.f)); }
DNRT_INLINE float positive(float a) { return a > 0.f ? 1.f : 0.f; }
DNRT_INLINE Vec relu(const Vec& a) { return at::vec::maximum(a, Vec(0.f)); }
DNRT_INLINE float relu(float a) { return std::isnan(a) ? a : std::max(a, 0.f); }
// a · f, but 0 where the factor f is 0, whatever a is (also ±∞): the limit of x·Φ(z) and x·φ(z) as x → ±∞.
DNRT_INLINE Vec times(const Vec& a, const Vec& f) { return (a * f) & (f != Vec(0.f)); }
DNRT_INLINE float times(float a, float f) { return f != 0.f ? a * f : 0.f; }
// The shift itself where finite, else NaN (∞ − ∞): a vector with a non-finite shift has no limit to give.
DNRT_INLINE Vec finite_or_nan(const Vec& s) { return s + (s - s); }
DNRT_INLINE float finite_or_nan(float s) { return s + (s - s); }

// y = x·Φ(z) or max(0, z), for z = x + s; V is Vec or float.
template <bool Gelu, typename V>
DNRT_INLINE V activation(const V& x, const V& z) {
  if constexpr (Gelu) return times(x, cdf(z, gauss(z)));
  else return relu(z);
}

// Returns g·∂y/∂x without the shift's share; term = g·∂y/∂s, summed into u.
template <bool Gelu, typename V>
DNRT_INLINE V gradient(const V& g, const V& x, const V& z, V& term) {
  if constexpr (Gelu) {
    const V e = keep_nan(gauss(z), z);
    term = g * times(x, e) * V(kInvSqrt2Pi);
    return v_fma(g, cdf(z, e), term);
  } else {
    term = g * positive(z);
    return term;
  }
}

// A line of n values as float32: the line itself, or converted into buf.
template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      Vec v;
      at::vec::load_to_float(src + j, v);
      v.store(buf + j);
    }
    for (; j < n; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// Where to write a line of float32 results: the output itself, or buf (then stored by store_line).
template <typename T>
float* out_line(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) return dst;
  else return buf;
}

template <typename T>
void store_line(const float* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) at::vec::convert(buf, dst, n);
}

template <typename T>
constexpr int64_t buffer_size(int64_t n) {
  return std::is_same_v<T, float> ? 0 : n;
}

float row_dot(const float* x, const float* w, int64_t d) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(w + j), acc);
  float total = hsum(acc);
  for (; j < d; ++j) total += x[j] * w[j];
  return total;
}

// Rows: while it computes row i's activation it already sums row i + 1's shift, so the loads that the
// shift needs overlap with erf's arithmetic.
template <typename T, bool Gelu>
void rows_forward(const T* x, const float* w, float b, T* y, float* s, int64_t n, int64_t d) {
  at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / d), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(buffer_size<T>(2 * d)), ybuf(buffer_size<T>(d));
    const float* xr = as_float(x + begin * d, d, xbuf.data());
    float si = finite_or_nan(row_dot(xr, w, d) + b);
    for (int64_t i = begin; i < end; ++i) {
      const float* next = i + 1 < end ? as_float(x + (i + 1) * d, d, xbuf.data() + ((i + 1 - begin) % 2) * d) : xr;
      float* yr = out_line(y + i * d, ybuf.data());
      s[i] = si;
      const Vec sv(si);
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) {
        acc = at::vec::fmadd(Vec::loadu(next + j), Vec::loadu(w + j), acc);
        const Vec xv = Vec::loadu(xr + j);
        activation<Gelu>(xv, xv + sv).store(yr + j);
      }
      float next_s = hsum(acc) + b;
      for (; j < d; ++j) {
        next_s += next[j] * w[j];
        yr[j] = activation<Gelu>(xr[j], xr[j] + si);
      }
      next_s = finite_or_nan(next_s);
      store_line(yr, y + i * d, d);
      xr = next;
      si = next_s;
    }
  });
}

template <typename T, bool Gelu>
void rows_backward(const T* g, const T* x, const float* s, const float* w, T* gx, float* u, float* gw_parts,
                   int64_t n, int64_t d) {
  at::parallel_for(0, n, std::max<int64_t>(1, kGrainElements / d), [&](int64_t begin, int64_t end) {
    float* gw = gw_parts + at::get_thread_num() * d;
    std::vector<float> xbuf(buffer_size<T>(d)), gbuf(buffer_size<T>(d)), pbuf(buffer_size<T>(d));
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = as_float(x + i * d, d, xbuf.data());
      const float* gr = as_float(g + i * d, d, gbuf.data());
      float* part = out_line(gx + i * d, pbuf.data());
      const Vec sv(s[i]);
      Vec acc(0.f), term;
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) {
        const Vec xv = Vec::loadu(xr + j);
        gradient<Gelu>(Vec::loadu(gr + j), xv, xv + sv, term).store(part + j);
        acc = acc + term;
      }
      float ui = hsum(acc), term_j;
      for (; j < d; ++j) {
        part[j] = gradient<Gelu>(gr[j], xr[j], xr[j] + s[i], term_j);
        ui += term_j;
      }
      u[i] = ui;
      const Vec uv(ui);
      for (j = 0; j + kLanes <= d; j += kLanes) {
        at::vec::fmadd(uv, Vec::loadu(w + j), Vec::loadu(part + j)).store(part + j);
        at::vec::fmadd(Vec::loadu(xr + j), uv, Vec::loadu(gw + j)).store(gw + j);
      }
      for (; j < d; ++j) {
        part[j] += ui * w[j];
        gw[j] += xr[j] * ui;
      }
      store_line(part, gx + i * d, d);
    }
  });
}

// The planes layout: [outer, C, inner] cut into tiles of T positions of one outer index.
struct Tiles {
  int64_t outer, channels, inner, size, per_outer;

  Tiles(int64_t outer_, int64_t channels_, int64_t inner_) : outer(outer_), channels(channels_), inner(inner_) {
    const int64_t widest = std::max(kLanes, kTileElements / channels / kLanes * kLanes);
    per_outer = (inner + widest - 1) / widest;
    size = ((inner + per_outer - 1) / per_outer + kLanes - 1) / kLanes * kLanes;
    per_outer = (inner + size - 1) / size;
  }
  int64_t count() const { return outer * per_outer; }
  int64_t grain() const { return std::max<int64_t>(1, kGrainElements / (channels * size)); }
  int64_t first(int64_t t) const { return (t % per_outer) * size; }                    // first position
  int64_t width(int64_t t) const { return std::min(size, inner - first(t)); }           // positions in tile t
  int64_t offset(int64_t t) const { return t / per_outer * channels * inner + first(t); }  // of channel 0
  int64_t shift_offset(int64_t t) const { return t / per_outer * inner + first(t); }
};

// A tile's C lines of n values lie `stride` apart: in the tensor itself for float32, else in a buffer.
template <typename T>
int64_t tile_stride(const Tiles& tiles, int64_t n) {
  return std::is_same_v<T, float> ? tiles.inner : n;
}

// A tile as float32 lines: the tensor itself, or converted into buf.
template <typename T>
const float* tile_as_float(const T* src, const Tiles& tiles, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t c = 0; c < tiles.channels; ++c) as_float(src + c * tiles.inner, n, buf + c * n);
    return buf;
  }
}

template <typename T>
void store_tile(const float* buf, T* dst, const Tiles& tiles, int64_t n) {
  for (int64_t c = 0; c < tiles.channels; ++c) store_line(buf + c * n, dst + c * tiles.inner, n);
}

// Planes: within a tile, one vector of positions at a time walks the C channels, its shifts (and backward's
// sums u) in registers; two accumulators halve the chain of dependent additions.
template <typename T, bool Gelu>
void planes_forward(const T* x, const float* w, float b, T* y, float* s, const Tiles& tiles) {
  const int64_t C = tiles.channels;
  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(buffer_size<T>(C * tiles.size)), ybuf(buffer_size<T>(C * tiles.size));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = tiles.width(t), off = tiles.offset(t), stride = tile_stride<T>(tiles, n);
      const float* xt = tile_as_float(x + off, tiles, n, xbuf.data());
      float* yt = out_line(y + off, ybuf.data());
      float* st = s + tiles.shift_offset(t);
      int64_t p = 0;
      for (; p + kLanes <= n; p += kLanes) {
        Vec even(b), odd(0.f);
        int64_t c = 0;
        for (; w && c + 1 < C; c += 2) {
          even = at::vec::fmadd(Vec(w[c]), Vec::loadu(xt + c * stride + p), even);
          odd = at::vec::fmadd(Vec(w[c + 1]), Vec::loadu(xt + (c + 1) * stride + p), odd);
        }
        if (w && c < C) even = at::vec::fmadd(Vec(w[c]), Vec::loadu(xt + c * stride + p), even);
        const Vec sv = finite_or_nan(even + odd);
        if (w) sv.store(st + p);
        for (c = 0; c < C; ++c) {
          const Vec xv = Vec::loadu(xt + c * stride + p);
          activation<Gelu>(xv, xv + sv).store(yt + c * stride + p);
        }
      }
      for (; p < n; ++p) {
        float sp = b;
        for (int64_t c = 0; w && c < C; ++c) sp += w[c] * xt[c * stride + p];
        sp = finite_or_nan(sp);
        if (w) st[p] = sp;
        for (int64_t c = 0; c < C; ++c) {
          const float xc = xt[c * stride + p];
          yt[c * stride + p] = activation<Gelu>(xc, xc + sp);
        }
      }
      store_tile(ybuf.data(), y + off, tiles, n);
    }
  });
}

// s holds one shift per position, or only b for the scalar shift (w null); then gb_parts gets each
// thread's Σu, otherwise u gets one sum per position and gw_parts each thread's ∂L/∂w.
template <typename T, bool Gelu>
void planes_backward(const T* g, const T* x, const float* s, const float* w, T* gx, float* u, float* gw_parts,
                     double* gb_parts, const Tiles& tiles) {
  const int64_t C = tiles.channels;
  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    const int64_t tile_floats = buffer_size<T>(C * tiles.size);
    std::vector<float> xbuf(tile_floats), gbuf(tile_floats), pbuf(tile_floats), gw_lanes(w ? C * kLanes : 0);
    float* gw = w ? gw_parts + at::get_thread_num() * C : nullptr;
    double gb = 0.0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = tiles.width(t), off = tiles.offset(t), stride = tile_stride<T>(tiles, n);
      const float* xt = tile_as_float(x + off, tiles, n, xbuf.data());
      const float* gt = tile_as_float(g + off, tiles, n, gbuf.data());
      float* pt = out_line(gx + off, pbuf.data());
      const float* st = w ? s + tiles.shift_offset(t) : nullptr;
      float* ut = w ? u + tiles.shift_offset(t) : nullptr;
      Vec tile_u(0.f);
      int64_t p = 0;
      for (; p + kLanes <= n; p += kLanes) {
        const Vec sv = w ? Vec::loadu(st + p) : Vec(s[0]);
        Vec even(0.f), odd(0.f), term;
        for (int64_t c = 0; c < C; ++c) {
          const Vec xv = Vec::loadu(xt + c * stride + p);
          gradient<Gelu>(Vec::loadu(gt + c * stride + p), xv, xv + sv, term).store(pt + c * stride + p);
          if (c % 2) odd = odd + term;
          else even = even + term;
        }
        const Vec uv = even + odd;
        if (!w) {
          tile_u = tile_u + uv;
          continue;
        }
        uv.store(ut + p);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t at_c = c * stride + p;
          at::vec::fmadd(uv, Vec(w[c]), Vec::loadu(pt + at_c)).store(pt + at_c);
          at::vec::fmadd(Vec::loadu(xt + at_c), uv, Vec::loadu(gw_lanes.data() + c * kLanes))
              .store(gw_lanes.data() + c * kLanes);
        }
      }
      float tail_u = hsum(tile_u);
      for (; p < n; ++p) {
        const float sp = w ? st[p] : s[0];
        float up = 0.f, term;
        for (int64_t c = 0; c < C; ++c) {
          pt[c * stride + p] = gradient<Gelu>(gt[c * stride + p], xt[c * stride + p], xt[c * stride + p] + sp, term);
          up += term;
        }
        tail_u += up;
        for (int64_t c = 0; w && c < C; ++c) {
          pt[c * stride + p] += up * w[c];
          gw[c] += xt[c * stride + p] * up;
        }
        if (w) ut[p] = up;
      }
      gb += tail_u;
      store_tile(pbuf.data(), gx + off, tiles, n);
    }
    for (int64_t c = 0; w && c < C; ++c) gw[c] += hsum(Vec::loadu(gw_lanes.data() + c * kLanes));
    if (!w) gb_parts[at::get_thread_num()] += gb;
  });
}

struct Shape {
  int64_t outer, channels, inner;
};

Shape shape_of(const at::Tensor& x, int64_t dim, bool scalar) {
  if (scalar) return {1, 1, x.numel()};
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK(d >= 0 && d < x.dim(), "dnrt_cpu::raa: dim ", dim, " out of range for ", x.dim(), "-d input");
  int64_t inner = 1;
  for (int64_t k = d + 1; k < x.dim(); ++k) inner *= x.size(k);
  return {x.numel() / (x.size(d) * inner), x.size(d), inner};
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() > 0, "dnrt_cpu::raa: ", name,
              " must be a non-empty contiguous CPU tensor");
}

const float* weights(const c10::optional<at::Tensor>& w, const Shape& shape) {
  if (!w) return nullptr;
  check(*w, "w");
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->numel() == shape.channels,
              "dnrt_cpu::raa: w must be float32 with one weight per feature");
  return w->const_data_ptr<float>();
}

// Calls f(T{}, std::bool_constant<Gelu>{}) for x's dtype T.
template <typename F>
void dispatch(at::ScalarType dtype, bool gelu, F&& f) {
  auto with_base = [&](auto tag) {
    if (gelu) f(tag, std::true_type{});
    else f(tag, std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: return with_base(float{});
    case at::kBFloat16: return with_base(at::BFloat16{});
    case at::kHalf: return with_base(at::Half{});
    default: TORCH_CHECK(false, "dnrt_cpu::raa: x must be float32, bfloat16 or float16, got ", dtype);
  }
}

std::vector<int64_t> shift_sizes(const at::Tensor& x, int64_t dim, bool scalar) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  if (scalar) std::fill(sizes.begin(), sizes.end(), 1);
  else sizes[dim < 0 ? dim + x.dim() : dim] = 1;
  return sizes;
}

// Returns y and the float32 shift s, shaped as x with its feature dim of size 1 (all ones for a scalar shift).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                           const at::Tensor& b, int64_t dim, bool gelu) {
  check(x, "x");
  const Shape shape = shape_of(x, dim, !w);
  const float* wp = weights(w, shape);
  const float bias = b.item().toFloat();  // a scalar shift's: made NaN where not finite by the loops
  at::Tensor y = at::empty_like(x), s = at::empty(shift_sizes(x, dim, !w), x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), gelu, [&](auto tag, auto base) {
    using T = decltype(tag);
    constexpr bool G = decltype(base)::value;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    float* sp = s.mutable_data_ptr<float>();
    if (!wp) sp[0] = finite_or_nan(bias);
    if (shape.inner == 1 && wp) rows_forward<T, G>(xp, wp, bias, yp, sp, shape.outer, shape.channels);
    else planes_forward<T, G>(xp, wp, bias, yp, sp, Tiles(shape.outer, shape.channels, shape.inner));
  });
  return {y, s};
}

// Returns ∂L/∂x, ∂L/∂w (float32; empty for the scalar shift) and ∂L/∂b (float32, 0-d).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& s,
                                                        const c10::optional<at::Tensor>& w, int64_t dim, bool gelu) {
  check(g, "grad");
  check(x, "x");
  check(s, "s");
  const Shape shape = shape_of(x, dim, !w);
  const float* wp = weights(w, shape);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && s.scalar_type() == at::kFloat &&
                  s.numel() * shape.channels == (wp ? x.numel() : shape.channels),
              "dnrt_cpu::raa_backward: mismatched shapes or dtypes");
  const int64_t threads = at::get_num_threads();
  const auto floats = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty_like(x), u = at::empty(wp ? s.sizes() : at::IntArrayRef{0}, floats);
  at::Tensor gw_parts = at::zeros({wp ? threads : 0, shape.channels}, floats);
  at::Tensor gb_parts = at::zeros({threads}, floats.dtype(at::kDouble));
  dispatch(x.scalar_type(), gelu, [&](auto tag, auto base) {
    using T = decltype(tag);
    constexpr bool G = decltype(base)::value;
    const T *gp = g.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
    const float* sp = s.const_data_ptr<float>();
    T* gxp = gx.mutable_data_ptr<T>();
    float *up = u.mutable_data_ptr<float>(), *gwp = gw_parts.mutable_data_ptr<float>();
    if (shape.inner == 1 && wp) {
      rows_backward<T, G>(gp, xp, sp, wp, gxp, up, gwp, shape.outer, shape.channels);
    } else {
      planes_backward<T, G>(gp, xp, sp, wp, gxp, up, gwp, gb_parts.mutable_data_ptr<double>(),
                                 Tiles(shape.outer, shape.channels, shape.inner));
    }
  });
  if (!wp) return {gx, at::empty({0}, floats), gb_parts.sum().to(at::kFloat)};
  return {gx, gw_parts.sum(0), u.sum()};
}

// The vector ISA this library was built for (ATen's names: DEFAULT, AVX2, AVX512), so tests know what ran.
#define DNRT_STRING(x) #x
#define DNRT_NAME(x) DNRT_STRING(x)
std::string capability() { return DNRT_NAME(CPU_CAPABILITY); }

}  // namespace

// A fragment, so that other kernel files may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(dnrt_cpu, m) {
  m.def("raa_forward(Tensor x, Tensor? w, Tensor b, int dim, bool gelu) -> (Tensor, Tensor)");
  m.def("raa_backward(Tensor grad, Tensor x, Tensor s, Tensor? w, int dim, bool gelu) -> (Tensor, Tensor, Tensor)");
  m.def("raa_capability() -> str", capability);
}

TORCH_LIBRARY_IMPL(dnrt_cpu, CPU, m) {
  m.impl("raa_forward", forward);
  m.impl("raa_backward", backward);
}
