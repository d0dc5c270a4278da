// Shared by cpu_gemv.cpp (AVX-512) and cpu_avx2.cpp: SSE2 intrinsics only. Included inside their anonymous
// namespace, after <torch/extension.h>, <ATen/Parallel.h>, <immintrin.h>, <cstring> and <vector>, with PW and KCHECK.
#pragma once

// 16 rows' 4-bit values at column k of one int4pack block (BN rows, bytes [K][BN/2]), rows r..r+15 (r % 16 == 0):
// layout > 0 puts rows i and BN/2 + i in byte i's low and high nibble; layout 0 puts rows 2i and 2i+1 there.
inline __m128i int4pack_rows16(const uint8_t* blk, int64_t half, int64_t r, int64_t k, bool pairs) {
  const __m128i lo4 = _mm_set1_epi8(15);
  const uint8_t* row = blk + k * half;
  if (pairs) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + r / 2));
    return _mm_unpacklo_epi8(_mm_and_si128(b, lo4), _mm_and_si128(_mm_srli_epi16(b, 4), lo4));
  }
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + r % half));
  return r < half ? _mm_and_si128(b, lo4) : _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
}

// In place: torch's int4pack bytes of an [N, K] weight (blocks of BN = layout or 32 rows, a row-pair tail) become the
// int4_vnni_mm panels [N/16, K/8, 64] (byte [p, o, 4c + j] = q[16p+c, 8o+j] | q[16p+c, 8o+4+j] << 4). Each block's
// panels occupy exactly the block's own bytes, so blocks convert independently with one block of scratch.
void int4pack_to_panels_(torch::Tensor buf, int64_t N, int64_t K, int64_t layout) {
  KCHECK(buf.device().is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kByte && buf.numel() == N * K / 2,
              "int4pack_to_panels_: uint8 CPU buffer of N*K/2 bytes");
  KCHECK(N % PW == 0 && K % 8 == 0 && (layout == 0 || layout == 32 || layout == 64),
              "int4pack_to_panels_: N % 16, K % 8 and layout in {0, 32, 64}");
  const int64_t BN = layout ? layout : 32, nbf = N / BN, tail = N - nbf * BN;
  uint8_t* base = buf.data_ptr<uint8_t>();
  at::parallel_for(0, nbf + (tail ? 1 : 0), 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> tmp(BN * K / 2);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t rows = b < nbf ? BN : tail;
      const bool pairs = layout == 0 || b == nbf;
      uint8_t* blk = base + b * BN * K / 2;
      std::memcpy(tmp.data(), blk, rows * K / 2);
      for (int64_t pp = 0; pp < rows / PW; pp++)
        for (int64_t o = 0; o < K / 8; o++) {
          __m128i a[4];
          for (int j = 0; j < 4; j++) {
            const __m128i lo = int4pack_rows16(tmp.data(), rows / 2, pp * PW, 8 * o + j, pairs);
            const __m128i hi = int4pack_rows16(tmp.data(), rows / 2, pp * PW, 8 * o + 4 + j, pairs);
            a[j] = _mm_or_si128(lo, _mm_slli_epi16(hi, 4));
          }
          const __m128i t0 = _mm_unpacklo_epi8(a[0], a[1]), t1 = _mm_unpacklo_epi8(a[2], a[3]);
          const __m128i t2 = _mm_unpackhi_epi8(a[0], a[1]), t3 = _mm_unpackhi_epi8(a[2], a[3]);
          __m128i* dst = reinterpret_cast<__m128i*>(blk + (pp * (K / 8) + o) * 4 * PW);
          _mm_storeu_si128(dst + 0, _mm_unpacklo_epi16(t0, t1));
          _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(t0, t1));
          _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(t2, t3));
          _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(t2, t3));
        }
    }
  });
}
