// Fused CPU kernels for MELoRALinear (fp32 and bf16), registered as torch.ops.melora_lit.*.
//
// Why: on CPU the adapter's cost is not its FLOPs (under 1 % of the layer's at r = 1) but
// its passes over the (tokens x features) activations. With BLAS, h = A x, B^T g, dA and dB
// are four separate, strided passes. Here the backward walks the rows of x and g once and
// does all of a row's work while the row is in L1; the forward adds nothing when the update
// is folded into the weight (`fold`) and one pass otherwise. Dropout is fused too: its mask
// is a hash of (seed, token, column), regenerated in the backward instead of stored.
//
// Layouts, all contiguous: x (T, d_in); y, g (T, d_out), fp32 or bf16 (the math is fp32);
// a (n, r, k) with k = d_in/n and b (n, o, r) with o = d_out/n, fp32, as the parameters are
// stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 16;  // tokens per parallel task, at least

inline uint32_t mix32(uint32_t v) {  // "lowbias32" (C. Wellons): a full-avalanche 32-bit hash
  v ^= v >> 16; v *= 0x7feb352dU; v ^= v >> 15; v *= 0x846ca68bU; v ^= v >> 16;
  return v;
}

inline uint32_t row_key(int64_t seed, int64_t t) {
  const uint64_t s = static_cast<uint64_t>(seed), u = static_cast<uint64_t>(t);
  return mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(u) ^
               mix32(static_cast<uint32_t>(s >> 32) ^ static_cast<uint32_t>(u >> 32))));
}

// One row of the dropout mask: 0 where column c is dropped, else 1/(1-p). The column enters
// by xor, not by addition: with key + c*G, two rows whose keys differ by a multiple of G
// would get the same mask shifted by some columns.
inline void row_mask(uint32_t key, uint32_t thresh, float keep, float* out, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) {
    const uint32_t v = mix32(key ^ (static_cast<uint32_t>(c) * 0x9E3779B9U));
    out[c] = v < thresh ? 0.f : keep;
  }
}

struct Dropout {  // P(drop) = thresh / 2^32; kept values are scaled by keep = 1/(1-p)
  bool on; uint32_t thresh; float keep; int64_t seed;
  Dropout(double p, int64_t seed_) : on(p > 0), thresh(0), keep(1.f), seed(seed_) {
    if (on) { const double t = p * 4294967296.0; thresh = t >= 4294967295.0 ? 0xFFFFFFFFU : uint32_t(t + 0.5);
              keep = static_cast<float>(1.0 / (1.0 - p)); }
  }
};

// out[t] = <w, rows[t][off : off+len]> for the TT rows of a tile. Written out per tile size
// with plain local pointers: through an array of pointers, gcc does not vectorize the loop.
template <int TT>
inline void dots(const float* __restrict__ w, const float* const* rows, int64_t off, int64_t len, float* out) {
  if constexpr (TT == 1) {
    const float* __restrict__ r0 = rows[0] + off;
    float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
    for (int64_t q = 0; q < len; ++q) s0 += r0[q] * w[q];
    out[0] = s0;
  } else {
    static_assert(TT == 4, "tiles of 1 or 4 rows");
    const float *__restrict__ r0 = rows[0] + off, *__restrict__ r1 = rows[1] + off,
                *__restrict__ r2 = rows[2] + off, *__restrict__ r3 = rows[3] + off;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t q = 0; q < len; ++q) {
      const float v = w[q];
      s0 += r0[q] * v; s1 += r1[q] * v; s2 += r2[q] * v; s3 += r3[q] * v;
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
  }
}

// acc += sum_t c[t] * rows[t][off : off+len]
template <int TT>
inline void axpys(const float* c, const float* const* rows, int64_t off, int64_t len, float* __restrict__ acc) {
  if constexpr (TT == 1) {
    const float* __restrict__ r0 = rows[0] + off;
    const float c0 = c[0];
#pragma omp simd
    for (int64_t q = 0; q < len; ++q) acc[q] += c0 * r0[q];
  } else {
    const float *__restrict__ r0 = rows[0] + off, *__restrict__ r1 = rows[1] + off,
                *__restrict__ r2 = rows[2] + off, *__restrict__ r3 = rows[3] + off;
    const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
    for (int64_t q = 0; q < len; ++q) acc[q] += c0 * r0[q] + c1 * r1[q] + c2 * r2[q] + c3 * r3[q];
  }
}

inline void axpy(float alpha, const float* __restrict__ x, float* __restrict__ y, int64_t len) {
#pragma omp simd
  for (int64_t q = 0; q < len; ++q) y[q] += alpha * x[q];
}

// out += scale * mask * sum_j c[j] * w[j*len : (j+1)*len]   (mask may be null; tmp: len floats)
inline void combine(const float* c, const float* w, int64_t r, int64_t len, float scale,
                    const float* mask, float* out, float* tmp) {
  if (!mask) {
    for (int64_t j = 0; j < r; ++j) axpy(scale * c[j], w + j * len, out, len);
    return;
  }
  std::fill(tmp, tmp + len, 0.f);
  for (int64_t j = 0; j < r; ++j) axpy(c[j], w + j * len, tmp, len);
#pragma omp simd
  for (int64_t q = 0; q < len; ++q) out[q] += scale * mask[q] * tmp[q];
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "melora_lit CPU kernel: ", name, " must be a contiguous float32 CPU tensor");
}

void check_act(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
              "melora_lit CPU kernel: ", name, " must be a contiguous CPU tensor of the input's dtype");
}

// bf16 <-> fp32 on the bits (round to nearest even, NaN kept), written so that gcc vectorizes
// the loops below; c10::BFloat16's own conversions do not vectorize.
inline float bf16_bits_to_f32(uint16_t v) {
  const uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// out[c] += v[c], rounding once to the activations' dtype
template <typename scalar_t>
inline void add_row(scalar_t* out, const float* v, int64_t len) {
  static_assert(std::is_same_v<scalar_t, c10::BFloat16>, "fp32 rows are updated in place");
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) o[c] = f32_to_bf16_bits(bf16_bits_to_f32(o[c]) + v[c]);
}

template <typename scalar_t>
inline float load_f32(const scalar_t* p, int64_t c) {
  if constexpr (std::is_same_v<scalar_t, float>) return p[c];
  else return bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(p)[c]);
}

// A row as fp32: the row itself for fp32 without dropout, else a converted (and masked) copy.
template <typename scalar_t>
inline const float* row_f32(const scalar_t* src, int64_t d, const float* mask, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!mask) return src;
  }
  if (mask) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) buf[c] = mask[c] * load_f32(src, c);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) buf[c] = load_f32(src, c);
  }
  return buf;
}

// Tile of TT tokens starting at tb (m of them real), as fp32 row pointers into x (dropout
// applied; the masks in mbuf) and, if gp is given, into g. Rows past the end point at zeros.
template <typename scalar_t, int TT>
inline int64_t load_tile(int64_t tb, int64_t t1, const scalar_t* xp, int64_t d_in, const scalar_t* gp,
                         int64_t d_out, const Dropout& dp, const float* zero, float* mbuf, float* xbuf,
                         float* gbuf, const float** xr, const float** gr) {
  const int64_t m = std::min<int64_t>(TT, t1 - tb);
  for (int tt = 0; tt < TT; ++tt) {
    if (tt >= m) { xr[tt] = zero; if (gp) gr[tt] = zero; continue; }
    const float* mk = nullptr;
    if (dp.on) {
      row_mask(row_key(dp.seed, tb + tt), dp.thresh, dp.keep, mbuf + tt * d_in, d_in);
      mk = mbuf + tt * d_in;
    }
    xr[tt] = row_f32(xp + (tb + tt) * d_in, d_in, mk, xbuf + tt * d_in);
    if (gp) gr[tt] = row_f32(gp + (tb + tt) * d_out, d_out, nullptr, gbuf + tt * d_out);
  }
  return m;
}

template <typename scalar_t, int TT>
void fwd_update_impl(scalar_t* yp, const scalar_t* xp, const float* ap, const float* bp, int64_t T, int64_t d_in,
                     int64_t d_out, int64_t n, int64_t r, int64_t k, int64_t o, float s, const Dropout& dp) {
  constexpr bool f32 = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    std::vector<float> mbuf(dp.on ? TT * d_in : 0), xbuf(TT * d_in), zero(d_in, 0.f), h(TT * r), hj(r),
        ybuf(f32 ? 0 : TT * d_out);
    const float* xr[TT];
    for (int64_t tb = t0; tb < t1; tb += TT) {
      const int64_t m = load_tile<scalar_t, TT>(tb, t1, xp, d_in, nullptr, d_out, dp, zero.data(), mbuf.data(),
                                                xbuf.data(), nullptr, xr, nullptr);
      if constexpr (!f32) std::fill(ybuf.begin(), ybuf.end(), 0.f);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < r; ++j) dots<TT>(ap + (i * r + j) * k, xr, i * k, k, h.data() + j * TT);
        for (int64_t tt = 0; tt < m; ++tt) {
          for (int64_t j = 0; j < r; ++j) hj[j] = h[j * TT + tt];
          float* out;
          if constexpr (f32) out = yp + (tb + tt) * d_out + i * o; else out = ybuf.data() + tt * d_out + i * o;
          combine(hj.data(), bp + i * r * o, r, o, s, nullptr, out, nullptr);
        }
      }
      if constexpr (!f32)
        for (int64_t tt = 0; tt < m; ++tt) add_row(yp + (tb + tt) * d_out, ybuf.data() + tt * d_out, d_out);
    }
  });
}

template <typename scalar_t, int TT>
void bwd_impl(float* accp, int64_t na, int64_t nb, const scalar_t* xp, const scalar_t* gp, const float* ap,
              const float* bp, scalar_t* gxp, int64_t T, int64_t d_in, int64_t d_out, int64_t n, int64_t r,
              int64_t k, int64_t o, float s, const Dropout& dp) {
  constexpr bool f32 = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    float* da = accp + at::get_thread_num() * (na + nb);
    float* db = da + na;
    std::vector<float> mbuf(dp.on ? TT * d_in : 0), xbuf(TT * d_in), gbuf(TT * d_out),
        zero(std::max(d_in, d_out), 0.f), h(TT * r), gh(TT * r), ghj(r), tmp(k),
        gxbuf(f32 || !gxp ? 0 : TT * d_in);
    const float* xr[TT]; const float* gr[TT];
    for (int64_t tb = t0; tb < t1; tb += TT) {
      const int64_t m = load_tile<scalar_t, TT>(tb, t1, xp, d_in, gp, d_out, dp, zero.data(), mbuf.data(),
                                                xbuf.data(), gbuf.data(), xr, gr);
      if (!gxbuf.empty()) std::fill(gxbuf.begin(), gxbuf.end(), 0.f);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < r; ++j) {  // each row slice is used again while still in L1
          dots<TT>(ap + (i * r + j) * k, xr, i * k, k, h.data() + j * TT);   // A_i x_i
          dots<TT>(bp + (i * r + j) * o, gr, i * o, o, gh.data() + j * TT);  // B_i^T g_i
          axpys<TT>(h.data() + j * TT, gr, i * o, o, db + (i * r + j) * o);
          axpys<TT>(gh.data() + j * TT, xr, i * k, k, da + (i * r + j) * k);
        }
        if (gxp) {
          for (int64_t tt = 0; tt < m; ++tt) {
            for (int64_t j = 0; j < r; ++j) ghj[j] = gh[j * TT + tt];
            float* out;
            if constexpr (f32) out = gxp + (tb + tt) * d_in + i * k; else out = gxbuf.data() + tt * d_in + i * k;
            combine(ghj.data(), ap + i * r * k, r, k, s, dp.on ? mbuf.data() + tt * d_in + i * k : nullptr,
                    out, tmp.data());
          }
        }
      }
      if constexpr (!f32)
        if (gxp)
          for (int64_t tt = 0; tt < m; ++tt) add_row(gxp + (tb + tt) * d_in, gxbuf.data() + tt * d_in, d_in);
    }
  });
}

}  // namespace

// y += s * blockdiag(B_i A_i) dropout(x), one pass over the rows of x and y. x and y are fp32
// or bf16 (computed in fp32, y rounded once); the factors are fp32.
void fwd_update_(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 double s, double p, int64_t seed) {
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "melora_lit CPU kernel: x must be float32 or bfloat16");
  check_act(x, "x", dt); check_act(y, "y", dt); check(a, "lora_A"); check(b, "lora_B");
  const at::Tensor bt = b.transpose(1, 2).contiguous();  // (n, r, o): the rows of B_i^T
  const int64_t n = a.size(0), r = a.size(1), k = a.size(2), o = bt.size(2);
  const Dropout dp(p, seed);
  // r = 1 is bound by memory: one row at a time streams best. Larger r is bound by
  // arithmetic: four rows at a time reuse every factor load four times.
  const bool tile = r >= 4;
  const float sf = static_cast<float>(s);
  if (dt == at::kFloat) {
    (tile ? fwd_update_impl<float, 4> : fwd_update_impl<float, 1>)(
        y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>(), x.size(0), x.size(1),
        y.size(1), n, r, k, o, sf, dp);
  } else {
    using bf16 = c10::BFloat16;
    (tile ? fwd_update_impl<bf16, 4> : fwd_update_impl<bf16, 1>)(
        y.data_ptr<bf16>(), x.data_ptr<bf16>(), a.data_ptr<float>(), bt.data_ptr<float>(), x.size(0), x.size(1),
        y.size(1), n, r, k, o, sf, dp);
  }
}

// The adapter's backward in one pass over the rows of x and g (and of gx, when given):
//   dA_i = s (B_i^T g_i) dropout(x)_i^T,   dB_i = s g_i (A_i dropout(x)_i)^T,
//   gx_i += s * mask_i * A_i^T B_i^T g_i   (only when gx is given: the unfolded case)
// x, g, gx fp32 or bf16; returns fp32 (dA (n, r, k), dB (n, o, r)).
std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                                       const at::Tensor& b, double s, double p, int64_t seed,
                                       const c10::optional<at::Tensor>& gx) {
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "melora_lit CPU kernel: x must be float32 or bfloat16");
  check_act(x, "x", dt); check_act(g, "grad", dt); check(a, "lora_A"); check(b, "lora_B");
  if (gx.has_value()) check_act(*gx, "grad_input", dt);
  const at::Tensor bt = b.transpose(1, 2).contiguous();
  const int64_t n = a.size(0), r = a.size(1), k = a.size(2), o = bt.size(2);
  const int64_t na = n * r * k, nb = n * r * o;
  // one accumulator per thread: no atomics, and a fixed order for a fixed thread count
  at::Tensor acc = at::zeros({at::get_num_threads(), na + nb}, a.options());
  const Dropout dp(p, seed);
  const bool tile = r >= 4;
  const float sf = static_cast<float>(s);
  if (dt == at::kFloat) {
    (tile ? bwd_impl<float, 4> : bwd_impl<float, 1>)(
        acc.data_ptr<float>(), na, nb, x.data_ptr<float>(), g.data_ptr<float>(), a.data_ptr<float>(),
        bt.data_ptr<float>(), gx.has_value() ? gx->data_ptr<float>() : nullptr, x.size(0), x.size(1), g.size(1),
        n, r, k, o, sf, dp);
  } else {
    using bf16 = c10::BFloat16;
    (tile ? bwd_impl<bf16, 4> : bwd_impl<bf16, 1>)(
        acc.data_ptr<float>(), na, nb, x.data_ptr<bf16>(), g.data_ptr<bf16>(), a.data_ptr<float>(),
        bt.data_ptr<float>(), gx.has_value() ? gx->data_ptr<bf16>() : nullptr, x.size(0), x.size(1), g.size(1),
        n, r, k, o, sf, dp);
  }
  at::Tensor total = acc.sum(0).mul_(s);
  return {total.narrow(0, 0, na).view({n, r, k}),
          total.narrow(0, na, nb).view({n, r, o}).transpose(1, 2).contiguous()};
}

// W + s * blockdiag(B_i A_i): a copy of W with only its n diagonal blocks updated.
at::Tensor fold(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s) {
  check(a, "lora_A"); check(b, "lora_B");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.device().is_cpu(), "melora_lit CPU kernel: weight must be float32 on CPU");
  at::Tensor out = w.contiguous().clone();
  const int64_t d_in = out.size(1), n = a.size(0), r = a.size(1), k = a.size(2), o = b.size(1);
  const float* ap = a.data_ptr<float>(); const float* bp = b.data_ptr<float>(); float* wp = out.data_ptr<float>();
  const float sf = static_cast<float>(s);
  at::parallel_for(0, n * o, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {  // output row i*o + q
      const int64_t i = row / o;
      for (int64_t j = 0; j < r; ++j) axpy(sf * bp[row * r + j], ap + (i * r + j) * k, wp + row * d_in + i * k, k);
    }
  });
  return out;
}

// The dropout mask the kernels use, (T, d) of 0 and 1/(1-p): for tests and debugging.
at::Tensor dropout_mask(int64_t seed, int64_t T, int64_t d, double p) {
  at::Tensor m = at::empty({T, d}, at::kFloat);
  float* mp = m.data_ptr<float>();
  const Dropout dp(p, seed);
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) row_mask(row_key(seed, t), dp.thresh, dp.keep, mp + t * d, d);
  });
  return m;
}

TORCH_LIBRARY(melora_lit, m) {
  m.def("fwd_update_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, float s, float p, int seed) -> ()");
  m.def("bwd(Tensor x, Tensor g, Tensor a, Tensor b, float s, float p, int seed, Tensor(b!)? gx) -> (Tensor, Tensor)");
  m.def("fold(Tensor w, Tensor a, Tensor b, float s) -> Tensor");
  m.def("dropout_mask(int seed, int t, int d, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(melora_lit, CPU, m) {
  m.impl("fwd_update_", &fwd_update_);
  m.impl("bwd", &bwd);
  m.impl("fold", &fold);
}

TORCH_LIBRARY_IMPL(melora_lit, CompositeExplicitAutograd, m) {
  m.impl("dropout_mask", &dropout_mask);
}
