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
      for (int64_t g = 0; g < G; g++) {
        T* dst = p + g * R;
        const T* src = tmp.data() + g;
        for (int64_t r = 0; r < R; r++) dst[r] = src[r * G] ^ f;
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
