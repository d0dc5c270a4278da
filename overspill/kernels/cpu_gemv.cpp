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
//   * int8 weights (same layout, 1 byte each) are widened to bf16 in registers (exact: |q| <= 127) and the
//     per-column scale is applied once at the end (w8a16: activations are never quantized);
//   * more than 6 rows re-read the panel group from L2, not DRAM;
//   * every output element is computed by one thread in a fixed order: results are deterministic and do
//     not depend on the thread count.
//
// Requires AVX512F/BW/VL + AVX512_BF16 (checked in Python before this file is compiled).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int PW = 16;  // columns per panel (one zmm of fp32 outputs)
constexpr int MAXNP = 4;  // panels per micro-kernel call
constexpr int MAXMR = 6;  // activation rows per micro-kernel call

template <typename WT>
inline __m512bh load_w(const WT* p) {
  if constexpr (sizeof(WT) == 2) {
    return (__m512bh)_mm512_loadu_si512(p);
  } else {
    __m256i q = _mm256_loadu_si256((const __m256i*)p);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi: order kept
  }
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

// Optional bias as contiguous fp32 [N] (undefined tensor when absent).
inline torch::Tensor bias_f32(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  TORCH_CHECK(bias->numel() == N, "bias must have ", N, " elements");
  return bias->to(at::kFloat).contiguous();
}

// bf16 output [..., N] shaped like x [..., K]: callers need no reshape.
inline torch::Tensor out_like(const torch::Tensor& x, int64_t N) {
  auto size = x.sizes().vec();
  size.back() = N;
  return torch::empty(size, x.options());
}

template <typename WT>
torch::Tensor panel_mm(const torch::Tensor& x, const torch::Tensor& wp, const float* scales,
                       const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "CPU kernels need CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [..., K]");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == PW && wp.size(3) == 2 && wp.is_contiguous(),
              "weight must be in panel layout [N/16, K/2, 16, 2]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = wp.size(0), KP = wp.size(1), N = NPAN * PW;
  TORCH_CHECK(KP * 2 == K, "x has K=", K, " but the weight has ", KP * 2, " input features");
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
  TORCH_CHECK(wp.scalar_type() == at::kBFloat16, "bf16_mm: weight must be bf16");
  return panel_mm<uint16_t>(x, wp, nullptr, bias);
}

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(qp.scalar_type() == at::kChar, "int8_mm: weight must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qp.size(0) * PW,
              "int8_mm: scales must be contiguous fp32 [N]");
  return panel_mm<int8_t>(x, qp, scales.data_ptr<float>(), bias);
}

// ---- int4 (w4a16), group-wise asymmetric: w[n,k] = (q - 8) * s[g,n] + z[g,n], q in 0..15, g = k / gs ------
// Panel layout of the nibbles: bytes [N/16][K/4][32]; for input quad P (k = 4P..4P+3) and column c,
// byte 2c+e = q[16p+c][4P+e] | q[16p+c][4P+2+e] << 4 (e = 0, 1). Scales and zeros: bf16 [N/16][K/gs][2][16].
// One 32-byte load widens (cvtepu8_epi16, then and/shift + or: bf16 bits 0x4300|q = 128+q) into the two
// zmm of (k, k+1) bf16 pairs that vdpbf16ps wants, for 16 columns x 4 inputs.
// Per group: acc += (sum (q-8) x) * s + z * sum(x over the group).
constexpr int I4MR = 2;  // activation rows per call: 2 x MR x NP accumulators + 2 NP weights fit 32 registers

inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

template <int MR, int NP>
inline void micro_i4(const uint16_t* x, int64_t ldx, const float* xs, int64_t ldxs, const uint8_t* w, int64_t ps,
                     const uint16_t* sz, int64_t szps, int64_t KP, int64_t gp, const float* bias,
                     at::BFloat16* y, int64_t ldy) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NP; j++) acc[m][j] = _mm512_setzero_ps();
  const int64_t G = KP / gp;
  for (int64_t g = 0; g < G; g++) {
    __m512 ag[MR][NP];
#pragma GCC unroll 3
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++) ag[m][j] = _mm512_setzero_ps();
    for (int64_t P = g * gp / 2; P < (g + 1) * gp / 2; P++) {
      __m512bh w0[NP], w1[NP];
#pragma GCC unroll 4
      for (int j = 0; j < NP; j++) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + j * ps + P * 2 * PW)));
        // bf16 bits 0x4300 | q == 128 + q exactly (q < 128): the nibble becomes a bf16 with two bit ops;
        // the 136 * sum(x) this adds (128 + the zero point 8) is taken out per group below.
        w0[j] = (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(15), _mm512_set1_epi16(0x4300), 0xEA);
        w1[j] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi16(0x4300));
      }
#pragma GCC unroll 3
      for (int m = 0; m < MR; m++) {
        int32_t p0, p1;
        std::memcpy(&p0, x + m * ldx + 4 * P, 4);
        std::memcpy(&p1, x + m * ldx + 4 * P + 2, 4);
        __m512bh xb0 = (__m512bh)_mm512_set1_epi32(p0), xb1 = (__m512bh)_mm512_set1_epi32(p1);
#pragma GCC unroll 4
        for (int j = 0; j < NP; j++) ag[m][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ag[m][j], w0[j], xb0), w1[j], xb1);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NP; j++) {
      const uint16_t* pz = sz + j * szps + g * 2 * PW;   // [G][2][16]: scales then zeros
      __m512 sv = load_bf16x16(pz);
      __m512 zv = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), sv, load_bf16x16(pz + PW));   // z - 136 s
#pragma GCC unroll 3
      for (int m = 0; m < MR; m++)
        acc[m][j] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[m * ldxs + g]), _mm512_fmadd_ps(ag[m][j], sv, acc[m][j]));
    }
  }
  for (int j = 0; j < NP; j++) {
    __m512 b = bias ? _mm512_loadu_ps(bias + j * PW) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + j * PW), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b)));
  }
}

template <int NP>
inline void rows_i4(int64_t mr, const uint16_t* x, int64_t ldx, const float* xs, int64_t ldxs, const uint8_t* w,
                    int64_t ps, const uint16_t* sz, int64_t szps, int64_t KP, int64_t gp, const float* b,
                    at::BFloat16* y, int64_t ldy) {
  switch (mr) {
    case 2: micro_i4<2, NP>(x, ldx, xs, ldxs, w, ps, sz, szps, KP, gp, b, y, ldy); break;
    default: micro_i4<1, NP>(x, ldx, xs, ldxs, w, ps, sz, szps, KP, gp, b, y, ldy); break;
  }
}

// qp: uint8 [N/16, K/4, 32]; sz: bf16 [N/16, K/gs, 2, 16] (scales, zeros); returns bf16 [M, N].
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor sz, int64_t group_size,
                      c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && qp.device().is_cpu() && sz.device().is_cpu(), "CPU kernels need CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [..., K]");
  TORCH_CHECK(group_size > 0, "int4_mm: group_size must be positive");
  TORCH_CHECK(qp.dim() == 3 && qp.scalar_type() == at::kByte && qp.size(2) == 2 * PW && qp.is_contiguous(),
              "int4_mm: weight must be uint8 panels [N/16, K/4, 32]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), KP = qp.size(1) * 2, N = NPAN * PW;
  TORCH_CHECK(KP * 2 == K, "x has K=", K, " but the weight has ", KP * 2, " input features");
  TORCH_CHECK(group_size % 4 == 0 && K % group_size == 0, "int4_mm: K=", K, " is not a multiple of group_size=", group_size);
  const int64_t G = K / group_size, gp = group_size / 2;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == NPAN &&
              sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == PW, "int4_mm: scales/zeros must be bf16 [N/16, K/gs, 2, 16]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  std::vector<float> xsum(M * G);   // per-row, per-group sums of x (fp32 of the bf16 values) for the zero term
  for (int64_t i = 0; i < M * G; i++) {
    float a = 0.f;
    for (int64_t k = 0; k < group_size; k++) a += (float)c10::BFloat16(xp[i * group_size + k], c10::BFloat16::from_bits());
    xsum[i] = a;
  }
  const float* xs = xsum.data();
  auto y = out_like(x, N);
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  const uint16_t* szb = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t ps = KP * PW, szps = G * 2 * PW;
  const int64_t NG = (NPAN + MAXNP - 1) / MAXNP;
  at::parallel_for(0, NG, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t p0 = g * MAXNP, np = std::min<int64_t>(MAXNP, NPAN - p0), n0 = p0 * PW;
      const uint8_t* w = wbase + p0 * ps;
      const uint16_t* s = szb + p0 * szps;
      const float* b = bp ? bp + n0 : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += I4MR) {
        const int64_t mr = std::min<int64_t>(I4MR, M - m0);
        const uint16_t* xm = xp + m0 * K;
        const float* xsm = xs + m0 * G;
        at::BFloat16* ym = yp + m0 * N + n0;
        switch (np) {
          case 4: rows_i4<4>(mr, xm, K, xsm, G, w, ps, s, szps, KP, gp, b, ym, N); break;
          case 3: rows_i4<3>(mr, xm, K, xsm, G, w, ps, s, szps, KP, gp, b, ym, N); break;
          case 2: rows_i4<2>(mr, xm, K, xsm, G, w, ps, s, szps, KP, gp, b, ym, N); break;
          default: rows_i4<1>(mr, xm, K, xsm, G, w, ps, s, szps, KP, gp, b, ym, N); break;
        }
      }
    }
  });
  return y;
}


// ---- decode attention (one query token per sequence) -------------------------------------------------
// o[b, h] = softmax(q[b, h] . K[b, h/g, :S] * scale, masked by valid[b, :S]) @ V[b, h/g, :S], g = nh / nkv.
// K/V are read in place from the cache (any batch/head/time strides, unit stride along the head dim), once
// per KV group: torch's bf16 bmm copies a strided cache slice on every call (~0.3 ms per K or V per layer at
// batch 8 here). Scores and the softmax are fp32; the weighted sum of V accumulates in fp32.
inline __m512 bf16x16_to_f32(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

torch::Tensor decode_attn(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                          double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU kernels need CPU tensors");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kBFloat16, "q must be bf16 [B, nh, 1, hs]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "k, v must be bf16 [B, nkv, S, hs]");
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3), nkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == nkv && v.size(2) == S && k.size(3) == hs && v.size(3) == hs,
              "k, v shapes must match q");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "nh must be a positive multiple of nkv");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v must have unit stride along the head dim");
  const bool* vp = nullptr;
  torch::Tensor valid_c;
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->numel() == B * S, "valid must be bool [B, S]");
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
        for (int64_t t = 0; t < S; t++) {
          if (vp && !vp[b * S + t]) { s[t] = -INFINITY; continue; }
          __m512 a = _mm512_setzero_ps();
          for (int64_t d = 0; d < hs; d += 32) {
            const int64_t n = std::min<int64_t>(32, hs - d);
            const __mmask32 m = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1);
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(m, K + t * kt + d),
                                 (__m512bh)_mm512_maskz_loadu_epi16(m, Q + d));
          }
          s[t] = _mm512_reduce_add_ps(a) * sc;
          mx = std::max(mx, s[t]);
        }
        float den = 0.f;
        for (int64_t t = 0; t < S; t++) { s[t] = (s[t] == -INFINITY) ? 0.f : std::exp(s[t] - mx); den += s[t]; }
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
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU kernels need CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm: bf16 x and w");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, "rms_norm: empty feature dimension");
  TORCH_CHECK(w.numel() == C, "rms_norm: weight has ", w.numel(), " elements, x has ", C, " features");
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
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "CPU kernels need CPU tensors");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "rope_: x must be contiguous bf16 [B, T, H, hs]");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hs = x.size(3), d = cos.size(-1), h2 = d / 2;
  TORCH_CHECK(cos.numel() == B * T * d && sin.numel() == B * T * d && d <= hs && d % 2 == 0 && n_rot <= H,
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


// ---- dequantize into the bf16 panel layout (prefill-sized batches run the bf16 kernel on the result) --------
// One parallel pass at memory speed; the torch expressions it replaces took ~10x longer (measured: int4
// TinyLlama prefill of 128 tokens 2.3 s vs 0.64 s in bf16).
// int8: qp int8 [N/16, K/2, 16, 2], scales fp32 [N]  ->  out bf16 [N/16, K/2, 16, 2] = bf16(q * s) (rounded once).
void int8_dequant_(torch::Tensor out, torch::Tensor qp, torch::Tensor scales) {
  TORCH_CHECK(qp.scalar_type() == at::kChar && qp.is_contiguous() && qp.dim() == 4 && qp.size(2) == PW, "int8_dequant_: qp");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.numel() == qp.numel(), "int8_dequant_: out");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qp.size(0) * PW,
              "int8_dequant_: scales must be contiguous fp32 [N]");
  TORCH_CHECK(out.device().is_cpu() && qp.device().is_cpu() && scales.device().is_cpu(), "CPU kernels need CPU tensors");
  const int64_t NP = qp.size(0), E = qp.size(1) * 2 * PW;   // elements per panel
  const int8_t* q = qp.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  uint16_t* o = (uint16_t*)out.data_ptr<at::BFloat16>();
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      // per 32 elements (16 columns x 2): scale of column c at positions 2c, 2c+1
      const __m512 s16 = _mm512_loadu_ps(s + p * PW);
      const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
      const __m512i hi_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
      const __m512 slo = _mm512_permutexvar_ps(lo_idx, s16), shi = _mm512_permutexvar_ps(hi_idx, s16);
      const int8_t* qq = q + p * E;
      uint16_t* oo = o + p * E;
      for (int64_t e = 0; e < E; e += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(qq + e));
        __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), slo);
        __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), shi);
        _mm512_storeu_si512(oo + e, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  });
}

// int4: qp uint8 [N/16, K/4, 32], sz bf16 [N/16, K/gs, 2, 16] -> out bf16 [N/16, K/2, 16, 2] = bf16((q-8)*s + z).
void int4_dequant_(torch::Tensor out, torch::Tensor qp, torch::Tensor sz, int64_t group_size) {
  TORCH_CHECK(qp.scalar_type() == at::kByte && qp.is_contiguous() && qp.dim() == 3 && qp.size(2) == 2 * PW, "int4_dequant_: qp");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.numel() == qp.numel() * 2, "int4_dequant_: out");
  TORCH_CHECK(out.device().is_cpu() && qp.device().is_cpu() && sz.device().is_cpu(), "CPU kernels need CPU tensors");
  const int64_t NP = qp.size(0), KQ = qp.size(1), K = KQ * 4;
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && K % group_size == 0, "int4_dequant_: bad group_size ", group_size);
  const int64_t G = K / group_size, gq = group_size / 4;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == NP &&
              sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == PW, "int4_dequant_: scales/zeros must be bf16 [N/16, K/gs, 2, 16]");
  const uint8_t* q = qp.data_ptr<uint8_t>();
  const uint16_t* szp = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  uint16_t* o = (uint16_t*)out.data_ptr<at::BFloat16>();
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      for (int64_t g = 0; g < G; g++) {
        const uint16_t* pz = szp + (p * G + g) * 2 * PW;
        const __m512 s16 = load_bf16x16(pz), z16 = load_bf16x16(pz + PW);
        const __m512 slo = _mm512_permutexvar_ps(lo_idx, s16), shi = _mm512_permutexvar_ps(hi_idx, s16);
        const __m512 zlo = _mm512_permutexvar_ps(lo_idx, z16), zhi = _mm512_permutexvar_ps(hi_idx, z16);
        for (int64_t P = g * gq; P < (g + 1) * gq; P++) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(q + (p * KQ + P) * 2 * PW)));
          // quad P -> rows kp = 2P (low nibbles) and 2P+1 (high nibbles) of the bf16 panel, 32 elements each
          for (int h = 0; h < 2; h++) {
            const __m512i w = h ? _mm512_srli_epi16(v, 4) : _mm512_and_si512(v, _mm512_set1_epi16(15));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)));
            const __m512 a = _mm512_fmadd_ps(_mm512_sub_ps(lo, _mm512_set1_ps(8.f)), slo, zlo);
            const __m512 b = _mm512_fmadd_ps(_mm512_sub_ps(hi, _mm512_set1_ps(8.f)), shi, zhi);
            _mm512_storeu_si512(o + (p * KQ * 2 + 2 * P + h) * 2 * PW, (__m512i)_mm512_cvtne2ps_pbh(b, a));
          }
        }
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_mm", &bf16_mm, "y[M,N] = x[M,K] @ W^T (+ bias), W in panel layout, bf16");
  m.def("int8_mm", &int8_mm, "y[M,N] = (x[M,K] @ Q^T) * scales (+ bias), Q in panel layout, int8");
  m.def("int8_dequant_", &int8_dequant_, "int8 panels * scales -> bf16 panels (into out)");
  m.def("int4_dequant_", &int4_dequant_, "int4 panels -> bf16 panels (into out)");
  m.def("rms_norm", &rms_norm, "Llama RMSNorm over the last dim, bf16, torch's rounding");
  m.def("rope_", &rope_, "rotate-half rotary embedding in place on the first n_rot heads, bf16, torch's rounding");
  m.def("decode_attn", &decode_attn, "one-token attention over a (strided) bf16 KV cache, fp32 softmax");
  m.def("int4_mm", &int4_mm, "y[M,N] = x[M,K] @ ((Q-8)*s+z)^T (+ bias), Q int4 panels, group-wise s/z");
}
