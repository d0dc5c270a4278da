// Tensor helpers shared by the CPU kernel builds (cpu_gemv.cpp: AVX-512, cpu_avx2.cpp: AVX2 + FMA).
#pragma once
#include <torch/extension.h>

// Optional bias as contiguous fp32 [N] (an undefined tensor when absent).
inline torch::Tensor bias_f32(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  TORCH_CHECK(bias->device().is_cpu(), "CPU kernels need a CPU bias");
  TORCH_CHECK(bias->numel() == N, "bias must have ", N, " elements");
  return bias->to(at::kFloat).contiguous();
}

// bf16 output [..., N] shaped like x [..., K]: callers need no reshape.
inline torch::Tensor out_like(const torch::Tensor& x, int64_t N) {
  auto size = x.sizes().vec();
  size.back() = N;
  return torch::empty(size, x.options());
}
