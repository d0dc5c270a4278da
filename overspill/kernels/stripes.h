// Shared by cpu_gemv.cpp (AVX-512) and cpu_avx2.cpp: plain C++, no ISA-specific code. Included inside their
// anonymous namespace, after <torch/extension.h>, <ATen/Parallel.h>, <cstring> and <vector>.
#pragma once

// In-place re-layout of weights in a streaming staging buffer: buf [S, R * G * E] bytes, each stripe [R][G][E]
// becomes [G][R][E] (optionally XOR-ing every byte with `flip`). Stripes in parallel, one stripe-sized scratch per
// thread: the conversion runs at memory speed in the prefetch thread instead of ~3 GB/s of torch copies.
template <typename T>
inline void stripes_of(uint8_t* base, int64_t S, int64_t R, int64_t G, T f) {
  // element-sized moves (T = 4 bytes for the VNNI panels, 2 for bf16-style pairs): ~4x the byte loop's rate
  const int64_t SB = R * G * (int64_t)sizeof(T);
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<T> tmp(R * G);
    for (int64_t st = s0; st < s1; st++) {
      T* p = reinterpret_cast<T*>(base + st * SB);
      std::memcpy(tmp.data(), p, SB);
      // tiles of TG elements of every row: each row's 64-byte line is used whole once it is loaded (the R rows sit
      // G elements apart, often a power of two, so they share cache sets and would evict one another between uses)
      constexpr int64_t TG = 64 / (int64_t)sizeof(T);
      for (int64_t g0 = 0; g0 < G; g0 += TG) {
        const int64_t ng = std::min<int64_t>(TG, G - g0);
        for (int64_t r = 0; r < R; r++) {
          const T* src = tmp.data() + r * G + g0;
          T* dst = p + g0 * R + r;
          for (int64_t gg = 0; gg < ng; gg++) dst[gg * R] = src[gg] ^ f;
        }
      }
    }
  });
}

void stripe_transpose_(torch::Tensor buf, int64_t R, int64_t G, int64_t E, int64_t flip) {
  KCHECK(buf.device().is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kByte, "stripe_transpose_: uint8 CPU buffer");
  const int64_t SB = R * G * E;
  KCHECK(SB > 0 && buf.numel() % SB == 0, "stripe_transpose_: buffer is not whole stripes of ", SB, " bytes");
  uint8_t* base = buf.data_ptr<uint8_t>();
  const int64_t S = buf.numel() / SB;
  const uint8_t f = (uint8_t)flip;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);   // element moves need element-aligned stripes
  if (E == 4 && addr % 4 == 0) return stripes_of<uint32_t>(base, S, R, G, 0x01010101u * f);
  if (E == 2 && addr % 2 == 0) return stripes_of<uint16_t>(base, S, R, G, (uint16_t)(0x0101u * f));
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<uint8_t> tmp(SB);
    for (int64_t st = s0; st < s1; st++) {
      uint8_t* p = base + st * SB;
      std::memcpy(tmp.data(), p, SB);
      for (int64_t g = 0; g < G; g++)
        for (int64_t r = 0; r < R; r++) {
          const uint8_t* src = tmp.data() + (r * G + g) * E;
          uint8_t* dst = p + (g * R + r) * E;
          for (int64_t e = 0; e < E; e++) dst[e] = src[e] ^ f;
        }
    }
  });
}

// Rows of a panel-layout weight widened to fp32 row-major: what training's input gradient (dX = dY @ W) and a
// float32 product multiply by, a slice of rows at a time (kernels/__init__.py f32 slices). Panels [P][G][16][E]
// hold w[16p + c, E*g + e] at [p][g][c][e]:
//   kind 0: bf16 pairs (E = 2, block_weight): fp32 = bits << 16
//   kind 1: int8 + 128 quads (E = 4, pack_int8): fp32 = (byte ^ 0x80) as int8, times scale[row]
// dst [P * 16, G * E] fp32. Panels in parallel; each reads its panel once in order and writes its 16 rows.
void panels_to_f32_(torch::Tensor panels, torch::Tensor dst, int64_t kind, c10::optional<torch::Tensor> scales) {
  KCHECK(panels.device().is_cpu() && panels.is_contiguous() && dst.device().is_cpu() && dst.is_contiguous() &&
         dst.scalar_type() == at::kFloat && dst.dim() == 2, "panels_to_f32_: contiguous CPU panels and fp32 [rows, K]");
  KCHECK(kind == 0 || kind == 1, "panels_to_f32_: kind must be 0 (bf16) or 1 (int8)");
  const int64_t E = kind == 0 ? 2 : 4, esz = kind == 0 ? 2 : 1;
  KCHECK(panels.element_size() * panels.numel() % (16 * E * esz) == 0, "panels_to_f32_: not whole panel lines");
  const int64_t rows = dst.size(0), K = dst.size(1);
  KCHECK(rows % 16 == 0 && K % E == 0 && panels.element_size() * panels.numel() == rows * K * esz,
         "panels_to_f32_: panels hold ", panels.element_size() * panels.numel() / esz, " weights, dst wants ",
         rows * K);
  const float* sp = nullptr;
  torch::Tensor sf;
  if (kind == 1) {
    KCHECK(scales.has_value() && scales->numel() == rows, "panels_to_f32_: int8 panels need ", rows, " scales");
    sf = scales->to(at::kFloat).contiguous();
    sp = sf.data_ptr<float>();
  }
  const int64_t P = rows / 16, G = K / E;
  const uint8_t* src = (const uint8_t*)panels.data_ptr();
  float* out = dst.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      float* d = out + p * 16 * K;
      if (kind == 0) {
        const uint32_t* s = (const uint32_t*)(src + p * 16 * K * 2);   // [G][16] pairs
        for (int c = 0; c < 16; c++) {                                  // a row at a time: its writes in order,
          uint32_t* dc = (uint32_t*)(d + c * K);                       // its reads one word per 64-byte line of a
          for (int64_t g = 0; g < G; g++) {                            // panel that stays in L2
            const uint32_t v = s[g * 16 + c];
            dc[2 * g] = v << 16;
            dc[2 * g + 1] = v & 0xffff0000u;
          }
        }
      } else {
        const uint8_t* s = src + p * 16 * K;                            // [G][16][4] bytes
        const float* sc = sp + p * 16;                                   // q * scale: one rounding, as q.float() * s
        for (int c = 0; c < 16; c++) {
          float* dc = d + c * K;
          const float scale = sc[c];
          for (int64_t g = 0; g < G; g++)
            for (int e = 0; e < 4; e++) dc[4 * g + e] = (float)(int8_t)(s[(g * 16 + c) * 4 + e] ^ 0x80) * scale;
        }
      }
    }
  });
}
