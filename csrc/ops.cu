// CUDA implementations of the var_rt ops. The schemas are defined in Python (var_rt/ops.py,
// torch.library); this file only registers the CUDA kernels for them, so the library must be
// loaded after var_rt.ops has defined the namespace (var_rt.ops does this itself).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "kernels.cuh"

namespace var_rt {
namespace {

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "var_rt: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

int64_t addr(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// Multiprocessors of the current device (cached per device; ATen's CUDAContext.h would pull in the
// cuBLAS/cuSPARSE headers for the same number).
int num_sms() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int& n = cache[dev & 63];
  if (n == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "var_rt: ", name, " must be on ", ref.device());
}

// Group size override for tuning (VAR_RT_TRANSITION_G=1|2|4|8); 0 = automatic.
int group_override() {
  static const int g = [] {
    const char* s = std::getenv("VAR_RT_TRANSITION_G");
    return s ? std::atoi(s) : 0;
  }();
  return g;
}

void scale_transition_cuda(at::Tensor& f_hat, const at::Tensor& h, const at::Tensor& phi_w, const at::Tensor& phi_b,
                           double ratio, int64_t pn_next, at::Tensor& next_tokens) {
  TORCH_CHECK(f_hat.dim() == 4 && f_hat.scalar_type() == at::kFloat && f_hat.is_contiguous(),
              "var_rt.scale_transition: f_hat must be a contiguous float32 (B, Cv, P, P) tensor");
  const int64_t B = f_hat.size(0), Cv = f_hat.size(1), P = f_hat.size(2);
  TORCH_CHECK(f_hat.size(3) == P && P >= 1 && P <= kMaxGrid, "var_rt.scale_transition: f_hat must be square with P <= 32");
  TORCH_CHECK(Cv >= 1 && Cv <= kMaxChannels, "var_rt.scale_transition: Cv must be in [1, 64], got ", Cv);
  TORCH_CHECK(h.dim() == 3 && h.size(0) == B && h.size(2) == Cv && h.is_contiguous(),
              "var_rt.scale_transition: h must be a contiguous (B, pn*pn, Cv) tensor");
  const int64_t pn = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(h.size(1)))));
  TORCH_CHECK(pn * pn == h.size(1) && pn >= 1 && pn <= P, "var_rt.scale_transition: h.size(1) must be pn*pn with pn <= P");
  TORCH_CHECK(phi_w.is_contiguous() && phi_w.dim() == 4 && phi_w.size(0) == Cv && phi_w.size(1) == Cv &&
                  phi_w.size(2) == 3 && phi_w.size(3) == 3,
              "var_rt.scale_transition: phi_w must be a contiguous (Cv, Cv, 3, 3) tensor");
  TORCH_CHECK(phi_b.scalar_type() == phi_w.scalar_type() && phi_b.is_contiguous() && phi_b.numel() == Cv,
              "var_rt.scale_transition: phi_b must be a contiguous (Cv,) tensor of phi_w's dtype");
  TORCH_CHECK(pn_next >= 0 && pn_next <= P, "var_rt.scale_transition: pn_next must be in [0, P]");
  check_cuda(h, f_hat, "h");
  check_cuda(phi_w, f_hat, "phi_w");
  check_cuda(phi_b, f_hat, "phi_b");
  DType next_dtype = DType::kFloat32;
  if (pn_next > 0) {
    check_cuda(next_tokens, f_hat, "next_tokens");
    TORCH_CHECK(next_tokens.dim() == 3 && next_tokens.size(0) == B && next_tokens.size(1) == pn_next * pn_next &&
                    next_tokens.size(2) == Cv && next_tokens.is_contiguous(),
                "var_rt.scale_transition: next_tokens must be a contiguous (B, pn_next^2, Cv) tensor");
    next_dtype = to_dtype(next_tokens, "next_tokens");
  }
  const c10::cuda::CUDAGuard guard(f_hat.device());

  TransitionParams p;
  p.f_hat = f_hat.data_ptr<float>();
  p.h = h.data_ptr();
  p.phi_w = phi_w.data_ptr();
  p.phi_b = phi_b.data_ptr();
  p.next = pn_next > 0 ? next_tokens.data_ptr() : nullptr;
  p.ratio = static_cast<float>(ratio);
  p.one_minus_ratio = static_cast<float>(1.0 - ratio);
  p.B = static_cast<int>(B);
  p.Cv = static_cast<int>(Cv);
  p.P = static_cast<int>(P);
  p.pn = static_cast<int>(pn);
  p.pn_next = static_cast<int>(pn_next);
  p.h_dtype = to_dtype(h, "h");
  p.next_dtype = next_dtype;
  p.w_dtype = to_dtype(phi_w, "phi_w");
  C10_CUDA_CHECK(launch_scale_transition(p, group_override(), num_sms(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_kv(const at::Tensor& cache, const at::Tensor& x, const char* what) {
  TORCH_CHECK(cache.dim() == 5 && x.dim() == 5, "var_rt.", what, ": tensors must be 5-D (depth, R, H, L, c)");
  TORCH_CHECK(cache.scalar_type() == x.scalar_type(), "var_rt.", what, ": dtypes differ: ", cache.scalar_type(), " vs ",
              x.scalar_type());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, "var_rt.", what,
              ": dtype must be float16, bfloat16 or float32");
  check_cuda(x, cache, "inputs");
  for (int d : {0, 1, 2, 4})
    TORCH_CHECK(cache.size(d) == x.size(d), "var_rt.", what, ": shapes differ at dim ", d, ": ", cache.sizes(), " vs ",
                x.sizes());
}

void kv_write_cuda(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k_new, const at::Tensor& v_new,
                   int64_t begin) {
  check_kv(cache_k, k_new, "kv_write");
  check_kv(cache_v, v_new, "kv_write");
  TORCH_CHECK(cache_k.sizes() == cache_v.sizes() && k_new.sizes() == v_new.sizes(), "var_rt.kv_write: k and v shapes differ");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "var_rt.kv_write: caches must be contiguous");
  TORCH_CHECK(k_new.stride(4) == 1 && v_new.stride(4) == 1, "var_rt.kv_write: new keys/values need unit channel stride");
  const int64_t L = cache_k.size(3), l = k_new.size(3);
  TORCH_CHECK(begin >= 0 && begin + l <= L, "var_rt.kv_write: [begin, begin + l) = [", begin, ", ", begin + l,
              ") out of the cache's ", L, " tokens");
  const c10::cuda::CUDAGuard guard(cache_k.device());
  const int64_t es = cache_k.element_size(), row_bytes = cache_k.size(4) * es;
  KVWriteArgs a[2];
  int64_t all = row_bytes | (begin * row_bytes) | addr(cache_k.data_ptr()) |
                addr(cache_v.data_ptr()) | addr(k_new.data_ptr()) |
                addr(v_new.data_ptr());
  const at::Tensor* caches[2] = {&cache_k, &cache_v};
  const at::Tensor* news[2] = {&k_new, &v_new};
  for (int i = 0; i < 2; ++i) {
    a[i].dst = static_cast<char*>(caches[i]->data_ptr());
    a[i].src = static_cast<const char*>(news[i]->data_ptr());
    for (int d = 0; d < 4; ++d) {
      a[i].src_stride[d] = news[i]->stride(d) * es;
      all |= a[i].src_stride[d];
    }
    a[i].R = static_cast<int>(cache_k.size(1));
    a[i].H = static_cast<int>(cache_k.size(2));
    a[i].l = static_cast<int>(l);
    a[i].L = static_cast<int>(L);
    a[i].begin = static_cast<int>(begin);
  }
  const int vec = vector_bytes({all});
  const int64_t rows = cache_k.size(0) * cache_k.size(1) * cache_k.size(2) * l;
  C10_CUDA_CHECK(launch_kv_write(a[0], a[1], rows, static_cast<int>(row_bytes), vec, num_sms(),
                                 c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_append_cuda(at::Tensor& dst, const at::Tensor& past, const at::Tensor& present) {
  check_kv(dst, past, "kv_append");
  check_kv(dst, present, "kv_append");
  TORCH_CHECK(dst.is_contiguous() && past.is_contiguous() && present.is_contiguous(),
              "var_rt.kv_append: dst, past and present must be contiguous");
  TORCH_CHECK(dst.size(3) == past.size(3) + present.size(3), "var_rt.kv_append: dst has ", dst.size(3),
              " tokens, past + present ", past.size(3) + present.size(3));
  const c10::cuda::CUDAGuard guard(dst.device());
  const int64_t es = dst.element_size(), row_bytes = dst.size(4) * es;
  const int64_t dh = dst.size(0) * dst.size(1) * dst.size(2);
  const int64_t past_bytes = past.size(3) * row_bytes, present_bytes = present.size(3) * row_bytes;
  const int vec = vector_bytes({past_bytes, present_bytes, addr(dst.data_ptr()),
                                addr(past.data_ptr()), addr(present.data_ptr())});
  C10_CUDA_CHECK(launch_kv_append(dst.data_ptr(), past.data_ptr(), present.data_ptr(), dh, past_bytes, present_bytes, vec,
                                  num_sms(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(var_rt, CUDA, m) {
  m.impl("scale_transition", &scale_transition_cuda);
  m.impl("kv_write", &kv_write_cuda);
  m.impl("kv_append", &kv_append_cuda);
}

}  // namespace var_rt
