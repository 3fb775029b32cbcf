// CUDA kernels of var-rt, free of torch headers so that nvcc can compile them alone
// (csrc/kernels_selftest.cu does, on machines whose torch cannot build the extension).
//
//  scale_transition: one VAR scale transition, fused into one launch:
//      u      = bicubic_upsample(h viewed as (B, Cv, pn, pn)) to P x P (align_corners=False, A=-0.75)
//      f_hat += (1 - r) u + r (conv3x3(u, W, b, padding=1)), the conv's operands (u, W, b) in W's dtype
//               (the compute dtype) with float32 sums; its result rounded as PyTorch's conv in that dtype
//               rounds it (conv, + b, * r: each rounded to the compute dtype); the blend and f_hat float32
//      next   = area_downsample(f_hat, pn_next) as (B, pn_next^2, Cv)
//  kv_write / kv_append: byte-level strided copies with 16-byte vectors where alignment allows.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace var_rt {

// Element types of h and next_tokens, chosen at run time (a warp-uniform branch in the load and
// store phases only, so the heavy templates are not multiplied by dtype pairs).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v, DType t) {
  switch (t) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// scale_transition
// ---------------------------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Copies channels [ci0, ci0 + nc) of npix token-major rows of h + hb (row stride Cv) into shared memory,
// element (pix, c) -> dst[c * cstride + pix / row * rstride + pix % row] (zero for c >= nc).
// Loads go out in batches of kBatch per thread before any store, so a thread waits for one
// memory latency per batch rather than one per element.
template <typename T>
__device__ __forceinline__ void load_h_chunk(const T* __restrict__ h, int64_t hb, int Cv, int ci0, int nc, int npix, int row,
                                             float* dst, int cstride, int rstride) {
  constexpr int kBatch = 8, C = 8;  // C = kTransitionChunk
  const int total = C * npix, step = blockDim.x;
  for (int base = threadIdx.x; base < total; base += kBatch * step) {
    float v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * step, c = i % C, pix = i / C;
      v[k] = (i < total && c < nc) ? to_float(__ldg(h + hb + static_cast<int64_t>(pix) * Cv + ci0 + c)) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * step, c = i % C, pix = i / C;
      if (i < total) dst[c * cstride + (pix / row) * rstride + pix % row] = v[k];
    }
  }
}

__device__ __forceinline__ void load_h_chunk_any(const void* h, DType t, int64_t hb, int Cv, int ci0, int nc, int npix, int row,
                                                 float* dst, int cstride, int rstride) {
  switch (t) {
    case DType::kFloat16:
      load_h_chunk(static_cast<const __half*>(h), hb, Cv, ci0, nc, npix, row, dst, cstride, rstride); break;
    case DType::kBFloat16:
      load_h_chunk(static_cast<const __nv_bfloat16*>(h), hb, Cv, ci0, nc, npix, row, dst, cstride, rstride); break;
    default:
      load_h_chunk(static_cast<const float*>(h), hb, Cv, ci0, nc, npix, row, dst, cstride, rstride);
  }
}

// ---------------------------------------------------------------------------------------------

constexpr int kTransitionThreads = 256;
constexpr int kTransitionChunk = 8;  // (load_h_chunk assumes 8) input channels upsampled into shared memory at a time
constexpr int kMaxGrid = 32;         // largest P (last token grid side)
constexpr int kMaxChannels = 64;     // largest Cv

struct TransitionParams {
  float* f_hat;        // (B, Cv, P, P) float32, updated in place
  const void* h;       // (B, pn*pn, Cv), h_dtype
  const void* phi_w;   // (Cv, Cv, 3, 3), w_dtype: the conv's operand dtype (the compute dtype)
  const void* phi_b;   // (Cv,), w_dtype
  void* next;          // (B, pn_next^2, Cv), next_dtype; unused when pn_next == 0
  float ratio;         // r (the host's double rounded to float, as PyTorch's scalar multiply does)
  float one_minus_ratio;  // 1 - r computed in double, then rounded (PyTorch's h * (1 - r) with a Python float)
  int B, Cv, P, pn, pn_next;
  DType h_dtype, next_dtype, w_dtype;
};

// x rounded to t and back (the conv's operands are in the compute dtype; products and sums in float32).
__device__ __forceinline__ float round_to(float x, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(__float2half_rn(x));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(x));
    default: return x;
  }
}

// PyTorch's cubic convolution weights (A = -0.75) for the 4 taps around a source position.
__device__ __forceinline__ void cubic_weights(float t, float w[4]) {
  constexpr float A = -0.75f;
  auto near = [](float x) { return ((A + 2.f) * x - (A + 3.f)) * x * x + 1.f; };       // |x| <= 1
  auto far = [](float x) { return ((A * x - 5.f * A) * x + 8.f * A) * x - 4.f * A; };  // 1 < |x| < 2
  w[0] = far(t + 1.f);
  w[1] = near(t);
  w[2] = near(1.f - t);
  w[3] = far(2.f - t);
}

// Dynamic shared memory (floats) of one CTA; the host uses the same function to size the launch.
//   s_w    Cv * 9 * G   conv weights of this CTA's G output channels, [ci][tap][g], phi folded in
//   s_cw   P * 4        bicubic tap weights per output index (rows and columns share them)
//   s_ci   P            first bicubic tap index per output index (ints, stored in float slots)
//   work   max(CHUNK * (pn*pn + pn*P + (P+2)^2), G * P * P)
//          per input-channel chunk: h (pn x pn), row-upsampled (pn x P), upsampled with a zero
//          halo ((P+2) x (P+2)); after the conv the same space holds the new f_hat of the CTA's
//          G channels for the area downsample.
__host__ __device__ inline int transition_smem_floats(int Cv, int P, int pn, int G) {
  int up = pn == P ? 0 : kTransitionChunk * (pn * pn + pn * P);
  int work = kTransitionChunk * (P + 2) * (P + 2) + up;
  int out = G * P * P;
  return Cv * 9 * G + 5 * P + (work > out ? work : out);
}

// Grid (ceil(Cv / G), B), kTransitionThreads threads. Each CTA owns G output channels of one
// image: it upsamples every input channel itself (cheap next to the conv), so CTAs never wait
// on each other. PPT = pixels per thread = ceil(P*P / threads).
template <int G, int PPT>
__global__ void __launch_bounds__(kTransitionThreads, 2)  // <= 128 registers: two CTAs per SM
scale_transition_kernel(const TransitionParams p) {
  extern __shared__ float smem[];
  const int Cv = p.Cv, P = p.P, pn = p.pn, PP = P * P, Q = P + 2;
  const int co0 = blockIdx.x * G;
  const int b = blockIdx.y;
  const int tid = threadIdx.x;

  float* s_w = smem;
  float* s_cw = s_w + Cv * 9 * G;
  int* s_ci = reinterpret_cast<int*>(s_cw + 4 * P);
  float* s_u = reinterpret_cast<float*>(s_ci + P);  // CHUNK x Q x Q, zero halo
  float* s_h = s_u + kTransitionChunk * Q * Q;        // CHUNK x pn x pn
  float* s_t = s_h + kTransitionChunk * pn * pn;      // CHUNK x pn x P
  float* s_out = s_u;                                 // G x P x P, after the conv

  // Weights W (values of the compute dtype); zero for channels past Cv. r and the blend's (1 - r) u are
  // applied in the epilogue, after the conv's result is rounded as PyTorch rounds it.
  const DType wt = p.w_dtype;
  for (int i = tid; i < Cv * 9 * G; i += blockDim.x) {
    const int g = i % G, tap = (i / G) % 9, ci = i / (9 * G), co = co0 + g;
    s_w[i] = co < Cv ? load_as_float(p.phi_w, (co * Cv + ci) * 9 + tap, wt) : 0.f;
  }
  // Bicubic taps exactly as ATen: scale = in / out in float, src = scale * (dst + 0.5) - 0.5
  // (not clamped for cubic), taps floor(src) - 1 .. + 2 clamped to the input.
  if (tid < P) {
    const float scale = static_cast<float>(pn) / static_cast<float>(P);
    const float src = scale * (tid + 0.5f) - 0.5f;
    const float fl = floorf(src);
    float w[4];
    cubic_weights(src - fl, w);
#pragma unroll
    for (int k = 0; k < 4; ++k) s_cw[tid * 4 + k] = w[k];
    s_ci[tid] = static_cast<int>(fl) - 1;
  }
  // Zero the halo once; the interior is rewritten for every chunk.
  for (int i = tid; i < kTransitionChunk * Q * Q; i += blockDim.x) s_u[i] = 0.f;

  // The conv's float32 sums (bias, r and the blend come in the epilogue).
  float acc[PPT][G];
#pragma unroll
  for (int k = 0; k < PPT; ++k)
#pragma unroll
    for (int g = 0; g < G; ++g) acc[k][g] = 0.f;

  // Input channels in chunks, this CTA's own chunk last: G divides the chunk, so the G output channels
  // lie in one chunk, and its upsampled u is still in s_u for the epilogue's (1 - r) u.
  const int64_t h_base = static_cast<int64_t>(b) * pn * pn * Cv;
  const int chunks = (Cv + kTransitionChunk - 1) / kTransitionChunk, own = co0 / kTransitionChunk;
  int ci0 = 0;
  for (int step = 1; step <= chunks; ++step) {
    ci0 = ((own + step) % chunks) * kTransitionChunk;
    __syncthreads();  // previous chunk's conv done with s_u (and, first time, tables/halo ready)
    const int nc = min(kTransitionChunk, Cv - ci0);
    if (pn == P) {
      // Last scale: no upsample, h goes straight into the padded tile.
      load_h_chunk_any(p.h, p.h_dtype, h_base, Cv, ci0, nc, PP, P, s_u + Q + 1, Q * Q, Q);
    } else {
      // h (token-major, channel-last) -> s_h [c][y][x]; consecutive threads read consecutive channels.
      const int n = pn * pn;
      load_h_chunk_any(p.h, p.h_dtype, h_base, Cv, ci0, nc, n, n, s_h, n, n);
      __syncthreads();
      // Rows: s_t[c][y][X] = sum_k cw[X][k] h[c][y][clamp(ci[X] + k)].
      for (int i = tid; i < kTransitionChunk * pn * P; i += blockDim.x) {
        const int X = i % P, y = (i / P) % pn, c = i / (P * pn);
        const float* row = s_h + c * n + y * pn;
        const int x0 = s_ci[X];
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) v += s_cw[X * 4 + k] * row[min(max(x0 + k, 0), pn - 1)];
        s_t[i] = v;
      }
      __syncthreads();
      // Columns: s_u[c][Y+1][X+1] = sum_k cw[Y][k] s_t[c][clamp(ci[Y] + k)][X].
      for (int i = tid; i < kTransitionChunk * PP; i += blockDim.x) {
        const int X = i % P, Y = (i / P) % P, c = i / PP;
        const float* col = s_t + c * pn * P + X;
        const int y0 = s_ci[Y];
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) v += s_cw[Y * 4 + k] * col[min(max(y0 + k, 0), pn - 1) * P];
        s_u[c * Q * Q + (Y + 1) * Q + X + 1] = v;
      }
    }
    __syncthreads();
    // 3x3 conv of this chunk into the G accumulators of each of the thread's pixels.
    for (int c = 0; c < nc; ++c) {
      const float* u = s_u + c * Q * Q;
      const float* wc = s_w + (ci0 + c) * 9 * G;
      float w[9][G];
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) {
        if constexpr (G % 4 == 0) {
#pragma unroll
          for (int g = 0; g < G; g += 4) {
            const float4 v = *reinterpret_cast<const float4*>(wc + tap * G + g);
            w[tap][g] = v.x; w[tap][g + 1] = v.y; w[tap][g + 2] = v.z; w[tap][g + 3] = v.w;
          }
        } else {
#pragma unroll
          for (int g = 0; g < G; ++g) w[tap][g] = wc[tap * G + g];
        }
      }
#pragma unroll
      for (int k = 0; k < PPT; ++k) {
        const int pix = tid + k * kTransitionThreads;
        if (pix < PP) {
          const float* up = u + (pix / P) * Q + pix % P;  // top-left of the 3x3 window (halo coords)
#pragma unroll
          for (int tap = 0; tap < 9; ++tap) {
            const float v = round_to(up[(tap / 3) * Q + tap % 3], wt);  // the conv's input operand
#pragma unroll
            for (int g = 0; g < G; ++g) acc[k][g] = fmaf(w[tap][g], v, acc[k][g]);
          }
        }
      }
    }
  }
  // phi(u) as PyTorch computes it in the compute dtype: y = round(round(round(conv) + b) * r), then
  // f_hat + ((1 - r) u + y) in float32. Explicit _rn operations: no contraction into an fma, whose single
  // rounding would differ from PyTorch's separate kernels. The own chunk's u is read from s_u (last chunk).
  const float r = p.ratio, one_minus_r = p.one_minus_ratio;
  float* __restrict__ f_img = p.f_hat + static_cast<int64_t>(b) * Cv * PP;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int co = co0 + g;
    if (co >= Cv) break;
    const float bias = load_as_float(p.phi_b, co, wt);
    const float* u = s_u + (co - ci0) * Q * Q;
#pragma unroll
    for (int k = 0; k < PPT; ++k) {
      const int pix = tid + k * kTransitionThreads;
      if (pix < PP) {
        const float conv = round_to(__fadd_rn(round_to(acc[k][g], wt), bias), wt);
        const float y = round_to(__fmul_rn(conv, r), wt);
        const float blend = __fadd_rn(__fmul_rn(u[(pix / P + 1) * Q + pix % P + 1], one_minus_r), y);
        acc[k][g] = __fadd_rn(f_img[co * PP + pix], blend);
      }
    }
  }
  __syncthreads();  // everyone done reading s_u before it becomes s_out

  // The new f_hat of this CTA's channels: to memory, and kept for the area downsample.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int co = co0 + g;
    if (co >= Cv) break;
#pragma unroll
    for (int k = 0; k < PPT; ++k) {
      const int pix = tid + k * kTransitionThreads;
      if (pix < PP) {
        f_img[co * PP + pix] = acc[k][g];
        s_out[g * PP + pix] = acc[k][g];
      }
    }
  }
  if (p.pn_next == 0) return;
  __syncthreads();

  // Area downsample = adaptive average pooling: window [floor(i P / n), ceil((i + 1) P / n)).
  const int n = p.pn_next, gmax = min(G, Cv - co0);
  for (int i = tid; i < n * n * gmax; i += blockDim.x) {
    const int g = i % gmax, t = i / gmax, oy = t / n, ox = t % n;
    const int y0 = oy * P / n, y1 = ((oy + 1) * P + n - 1) / n;
    const int x0 = ox * P / n, x1 = ((ox + 1) * P + n - 1) / n;
    const float* src = s_out + g * PP;
    float s = 0.f;
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) s += src[y * P + x];
    s = s / static_cast<float>(y1 - y0) / static_cast<float>(x1 - x0);  // ATen's adaptive average: / kH / kW
    store_from_float(p.next, (static_cast<int64_t>(b) * n * n + t) * Cv + co0 + g, s, p.next_dtype);
  }
}

// Output channels per CTA: as many as keep at least one CTA per multiprocessor, so batch 1
// spreads over Cv CTAs and large batches recompute the upsample less often.
inline int transition_group(int B, int Cv, int num_sms) {
  const int choices[4] = {8, 4, 2, 1};
  for (int G : choices)
    if (static_cast<int64_t>(B) * ((Cv + G - 1) / G) >= num_sms) return G;
  return 1;
}

template <int G, int PPT>
cudaError_t launch_transition_impl(const TransitionParams& p, cudaStream_t stream) {
  const int smem = transition_smem_floats(p.Cv, p.P, p.pn, G) * static_cast<int>(sizeof(float));
  auto kernel = scale_transition_kernel<G, PPT>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  dim3 grid((p.Cv + G - 1) / G, p.B);
  kernel<<<grid, kTransitionThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int PPT>
cudaError_t launch_transition_g(const TransitionParams& p, int G, cudaStream_t stream) {
  switch (G) {
    case 8: return launch_transition_impl<8, PPT>(p, stream);
    case 4: return launch_transition_impl<4, PPT>(p, stream);
    case 2: return launch_transition_impl<2, PPT>(p, stream);
    default: return launch_transition_impl<1, PPT>(p, stream);
  }
}

// G <= 0: pick with transition_group. Requires P <= 32, Cv <= 64, 1 <= pn <= P, pn_next <= P.
inline cudaError_t launch_scale_transition(const TransitionParams& p, int G, int num_sms, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (G <= 0) G = transition_group(p.B, p.Cv, num_sms);
  if (p.P * p.P <= kTransitionThreads) return launch_transition_g<1>(p, G, stream);
  return launch_transition_g<4>(p, G, stream);
}

// ---------------------------------------------------------------------------------------------
// KV cache copies. Rows are the innermost (token, channel) rows of c elements; all copies are
// of whole rows, treated as bytes and moved in vectors of VecT (16 bytes where alignment allows).
// ---------------------------------------------------------------------------------------------

constexpr int kCopyThreads = 256;

// Strided source with 4 outer dims (depth, R, H, l) and contiguous rows of row_vecs vectors.
struct KVWriteArgs {
  char* dst;             // cache base (contiguous (depth, R, H, L, row))
  const char* src;       // new base
  int64_t src_stride[4]; // in vectors, for dims depth, R, H, l of the source
  int R, H, l, L, begin;
};

template <typename VecT>
__global__ void __launch_bounds__(kCopyThreads)
kv_write_kernel(KVWriteArgs k, KVWriteArgs v, int64_t rows, int row_vecs) {
  // blockIdx.y picks k or v; field-wise selects keep the structs in parameter space (no stack copy).
  const bool is_v = blockIdx.y != 0;
  VecT* dst = reinterpret_cast<VecT*>(is_v ? v.dst : k.dst);
  const VecT* src = reinterpret_cast<const VecT*>(is_v ? v.src : k.src);
  const int64_t s0 = is_v ? v.src_stride[0] : k.src_stride[0], s1 = is_v ? v.src_stride[1] : k.src_stride[1];
  const int64_t s2 = is_v ? v.src_stride[2] : k.src_stride[2], s3 = is_v ? v.src_stride[3] : k.src_stride[3];
  const KVWriteArgs& a = k;  // sizes are the same for k and v
  const int64_t total = rows * row_vecs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % row_vecs);
    int64_t row = i / row_vecs;
    const int t = static_cast<int>(row % a.l);
    row /= a.l;
    const int hh = static_cast<int>(row % a.H);
    row /= a.H;
    const int rr = static_cast<int>(row % a.R);
    const int64_t d = row / a.R;
    const int64_t s = d * s0 + rr * s1 + hh * s2 + t * s3 + j;
    const int64_t o = ((((d * a.R + rr) * a.H + hh) * a.L) + a.begin + t) * row_vecs + j;
    dst[o] = src[s];
  }
}

// dst (DH, b + l, row) = cat(past (DH, b, row), present (DH, l, row)), all contiguous, sizes in vectors.
template <typename VecT>
__global__ void __launch_bounds__(kCopyThreads)
kv_append_kernel(VecT* dst, const VecT* past, const VecT* present, int64_t dh, int64_t past_vecs,
                 int64_t present_vecs) {
  const int64_t per = past_vecs + present_vecs, total = dh * per;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per, w = i - row * per;
    dst[i] = w < past_vecs ? past[row * past_vecs + w] : present[row * present_vecs + (w - past_vecs)];
  }
}

inline unsigned copy_blocks(int64_t total, int num_sms) {
  const int64_t want = (total + kCopyThreads - 1) / kCopyThreads;
  const int64_t cap = static_cast<int64_t>(num_sms) * 16;  // grid-stride beyond that
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

// vec_bytes in {16, 8, 4, 2}: the caller picks the largest dividing every row size, stride and address.
inline cudaError_t launch_kv_write(KVWriteArgs k, KVWriteArgs v, int64_t rows, int row_bytes, int vec_bytes,
                                   int num_sms, cudaStream_t stream) {
  const int row_vecs = row_bytes / vec_bytes;
  if (rows == 0 || row_vecs == 0) return cudaSuccess;
  for (KVWriteArgs* a : {&k, &v})
    for (int i = 0; i < 4; ++i) a->src_stride[i] /= vec_bytes;  // bytes -> vectors
  dim3 grid(copy_blocks(rows * row_vecs, num_sms), 2);
  switch (vec_bytes) {
    case 16: kv_write_kernel<uint4><<<grid, kCopyThreads, 0, stream>>>(k, v, rows, row_vecs); break;
    case 8: kv_write_kernel<uint2><<<grid, kCopyThreads, 0, stream>>>(k, v, rows, row_vecs); break;
    case 4: kv_write_kernel<uint32_t><<<grid, kCopyThreads, 0, stream>>>(k, v, rows, row_vecs); break;
    default: kv_write_kernel<uint16_t><<<grid, kCopyThreads, 0, stream>>>(k, v, rows, row_vecs);
  }
  return cudaGetLastError();
}

inline cudaError_t launch_kv_append(void* dst, const void* past, const void* present, int64_t dh, int64_t past_bytes,
                                    int64_t present_bytes, int vec_bytes, int num_sms, cudaStream_t stream) {
  const int64_t pv = past_bytes / vec_bytes, qv = present_bytes / vec_bytes, total = dh * (pv + qv);
  if (total == 0) return cudaSuccess;
  const unsigned grid = copy_blocks(total, num_sms);
#define VAR_RT_APPEND(T)                                                                              \
  kv_append_kernel<T><<<grid, kCopyThreads, 0, stream>>>(static_cast<T*>(dst), static_cast<const T*>(past), \
                                                         static_cast<const T*>(present), dh, pv, qv)
  switch (vec_bytes) {
    case 16: VAR_RT_APPEND(uint4); break;
    case 8: VAR_RT_APPEND(uint2); break;
    case 4: VAR_RT_APPEND(uint32_t); break;
    default: VAR_RT_APPEND(uint16_t);
  }
#undef VAR_RT_APPEND
  return cudaGetLastError();
}

// Largest vector width in {16, 8, 4, 2} that divides every value (addresses, byte sizes, byte strides).
inline int vector_bytes(std::initializer_list<int64_t> values) {
  int64_t all = 0;
  for (int64_t x : values) all |= x;
  for (int w : {16, 8, 4}) if ((all & (w - 1)) == 0) return w;
  return 2;
}

}  // namespace var_rt
