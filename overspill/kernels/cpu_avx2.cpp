// overspill's bf16 matmul over the panel layout, for x86-64 CPUs with AVX2 + FMA but without AVX512-BF16 (for
// example AMD Zen 2-4 desktops and servers, Intel client CPUs): cpu_gemv.cpp's bf16_mm, same layout, same call.
//
// Why (measured on a 2-core AVX2 EPYC, benchmarks/bench_linear.py): without native bf16, torch's bf16 F.linear
// multiplies at ~0.012 TFLOP/s, so decode of a few rows crawls (8 rows: ~1 s per token for a 1.2B model) and one row
// reads the weight at ~0.75 of the memory bandwidth. bf16 -> fp32 is a 16-bit shift, so the weight can be widened
// in registers and multiplied with fp32 FMAs at the FMA units' rate while it streams from memory once.
//
//   * panels of 16 output columns [N/16][K/2][16][2]: a 64-byte line holds 16 columns x 2 inputs (k even, k odd);
//     in each 32-bit lane the low half is the even input's weight (shift left 16 -> fp32), the high half the odd
//     one's (mask the low half away -> fp32);
//   * x is widened to fp32 once per call (float32 x, training's activations, is used as it is, and the result is
//     then float32 too); each input is broadcast from there;
//   * MR rows (<= 4) x NP panels (MR = 1: 2 panels) of accumulators, acc = fma(w_even, x_even, acc) then
//     fma(w_odd, x_odd, acc): every output element is summed in the same order whatever MR and NP are, by one
//     thread: results do not depend on the batch's row count or the thread count;
//   * fp32 -> bf16 rounds to nearest even, NaN kept NaN (torch's conversion).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include "tensors.h"

namespace {

constexpr int PW = 16;    // columns per panel
constexpr int MAXMR = 4;  // activation rows per micro-kernel call

#include "stripes.h"

inline __m256i round_bf16(__m256 v) {
  // round to nearest even on the upper 16 bits; NaN -> quiet NaN (0x7fc0), as c10::BFloat16 does
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), nan);
  return _mm256_srli_epi32(r, 16);
}

// store 16 fp32 (two ymm) as 16 bf16
inline void store_bf16x16(at::BFloat16* y, __m256 lo, __m256 hi) {
  __m256i a = round_bf16(lo), b = round_bf16(hi);
  __m256i p = _mm256_packus_epi32(a, b);                // lanes: a0-3 b0-3 | a4-7 b4-7
  p = _mm256_permute4x64_epi64(p, 0xD8);                // a0-3 a4-7 | b0-3 b4-7
  _mm256_storeu_si256((__m256i*)y, p);
}

// 16 fp32 results to the output's dtype: bf16 (rounded) or fp32 (as they are: float32 activations, training's)
inline void store16(at::BFloat16* y, __m256 lo, __m256 hi) { store_bf16x16(y, lo, hi); }
inline void store16(float* y, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(y, lo);
  _mm256_storeu_ps(y + 8, hi);
}

// y[m, j*16 + c] for m < MR, j < NP; w: the group's first panel, panel stride ps elements; xf: fp32 rows, ldx.
template <int MR, int NP, typename Y>
inline void micro(const float* xf, int64_t ldx, const uint16_t* w, int64_t ps, int64_t KP, const float* bias,
                  Y* y, int64_t ldy) {
  __m256 acc[MR][NP][2];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NP; j++) acc[m][j][0] = acc[m][j][1] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
  for (int64_t kp = 0; kp < KP; kp++) {
    __m256 we[NP][2], wo[NP][2];
    for (int j = 0; j < NP; j++) {
      const uint16_t* p = w + j * ps + kp * 2 * PW;
      for (int h = 0; h < 2; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + h * PW));
        we[j][h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        wo[j][h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      }
    }
    for (int m = 0; m < MR; m++) {
      const __m256 xe = _mm256_broadcast_ss(xf + m * ldx + 2 * kp);
      const __m256 xo = _mm256_broadcast_ss(xf + m * ldx + 2 * kp + 1);
      for (int j = 0; j < NP; j++)
        for (int h = 0; h < 2; h++) acc[m][j][h] = _mm256_fmadd_ps(wo[j][h], xo, _mm256_fmadd_ps(we[j][h], xe, acc[m][j][h]));
    }
  }
  for (int j = 0; j < NP; j++) {
    __m256 b0 = bias ? _mm256_loadu_ps(bias + j * PW) : _mm256_setzero_ps();
    __m256 b1 = bias ? _mm256_loadu_ps(bias + j * PW + 8) : _mm256_setzero_ps();
    for (int m = 0; m < MR; m++)
      store16(y + m * ldy + j * PW, _mm256_add_ps(acc[m][j][0], b0), _mm256_add_ps(acc[m][j][1], b1));
  }
}

template <typename Y>
inline void rows(int64_t mr, int np, const float* xf, int64_t ldx, const uint16_t* w, int64_t ps, int64_t KP,
                 const float* b, Y* y, int64_t ldy) {
  if (mr == 1 && np == 2) return micro<1, 2>(xf, ldx, w, ps, KP, b, y, ldy);
  // one panel at a time (np == 2 with more rows: two calls)
  for (int j = 0; j < np; j++) {
    const uint16_t* wj = w + j * ps;
    const float* bj = b ? b + j * PW : nullptr;
    Y* yj = y + j * PW;
    switch (mr) {
      case 4: micro<4, 1>(xf, ldx, wj, ps, KP, bj, yj, ldy); break;
      case 3: micro<3, 1>(xf, ldx, wj, ps, KP, bj, yj, ldy); break;
      case 2: micro<2, 1>(xf, ldx, wj, ps, KP, bj, yj, ldy); break;
      default: micro<1, 1>(xf, ldx, wj, ps, KP, bj, yj, ldy); break;
    }
  }
}

// x: bf16, or fp32 (training's float32 activations, used as they are); y in x's dtype.
torch::Tensor bf16_mm(torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias) {
  KCHECK(x.device().is_cpu() && wp.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.is_contiguous(),
         "x must be contiguous bf16 or fp32 [..., K]");
  KCHECK(wp.scalar_type() == at::kBFloat16, "bf16_mm: weight must be bf16");
  KCHECK(wp.dim() == 4 && wp.size(2) == PW && wp.size(3) == 2 && wp.is_contiguous(),
              "weight must be in panel layout [N/16, K/2, 16, 2]");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = wp.size(0), KP = wp.size(1), N = NPAN * PW;
  KCHECK(KP * 2 == K, "x has K=", K, " but the weight has ", KP * 2, " input features");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0 || N == 0) return y;
  torch::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();   // exact: bf16 -> fp32 (fp32: no copy)
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wbase = (const uint16_t*)wp.data_ptr<at::BFloat16>();
  const int64_t ps = KP * 2 * PW;               // elements per panel
  const int64_t NG = (NPAN + 1) / 2;            // groups of 2 panels = 32 columns
  auto run = [&](auto* yp) {
    at::parallel_for(0, NG, 8, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; g++) {
        const int64_t p0 = g * 2, np = std::min<int64_t>(2, NPAN - p0), n0 = p0 * PW;
        for (int64_t m0 = 0; m0 < M; m0 += MAXMR) {
          const int64_t mr = std::min<int64_t>(MAXMR, M - m0);
          rows(mr, (int)np, xp + m0 * K, K, wbase + p0 * ps, ps, KP, bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
        }
      }
    });
  };
  if (x.scalar_type() == at::kFloat) run(y.data_ptr<float>());
  else run(y.data_ptr<at::BFloat16>());
  return y;
}

// -- the input gradient over bf16 panels: dx = g @ W (training's backward, float32) ------------------------------
// W [N, K] in panels [N/16][K/2][16][2]; g [M, N] fp32; dx [M, K] fp32. For one input pair kp the 64-byte line of
// panel p holds W[16p + c, 2kp + j] for c < 16, j < 2: widened to fp32 as four vectors over c (even and odd input,
// c < 8 and c >= 8), each multiplied by the 8 matching values of g's row and summed over the panels in 8 lanes, then
// across the lanes. Threads split the input pairs; a pair's column of lines (N/16 x 64 bytes) stays in L2 while
// GMR rows at a time go over it. Each dx element is summed in one fixed order whatever M and the thread count are.
// Against float32 slices of W (panels_to_f32_) and MKL's sgemm (~50 GFLOP/s at 32 rows on the 2-core AVX2 EPYC)
// it reads the bf16 bytes once, with no float32 copy: 59-79 against 15-66 GFLOP/s at 16-64 rows; above ~128 rows
// sgemm is faster (model/linear.py GRAD_KERNEL_MAX_ROWS).
constexpr int GMR = 4;   // rows of g per pass over a pair's lines: 8 accumulators + 4 weight vectors
constexpr int GKT = 4;   // input pairs whose lines a thread gathers at a time

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// an input gradient's dx [..., K] for g [..., N]: zeros when N == 0 (an empty sum), else to be written in full
inline torch::Tensor grad_out(const torch::Tensor& g, int64_t N, int64_t K) {
  auto size = g.sizes().vec();
  size.back() = K;
  return N == 0 ? torch::zeros(size, g.options()) : torch::empty(size, g.options());
}

template <int MR>
inline void micro_t(const float* g, int64_t ldg, const uint16_t* w, int64_t ps, int64_t NPAN, float* dx,
                    int64_t ldx) {
  __m256 ae[MR], ao[MR];
  for (int m = 0; m < MR; m++) ae[m] = ao[m] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
  for (int64_t p = 0; p < NPAN; p++) {
    const uint16_t* line = w + p * ps;
    const __m256i v0 = _mm256_loadu_si256((const __m256i*)line), v1 = _mm256_loadu_si256((const __m256i*)(line + PW));
    const __m256 we0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), wo0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    const __m256 we1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), wo1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
    for (int m = 0; m < MR; m++) {
      const float* gm = g + m * ldg + p * PW;
      const __m256 g0 = _mm256_loadu_ps(gm), g1 = _mm256_loadu_ps(gm + 8);
      ae[m] = _mm256_fmadd_ps(we1, g1, _mm256_fmadd_ps(we0, g0, ae[m]));
      ao[m] = _mm256_fmadd_ps(wo1, g1, _mm256_fmadd_ps(wo0, g0, ao[m]));
    }
  }
  for (int m = 0; m < MR; m++) {
    dx[m * ldx] = hsum8(ae[m]);
    dx[m * ldx + 1] = hsum8(ao[m]);
  }
}

torch::Tensor bf16_mm_t(torch::Tensor g, torch::Tensor wp) {
  KCHECK(g.device().is_cpu() && wp.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(g.dim() >= 1 && g.scalar_type() == at::kFloat && g.is_contiguous(), "bf16_mm_t: g must be contiguous fp32 [..., N]");
  KCHECK(wp.scalar_type() == at::kBFloat16 && wp.dim() == 4 && wp.size(2) == PW && wp.size(3) == 2 && wp.is_contiguous(),
         "bf16_mm_t: weight must be bf16 in panel layout [N/16, K/2, 16, 2]");
  const int64_t NPAN = wp.size(0), KP = wp.size(1), N = NPAN * PW, K = KP * 2;
  KCHECK(g.size(-1) == N, "bf16_mm_t: g has N=", g.size(-1), " but the weight has ", N, " output features");
  auto dx = grad_out(g, N, K);
  const int64_t M = N ? g.numel() / N : 0;
  if (M == 0 || K == 0) return dx;
  const float* gp = g.data_ptr<float>();
  const uint16_t* wbase = (const uint16_t*)wp.data_ptr<at::BFloat16>();
  float* dp = dx.data_ptr<float>();
  const int64_t ps = KP * 2 * PW;   // elements per panel
  // A pair's lines sit one panel apart (K * 32 bytes: a power of two for most models), so read in place they would
  // all fall in the same cache sets; each thread first copies GKT pairs' lines of every panel into one contiguous
  // buffer (N/16 x GKT x 64 bytes, in L2), then runs every row of g over it.
  const int64_t NT = (KP + GKT - 1) / GKT;
  at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> buf(NPAN * GKT * 2 * PW);
    for (int64_t t = t0; t < t1; t++) {
      const int64_t kp0 = t * GKT, nk = std::min<int64_t>(GKT, KP - kp0);
      for (int64_t p = 0; p < NPAN; p++)
        std::memcpy(buf.data() + p * GKT * 2 * PW, wbase + p * ps + kp0 * 2 * PW, nk * 2 * PW * sizeof(uint16_t));
      for (int64_t m0 = 0; m0 < M; m0 += GMR) {
        const float* gm = gp + m0 * N;
        for (int64_t kk = 0; kk < nk; kk++) {
          const uint16_t* w = buf.data() + kk * 2 * PW;
          float* dm = dp + m0 * K + 2 * (kp0 + kk);
          switch (std::min<int64_t>(GMR, M - m0)) {
            case 4: micro_t<4>(gm, N, w, GKT * 2 * PW, NPAN, dm, K); break;
            case 3: micro_t<3>(gm, N, w, GKT * 2 * PW, NPAN, dm, K); break;
            case 2: micro_t<2>(gm, N, w, GKT * 2 * PW, NPAN, dm, K); break;
            default: micro_t<1>(gm, N, w, GKT * 2 * PW, NPAN, dm, K); break;
          }
        }
      }
    }
  });
  return dx;
}

// -- int8 weights, exact activations (w8a16) ------------------------------------------------------------------
// Panels of pack_int8: [N/16][K/4][64] bytes, byte 4c + j = q[16p + c, 4P + j] + 128. Half a panel (8 columns) is
// one 32-byte load: 8 lanes of 4 inputs. XOR 0x80 gives the signed q bytes; byte j of every lane is moved to the top
// and shifted back arithmetically (sign-extended to int32), converted to fp32 (exact) and FMAed with x[4P + j].
// y[m, n] = s[n] * sum_k q[n, k] x[m, k] (+ bias): x is never rounded to int8 (unlike the AVX-512 w8a8 kernel),
// so this is torch's _weight_int8pack_mm's arithmetic with fp32 sums, read from half the bytes of bf16.
template <int MR, typename Y>
inline void micro_i8(const float* xf, int64_t ldx, const uint8_t* w, int64_t KQ, const float* scale,
                     const float* bias, Y* y, int64_t ldy) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi32((int)0x80808080u);
  for (int64_t kq = 0; kq < KQ; kq++) {
    const uint8_t* p = w + kq * 64;
    // both halves of the line, one widened input at a time: each x value is broadcast once for its two FMAs
    // (8 accumulators + 5 live registers: nothing spills), each accumulator summed over k in ascending order
    const __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip);
    const __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 32)), flip);
    for (int j = 0; j < 4; j++) {
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(j == 3 ? v0 : _mm256_slli_epi32(v0, 24 - 8 * j), 24));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(j == 3 ? v1 : _mm256_slli_epi32(v1, 24 - 8 * j), 24));
      for (int m = 0; m < MR; m++) {
        const __m256 xb = _mm256_broadcast_ss(xf + m * ldx + 4 * kq + j);
        acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
      }
    }
  }
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int m = 0; m < MR; m++)
    store16(y + m * ldy, _mm256_fmadd_ps(acc[m][0], s0, b0), _mm256_fmadd_ps(acc[m][1], s1, b1));
}

// x: bf16, or fp32 (used as it is); y in x's dtype.
torch::Tensor int8_w8a16_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  KCHECK(x.device().is_cpu() && qp.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.is_contiguous(),
         "x must be contiguous bf16 or fp32 [..., K]");
  KCHECK(qp.scalar_type() == at::kByte && qp.dim() == 3 && qp.size(2) == 4 * PW && qp.is_contiguous(),
              "weight must be int8 panels [N/16, K/4, 64] (pack_int8)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), KQ = qp.size(1), N = NPAN * PW;
  KCHECK(KQ * 4 == K, "x has K=", K, " but the weight has ", KQ * 4, " input features");
  KCHECK(scales.numel() == N, "scales must have ", N, " elements");
  torch::Tensor sf = scales.to(at::kFloat).contiguous(), bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0 || N == 0) return y;
  torch::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float* sp = sf.data_ptr<float>();
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  auto run = [&](auto* yp) {
    at::parallel_for(0, NPAN, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; p++) {
        const uint8_t* w = wbase + p * KQ * 64;
        const int64_t n0 = p * PW;
        for (int64_t m0 = 0; m0 < M; m0 += MAXMR) {
          const int64_t mr = std::min<int64_t>(MAXMR, M - m0);
          const float* xm = xp + m0 * K;
          auto* ym = yp + m0 * N + n0;
          const float* b = bp ? bp + n0 : nullptr;
          switch (mr) {
            case 4: micro_i8<4>(xm, K, w, KQ, sp + n0, b, ym, N); break;
            case 3: micro_i8<3>(xm, K, w, KQ, sp + n0, b, ym, N); break;
            case 2: micro_i8<2>(xm, K, w, KQ, sp + n0, b, ym, N); break;
            default: micro_i8<1>(xm, K, w, KQ, sp + n0, b, ym, N); break;
          }
        }
      }
    });
  };
  if (x.scalar_type() == at::kFloat) run(y.data_ptr<float>());
  else run(y.data_ptr<at::BFloat16>());
  return y;
}

// -- the input gradient over int8 panels: dx = g @ (Q * s) (training's backward, float32) -----------------------
// Widening int8 costs three instructions a vector (bf16: one), too many to repeat for every row of g as bf16_mm_t
// does; so each thread widens a few input quads of every panel once, times the columns' scales, into a float32
// buffer [NPAN][IKT][2 halves][4 inputs][8 columns] (N x IKT x 16 bytes, in L2), and every row of g then runs over
// it with plain FMAs: dx[m, 4q + j] = sum over panels and halves of (q * s)[8 columns, j] . g[m, those 8 columns],
// summed in 8 lanes, then across them. The order is fixed: results do not depend on M or the thread count.
constexpr int IMR = 3;   // rows of g per pass: 8 accumulators + 4 weight vectors + 2 of g
constexpr int IKT = 2;   // input quads a thread widens at a time

template <int MR>
inline void micro_i8t(const float* g, int64_t ldg, const float* wb, int64_t ws, int64_t NPAN, float* dx, int64_t ldx) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < NPAN; p++) {
    for (int h = 0; h < 2; h++) {
      // MR rows of g in registers, one weight vector at a time: 4 MR accumulators + MR + 1 registers (no spills)
      const float* w = wb + p * ws + h * 32;
      __m256 gv[MR];
      for (int m = 0; m < MR; m++) gv[m] = _mm256_loadu_ps(g + m * ldg + p * PW + h * 8);
      for (int j = 0; j < 4; j++) {
        const __m256 wj = _mm256_loadu_ps(w + 8 * j);
        for (int m = 0; m < MR; m++) acc[m][j] = _mm256_fmadd_ps(wj, gv[m], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < 4; j++) dx[m * ldx + j] = hsum8(acc[m][j]);
}

torch::Tensor int8_mm_t(torch::Tensor g, torch::Tensor qp, torch::Tensor scales) {
  KCHECK(g.device().is_cpu() && qp.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(g.dim() >= 1 && g.scalar_type() == at::kFloat && g.is_contiguous(), "int8_mm_t: g must be contiguous fp32 [..., N]");
  KCHECK(qp.scalar_type() == at::kByte && qp.dim() == 3 && qp.size(2) == 4 * PW && qp.is_contiguous(),
         "int8_mm_t: weight must be int8 panels [N/16, K/4, 64] (pack_int8)");
  const int64_t NPAN = qp.size(0), KQ = qp.size(1), N = NPAN * PW, K = KQ * 4;
  KCHECK(g.size(-1) == N, "int8_mm_t: g has N=", g.size(-1), " but the weight has ", N, " output features");
  KCHECK(scales.numel() == N, "int8_mm_t: scales must have ", N, " elements, got ", scales.numel());
  auto dx = grad_out(g, N, K);
  const int64_t M = N ? g.numel() / N : 0;
  if (M == 0 || K == 0) return dx;
  torch::Tensor sf = scales.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const float* sp = sf.data_ptr<float>();
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  float* dp = dx.data_ptr<float>();
  const int64_t NT = (KQ + IKT - 1) / IKT;
  at::parallel_for(0, NT, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(NPAN * IKT * 64);
    const __m256i flip = _mm256_set1_epi32((int)0x80808080u);
    for (int64_t t = t0; t < t1; t++) {
      const int64_t kq0 = t * IKT, nk = std::min<int64_t>(IKT, KQ - kq0);
      for (int64_t kk = 0; kk < nk; kk++) {
        for (int64_t p = 0; p < NPAN; p++) {
          const uint8_t* line = wbase + (p * KQ + kq0 + kk) * 64;
          float* b = buf.data() + (kk * NPAN + p) * 64;
          for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(line + 32 * h)), flip);
            const __m256 s = _mm256_loadu_ps(sp + p * PW + 8 * h);
            _mm256_storeu_ps(b + 32 * h, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24))));
            _mm256_storeu_ps(b + 32 * h + 8, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24))));
            _mm256_storeu_ps(b + 32 * h + 16, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24))));
            _mm256_storeu_ps(b + 32 * h + 24, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24))));
          }
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += IMR) {
        const float* gm = gp + m0 * N;
        for (int64_t kk = 0; kk < nk; kk++) {
          const float* wb = buf.data() + kk * NPAN * 64;
          float* dm = dp + m0 * K + 4 * (kq0 + kk);
          switch (std::min<int64_t>(IMR, M - m0)) {
            case 3: micro_i8t<3>(gm, N, wb, 64, NPAN, dm, K); break;
            case 2: micro_i8t<2>(gm, N, wb, 64, NPAN, dm, K); break;
            default: micro_i8t<1>(gm, N, wb, 64, NPAN, dm, K); break;
          }
        }
      }
    }
  });
  return dx;
}

// panels_to_f32_ (stripes.h) with int8 panels widened 32 bytes at a time: 8 bytes = 2 columns x 4 inputs ->
// cvtepi8_epi32 -> fp32 -> times the two columns' scales -> 16 bytes to each column's row (the portable loop moves a
// byte at a time: 2.5x slower). bf16 panels take the portable loop, which already runs at ~7 GB/s.
void panels_to_f32_avx2(torch::Tensor panels, torch::Tensor dst, int64_t kind, c10::optional<torch::Tensor> scales) {
  if (kind != 1) return panels_to_f32_(panels, dst, kind, scales);
  KCHECK(panels.device().is_cpu() && panels.is_contiguous() && dst.device().is_cpu() && dst.is_contiguous() &&
         dst.scalar_type() == at::kFloat && dst.dim() == 2, "panels_to_f32_: contiguous CPU panels and fp32 [rows, K]");
  const int64_t rows = dst.size(0), K = dst.size(1);
  KCHECK(rows % 16 == 0 && K % 4 == 0 && panels.element_size() * panels.numel() == rows * K,
         "panels_to_f32_: panels hold ", panels.element_size() * panels.numel(), " weights, dst wants ", rows * K);
  KCHECK(scales.has_value() && scales->numel() == rows, "panels_to_f32_: int8 panels need ", rows, " scales");
  torch::Tensor sf = scales->to(at::kFloat).contiguous();
  const float* sp = sf.data_ptr<float>();
  const int64_t P = rows / 16, G = K / 4;
  const uint8_t* src = (const uint8_t*)panels.data_ptr();
  float* out = dst.data_ptr<float>();
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      float* d = out + p * 16 * K;
      const uint8_t* s = src + p * 16 * K;
      __m256 sc[8];                                   // [s_2i x4 | s_2i+1 x4]
      for (int i = 0; i < 8; i++)
        sc[i] = _mm256_setr_ps(sp[p * 16 + 2 * i], sp[p * 16 + 2 * i], sp[p * 16 + 2 * i], sp[p * 16 + 2 * i],
                               sp[p * 16 + 2 * i + 1], sp[p * 16 + 2 * i + 1], sp[p * 16 + 2 * i + 1], sp[p * 16 + 2 * i + 1]);
      for (int64_t g = 0; g < G; g++) {
        for (int h = 0; h < 2; h++) {                 // columns 8h .. 8h + 7
          const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(s + g * 64 + 32 * h)), flip);
          const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
          const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
          for (int i = 0; i < 4; i++) {               // columns 8h + 2i, 8h + 2i + 1
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[i])), sc[4 * h + i]);
            const int64_t c = 8 * h + 2 * i;
            _mm_storeu_ps(d + c * K + 4 * g, _mm256_castps256_ps128(f));
            _mm_storeu_ps(d + (c + 1) * K + 4 * g, _mm256_extractf128_ps(f, 1));
          }
        }
      }
    }
  });
}

// -- int8 weights, int8 activations (w8a8): the AVX-512 int8_vnni_mm's arithmetic on AVX2 -----------------------
// Activations are quantized per (row, block of KB inputs) exactly as cpu_gemv.cpp's quantize_act does (d = max|x| /
// 127, xq = round-half-even(x * 127 / max|x|)). AVX2 has no vpdpbusd; vpmaddubsw multiplies u8 x s8 pairs into
// saturating int16, so the signed weight goes in as |q| and its sign moves onto the activation (vpsignb):
// |q0| sign(q0) x0 + |q1| sign(q1) x1 <= 2 * 127 * 127 fits int16; vpmaddwd by ones then sums the two pairs into the
// column's int32 lane. Each block's integer sum is sum q * xq, the same integer vpdpbusd's biased sum gives after its
// correction, and the fp32 steps (acc += float(sum) * d per block in order, then acc * s + bias, one rounding to
// bf16) are the AVX-512 kernel's: the two builds give the same results.
// Integer products are 2x denser than fp32 FMAs over widened weights (measured here: 27 against 13-17 GMAC/s a
// core), which is what a 16-row decode step and a prefill are bound by on these CPUs.
constexpr int AMR = 3;     // activation rows per w8a8 micro-kernel (2 x AMR int32 + 2 x AMR fp32 accumulators)
constexpr int AROWS = 48;  // rows per pass over a thread's panels: their int8 activations stay in L2

struct ActQ8 {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K / KB]
  std::vector<int32_t> s;  // [M, K / KB] sums of q, and
  std::vector<float> xs;   // sums of x (fp32 of the bf16 values): int4's zero points (with_sums only)
};

// The integer kernels' loop: panels in parallel (4 at a time), rows in passes of AROWS over a thread's panels, AMR rows
// per micro-kernel call: f(std::integral_constant<int, rows>, panel, first row).
template <typename F>
inline void over_row_passes(int64_t NPAN, int64_t M, F f) {
  at::parallel_for(0, NPAN, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += AROWS) {          // a pass of rows over this thread's panels
      const int64_t r1 = std::min<int64_t>(M, r0 + AROWS);
      for (int64_t p = p0; p < p1; p++)
        for (int64_t m0 = r0; m0 < r1; m0 += AMR)
          switch (std::min<int64_t>(AMR, r1 - m0)) {
            case 3: f(std::integral_constant<int, 3>(), p, m0); break;
            case 2: f(std::integral_constant<int, 2>(), p, m0); break;
            default: f(std::integral_constant<int, 1>(), p, m0); break;
          }
    }
  });
}

inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline void quantize_act8(const uint16_t* x, int64_t M, int64_t K, int64_t KB, ActQ8& a, bool with_sums = false) {
  const int64_t NB = K / KB, n = M * NB;
  a.q.resize(M * K);
  a.d.resize(n);
  if (with_sums) {
    a.s.resize(n);
    a.xs.resize(n);
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {          // block i = row i / NB, block i % NB: contiguous in x
      const uint16_t* xb = x + i * KB;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = 0; k < KB; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, load_bf16x8(xb + k)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float amax = _mm_cvtss_f32(m4);
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      int8_t* qb = a.q.data() + i * KB;
      for (int64_t k = 0; k < KB; k += 32) {       // KB is a multiple of 16: 32 at a time, then a 16 tail
        if (k + 32 <= KB) {
          const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(xb + k), inv));   // MXCSR: nearest even
          const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(xb + k + 8), inv));
          const __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(xb + k + 16), inv));
          const __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(xb + k + 24), inv));
          const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
          _mm256_storeu_si256((__m256i*)(qb + k), _mm256_permutevar8x32_epi32(b, order));
        } else {
          const float f = _mm256_cvtss_f32(inv);
          for (int64_t j = k; j < KB; j++) {
            const uint32_t u = (uint32_t)xb[j] << 16;
            float v;
            std::memcpy(&v, &u, 4);
            qb[j] = (int8_t)_mm_cvtss_si32(_mm_set_ss(v * f));    // the same product, rounded to nearest even
          }
        }
      }
      a.d[i] = amax / 127.f;
      if (with_sums) {
        // sum of x in the AVX-512 build's order: 16 lanes over k (two halves here), then _mm512_reduce_add_ps's tree
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t k = 0; k < KB; k += 16) {
          lo = _mm256_add_ps(lo, load_bf16x8(xb + k));
          hi = _mm256_add_ps(hi, load_bf16x8(xb + k + 8));
        }
        const __m256 t3 = _mm256_add_ps(hi, lo);
        const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
        a.xs[i] = _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
        int32_t qsum = 0;
        for (int64_t k = 0; k < KB; k++) qsum += qb[k];
        a.s[i] = qsum;
      }
    }
  });
}

template <int MR>
inline void micro_w8a8(const int8_t* xq, int64_t ldx, const float* d, int64_t ldb, const uint8_t* w, int64_t NB,
                       int64_t KB, const float* scale, const float* bias, at::BFloat16* y, int64_t ldy) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi32((int)0x80808080u), ones = _mm256_set1_epi16(1);
  const int64_t QB = KB / 4;   // input quads per block
  for (int64_t b = 0; b < NB; b++) {
    __m256i ia[MR][2];
    for (int m = 0; m < MR; m++) ia[m][0] = ia[m][1] = _mm256_setzero_si256();
    for (int64_t P = b * QB; P < (b + 1) * QB; P++) {
      const uint8_t* p = w + P * 64;
      const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip);
      const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 32)), flip);
      const __m256i a0 = _mm256_abs_epi8(q0), a1 = _mm256_abs_epi8(q1);
      for (int m = 0; m < MR; m++) {
        int32_t quad;
        std::memcpy(&quad, xq + m * ldx + 4 * P, 4);
        const __m256i xb = _mm256_set1_epi32(quad);
        ia[m][0] = _mm256_add_epi32(ia[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, q0)), ones));
        ia[m][1] = _mm256_add_epi32(ia[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, q1)), ones));
      }
    }
    for (int m = 0; m < MR; m++) {
      const __m256 dv = _mm256_set1_ps(d[m * ldb + b]);
      acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][0]), dv, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][1]), dv, acc[m][1]);
    }
  }
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int m = 0; m < MR; m++)
    store_bf16x16(y + m * ldy, _mm256_fmadd_ps(acc[m][0], s0, b0), _mm256_fmadd_ps(acc[m][1], s1, b1));
}

// qp: uint8 panels [N/16, K/4, 64] (q + 128, pack_int8); scales fp32 [N]; block: inputs per activation scale.
torch::Tensor int8_w8a8_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                           int64_t block) {
  KCHECK(x.device().is_cpu() && qp.device().is_cpu() && scales.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [..., K]");
  KCHECK(qp.scalar_type() == at::kByte && qp.dim() == 3 && qp.size(2) == 4 * PW && qp.is_contiguous(),
         "weight must be int8 panels [N/16, K/4, 64] (pack_int8)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), N = NPAN * PW;
  KCHECK(block > 0 && block % 16 == 0 && block <= 16384 && K % block == 0, "int8_w8a8_mm: K=", K,
         " must be a multiple of the activation block ", block, " (a multiple of 16, at most 16384: int32 sums)");
  KCHECK(qp.size(1) * 4 == K, "x has K=", K, " but the weight has ", qp.size(1) * 4, " input features");
  KCHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
         "int8_w8a8_mm: scales must be contiguous fp32 [", N, "]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0 || N == 0) return y;
  ActQ8 a;
  quantize_act8((const uint16_t*)x.data_ptr<at::BFloat16>(), M, K, block, a);
  const int64_t NB = K / block, ps = K * PW;   // bytes per panel
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  over_row_passes(NPAN, M, [&](auto MR, int64_t p, int64_t m0) {
    const int64_t n0 = p * PW;
    micro_w8a8<decltype(MR)::value>(a.q.data() + m0 * K, K, a.d.data() + m0 * NB, NB, wbase + p * ps, NB, block,
                                    sc + n0, bp ? bp + n0 : nullptr, yp + m0 * N + n0, N);
  });
  return y;
}

// -- int4 weights, int8 activations (w4a8): the AVX-512 int4_vnni_mm's arithmetic on AVX2 -----------------------
// Panels of pack_int4 [N/16][K/8][64] (byte 4c + j = q[16p + c, 8o + j] | q[16p + c, 8o + 4 + j] << 4, q in 0..15),
// scales and zeros bf16 [N/16][K/gs][2][16]. Activations are quantized per (row, group of gs inputs) as quantize_act8
// does, with the sums of xq and of x. The nibbles are unsigned, so vpmaddubsw takes them as they are (15 x 127 x 2
// per int16 pair, and the low and high nibbles' pairs added in int16: at most 7620); vpmaddwd by ones sums each
// column's lane into int32. Per group: acc += (float(sum q xq - 8 sum xq)) * (s * d) then + z * sum x, the AVX-512
// kernel's fp32 steps in its order, one rounding to bf16 at the end. torch's int4pack kernel, which AVX2 machines
// ran before, decoded the 20B shape at 1.52 s/token (3.5x its memory bound; benchmarks/RESULTS.md).
template <int MR>
inline void micro_w4a8(const int8_t* xq, int64_t ldx, const float* d, const int32_t* qs, const float* xs, int64_t ldb,
                       const uint8_t* w, int64_t G, int64_t gs, const uint16_t* sz, const float* bias, at::BFloat16* y,
                       int64_t ldy) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const int64_t OG = gs / 8;   // input octets per group
  for (int64_t g = 0; g < G; g++) {
    __m256i ia[MR][2];
    for (int m = 0; m < MR; m++) ia[m][0] = ia[m][1] = _mm256_setzero_si256();
    for (int64_t O = g * OG; O < (g + 1) * OG; O++) {
      const uint8_t* p = w + O * 64;
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)p), v1 = _mm256_loadu_si256((const __m256i*)(p + 32));
      const __m256i l0 = _mm256_and_si256(v0, lo4), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo4);
      const __m256i l1 = _mm256_and_si256(v1, lo4), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo4);
      for (int m = 0; m < MR; m++) {
        int32_t q0, q1;
        std::memcpy(&q0, xq + m * ldx + 8 * O, 4);
        std::memcpy(&q1, xq + m * ldx + 8 * O + 4, 4);
        const __m256i x0 = _mm256_set1_epi32(q0), x1 = _mm256_set1_epi32(q1);
        ia[m][0] = _mm256_add_epi32(ia[m][0], _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(l0, x0), _mm256_maddubs_epi16(h0, x1)), ones));
        ia[m][1] = _mm256_add_epi32(ia[m][1], _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(l1, x0), _mm256_maddubs_epi16(h1, x1)), ones));
      }
    }
    const uint16_t* pz = sz + g * 2 * PW;   // [2][16]: scales then zeros
    const __m256 s0 = load_bf16x8(pz), s1 = load_bf16x8(pz + 8), z0 = load_bf16x8(pz + PW), z1 = load_bf16x8(pz + PW + 8);
    for (int m = 0; m < MR; m++) {
      const int64_t i = m * ldb + g;
      const __m256i c = _mm256_set1_epi32(8 * qs[i]);
      const __m256 dv = _mm256_set1_ps(d[i]), xv = _mm256_set1_ps(xs[i]);
      acc[m][0] = _mm256_fmadd_ps(z0, xv, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ia[m][0], c)),
                                                          _mm256_mul_ps(s0, dv), acc[m][0]));
      acc[m][1] = _mm256_fmadd_ps(z1, xv, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ia[m][1], c)),
                                                          _mm256_mul_ps(s1, dv), acc[m][1]));
    }
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int m = 0; m < MR; m++)
    store_bf16x16(y + m * ldy, _mm256_add_ps(acc[m][0], b0), _mm256_add_ps(acc[m][1], b1));
}

// qp: uint8 [N/16, K/8, 64]; sz: bf16 [N/16, K/gs, 2, 16] (scales, zeros); x bf16, quantized per group. bf16 [..., N].
torch::Tensor int4_w4a8_mm(torch::Tensor x, torch::Tensor qp, torch::Tensor sz, int64_t group_size,
                           c10::optional<torch::Tensor> bias) {
  KCHECK(x.device().is_cpu() && qp.device().is_cpu() && sz.device().is_cpu(), "CPU kernels need CPU tensors");
  KCHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16 [..., K]");
  KCHECK(group_size > 0 && group_size % 16 == 0 && group_size <= 16384 && x.size(-1) % group_size == 0,
         "int4_w4a8_mm: K=", x.size(-1), " must be a multiple of the group size ", group_size,
         " (a multiple of 16, at most 16384: int32 sums)");
  KCHECK(qp.dim() == 3 && qp.scalar_type() == at::kByte && qp.size(2) == 4 * PW && qp.is_contiguous(),
         "int4_w4a8_mm: weight must be uint8 panels [N/16, K/8, 64] (pack_int4)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, NPAN = qp.size(0), N = NPAN * PW, G = K / group_size;
  KCHECK(qp.size(1) * 8 == K, "x has K=", K, " but the weight has ", qp.size(1) * 8, " input features");
  KCHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == NPAN &&
         sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == PW,
         "int4_w4a8_mm: scales/zeros must be bf16 [N/16, K/gs, 2, 16]");
  torch::Tensor bias_f = bias_f32(bias, N);
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto y = out_like(x, N);
  if (M == 0 || N == 0) return y;
  ActQ8 a;
  quantize_act8((const uint16_t*)x.data_ptr<at::BFloat16>(), M, K, group_size, a, true);
  const int64_t ps = K * PW / 2, szps = G * 2 * PW;
  const uint8_t* wbase = qp.data_ptr<uint8_t>();
  const uint16_t* szb = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  over_row_passes(NPAN, M, [&](auto MR, int64_t p, int64_t m0) {
    const int64_t n0 = p * PW, o = m0 * G;
    micro_w4a8<decltype(MR)::value>(a.q.data() + m0 * K, K, a.d.data() + o, a.s.data() + o, a.xs.data() + o, G,
                                    wbase + p * ps, G, group_size, szb + p * szps, bp ? bp + n0 : nullptr,
                                    yp + m0 * N + n0, N);
  });
  return y;
}

#include "int4pack.h"

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_mm", &bf16_mm, "y[M,N] = x[M,K] @ W^T (+ bias), W in panel layout, bf16 (AVX2 + FMA)");
  m.def("bf16_mm_t", &bf16_mm_t, "dx[M,K] = g[M,N] @ W, W bf16 in panel layout, g and dx fp32 (AVX2 + FMA)");
  m.def("panels_to_f32_", &panels_to_f32_avx2, "panel-layout rows (bf16 pairs or int8 quads) -> fp32 [rows, K]");
  m.def("stripe_transpose_", &stripe_transpose_, "in place: stripes [R][G][E] -> [G][R][E] bytes (xor flip)");
  m.def("int8_w8a8_mm", &int8_w8a8_mm, "y = x @ ((Q-128)*s)^T (+ bias), x quantized to int8 per block (w8a8, AVX2; "
        "int8_vnni_mm's arithmetic)");
  m.def("int4_w4a8_mm", &int4_w4a8_mm, "y = x @ ((Q-8)*s+z)^T (+ bias), x quantized to int8 per group (w4a8, AVX2; "
        "int4_vnni_mm's arithmetic)");
  m.def("int4pack_to_panels_", &int4pack_to_panels_, "in place: torch int4pack bytes -> int4 panels (pack_int4)");
  m.def("int8_mm_t", &int8_mm_t, "dx[M,K] = g[M,N] @ (Q * s), Q in pack_int8 panels, g and dx fp32 (AVX2 + FMA)");
  m.attr("F32_ACTIVATIONS") = true;   // bf16_mm and int8_w8a16_mm take fp32 x too (y in fp32)
  m.def("int8_w8a16_mm", &int8_w8a16_mm, "y = x @ ((Q-128)*s)^T (+ bias) over pack_int8 panels, x exact (AVX2 + FMA)");
}
