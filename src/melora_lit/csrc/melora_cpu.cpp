// Fused CPU kernels for MELoRALinear (fp32), registered as torch.ops.melora_lit.*.
//
// Why: on CPU the adapter's cost is not its FLOPs (under 1 % of the layer's at r = 1) but
// its passes over the (tokens x features) activations. With BLAS, h = A x, B^T g, dA and dB
// are four separate, strided passes. Here the backward walks the rows of x and g once and
// does all of a row's work while the row is in L1; the forward adds nothing when the update
// is folded into the weight (`fold`) and one pass otherwise. Dropout is fused too: its mask
// is a hash of (seed, token, column), regenerated in the backward instead of stored.
//
// Layouts, all contiguous fp32: x (T, d_in); y, g (T, d_out); a (n, r, k) with k = d_in/n;
// b (n, o, r) with o = d_out/n, as the parameters are stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
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

// Tile of TT tokens starting at tb (m of them real): row pointers into x (masked copies with
// dropout, masks in mbuf) and, if g is given, into g.
template <int TT>
inline int64_t load_tile(int64_t tb, int64_t t1, const float* xp, int64_t d_in, const float* gp, int64_t d_out,
                         const Dropout& dp, const float* zero, float* mbuf, float* xbuf,
                         const float** xr, const float** gr) {
  const int64_t m = std::min<int64_t>(TT, t1 - tb);
  for (int tt = 0; tt < TT; ++tt) {
    if (tt >= m) { xr[tt] = zero; if (gr) gr[tt] = zero; continue; }
    xr[tt] = xp + (tb + tt) * d_in;
    if (gr) gr[tt] = gp + (tb + tt) * d_out;
    if (dp.on) {
      float* mk = mbuf + tt * d_in; float* buf = xbuf + tt * d_in;
      row_mask(row_key(dp.seed, tb + tt), dp.thresh, dp.keep, mk, d_in);
#pragma omp simd
      for (int64_t c = 0; c < d_in; ++c) buf[c] = mk[c] * xr[tt][c];
      xr[tt] = buf;
    }
  }
  return m;
}

template <int TT>
void fwd_update_impl(float* yp, const float* xp, const float* ap, const float* bp, int64_t T, int64_t d_in,
                     int64_t d_out, int64_t n, int64_t r, int64_t k, int64_t o, float s, const Dropout& dp) {
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    std::vector<float> mbuf(dp.on ? TT * d_in : 0), xbuf(dp.on ? TT * d_in : 0), zero(d_in, 0.f), h(TT * r), hj(r);
    const float* xr[TT];
    for (int64_t tb = t0; tb < t1; tb += TT) {
      const int64_t m = load_tile<TT>(tb, t1, xp, d_in, nullptr, d_out, dp, zero.data(), mbuf.data(),
                                      xbuf.data(), xr, nullptr);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < r; ++j) dots<TT>(ap + (i * r + j) * k, xr, i * k, k, h.data() + j * TT);
        for (int64_t tt = 0; tt < m; ++tt) {
          for (int64_t j = 0; j < r; ++j) hj[j] = h[j * TT + tt];
          combine(hj.data(), bp + i * r * o, r, o, s, nullptr, yp + (tb + tt) * d_out + i * o, nullptr);
        }
      }
    }
  });
}

template <int TT>
void bwd_impl(float* accp, int64_t na, int64_t nb, const float* xp, const float* gp, const float* ap,
              const float* bp, float* gxp, int64_t T, int64_t d_in, int64_t d_out, int64_t n, int64_t r,
              int64_t k, int64_t o, float s, const Dropout& dp) {
  at::parallel_for(0, T, kGrain, [&](int64_t t0, int64_t t1) {
    float* da = accp + at::get_thread_num() * (na + nb);
    float* db = da + na;
    std::vector<float> mbuf(dp.on ? TT * d_in : 0), xbuf(dp.on ? TT * d_in : 0),
        zero(std::max(d_in, d_out), 0.f), h(TT * r), gh(TT * r), ghj(r), tmp(k);
    const float* xr[TT]; const float* gr[TT];
    for (int64_t tb = t0; tb < t1; tb += TT) {
      const int64_t m = load_tile<TT>(tb, t1, xp, d_in, gp, d_out, dp, zero.data(), mbuf.data(), xbuf.data(), xr, gr);
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
            combine(ghj.data(), ap + i * r * k, r, k, s, dp.on ? mbuf.data() + tt * d_in + i * k : nullptr,
                    gxp + (tb + tt) * d_in + i * k, tmp.data());
          }
        }
      }
    }
  });
}

}  // namespace

// y += s * blockdiag(B_i A_i) dropout(x), one pass over the rows of x and y.
void fwd_update_(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 double s, double p, int64_t seed) {
  check(y, "y"); check(x, "x"); check(a, "lora_A"); check(b, "lora_B");
  const at::Tensor bt = b.transpose(1, 2).contiguous();  // (n, r, o): the rows of B_i^T
  const int64_t n = a.size(0), r = a.size(1), k = a.size(2), o = bt.size(2);
  const Dropout dp(p, seed);
  // r = 1 is bound by memory: one row at a time streams best. Larger r is bound by
  // arithmetic: four rows at a time reuse every factor load four times.
  auto run = r >= 4 ? fwd_update_impl<4> : fwd_update_impl<1>;
  run(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>(), x.size(0),
      x.size(1), y.size(1), n, r, k, o, static_cast<float>(s), dp);
}

// The adapter's backward in one pass over the rows of x and g (and of gx, when given):
//   dA_i = s (B_i^T g_i) dropout(x)_i^T,   dB_i = s g_i (A_i dropout(x)_i)^T,
//   gx_i += s * mask_i * A_i^T B_i^T g_i   (only when gx is given: the unfolded case)
// Returns (dA (n, r, k), dB (n, o, r)).
std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                                       const at::Tensor& b, double s, double p, int64_t seed,
                                       const c10::optional<at::Tensor>& gx) {
  check(x, "x"); check(g, "grad"); check(a, "lora_A"); check(b, "lora_B");
  if (gx.has_value()) check(*gx, "grad_input");
  const at::Tensor bt = b.transpose(1, 2).contiguous();
  const int64_t n = a.size(0), r = a.size(1), k = a.size(2), o = bt.size(2);
  const int64_t na = n * r * k, nb = n * r * o;
  // one accumulator per thread: no atomics, and a fixed order for a fixed thread count
  at::Tensor acc = at::zeros({at::get_num_threads(), na + nb}, x.options());
  const Dropout dp(p, seed);
  auto run = r >= 4 ? bwd_impl<4> : bwd_impl<1>;
  run(acc.data_ptr<float>(), na, nb, x.data_ptr<float>(), g.data_ptr<float>(), a.data_ptr<float>(),
      bt.data_ptr<float>(), gx.has_value() ? gx->data_ptr<float>() : nullptr, x.size(0), x.size(1), g.size(1),
      n, r, k, o, static_cast<float>(s), dp);
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
