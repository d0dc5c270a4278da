// overspill CPU kernels: matmuls over weights in a panel layout, fast for decode (M = 1..8 activation
// rows: they stream the weight once at memory speed) and usable for prefill (large M, compute-bound).
// Why hand-written (measured, shared/anchors/kernels/RESULTS.md and benchmarks/bench_linear.py): at batch 1,
// bf16 F.linear reads weights at ~0.5-0.6 of the machine's read bandwidth, oneDNN's prepacked bf16 at
// ~0.7-0.85, torch's int8pack (w8a16) at ~0.6. Decode is nothing but these reads, so the runtime's speed is
// this loop's. The layout and micro-kernel are the usual ones of x86 bf16 GEMMs (oneDNN brgemm, llama.cpp's
// AVX512-BF16 path):
//
//   * weights re-laid out once into panels of 16 output columns: [N/16][K/2][16][2], so a 64-byte load holds
//     16 columns x 2 inputs, the pairs vdpbf16ps multiplies; each panel is one sequential stream;
//   * the micro-kernel keeps MR x NP accumulators (up to 6 activation rows x 4 panels = 64 outputs) and
//     broadcasts an (x[k], x[k+1]) pair into each vdpbf16ps: fp32 accumulation, no horizontal sums;
//   * 8- and 4-bit weights have their own panel layouts and integer kernels (w8a8 / w4a8 on AVX512-VNNI, at the
//     end of this file): widening them to bf16 in registers, as a first version did, ran at 0.6-0.7 of the
//     bandwidth;
//   * more than 6 rows re-read the panel group from L2, not DRAM;
//   * every output element is computed by one thread in a fixed order: results are deterministic and do
//     not depend on the thread count.
//
// Requires AVX512F/BW/VL + AVX512_BF16 + AVX512_VNNI (checked in Python before this file is compiled).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include "tensors.h"

namespace {

constexpr int PW = 16;  // columns per panel (one zmm of fp32 outputs)
constexpr int MAXNP = 4;  // panels per micro-kernel call
constexpr int MAXMR = 6;  // activation rows per micro-kernel call

template <typename WT>
inline __m512bh load_w(const WT* p) {
  static_assert(sizeof(WT) == 2, "bf16 panels only (8/4-bit weights use the VNNI kernels below)");
  return (__m512bh)_mm512_loadu_si512(p);
}

// y[m, n0 + j*16 + c] for m < MR, j < NP. w: first panel of the group; panel stride ps elements.
template <int MR, int NP, typename WT>
inline void micro(const uint16_t* x, int64_t ldx, const WT* w, int64_t ps, int64_t KP, const float* scales,
                  const float* bias, at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NP];
#pragma GCC unroll 6
  for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
    for (int j = 0; j < NP; j++) acc[m][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; kp++) {
    __m512bh wv[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; j++) {
      const WT* p = w + j * ps + kp * 2 * PW;
      if constexpr (MR > 1) if (kp + 32 < KP) _mm_prefetch((const char*)(p + 32 * 2 * PW), _MM_HINT_T0);
      wv[j] = load_w(p);
    }
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * kp, 4);
      __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xb);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NP; j++) {
    __m512 s = scales ? _mm512_loadu_ps(scales + j * PW) : _mm512_set1_ps(1.0f);
    __m512 b = bias ? _mm512_loadu_ps(bias + j * PW) : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
      __m512 v = _mm512_fmadd_ps(acc[m][j], s, b);
      _mm256_storeu_si256((__m256i*)(y + m * ldy + j * PW), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int NP, typename WT>
inline void rows(int64_t mr, const uint16_t* x, int64_t ldx, const WT* w, int64_t ps, int64_t KP,
                 const float* s, const float* b, at::BFloat16* y, int64_t ldy) {
  switch (mr) {
    case 6: micro<6, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
    case 5: micro<5, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
    case 4: micro<4, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
    case 3: micro<3, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
    case 2: micro<2, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
    default: micro<1, NP>(x, ldx, w, ps, KP, s, b, y, ldy); break;
  }
}

template <typename WT>
torch::Tensor panel_mm(const torch::Tensor& x, const torch::Tensor& wp, const float* scales,
                       const c10::optional<torch::Tensor>& bias) {
  KCHECK(x.device().is_cpu() && wp.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [..., K]");
  KCHECK(wp.dim() == 4 && wp.size(2) == PW && wp.size(3) == 2 && wp.is_contiguous(),
              "weight must be in panel layout [N/16, K/2, 16, 2]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = wp.size(0), KP = wp.size(1), N = NPAN * PW;
  KCHECK(KP * 2 == K, "x has K=", K, " but the weight has ", KP * 2, " input features");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  const WT* wbase = (const WT*)wp.data_ptr();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t ps = KP * 2 * PW;                  // elements per panel
  const int64_t NG = (NPAN + MAXNP - 1) / MAXNP;   // groups of 4 panels = 64 columns
  at::parallel_for(0, NG, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t p0 = g * MAXNP, np = std::min<int64_t>(MAXNP, NPAN - p0), n0 = p0 * PW;
      const WT* w = wbase + p0 * ps;
      const float* s = scales ? scales + n0 : nullptr;
      const float* b = bp ? bp + n0 : nullptr;
      // (balanced passes, e.g. 8 rows as 4 + 4, measured slower than 6 + 2 interleaved: 28 vs 33 GB/s)
      for (int64_t m0 = 0; m0 < M; m0 += MAXMR) {
        const int64_t mr = std::min<int64_t>(MAXMR, M - m0);
        const uint16_t* xm = xp + m0 * K;
        at::BFloat16* ym = yp + m0 * N + n0;
        switch (np) {
          case 4: rows<4>(mr, xm, K, w, ps, KP, s, b, ym, N); break;
          case 3: rows<3>(mr, xm, K, w, ps, KP, s, b, ym, N); break;
          case 2: rows<2>(mr, xm, K, w, ps, KP, s, b, ym, N); break;
          default: rows<1>(mr, xm, K, w, ps, KP, s, b, ym, N); break;
        }
      }
    }
  });
  return y;
}

torch::Tensor bf16_mm(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias) {
  KCHECK(wp.scalar_type() == at::kBFloat16, "bf16_mm: weight must be bf16");
  return panel_mm<uint16_t>(x, wp, nullptr, bias);
}

inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}


// ---- decode attention (one query token per sequence) -------------------------------------------------
// o[b, h] = softmax(q[b, h] . K[b, h/g, :S] * scale, masked by valid[b, :S]) @ V[b, h/g, :S], g = nh / nkv.
// K/V are read in place from the cache (any batch/head/time strides, unit stride along the head dim), once
// per KV group: torch's bf16 bmm copies a strided cache slice on every call (~0.3 ms per K or V per layer at
// batch 8 here). Scores and the softmax are fp32; the weighted sum of V accumulates in fp32.
inline __m512 bf16x16_to_f32(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __m512 exp_ps(__m512 x);

torch::Tensor decode_attn(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                          double scale) {
  KCHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kBFloat16, "q must be bf16 [B, nh, 1, hs]");
  KCHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "k, v must be bf16 [B, nkv, S, hs]");
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3), nkv = k.size(1), S = k.size(2);
  KCHECK(k.size(0) == B && v.size(0) == B && v.size(1) == nkv && v.size(2) == S && k.size(3) == hs && v.size(3) == hs,
              "k, v shapes must match q");
  KCHECK(nkv > 0 && nh % nkv == 0, "nh must be a positive multiple of nkv");
  KCHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v must have unit stride along the head dim");
  const bool* vp = nullptr;
  torch::Tensor valid_c;
  if (valid.has_value() && valid->defined()) {
    KCHECK(valid->device().is_cpu() && valid->scalar_type() == at::kBool && valid->numel() == B * S,
                "valid must be a CPU bool [B, S]");
    valid_c = valid->contiguous();
    vp = valid_c.data_ptr<bool>();
  }
  auto qc = q.contiguous();
  auto o = torch::empty({B, nh, 1, hs}, q.options());
  const uint16_t* qp = (const uint16_t*)qc.data_ptr<at::BFloat16>();
  const uint16_t* kp = (const uint16_t*)k.data_ptr<at::BFloat16>();
  const uint16_t* vpp = (const uint16_t*)v.data_ptr<at::BFloat16>();
  uint16_t* op = (uint16_t*)o.data_ptr<at::BFloat16>();
  const int64_t g = nh / nkv, nv = (hs + 15) / 16;
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  const float sc = (float)scale;
  at::parallel_for(0, B * nkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(S);
    std::vector<__m512> acc(nv);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / nkv, j = i % nkv;
      const uint16_t* K = kp + b * kb + j * kh;
      const uint16_t* V = vpp + b * vb + j * vh;
      for (int64_t hq = 0; hq < g; hq++) {
        const int64_t h = j * g + hq;
        const uint16_t* Q = qp + (b * nh + h) * hs;
        float mx = -INFINITY;
        // scores, 4 keys at a time: independent accumulators and reductions (one key at a time waited on each
        // horizontal sum's latency)
        for (int64_t t0 = 0; t0 < S; t0 += 4) {
          const int64_t nt = std::min<int64_t>(4, S - t0);
          __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t d = 0; d < hs; d += 32) {
            const int64_t n = std::min<int64_t>(32, hs - d);
            const __mmask32 m = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1);
            const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, Q + d);
            for (int64_t u = 0; u < nt; u++)
              a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_maskz_loadu_epi16(m, K + (t0 + u) * kt + d), qv);
          }
          for (int64_t u = 0; u < nt; u++) {
            const int64_t t = t0 + u;
            s[t] = (vp && !vp[b * S + t]) ? -INFINITY : _mm512_reduce_add_ps(a[u]) * sc;
            mx = std::max(mx, s[t]);
          }
        }
        // softmax numerators 16 keys at a time (masked keys: exactly 0)
        __m512 dv = _mm512_setzero_ps();
        const __m512 mxv = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < S; t += 16) {
          const int64_t n = std::min<int64_t>(16, S - t);
          const __mmask16 m = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
          const __m512 x = _mm512_mask_loadu_ps(ninf, m, s.data() + t);
          const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
          const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(x, mxv)));
          _mm512_mask_storeu_ps(s.data() + t, m, e);
          dv = _mm512_add_ps(dv, e);
        }
        const float den = mx == -INFINITY ? 0.f : _mm512_reduce_add_ps(dv);
        const float inv = den > 0.f ? 1.f / den : 0.f;
        for (int64_t c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < S; t++) {
          if (s[t] == 0.f) continue;
          const __m512 p = _mm512_set1_ps(s[t] * inv);
          for (int64_t c = 0; c < nv; c++) {
            const int64_t n = std::min<int64_t>(16, hs - c * 16);
            const __mmask16 m = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
            acc[c] = _mm512_fmadd_ps(p, bf16x16_to_f32(V + t * vt + c * 16, m), acc[c]);
          }
        }
        uint16_t* O = op + (b * nh + h) * hs;
        for (int64_t c = 0; c < nv; c++) {
          const int64_t n = std::min<int64_t>(16, hs - c * 16);
          const __mmask16 m = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
          _mm256_mask_storeu_epi16(O + c * 16, m, (__m256i)_mm512_cvtneps_pbh(acc[c]));
        }
      }
    }
  });
  return o;
}


// ---- small fused ops for the decode step (each replaces 5-8 torch ops of a few microseconds) ------------
// Both round where the torch expressions they replace (overspill/model/layers.py) round: rope_ is bitwise equal
// to it (tested); rms_norm sums the squares in double, so about 1 in 20 outputs differs by one bf16 ulp.
inline float bf(float v) { return (float)c10::BFloat16(v); }   // round to bf16 and back

// RMSNorm, Llama style: w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(bf16), the product rounded to bf16.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  KCHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm: bf16 x and w");
  const int64_t C = x.size(-1);
  KCHECK(C > 0, "rms_norm: empty feature dimension");
  KCHECK(w.numel() == C, "rms_norm: weight has ", w.numel(), " elements, x has ", C, " features");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t R = xc.numel() / C;
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const at::BFloat16* xr = xp + r * C;
      // mean of squares in fp32: torch reduces with vectorized partial sums; the order differs from this loop,
      // but the sum of C fp32 squares is rounded to fp32 both ways and rarely differs in the last bit.
      double ss = 0;
      for (int64_t c = 0; c < C; c++) { const float v = (float)xr[c]; ss += (double)(v * v); }
      const float inv = 1.0f / std::sqrt((float)(ss / C) + (float)eps);
      for (int64_t c = 0; c < C; c++)
        yp[r * C + c] = at::BFloat16((float)wp[c] * bf((float)xr[c] * inv));
    }
  });
  return y;
}

// Rotary embedding (rotate-half form) in place on the first n_rot heads of x [B, T, H, hs] (contiguous):
// out = bf16(bf16(x * cos) + bf16(cat(-x2, x1) * sin)) over the first d = cos.size(-1) dims of each head.
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t n_rot) {
  KCHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "rope_: x must be contiguous bf16 [B, T, H, hs]");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hs = x.size(3), d = cos.size(-1), h2 = d / 2;
  KCHECK(cos.numel() == B * T * d && sin.numel() == B * T * d && d <= hs && d % 2 == 0 && n_rot <= H,
              "rope_: cos/sin must be [B, T, 1, d] with d <= head size");
  auto cc = cos.to(at::kBFloat16).contiguous(), sc = sin.to(at::kBFloat16).contiguous();
  at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* cp = cc.data_ptr<at::BFloat16>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * T, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(d);
    for (int64_t i = i0; i < i1; i++) {
      const at::BFloat16* c = cp + i * d;
      const at::BFloat16* s = sp + i * d;
      for (int64_t h = 0; h < n_rot; h++) {
        at::BFloat16* v = xp + (i * H + h) * hs;
        for (int64_t j = 0; j < d; j++) {
          const float rot = j < h2 ? -(float)v[j + h2] : (float)v[j - h2];
          buf[j] = bf(bf((float)v[j] * (float)c[j]) + bf(rot * (float)s[j]));
        }
        for (int64_t j = 0; j < d; j++) v[j] = at::BFloat16(buf[j]);
      }
    }
  });
}


// One decode step of attention from the fused qkv projection: rotary on the q and k heads (in place), the new
// key/value written into cache slot `start`, then decode_attn over slots [0, start]. Replaces ~15 tensor ops and
// their Python glue per layer. qkv: bf16 [B, 1, (nh + 2 nkv) * hs] contiguous; caches [B, nkv, S_max, hs].
// Returns o [B, 1, nh * hs] (the layout the output projection takes).
torch::Tensor decode_step(torch::Tensor qkv, torch::Tensor kc, torch::Tensor vc, int64_t start,
                          c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin, int64_t nh, int64_t nkv,
                          c10::optional<torch::Tensor> valid, double scale) {
  KCHECK(qkv.device().is_cpu() && kc.device().is_cpu() && vc.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(kc.dim() == 4 && vc.dim() == 4 && kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16 &&
              kc.stride(3) == 1 && vc.stride(3) == 1 && kc.sizes() == vc.sizes(), "decode_step: caches must be bf16 [B, nkv, S, hs]");
  const int64_t B = kc.size(0), hs = kc.size(3), H = nh + 2 * nkv;
  KCHECK(qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous() && qkv.dim() == 3 && qkv.size(0) == B &&
              qkv.size(1) == 1 && qkv.size(2) == H * hs, "decode_step: qkv must be contiguous bf16 [B, 1, (nh+2nkv)*hs]");
  KCHECK(kc.size(1) == nkv && start >= 0 && start < kc.size(2), "decode_step: slot ", start, " outside the cache");
  auto x4 = qkv.view({B, 1, H, hs});
  if (cos.has_value() && cos->defined()) {
    KCHECK(sin.has_value() && sin->defined(), "decode_step: cos without sin");
    rope_(x4, *cos, *sin, nh + nkv);
  }
  const uint16_t* src = (const uint16_t*)qkv.data_ptr<at::BFloat16>();
  uint16_t* kp = (uint16_t*)kc.data_ptr<at::BFloat16>();
  uint16_t* vp = (uint16_t*)vc.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < nkv; j++) {
      std::memcpy(kp + b * kc.stride(0) + j * kc.stride(1) + start * kc.stride(2), src + (b * H + nh + j) * hs, hs * 2);
      std::memcpy(vp + b * vc.stride(0) + j * vc.stride(1) + start * vc.stride(2), src + (b * H + nh + nkv + j) * hs, hs * 2);
    }
  auto o = decode_attn(x4.narrow(2, 0, nh).transpose(1, 2), kc.narrow(2, 0, start + 1), vc.narrow(2, 0, start + 1),
                       valid, scale);
  return o.view({B, 1, nh * hs});
}

// e^x for fp32 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor (rel. error < 2e-7; the result is
// rounded to bf16 by the callers).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// SwiGLU's gate: h [..., 2I] = (g, u) -> bf16(bf16(silu(g)) * u) [..., I], rounded where F.silu(g) * u rounds.
torch::Tensor silu_mul(torch::Tensor h) {
  KCHECK(h.device().is_cpu() && h.scalar_type() == at::kBFloat16 && h.is_contiguous() && h.size(-1) % 2 == 0,
              "silu_mul: h must be contiguous bf16 [..., 2I]");
  const int64_t I = h.size(-1) / 2, R = I ? h.numel() / (2 * I) : 0;
  auto size = h.sizes().vec();
  size.back() = I;
  auto y = torch::empty(size, h.options());
  const uint16_t* hp = (const uint16_t*)h.data_ptr<at::BFloat16>();
  uint16_t* yp = (uint16_t*)y.data_ptr<at::BFloat16>();
  at::parallel_for(0, R * ((I + 15) / 16), 64, [&](int64_t c0, int64_t c1) {
    const int64_t nc = (I + 15) / 16;
    for (int64_t c = c0; c < c1; c++) {
      const int64_t r = c / nc, i = (c % nc) * 16, n = std::min<int64_t>(16, I - i);
      const __mmask16 m = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
      const __m512 g = bf16x16_to_f32(hp + r * 2 * I + i, m), u = bf16x16_to_f32(hp + r * 2 * I + I + i, m);
      const __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      __m256i sgr = (__m256i)_mm512_cvtneps_pbh(sg);                 // round silu(g) to bf16 as F.silu does
      const __m512 sgf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sgr), 16));
      _mm256_mask_storeu_epi16(yp + r * I + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sgf, u)));
    }
  });
  return y;
}

// ---- w8a8 / w4a8: int8 activations x int8 or int4 weights on the integer dot product (AVX512-VNNI) --------
// Decode with 8- or 4-bit weights is bound by the work of widening weights to bf16, not by memory: the w8a16 and
// w4a16 paths above read 0.6-0.7 of the bandwidth (benchmarks/bench_linear.py). vpdpbusd multiplies 64 u8 x s8
// pairs per instruction with no widening, so the loop is back at memory speed. This is what llama.cpp's Q8_0/Q4_0
// paths do: activations are quantized on the fly, symmetric int8 with one scale per block of KB inputs (per row).
//
//   x[m, block b] ~ d[m,b] * xq[m, k],  d = max|x| / 127,  xq = round-half-even(x * 127 / max|x|)
//
// Weights go in the unsigned operand, so they are stored biased: int8 q as u8 q+128, int4 nibbles as 0..15 (zero
// point 8). The bias comes back out exactly per block: sum (q + 128) xq - 128 sum xq.
// Panels of 16 output columns; for 4 consecutive inputs each column is one 32-bit lane of 4 bytes:
//   int8: [N/16][K/4][16 columns][4 inputs]                     (64 bytes per 4 inputs)
//   int4: [N/16][K/8][16 columns][4 bytes], byte j of column c = q[c][8o+j] | q[c][8o+4+j] << 4  (64 bytes per 8 inputs)
constexpr int VMR8 = 3;  // rows per int8 micro-kernel: 3 x 4 int32 + 3 x 4 fp32 accumulators + 4 weights fit 32 zmm
constexpr int VMR4 = 2;  // rows per int4 micro-kernel (two weight registers per panel)

struct ActQ {        // x quantized per (row, block)
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, NB] scales
  std::vector<int32_t> s;  // [M, NB] sums of q
  std::vector<float> xs;   // [M, NB] sums of x (fp32 of the bf16 values); for int4 zero points
};

inline void quantize_act(const uint16_t* x, int64_t M, int64_t K, int64_t KB, ActQ& a) {
  const int64_t NB = K / KB, n = M * NB;
  a.q.resize(M * K); a.d.resize(n); a.s.resize(n); a.xs.resize(n);
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {          // block i = row i / NB, block i % NB: contiguous in x
      const uint16_t* xb = x + i * KB;
      __m512 mx = _mm512_setzero_ps(), sm = _mm512_setzero_ps();
      for (int64_t k = 0; k < KB; k += 16) {
        const __m512 v = load_bf16x16(xb + k);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        sm = _mm512_add_ps(sm, v);
      }
      const float amax = _mm512_reduce_max_ps(mx);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i qs = _mm512_setzero_si512();
      for (int64_t k = 0; k < KB; k += 16) {
        const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load_bf16x16(xb + k), inv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(a.q.data() + i * KB + k), _mm512_cvtsepi32_epi8(q));
        qs = _mm512_add_epi32(qs, q);
      }
      a.d[i] = amax / 127.f;
      a.s[i] = _mm512_reduce_add_epi32(qs);
      a.xs[i] = _mm512_reduce_add_ps(sm);
    }
  });
}

template <int MR, int NP>
inline void micro_w8a8(const int8_t* xq, int64_t ldx, const float* d, const int32_t* qs, int64_t ldb,
                       const uint8_t* w, int64_t ps, int64_t NB, int64_t KB, const float* scales, const float* bias,
                       at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NP; j++) acc[m][j] = _mm512_setzero_ps();
  const int64_t QB = KB / 4;   // input quads per block
  for (int64_t b = 0; b < NB; b++) {
    __m512i ia[MR][NP];
    for (int m = 0; m < MR; m++)
      for (int j = 0; j < NP; j++) ia[m][j] = _mm512_setzero_si512();
    for (int64_t P = b * QB; P < (b + 1) * QB; P++) {
      __m512i wv[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++) {
        const uint8_t* p = w + j * ps + P * 64;
        if constexpr (MR > 1) _mm_prefetch((const char*)(p + 2048), _MM_HINT_T0);
        wv[j] = _mm512_loadu_si512(p);
      }
#pragma GCC unroll 3
      for (int m = 0; m < MR; m++) {
        int32_t quad;
        std::memcpy(&quad, xq + m * ldx + 4 * P, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
        for (int j = 0; j < NP; j++) ia[m][j] = _mm512_dpbusd_epi32(ia[m][j], wv[j], xb);
      }
    }
#pragma GCC unroll 3
    for (int m = 0; m < MR; m++) {
      const __m512i corr = _mm512_set1_epi32(128 * qs[m * ldb + b]);
      const __m512 dv = _mm512_set1_ps(d[m * ldb + b]);
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++)
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[m][j], corr)), dv, acc[m][j]);
    }
  }
  for (int j = 0; j < NP; j++) {
    const __m512 s = _mm512_loadu_ps(scales + j * PW);
    const __m512 bv = bias ? _mm512_loadu_ps(bias + j * PW) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + j * PW), (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(acc[m][j], s, bv)));
  }
}

template <int MR, int NP>
inline void micro_w4a8(const int8_t* xq, int64_t ldx, const float* d, const int32_t* qs, const float* xs, int64_t ldb,
                       const uint8_t* w, int64_t ps, const uint16_t* sz, int64_t szps, int64_t G, int64_t gs,
                       const float* bias, at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NP; j++) acc[m][j] = _mm512_setzero_ps();
  const __m512i lo4 = _mm512_set1_epi8(15);
  const int64_t OG = gs / 8;   // input octets per group
  for (int64_t g = 0; g < G; g++) {
    __m512i ia[MR][NP];
    for (int m = 0; m < MR; m++)
      for (int j = 0; j < NP; j++) ia[m][j] = _mm512_setzero_si512();
    for (int64_t O = g * OG; O < (g + 1) * OG; O++) {
      __m512i wl[NP], wh[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++) {
        const uint8_t* p = w + j * ps + O * 64;
        if constexpr (MR > 1) _mm_prefetch((const char*)(p + 2048), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        wl[j] = _mm512_and_si512(v, lo4);
        wh[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
      }
#pragma GCC unroll 2
      for (int m = 0; m < MR; m++) {
        int32_t q0, q1;
        std::memcpy(&q0, xq + m * ldx + 8 * O, 4);
        std::memcpy(&q1, xq + m * ldx + 8 * O + 4, 4);
        const __m512i x0 = _mm512_set1_epi32(q0), x1 = _mm512_set1_epi32(q1);
#pragma GCC unroll 4
        for (int j = 0; j < NP; j++)
          ia[m][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[m][j], wl[j], x0), wh[j], x1);
      }
    }
    // sum_k w x = s * d * (sum q xq - 8 sum xq) + z * sum x   over the group
#pragma GCC unroll 4
    for (int j = 0; j < NP; j++) {
      const uint16_t* pz = sz + j * szps + g * 2 * PW;   // [G][2][16]: scales then zeros
      const __m512 sv = load_bf16x16(pz), zv = load_bf16x16(pz + PW);
#pragma GCC unroll 2
      for (int m = 0; m < MR; m++) {
        const int64_t i = m * ldb + g;
        const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(ia[m][j], _mm512_set1_epi32(8 * qs[i])));
        acc[m][j] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[i]),
                                    _mm512_fmadd_ps(t, _mm512_mul_ps(sv, _mm512_set1_ps(d[i])), acc[m][j]));
      }
    }
  }
  for (int j = 0; j < NP; j++) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + j * PW) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + j * PW), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b)));
  }
}

// The tile loop of the quantized kernels: groups of up to MAXNP panels in parallel (each output column is summed by
// one thread, in a fixed order), passes of up to MAXR activation rows inside a group (the group's weights are re-read
// from L2, not memory). Calls f(MR, NP, p0, m0) with MR, NP as compile-time constants (std::integral_constant).
template <int MAXR, typename F>
inline void over_tiles(int64_t NPAN, int64_t M, F&& f) {
  const int64_t NG = (NPAN + MAXNP - 1) / MAXNP;
  at::parallel_for(0, NG, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t p0 = g * MAXNP, np = std::min<int64_t>(MAXNP, NPAN - p0);
      for (int64_t m0 = 0; m0 < M; m0 += MAXR) {
        const int64_t mr = std::min<int64_t>(MAXR, M - m0);
        auto rows = [&](auto NPc) {
          if constexpr (MAXR >= 3) if (mr == 3) return f(std::integral_constant<int, 3>{}, NPc, p0, m0);
          if (mr == 2) return f(std::integral_constant<int, 2>{}, NPc, p0, m0);
          return f(std::integral_constant<int, 1>{}, NPc, p0, m0);
        };
        switch (np) {
          case 4: rows(std::integral_constant<int, 4>{}); break;
          case 3: rows(std::integral_constant<int, 3>{}); break;
          case 2: rows(std::integral_constant<int, 2>{}); break;
          default: rows(std::integral_constant<int, 1>{}); break;
        }
      }
    }
  });
}

// ---- code-book weights (int8-dynamic: 256-value table; nf4: 16 values), decoded in registers ------------------
// w[n, k] = code[q[n, k]] * absmax[n, k / bs]. The table (bf16) lives in registers; each code becomes its bf16 value
// by word permutes (vpermt2w over 64-entry halves, blended on index bits 6 and 7, for 256 entries; one vpermw for
// 16), then the bf16 path's vdpbf16ps; the block scale is applied per block in fp32. Replaces decoding the whole
// weight into a bf16 buffer before every matmul (0.9 tok/s on the TinyLlama shape).
// Code panels: 8-bit [N/16][K/2][16][2] (as block_weight); 4-bit [N/16][K/4][32 bytes]: byte 2c+e of quad P =
// q[c][4P+e] | q[c][4P+2+e] << 4. absmax panels: fp32 [N/16][K/bs][16].
constexpr int LMR = 2;

struct Lut {
  __m512i t[8];
};

inline __m512bh lookup(const Lut& L, __m512i idx, int bits) {
  if (bits == 4) return (__m512bh)_mm512_permutexvar_epi16(idx, L.t[0]);
  const __m512i r0 = _mm512_permutex2var_epi16(L.t[0], idx, L.t[1]);
  const __m512i r1 = _mm512_permutex2var_epi16(L.t[2], idx, L.t[3]);
  const __m512i r2 = _mm512_permutex2var_epi16(L.t[4], idx, L.t[5]);
  const __m512i r3 = _mm512_permutex2var_epi16(L.t[6], idx, L.t[7]);
  const __mmask32 m6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
  const __mmask32 m7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
  return (__m512bh)_mm512_mask_blend_epi16(m7, _mm512_mask_blend_epi16(m6, r0, r1), _mm512_mask_blend_epi16(m6, r2, r3));
}

template <int MR, int NP, int BITS>
inline void micro_lut(const uint16_t* x, int64_t ldx, const uint8_t* w, int64_t ps, const float* am, int64_t amps,
                      int64_t G, int64_t bs, const Lut& L, const float* bias, at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NP; j++) acc[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512 ag[MR][NP];
    for (int m = 0; m < MR; m++)
      for (int j = 0; j < NP; j++) ag[m][j] = _mm512_setzero_ps();
    if constexpr (BITS == 8) {
      for (int64_t kp = g * bs / 2; kp < (g + 1) * bs / 2; kp++) {
        __m512bh wv[NP];
#pragma GCC unroll 4
        for (int j = 0; j < NP; j++)
          wv[j] = lookup(L, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + j * ps + kp * 2 * PW))), 8);
#pragma GCC unroll 2
        for (int m = 0; m < MR; m++) {
          int32_t pair;
          std::memcpy(&pair, x + m * ldx + 2 * kp, 4);
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
          for (int j = 0; j < NP; j++) ag[m][j] = _mm512_dpbf16_ps(ag[m][j], wv[j], xb);
        }
      }
    } else {
      for (int64_t P = g * bs / 4; P < (g + 1) * bs / 4; P++) {
        __m512bh w0[NP], w1[NP];
#pragma GCC unroll 4
        for (int j = 0; j < NP; j++) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + j * ps + P * 2 * PW)));
          w0[j] = lookup(L, _mm512_and_si512(v, _mm512_set1_epi16(15)), 4);
          w1[j] = lookup(L, _mm512_srli_epi16(v, 4), 4);
        }
#pragma GCC unroll 2
        for (int m = 0; m < MR; m++) {
          int32_t p0, p1;
          std::memcpy(&p0, x + m * ldx + 4 * P, 4);
          std::memcpy(&p1, x + m * ldx + 4 * P + 2, 4);
          const __m512bh x0 = (__m512bh)_mm512_set1_epi32(p0), x1 = (__m512bh)_mm512_set1_epi32(p1);
#pragma GCC unroll 4
          for (int j = 0; j < NP; j++) ag[m][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ag[m][j], w0[j], x0), w1[j], x1);
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NP; j++) {
      const __m512 a = _mm512_loadu_ps(am + j * amps + g * PW);
#pragma GCC unroll 2
      for (int m = 0; m < MR; m++) acc[m][j] = _mm512_fmadd_ps(ag[m][j], a, acc[m][j]);
    }
  }
  for (int j = 0; j < NP; j++) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + j * PW) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + j * PW), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b)));
  }
}

// x bf16 [..., K]; codes: uint8 panels (8-bit [N/16, K/2, 16, 2], 4-bit [N/16, K/4, 32]); absmax fp32 [N/16, K/bs, 16];
// lut bf16 [256] (8-bit) or [16] (4-bit). Returns bf16 [..., N].
torch::Tensor lut_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax, torch::Tensor lut, int64_t bits,
                     int64_t bs, c10::optional<torch::Tensor> bias) {
  KCHECK(x.device().is_cpu() && codes.device().is_cpu() && absmax.device().is_cpu() && lut.device().is_cpu(),
              "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "lut_mm: x must be contiguous bf16 [..., K]");
  KCHECK(bits == 8 || bits == 4, "lut_mm: bits must be 8 or 4");
  KCHECK(lut.scalar_type() == at::kBFloat16 && lut.is_contiguous() && lut.numel() == (1 << bits),
              "lut_mm: lut must be contiguous bf16 [", 1 << bits, "]");
  KCHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() &&
              (bits == 8 ? codes.dim() == 4 && codes.size(2) == PW && codes.size(3) == 2
                         : codes.dim() == 3 && codes.size(2) == 2 * PW), "lut_mm: codes must be uint8 panels");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = codes.size(0), N = NPAN * PW;
  const int64_t Kw = bits == 8 ? codes.size(1) * 2 : codes.size(1) * 4;
  KCHECK(Kw == K, "x has K=", K, " but the weight has ", Kw, " input features");
  KCHECK(bs > 0 && bs % 4 == 0 && K % bs == 0, "lut_mm: K=", K, " must be a multiple of the block size ", bs);
  const int64_t G = K / bs;
  KCHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == NPAN * G * PW,
              "lut_mm: absmax must be contiguous fp32 [N/16, K/bs, 16]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0) return y;
  Lut L;
  uint16_t tab[256] = {0};
  std::memcpy(tab, lut.data_ptr<at::BFloat16>(), lut.numel() * 2);
  for (int i = 0; i < 8; i++) L.t[i] = _mm512_loadu_si512(tab + 32 * i);
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  const uint8_t* wbase = codes.data_ptr<uint8_t>();
  const float* amb = absmax.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t ps = K * PW * bits / 8, amps = G * PW;
  over_tiles<LMR>(NPAN, M, [&](auto MRc, auto NPc, int64_t p0, int64_t m0) {
    constexpr int MRv = decltype(MRc)::value, NPv = decltype(NPc)::value;
    const int64_t n0 = p0 * PW;
    if (bits == 8)
      micro_lut<MRv, NPv, 8>(xp + m0 * K, K, wbase + p0 * ps, ps, amb + p0 * amps, amps, G, bs, L,
                             bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
    else
      micro_lut<MRv, NPv, 4>(xp + m0 * K, K, wbase + p0 * ps, ps, amb + p0 * amps, amps, G, bs, L,
                             bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
  });
  return y;
}

#include "stripes.h"

// int4 panels (pack_int4: [N/16][K/8][16][4] bytes, byte 4c + j of line o = q[c, 8o + j] | q[c, 8o + 4 + j] << 4)
// with their bf16 scales and zeros ([N/16][K/gs][2][16]) -> bf16 [rows, K] = (q - 8) * s + z in fp32 (a multiply,
// then an add: the rounding of int4.py's float32 rows), rounded once to bf16. A 64-byte line holds 8 inputs of 16
// columns: low and high nibbles interleaved a dword at a time put each column's 8 inputs in order.
void int4_panels_to_bf16_(torch::Tensor qp, torch::Tensor sz, torch::Tensor dst, int64_t group_size) {
  KCHECK(qp.device().is_cpu() && qp.is_contiguous() && qp.scalar_type() == at::kByte && qp.dim() == 3 &&
         qp.size(2) == 4 * PW, "int4_panels_to_bf16_: uint8 panels [N/16, K/8, 64]");
  KCHECK(dst.device().is_cpu() && dst.is_contiguous() && dst.scalar_type() == at::kBFloat16 && dst.dim() == 2,
         "int4_panels_to_bf16_: contiguous bf16 dst [rows, K]");
  const int64_t P = qp.size(0), K = qp.size(1) * 8, gs = group_size;
  KCHECK(dst.size(0) == P * PW && dst.size(1) == K, "int4_panels_to_bf16_: dst must be [", P * PW, ", ", K, "]");
  KCHECK(gs % 8 == 0 && K % gs == 0, "int4_panels_to_bf16_: group size must divide K and be a multiple of 8");
  KCHECK(sz.is_contiguous() && sz.scalar_type() == at::kBFloat16 && sz.dim() == 4 && sz.size(0) == P &&
         sz.size(1) == K / gs && sz.size(2) == 2 && sz.size(3) == PW,
         "int4_panels_to_bf16_: scales/zeros must be bf16 [N/16, K/gs, 2, 16]");
  const int64_t G = K / gs, O = K / 8;
  const uint8_t* src = qp.data_ptr<uint8_t>();
  const uint16_t* szp = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  uint16_t* out = (uint16_t*)dst.data_ptr<at::BFloat16>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t p = p0; p < p1; p++) {
      uint16_t* d = out + p * PW * K;
      __m512 sv[8], zv[8];                                    // per (half h, lane l): columns c, c + 1, 8 each
      int64_t at = -1;
      for (int64_t o = 0; o < O; o++) {
        const int64_t g = o * 8 / gs;
        if (g != at) {                                        // a new group: its scales and zeros, widened
          const uint16_t* sg = szp + ((p * G + g) * 2) * PW;  // 16 scales, then 16 zeros
          for (int i = 0; i < 8; i++) {
            const int c = 4 * (i % 4) + 2 * (i / 4);
            float a[16], z[16];
            for (int e = 0; e < 16; e++) {
              const uint32_t sb = (uint32_t)sg[c + e / 8] << 16, zb = (uint32_t)sg[PW + c + e / 8] << 16;
              std::memcpy(&a[e], &sb, 4);
              std::memcpy(&z[e], &zb, 4);
            }
            sv[i] = _mm512_loadu_ps(a);
            zv[i] = _mm512_loadu_ps(z);
          }
          at = g;
        }
        const __m512i v = _mm512_loadu_si512((const void*)(src + (p * O + o) * 64));
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        // per 128-bit lane l (columns 4l .. 4l + 3): unpacklo -> columns 4l, 4l + 1; unpackhi -> 4l + 2, 4l + 3
        const __m512i pr[2] = {_mm512_unpacklo_epi32(lo, hi), _mm512_unpackhi_epi32(lo, hi)};
        for (int h = 0; h < 2; h++) {
          const __m128i lanes[4] = {_mm512_extracti32x4_epi32(pr[h], 0), _mm512_extracti32x4_epi32(pr[h], 1),
                                    _mm512_extracti32x4_epi32(pr[h], 2), _mm512_extracti32x4_epi32(pr[h], 3)};
          for (int l = 0; l < 4; l++) {
            const int c = 4 * l + 2 * h, i = 4 * h + l;
            const __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lanes[l])), eight);
            const __m512 w = _mm512_add_ps(_mm512_mul_ps(q, sv[i]), zv[i]);
            const __m256i r = (__m256i)_mm512_cvtneps_pbh(w);
            _mm_storeu_si128((__m128i*)(d + c * K + 8 * o), _mm256_castsi256_si128(r));
            _mm_storeu_si128((__m128i*)(d + (c + 1) * K + 8 * o), _mm256_extracti128_si256(r, 1));
          }
        }
      }
    }
  });
}

// int8 panels (pack_int8: [N/16][K/4][16][4] bytes, q + 128) -> bf16 [rows, K] = q * scale in fp32, rounded once to
// bf16 (to nearest even, as torch's .to(bfloat16)): the slices a training input gradient multiplies in oneDNN's
// native bf16 GEMM (int8.py). A 64-byte panel line is 16 columns x 4 inputs: each quarter (4 columns) widens to 16
// fp32, times its columns' scales, rounds to 16 bf16 and goes out as 8 bytes to each of the 4 columns' rows.
void panels_to_bf16_(torch::Tensor panels, torch::Tensor dst, torch::Tensor scales) {
  KCHECK(panels.device().is_cpu() && panels.is_contiguous() && dst.device().is_cpu() && dst.is_contiguous() &&
         dst.scalar_type() == at::kBFloat16 && dst.dim() == 2, "panels_to_bf16_: contiguous CPU panels and bf16 "
         "[rows, K]");
  const int64_t rows = dst.size(0), K = dst.size(1);
  KCHECK(rows % 16 == 0 && K % 4 == 0 && panels.element_size() * panels.numel() == rows * K,
         "panels_to_bf16_: panels hold ", panels.element_size() * panels.numel(), " weights, dst wants ", rows * K);
  KCHECK(scales.numel() == rows, "panels_to_bf16_: int8 panels need ", rows, " scales");
  torch::Tensor sf = scales.to(at::kFloat).contiguous();
  const float* sp = sf.data_ptr<float>();
  const int64_t P = rows / 16, G = K / 4;
  const uint8_t* src = (const uint8_t*)panels.data_ptr();
  uint16_t* out = (uint16_t*)dst.data_ptr();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t p = p0; p < p1; p++) {
      uint16_t* d = out + p * 16 * K;
      const uint8_t* s = src + p * 16 * K;
      __m512 sc[4];                                   // columns 4i .. 4i + 3, each scale x4
      for (int i = 0; i < 4; i++) {
        float v[16];
        for (int j = 0; j < 16; j++) v[j] = sp[p * 16 + 4 * i + j / 4];
        sc[i] = _mm512_loadu_ps(v);
      }
      for (int64_t g = 0; g < G; g++) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void*)(s + g * 64)), flip);
        const __m128i part[4] = {_mm512_extracti32x4_epi32(v, 0), _mm512_extracti32x4_epi32(v, 1),
                                 _mm512_extracti32x4_epi32(v, 2), _mm512_extracti32x4_epi32(v, 3)};
        for (int i = 0; i < 4; i++) {
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part[i])), sc[i]);
          const __m256i b = (__m256i)_mm512_cvtneps_pbh(f);
          const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
          uint16_t* r = d + 4 * i * K + 4 * g;
          _mm_storel_epi64((__m128i*)r, lo);
          _mm_storeh_pd((double*)(r + K), _mm_castsi128_pd(lo));
          _mm_storel_epi64((__m128i*)(r + 2 * K), hi);
          _mm_storeh_pd((double*)(r + 3 * K), _mm_castsi128_pd(hi));
        }
      }
    }
  });
}

#include "int4pack.h"

inline void check_x(const torch::Tensor& x, int64_t KB, const char* who) {
  KCHECK(x.device().is_cpu(), who, ": CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), who, ": x must be contiguous bf16 [..., K]");
  KCHECK(KB > 0 && KB % 16 == 0 && KB <= 16384 && x.size(-1) % KB == 0, who, ": K=", x.size(-1),
              " must be a multiple of the activation block ", KB, " (a multiple of 16, at most 16384: int32 sums)");
}

// qp: uint8 [N/16, K/4, 64] (q + 128); scales fp32 [N]; block: inputs per activation scale. Returns bf16 [..., N].
torch::Tensor int8_vnni_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                           int64_t block) {
  check_x(x, block, "int8_vnni_mm");
  KCHECK(qp.device().is_cpu() && scales.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(qp.dim() == 3 && qp.scalar_type() == at::kByte && qp.size(2) == 4 * PW && qp.is_contiguous(),
              "int8_vnni_mm: weight must be uint8 panels [N/16, K/4, 64]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), N = NPAN * PW;
  KCHECK(qp.size(1) * 4 == K, "x has K=", K, " but the weight has ", qp.size(1) * 4, " input features");
  KCHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "int8_vnni_mm: scales must be contiguous fp32 [N]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0) return y;
  ActQ a;
  quantize_act((const uint16_t*)x.data_ptr<at::BFloat16>(), M, K, block, a);
  const int64_t NB = K / block, ps = K * PW;
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  over_tiles<VMR8>(NPAN, M, [&](auto MRc, auto NPc, int64_t p0, int64_t m0) {
    const int64_t n0 = p0 * PW;
    micro_w8a8<decltype(MRc)::value, decltype(NPc)::value>(
        a.q.data() + m0 * K, K, a.d.data() + m0 * NB, a.s.data() + m0 * NB, NB, wbase + p0 * ps, ps, NB, block,
        sc + n0, bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
  });
  return y;
}

// qp: uint8 [N/16, K/8, 64]; sz: bf16 [N/16, K/gs, 2, 16] (scales, zeros); activations quantized per group.
torch::Tensor int4_vnni_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor sz, int64_t group_size,
                           c10::optional<torch::Tensor> bias) {
  check_x(x, group_size, "int4_vnni_mm");
  KCHECK(qp.device().is_cpu() && sz.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(qp.dim() == 3 && qp.scalar_type() == at::kByte && qp.size(2) == 4 * PW && qp.is_contiguous(),
              "int4_vnni_mm: weight must be uint8 panels [N/16, K/8, 64]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), N = NPAN * PW, G = K / group_size;
  KCHECK(qp.size(1) * 8 == K, "x has K=", K, " but the weight has ", qp.size(1) * 8, " input features");
  KCHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == NPAN &&
              sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == PW, "int4_vnni_mm: scales/zeros must be bf16 [N/16, K/gs, 2, 16]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0) return y;
  ActQ a;
  quantize_act((const uint16_t*)x.data_ptr<at::BFloat16>(), M, K, group_size, a);
  const int64_t ps = K * PW / 2, szps = G * 2 * PW;
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  const uint16_t* szb = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  over_tiles<VMR4>(NPAN, M, [&](auto MRc, auto NPc, int64_t p0, int64_t m0) {
    const int64_t n0 = p0 * PW;
    micro_w4a8<decltype(MRc)::value, decltype(NPc)::value>(
        a.q.data() + m0 * K, K, a.d.data() + m0 * G, a.s.data() + m0 * G, a.xs.data() + m0 * G, G,
        wbase + p0 * ps, ps, szb + p0 * szps, szps, G, group_size, bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
  });
  return y;
}

// The activation quantization the two kernels above apply, for tests: (xq int8 [M, K], d fp32 [M, K/KB]).
std::vector<torch::Tensor> quantize_activations(torch::Tensor x, int64_t block) {
  check_x(x, block, "quantize_activations");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  ActQ a;
  quantize_act((const uint16_t*)x.data_ptr<at::BFloat16>(), M, K, block, a);
  auto q = torch::from_blob(a.q.data(), {M, K}, torch::kInt8).clone();
  auto d = torch::from_blob(a.d.data(), {M, K / block}, torch::kFloat).clone();
  return {q, d};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_mm", &bf16_mm, "y[M,N] = x[M,K] @ W^T (+ bias), W in panel layout, bf16");
  m.def("rms_norm", &rms_norm, "Llama RMSNorm over the last dim, bf16, torch's rounding");
  m.def("rope_", &rope_, "rotate-half rotary embedding in place on the first n_rot heads, bf16, torch's rounding");
  m.def("decode_attn", &decode_attn, "one-token attention over a (strided) bf16 KV cache, fp32 softmax");
  m.def("decode_step", &decode_step, "rotary + KV-cache write + one-token attention from the fused qkv output");
  m.def("silu_mul", &silu_mul, "SwiGLU gate: silu(g) * u over h = (g, u), bf16");
  m.def("panels_to_f32_", &panels_to_f32_, "panel-layout rows (bf16 pairs or int8 quads) -> fp32 [rows, K]");
  m.def("int4_panels_to_bf16_", &int4_panels_to_bf16_, "int4 panel rows -> bf16 [rows, K] = (q - 8) * s + z");
  m.def("panels_to_bf16_", &panels_to_bf16_, "int8 panel rows -> bf16 [rows, K] = q * scale, rounded once");
  m.def("stripe_transpose_", &stripe_transpose_, "in place: stripes [R][G][E] -> [G][R][E] bytes (xor flip)");
  m.def("int4pack_to_panels_", &int4pack_to_panels_, "in place: torch int4pack bytes -> int4_vnni_mm panels");
  m.def("lut_mm", &lut_mm, "y = x @ (code[Q] * absmax)^T (+ bias), code-book weights decoded in registers");
  m.def("int8_vnni_mm", &int8_vnni_mm, "y = x @ ((Q-128)*s)^T (+ bias), x quantized to int8 per block (w8a8, VNNI)");
  m.def("int4_vnni_mm", &int4_vnni_mm, "y = x @ ((Q-8)*s+z)^T (+ bias), x quantized to int8 per group (w4a8, VNNI)");
  m.def("quantize_activations", &quantize_activations, "x bf16 -> (int8, per-block scales) as the VNNI kernels do");
}
