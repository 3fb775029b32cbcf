// Standalone check of csrc/kernels.cuh without torch: compiles every kernel instantiation and,
// on a GPU, compares the scale transition and the KV copies with a double-precision CPU reference.
//   nvcc -std=c++17 -arch=sm_90 -O2 -o /tmp/var_rt_selftest csrc/kernels_selftest.cu && /tmp/var_rt_selftest
// Exit status 0 when every case is within tolerance.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.cuh"

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);      \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace {

double cubic(double x) {  // A = -0.75
  const double A = -0.75;
  x = std::fabs(x);
  if (x <= 1) return ((A + 2) * x - (A + 3)) * x * x + 1;
  if (x < 2) return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A;
  return 0;
}

// u = bicubic(h) (B, Cv, P, P); f += (1 - r) u + r conv(u); next = area(f).
void reference(std::vector<double>& f, const std::vector<float>& h, const std::vector<float>& w,
               const std::vector<float>& bias, double r, int B, int Cv, int P, int pn, int pn_next,
               std::vector<double>& next) {
  std::vector<double> up((size_t)P * 4);
  std::vector<int> idx((size_t)P * 4);
  for (int o = 0; o < P; ++o) {
    const double src = (double)(float)((float)pn / (float)P * (o + 0.5f) - 0.5f);
    const double fl = std::floor(src), t = src - fl;
    for (int k = 0; k < 4; ++k) {
      up[o * 4 + k] = pn == P ? (k == 1) : cubic(t + 1 - k);
      idx[o * 4 + k] = pn == P ? o : std::min(std::max((int)fl - 1 + k, 0), pn - 1);
    }
  }
  std::vector<double> u((size_t)Cv * P * P);
  for (int b = 0; b < B; ++b) {
    for (int c = 0; c < Cv; ++c)
      for (int Y = 0; Y < P; ++Y)
        for (int X = 0; X < P; ++X) {
          double v = 0;
          for (int ky = 0; ky < 4; ++ky)
            for (int kx = 0; kx < 4; ++kx)
              v += up[Y * 4 + ky] * up[X * 4 + kx] *
                   h[((size_t)b * pn * pn + idx[Y * 4 + ky] * pn + idx[X * 4 + kx]) * Cv + c];
          u[((size_t)c * P + Y) * P + X] = v;
        }
    for (int co = 0; co < Cv; ++co)
      for (int Y = 0; Y < P; ++Y)
        for (int X = 0; X < P; ++X) {
          double conv = bias[co];
          for (int ci = 0; ci < Cv; ++ci)
            for (int dy = -1; dy <= 1; ++dy)
              for (int dx = -1; dx <= 1; ++dx) {
                const int y = Y + dy, x = X + dx;
                if (y < 0 || y >= P || x < 0 || x >= P) continue;
                conv += (double)w[((size_t)co * Cv + ci) * 9 + (dy + 1) * 3 + dx + 1] * u[((size_t)ci * P + y) * P + x];
              }
          f[(((size_t)b * Cv + co) * P + Y) * P + X] += (1 - r) * u[((size_t)co * P + Y) * P + X] + r * conv;
        }
    const int n = pn_next;
    for (int oy = 0; oy < n; ++oy)
      for (int ox = 0; ox < n; ++ox)
        for (int c = 0; c < Cv; ++c) {
          const int y0 = oy * P / n, y1 = ((oy + 1) * P + n - 1) / n, x0 = ox * P / n, x1 = ((ox + 1) * P + n - 1) / n;
          double s = 0;
          for (int y = y0; y < y1; ++y)
            for (int x = x0; x < x1; ++x) s += f[(((size_t)b * Cv + c) * P + y) * P + x];
          next[((size_t)b * n * n + oy * n + ox) * Cv + c] = s / ((y1 - y0) * (x1 - x0));
        }
  }
}

double max_rel(const std::vector<double>& ref, const std::vector<float>& got) {
  double scale = 1e-6, err = 0;
  for (double v : ref) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(ref[i] - got[i]);
    err = std::max(err, std::isnan(got[i]) ? 1e30 : e);
  }
  return err / scale;
}

bool check_transition(int B, int Cv, int P, int pn, int pn_next, int G, int sms, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> f0((size_t)B * Cv * P * P), h((size_t)B * pn * pn * Cv), w((size_t)Cv * Cv * 9), bias(Cv);
  for (auto* v : {&f0, &h, &w, &bias})
    for (float& x : *v) x = nd(rng);
  for (float& x : w) x *= 0.1f;
  const float r = 0.5f;
  std::vector<double> fr(f0.begin(), f0.end()), nr((size_t)B * pn_next * pn_next * Cv);
  reference(fr, h, w, bias, r, B, Cv, P, pn, pn_next, nr);

  float *d_f, *d_h, *d_w, *d_b, *d_n;
  CK(cudaMalloc(&d_f, f0.size() * 4));
  CK(cudaMalloc(&d_h, h.size() * 4));
  CK(cudaMalloc(&d_w, w.size() * 4));
  CK(cudaMalloc(&d_b, bias.size() * 4));
  CK(cudaMalloc(&d_n, std::max<size_t>(nr.size(), 1) * 4));
  CK(cudaMemcpy(d_f, f0.data(), f0.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_h, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_b, bias.data(), bias.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_n, 0xff, std::max<size_t>(nr.size(), 1) * 4));  // NaN poison
  var_rt::TransitionParams p{d_f, d_h, d_w, d_b, d_n, r, 1.f - r, B, Cv, P, pn, pn_next,
                             var_rt::DType::kFloat32, var_rt::DType::kFloat32, var_rt::DType::kFloat32};
  CK(var_rt::launch_scale_transition(p, G, sms, 0));
  CK(cudaDeviceSynchronize());
  std::vector<float> fg(f0.size()), ng(nr.size());
  CK(cudaMemcpy(fg.data(), d_f, fg.size() * 4, cudaMemcpyDeviceToHost));
  if (!ng.empty()) CK(cudaMemcpy(ng.data(), d_n, ng.size() * 4, cudaMemcpyDeviceToHost));
  for (float* ptr : {d_f, d_h, d_w, d_b, d_n}) CK(cudaFree(ptr));
  const double ef = max_rel(fr, fg), en = ng.empty() ? 0 : max_rel(nr, ng);
  const bool ok = ef < 1e-5 && en < 1e-5;
  std::printf("%s transition B=%d Cv=%d P=%d pn=%d pn_next=%d G=%d  f_hat %.2e  next %.2e\n", ok ? "ok  " : "FAIL", B, Cv,
              P, pn, pn_next, G, ef, en);
  return ok;
}

bool check_kv(int sms) {
  // (depth, R, H, L, c) = (3, 4, 2, 40, 64) half-sized elements as uint16; write l = 9 at begin 13.
  const int D = 3, R = 4, H = 2, L = 40, c = 64, l = 9, begin = 13;
  const size_t cache_n = (size_t)D * R * H * L * c, new_n = (size_t)D * R * H * l * c;
  std::vector<uint16_t> ck(cache_n), kn(new_n), vn(new_n);
  for (size_t i = 0; i < cache_n; ++i) ck[i] = (uint16_t)(i * 7);
  for (size_t i = 0; i < new_n; ++i) kn[i] = (uint16_t)(i * 13 + 1), vn[i] = (uint16_t)(i * 17 + 3);
  uint16_t *d_ck, *d_cv, *d_k, *d_v;
  CK(cudaMalloc(&d_ck, cache_n * 2));
  CK(cudaMalloc(&d_cv, cache_n * 2));
  CK(cudaMalloc(&d_k, new_n * 2));
  CK(cudaMalloc(&d_v, new_n * 2));
  CK(cudaMemcpy(d_ck, ck.data(), cache_n * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_cv, ck.data(), cache_n * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_k, kn.data(), new_n * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_v, vn.data(), new_n * 2, cudaMemcpyHostToDevice));
  const int64_t row = c * 2;
  var_rt::KVWriteArgs a{(char*)d_ck, (const char*)d_k, {R * H * l * row, H * l * row, l * row, row}, R, H, l, L, begin};
  var_rt::KVWriteArgs b = a;
  b.dst = (char*)d_cv;
  b.src = (const char*)d_v;
  bool ok = true;
  for (int vec : {16, 8, 4, 2}) {
    CK(var_rt::launch_kv_write(a, b, (int64_t)D * R * H * l, (int)row, vec, sms, 0));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> gk(cache_n), gv(cache_n);
    CK(cudaMemcpy(gk.data(), d_ck, cache_n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gv.data(), d_cv, cache_n * 2, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < cache_n; ++i) {
      const size_t cc = i % c, t = (i / c) % L, dh = i / (c * L);
      const bool in = t >= (size_t)begin && t < (size_t)begin + l;
      const size_t j = (dh * l + (t - begin)) * c + cc;
      bad += gk[i] != (in ? kn[j] : ck[i]);
      bad += gv[i] != (in ? vn[j] : ck[i]);
    }
    std::printf("%s kv_write vec=%d bad=%zu\n", bad ? "FAIL" : "ok  ", vec, bad);
    ok = ok && !bad;
  }
  // kv_append: dst (DH, 13 + 9) = cat(past (DH, 13), present (DH, 9)).
  const int64_t DH = (int64_t)D * R * H, pb = 13 * row, qb = 9 * row;
  uint16_t* d_dst;
  CK(cudaMalloc(&d_dst, DH * (pb + qb)));
  for (int vec : {16, 8, 4, 2}) {
    CK(cudaMemset(d_dst, 0xff, DH * (pb + qb)));
    CK(var_rt::launch_kv_append(d_dst, d_ck, d_k, DH, pb, qb, vec, sms, 0));
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> g(DH * (pb + qb) / 2);
    CK(cudaMemcpy(g.data(), d_dst, g.size() * 2, cudaMemcpyDeviceToHost));
    size_t bad = 0;
    const size_t per = (pb + qb) / 2, pe = pb / 2, qe = qb / 2;
    std::vector<uint16_t> past_host(cache_n);
    CK(cudaMemcpy(past_host.data(), d_ck, cache_n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < g.size(); ++i) {
      const size_t rw = i / per, wi = i % per;
      bad += g[i] != (wi < pe ? past_host[rw * pe + wi] : kn[rw * qe + wi - pe]);
    }
    std::printf("%s kv_append vec=%d bad=%zu\n", bad ? "FAIL" : "ok  ", vec, bad);
    ok = ok && !bad;
  }
  for (uint16_t* ptr : {d_ck, d_cv, d_k, d_v, d_dst}) CK(cudaFree(ptr));
  return ok;
}

}  // namespace

int main() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    std::printf("no CUDA device: compiled only\n");
    return 0;
  }
  std::mt19937 rng(0);
  bool ok = true;
  const int s16[] = {1, 2, 3, 4, 5, 6, 8, 10, 13, 16}, s32[] = {1, 2, 3, 4, 6, 9, 13, 18, 24, 32};
  for (int G : {1, 2, 4, 8})
    for (int i = 0; i < 10; ++i) ok &= check_transition(2, 16, 16, s16[i], i < 9 ? s16[i + 1] : 0, G, sms, rng);
  for (int i = 0; i < 10; ++i) ok &= check_transition(2, 32, 32, s32[i], i < 9 ? s32[i + 1] : 0, 0, sms, rng);
  ok &= check_transition(1, 64, 32, 24, 32, 8, sms, rng);  // widest channels, largest smem
  ok &= check_transition(3, 20, 24, 7, 11, 8, sms, rng);   // Cv not a multiple of the group or chunk
  ok &= check_kv(sms);
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
