// Tensor helpers shared by the CPU kernel builds (cpu_gemv.cpp: AVX-512, cpu_avx2.cpp: AVX2 + FMA).
#pragma once
#include <torch/extension.h>
#include <string>
#include <type_traits>

// Error text built without iostreams. With some toolchain mixes (a manylinux torch wheel beside a distribution's
// g++ 13, as on a CUDA image with an AVX-512 Xeon) a TORCH_CHECK that streams an integer segfaults inside
// ostream::_M_insert<long> instead of raising; std::to_string does not go through the stream's locale.
inline void msg_part(std::string& s, const char* p) { s += p; }
inline void msg_part(std::string& s, const std::string& p) { s += p; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void msg_part(std::string& s, T v) { s += std::to_string(v); }
template <typename... A>
inline std::string msg(const A&... a) {
  std::string s;
  (msg_part(s, a), ...);
  return s;
}
// TORCH_CHECK with the message joined by msg(): c10::str of one std::string returns it without a stream.
#define KCHECK(cond, ...) TORCH_CHECK(cond, msg(__VA_ARGS__))

// Optional bias as contiguous fp32 [N] (an undefined tensor when absent).
inline torch::Tensor bias_f32(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  KCHECK(bias->device().is_cpu(), "CPU kernels need a CPU bias");
  KCHECK(bias->numel() == N, "bias must have ", N, " elements");
  return bias->to(at::kFloat).contiguous();
}

// bf16 output [..., N] shaped like x [..., K]: callers need no reshape.
inline torch::Tensor out_like(const torch::Tensor& x, int64_t N) {
  auto size = x.sizes().vec();
  size.back() = N;
  return torch::empty(size, x.options());
}
