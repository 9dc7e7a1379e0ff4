// Fused non-scaling LayerNorm kernels (SPEC §4): forward, backward and JVP over the last dim.
//
//   x̂ = (x − μ)·rstd,  y = x̂·(1 + scale) + shift + β                      (shift/scale/β optional)
//   backward: g = dy·(1 + scale), dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
//             dβ = Σ_rows dy, dshift_b = Σ_{rows of b} dy, dscale_b = Σ_{rows of b} dy·x̂
//   JVP:      ẋ̂ = rstd·(ẋ_c − x̂·mean(x̂·ẋ_c)), ẋ_c = ẋ − mean(ẋ);  ẏ = ẋ̂·(1 + scale) + x̂·scalė + shifṫ + β̇
//
// Torch-free: raw pointers, sizes and a stream. One block per row holds the whole row in registers
// (16-byte vector loads, fp32 statistics from a two-pass reduction over registers: exact, no E[x²] − μ²
// cancellation). Rows wider than split_threshold (the UNet's C·H·W) are cut into chunks: per-chunk moments,
// a per-row combine with Chan's parallel formulas, then the apply kernel on a (row, chunk) grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "nsln_kernels.h"

namespace lct_fast {
namespace nsln {
namespace {

constexpr int kChunkThreads = 256;  // split path: threads per chunk block
constexpr int kChunkIters = 2;      // split path: vectors per thread per chunk (keeps bwd registers low)

// ------------------------------------------------------------------------------------------------
// element conversion and vector access
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&o)[VEC]) {
  const Pack<T, VEC> t = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] = to_f(t.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&o)[VEC]) {
  Pack<T, VEC> t;
#pragma unroll
  for (int j = 0; j < VEC; ++j) t.v[j] = from_f<T>(o[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = t;
}

// fp32 parameters (bias/shift/scale and tangents): float4 loads when the pack allows it
template <int VEC>
__device__ __forceinline__ void load_param(const float* p, float (&o)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + j);
      o[j] = t.x;
      o[j + 1] = t.y;
      o[j + 2] = t.z;
      o[j + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = p[j];
  }
}

// ------------------------------------------------------------------------------------------------
// reductions: warp shuffles, then every thread sums the per-warp values (deterministic, all threads get it)
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 sh[32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // previous use of sh finished
  if (lane == 0) sh[wid] = make_float2(a, b);
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
  for (int i = 0; i < nw; ++i) {
    t.x += sh[i].x;
    t.y += sh[i].y;
  }
  return t;
}

__device__ __forceinline__ float block_sum(float a) { return block_sum2(a, 0.f).x; }

// ------------------------------------------------------------------------------------------------
// forward / JVP / apply kernel. Grid (rows, chunks); without split the chunk is the whole row and the block
// computes the statistics itself; with split, mean/rstd (and mean ẋ, mean(x̂·ẋ_c)) come from `stats`.
// ------------------------------------------------------------------------------------------------

template <typename T, int VEC, int ITERS>
__global__ void fwd_kernel(FwdArgs a, const float* __restrict__ stats, bool split) {
  const int64_t row = blockIdx.x;
  const int64_t n = a.n;
  const int64_t col0 = split ? (int64_t)blockIdx.y * blockDim.x * ITERS * VEC : 0;
  const int64_t roff = row * n;
  const T* x = static_cast<const T*>(a.x) + roff;
  float xv[ITERS][VEC];
  bool ok[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
    ok[it] = c < n;  // n % VEC == 0, so a pack is all in or all out
    if (ok[it]) load_pack<T, VEC>(x + c, xv[it]);
    else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[it][j] = 0.f;
    }
  }
  float mean, rstd;
  if (split) {
    mean = stats[row * 4 + 0];
    rstd = stats[row * 4 + 1];
  } else {
    float s = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += xv[it][j];
    mean = block_sum(s) / (float)n;
    float q = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = ok[it] ? xv[it][j] - mean : 0.f;
        q += d * d;
      }
    rstd = rsqrtf(block_sum(q) / (float)n + a.eps);
    if (threadIdx.x == 0 && a.mean != nullptr) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
  }
  // x̂ in place
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[it][j] = ok[it] ? (xv[it][j] - mean) * rstd : 0.f;

  const int64_t moff = a.scale != nullptr ? (row / a.tokens) * n : 0;
  if (a.write_y) {
    T* y = static_cast<T*>(a.y) + roff;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (!ok[it]) continue;
      const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
      float o[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] = xv[it][j];
      if (a.scale != nullptr) {
        float sc[VEC], sh[VEC];
        load_param<VEC>(a.scale + moff + c, sc);
        load_param<VEC>(a.shift + moff + c, sh);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = o[j] * (1.f + sc[j]) + sh[j];
      }
      if (a.bias != nullptr) {
        float bb[VEC];
        load_param<VEC>(a.bias + c, bb);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] += bb[j];
      }
      store_pack<T, VEC>(y + c, o);
    }
  }
  if (!a.jvp) return;

  float dv[ITERS][VEC];
  float cxd = 0.f;
  if (a.xd != nullptr) {
    const T* xd = static_cast<const T*>(a.xd) + roff;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
      if (ok[it]) load_pack<T, VEC>(xd + c, dv[it]);
      else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dv[it][j] = 0.f;
      }
    }
    float mxd;
    if (split) {
      mxd = stats[row * 4 + 2];
      cxd = stats[row * 4 + 3];
    } else {
      float s = 0.f;
#pragma unroll
      for (int it = 0; it < ITERS; ++it)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += dv[it][j];
      mxd = block_sum(s) / (float)n;
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
#pragma unroll
      for (int j = 0; j < VEC; ++j) dv[it][j] = ok[it] ? dv[it][j] - mxd : 0.f;  // ẋ_c
    if (!split) {
      float s = 0.f;
#pragma unroll
      for (int it = 0; it < ITERS; ++it)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += xv[it][j] * dv[it][j];
      cxd = block_sum(s) / (float)n;  // mean(x̂·ẋ_c)
    }
  }
  T* yd = static_cast<T*>(a.yd) + roff;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    if (!ok[it]) continue;
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
    float o[VEC], t[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = a.xd != nullptr ? rstd * (dv[it][j] - xv[it][j] * cxd) : 0.f;  // ẋ̂
    if (a.scale != nullptr) {
      load_param<VEC>(a.scale + moff + c, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] *= 1.f + t[j];
    }
    if (a.scaled != nullptr) {
      load_param<VEC>(a.scaled + moff + c, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += xv[it][j] * t[j];
    }
    if (a.shiftd != nullptr) {
      load_param<VEC>(a.shiftd + moff + c, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += t[j];
    }
    if (a.biasd != nullptr) {
      load_param<VEC>(a.biasd + c, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += t[j];
    }
    store_pack<T, VEC>(yd + c, o);
  }
}

// Split path, forward/JVP: per (row, chunk) sum x, M2 about the chunk mean, sum ẋ, co-moment. P [rows, C, 4].
template <typename T, int VEC>
__global__ void chunk_stats_kernel(const T* __restrict__ x, const T* __restrict__ xd, float* __restrict__ p,
                                   int64_t n, int64_t chunks) {
  constexpr int ITERS = kChunkIters;
  const int64_t row = blockIdx.x, chunk = blockIdx.y;
  const int64_t span = (int64_t)blockDim.x * ITERS * VEC;
  const int64_t col0 = chunk * span;
  const float cnt = (float)(n - col0 < span ? n - col0 : span);
  float xv[ITERS][VEC], dv[ITERS][VEC];
  bool ok[ITERS];
  float s = 0.f, sd = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
    ok[it] = c < n;
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[it][j] = dv[it][j] = 0.f;
    if (ok[it]) {
      load_pack<T, VEC>(x + row * n + c, xv[it]);
      if (xd != nullptr) load_pack<T, VEC>(xd + row * n + c, dv[it]);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s += xv[it][j];
      sd += dv[it][j];
    }
  }
  const float2 tot = block_sum2(s, sd);
  const float mc = tot.x / cnt, nc = tot.y / cnt;
  float q = 0.f, co = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (!ok[it]) continue;
      const float dx = xv[it][j] - mc;
      q += dx * dx;
      co += dx * (dv[it][j] - nc);
    }
  const float2 m = block_sum2(q, co);
  if (threadIdx.x == 0) {
    float* o = p + (row * chunks + chunk) * 4;
    o[0] = tot.x;
    o[1] = m.x;
    o[2] = tot.y;
    o[3] = m.y;
  }
}

// Split path: combine chunk moments into per-row (mean, rstd, mean ẋ, mean(x̂·ẋ_c)) with Chan's formulas.
__global__ void combine_kernel(const float* __restrict__ p, float* __restrict__ stats, float* mean_out,
                               float* rstd_out, int64_t rows, int64_t n, int64_t chunks, int64_t span, float eps) {
  const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float* q = p + row * chunks * 4;
  double sx = 0.0, sd = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sx += q[c * 4 + 0];
    sd += q[c * 4 + 2];
  }
  const double mean = sx / (double)n, mxd = sd / (double)n;
  double m2 = 0.0, co = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double cnt = (double)(c == chunks - 1 ? n - c * span : span);
    const double dm = q[c * 4 + 0] / cnt - mean, dn = q[c * 4 + 2] / cnt - mxd;
    m2 += q[c * 4 + 1] + cnt * dm * dm;
    co += q[c * 4 + 3] + cnt * dm * dn;
  }
  const float rstd = rsqrtf((float)(m2 / (double)n) + eps);
  stats[row * 4 + 0] = (float)mean;
  stats[row * 4 + 1] = rstd;
  stats[row * 4 + 2] = (float)mxd;
  stats[row * 4 + 3] = (float)(co / (double)n) * rstd;
  if (mean_out != nullptr) {
    mean_out[row] = (float)mean;
    rstd_out[row] = rstd;
  }
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------

// Split path: per (row, chunk) Σg and Σg·x̂, g = dy·(1 + scale). P [rows, C, 2].
template <typename T, int VEC>
__global__ void bwd_chunk_stats_kernel(BwdArgs a, float* __restrict__ p, int64_t chunks, int64_t tokens) {
  constexpr int ITERS = kChunkIters;
  const int64_t row = blockIdx.x, chunk = blockIdx.y, n = a.n;
  const int64_t col0 = chunk * (int64_t)blockDim.x * ITERS * VEC;
  const float mean = a.mean[row], rstd = a.rstd[row];
  const int64_t moff = (row / tokens) * n;
  float sg = 0.f, sgx = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
    if (c >= n) continue;
    float xv[VEC], gv[VEC];
    load_pack<T, VEC>(static_cast<const T*>(a.x) + row * n + c, xv);
    load_pack<T, VEC>(static_cast<const T*>(a.dy) + row * n + c, gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = a.scale != nullptr ? gv[j] * (1.f + a.scale[moff + c + j]) : gv[j];
      sg += g;
      sgx += g * (xv[j] - mean) * rstd;
    }
  }
  const float2 t = block_sum2(sg, sgx);
  if (threadIdx.x == 0) {
    p[(row * chunks + chunk) * 2 + 0] = t.x;
    p[(row * chunks + chunk) * 2 + 1] = t.y;
  }
}

__global__ void bwd_combine_kernel(const float* __restrict__ p, float* __restrict__ mg, int64_t rows, int64_t n,
                                   int64_t chunks) {
  const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float a = 0.f, b = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    a += p[(row * chunks + c) * 2 + 0];
    b += p[(row * chunks + c) * 2 + 1];
  }
  mg[row * 2 + 0] = a / (float)n;
  mg[row * 2 + 1] = b / (float)n;
}

// Grid (groups, chunks): dx for every row of the group (rows of one sample) and fp32 partial Σdy, Σdy·x̂.
template <typename T, int VEC, int ITERS>
__global__ void bwd_kernel(BwdArgs a, const float* __restrict__ mg, float* __restrict__ pdy,
                           float* __restrict__ pdyx, int64_t tokens, int64_t rpg, int64_t groups_per_sample,
                           bool split) {
  const int64_t grp = blockIdx.x, n = a.n;
  const int64_t b = grp / groups_per_sample;
  const int64_t r0 = b * tokens + (grp % groups_per_sample) * rpg;
  const int64_t r1 = r0 + rpg < (b + 1) * tokens ? r0 + rpg : (b + 1) * tokens;
  const int64_t col0 = split ? (int64_t)blockIdx.y * blockDim.x * ITERS * VEC : 0;
  float sc1[ITERS][VEC], acc_dy[ITERS][VEC], acc_dyx[ITERS][VEC];
  bool ok[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
    ok[it] = c < n;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sc1[it][j] = (a.scale != nullptr && ok[it]) ? 1.f + a.scale[b * n + c + j] : 1.f;
      acc_dy[it][j] = acc_dyx[it][j] = 0.f;
    }
  }
  for (int64_t row = r0; row < r1; ++row) {
    const float mean = a.mean[row], rstd = a.rstd[row];
    float xh[ITERS][VEC], dy[ITERS][VEC];
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) xh[it][j] = dy[it][j] = 0.f;
      if (ok[it]) {
        load_pack<T, VEC>(static_cast<const T*>(a.x) + row * n + c, xh[it]);
        load_pack<T, VEC>(static_cast<const T*>(a.dy) + row * n + c, dy[it]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xh[it][j] = (xh[it][j] - mean) * rstd;
          const float g = dy[it][j] * sc1[it][j];
          sg += g;
          sgx += g * xh[it][j];
          acc_dy[it][j] += dy[it][j];
          acc_dyx[it][j] += dy[it][j] * xh[it][j];
        }
      }
    }
    if (a.dx == nullptr) continue;
    float m1, m2;
    if (split) {
      m1 = mg[row * 2 + 0];
      m2 = mg[row * 2 + 1];
    } else {
      const float2 t = block_sum2(sg, sgx);
      m1 = t.x / (float)n;
      m2 = t.y / (float)n;
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (!ok[it]) continue;
      const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
      float o[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] = rstd * (dy[it][j] * sc1[it][j] - m1 - xh[it][j] * m2);
      store_pack<T, VEC>(static_cast<T*>(a.dx) + row * n + c, o);
    }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    if (!ok[it]) continue;
    const int64_t c = col0 + ((int64_t)it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (pdy != nullptr) pdy[grp * n + c + j] = acc_dy[it][j];
      if (pdyx != nullptr) pdyx[grp * n + c + j] = acc_dyx[it][j];
    }
  }
}

// out[p, c] = Σ_q in[p, q, c] (fp32, fixed order: deterministic).
__global__ void colsum_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t q, int64_t n) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (c >= n) return;
  float s = 0.f;
  for (int64_t i = 0; i < q; ++i) s += in[(p * q + i) * n + c];
  out[p * n + c] = s;
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// vector width: 16-byte packs when the row width and every row pointer allow it
int pick_vec(int64_t n, int dtype, std::initializer_list<const void*> ptrs) {
  const int v = 16 / elem_size(dtype);
  if (n % v != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return v;
}

struct OnePass {
  int iters = 0, threads = 0;
};

// The backward keeps five [ITERS][VEC] float arrays live (scale, two accumulators, x̂, dy): at ITERS 8 with
// 16-byte packs that is 320 floats and ptxas (sm_90, -v) spills ~1 KB per thread; at ITERS 4 it uses ≤ 208
// registers and no spill. Wider rows take the split path instead.
constexpr int kFwdMaxIters = 8;
constexpr int kBwdMaxIters = 4;

// one pass: smallest ITERS in {1,2,4,8} (≤ max_iters) with ≤ 512 threads (≤ 1024 at max_iters);
// iters = 0: too wide
OnePass one_pass_plan(int64_t n, int vec, int max_iters) {
  const int64_t nvec = n / vec;
  for (int it : {1, 2, 4, 8}) {
    if (it > max_iters) break;
    const int64_t t = ((nvec + it - 1) / it + 31) / 32 * 32;
    if (t <= 512 || (it == max_iters && t <= 1024)) return {it, (int)(t < 32 ? 32 : t)};
  }
  return {};
}

bool use_split(int64_t n, int64_t split_threshold, int vec, int max_iters) {
  return n > split_threshold || one_pass_plan(n, vec, max_iters).iters == 0;
}

int64_t chunk_span(int vec) { return (int64_t)kChunkThreads * kChunkIters * vec; }

int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) v = 132;
    cache[device] = v;
  }
  return cache[device];
}

struct BwdPlan {
  int vec;
  bool split;
  int64_t chunks, groups_per_sample, rpg;
};

BwdPlan bwd_plan(int64_t rows, int64_t n, int64_t samples, int64_t split_threshold, int vec, int device) {
  BwdPlan p{};
  p.vec = vec;
  p.split = use_split(n, split_threshold, vec, kBwdMaxIters);
  p.chunks = p.split ? (n + chunk_span(vec) - 1) / chunk_span(vec) : 1;
  const int64_t tokens = samples > 0 ? rows / samples : 0;
  const int64_t target = 4LL * num_sms(device);
  int64_t s = (target + samples * p.chunks - 1) / (samples * p.chunks);
  if (s > tokens) s = tokens;
  if (s < 1) s = 1;
  p.rpg = tokens > 0 ? (tokens + s - 1) / s : 1;
  p.groups_per_sample = tokens > 0 ? (tokens + p.rpg - 1) / p.rpg : 1;
  return p;
}

template <typename T, int VEC>
void launch_fwd_onepass(const FwdArgs& a, OnePass plan, cudaStream_t st) {
  const dim3 grid((unsigned)a.rows, 1);
  switch (plan.iters) {
    case 1: fwd_kernel<T, VEC, 1><<<grid, plan.threads, 0, st>>>(a, nullptr, false); break;
    case 2: fwd_kernel<T, VEC, 2><<<grid, plan.threads, 0, st>>>(a, nullptr, false); break;
    case 4: fwd_kernel<T, VEC, 4><<<grid, plan.threads, 0, st>>>(a, nullptr, false); break;
    default: fwd_kernel<T, VEC, 8><<<grid, plan.threads, 0, st>>>(a, nullptr, false); break;
  }
}

template <typename T, int VEC>
void launch_fwd_split(const FwdArgs& a, float* ws, cudaStream_t st) {
  const int64_t span = chunk_span(VEC), chunks = (a.n + span - 1) / span;
  float* partial = ws;
  float* stats = ws + a.rows * chunks * 4;
  const dim3 grid((unsigned)a.rows, (unsigned)chunks);
  chunk_stats_kernel<T, VEC><<<grid, kChunkThreads, 0, st>>>(
      static_cast<const T*>(a.x), a.jvp ? static_cast<const T*>(a.xd) : nullptr, partial, a.n, chunks);
  combine_kernel<<<(unsigned)((a.rows + 127) / 128), 128, 0, st>>>(partial, stats, a.mean, a.rstd, a.rows, a.n,
                                                                  chunks, span, a.eps);
  fwd_kernel<T, VEC, kChunkIters><<<grid, kChunkThreads, 0, st>>>(a, stats, true);
}

template <typename T, int VEC>
void launch_fwd(const FwdArgs& a, int64_t split_threshold, float* ws, cudaStream_t st) {
  if (use_split(a.n, split_threshold, VEC, kFwdMaxIters)) launch_fwd_split<T, VEC>(a, ws, st);
  else launch_fwd_onepass<T, VEC>(a, one_pass_plan(a.n, VEC, kFwdMaxIters), st);
}

template <typename T>
void dispatch_fwd(const FwdArgs& a, int64_t split_threshold, float* ws, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (pick_vec(a.n, a.dtype, {a.x, a.y, a.xd, a.yd, a.bias, a.biasd, a.shift, a.scale, a.shiftd, a.scaled}) == V) launch_fwd<T, V>(a, split_threshold, ws, st);
  else launch_fwd<T, 1>(a, split_threshold, ws, st);
}

template <typename T, int VEC>
void launch_bwd(const BwdArgs& a, const BwdPlan& p, float* ws, cudaStream_t st) {
  const int64_t tokens = a.rows / a.samples, groups = a.samples * p.groups_per_sample;
  float* pdy = ws;
  float* pdyx = pdy + groups * a.n;
  float* mg = pdyx + groups * a.n;
  float* part = mg + a.rows * 2;
  const bool need_pdy = a.dbias != nullptr || a.dshift != nullptr;
  const bool need_pdyx = a.dscale != nullptr;
  if (p.split) {
    if (a.dx != nullptr) {
      bwd_chunk_stats_kernel<T, VEC><<<dim3((unsigned)a.rows, (unsigned)p.chunks), kChunkThreads, 0, st>>>(
          a, part, p.chunks, tokens);
      bwd_combine_kernel<<<(unsigned)((a.rows + 127) / 128), 128, 0, st>>>(part, mg, a.rows, a.n, p.chunks);
    }
    bwd_kernel<T, VEC, kChunkIters><<<dim3((unsigned)groups, (unsigned)p.chunks), kChunkThreads, 0, st>>>(
        a, mg, need_pdy ? pdy : nullptr, need_pdyx ? pdyx : nullptr, tokens, p.rpg, p.groups_per_sample, true);
  } else {
    const OnePass op = one_pass_plan(a.n, VEC, kBwdMaxIters);
    const dim3 grid((unsigned)groups, 1);
    float* q1 = need_pdy ? pdy : nullptr;
    float* q2 = need_pdyx ? pdyx : nullptr;
    switch (op.iters) {
      case 1: bwd_kernel<T, VEC, 1><<<grid, op.threads, 0, st>>>(a, mg, q1, q2, tokens, p.rpg, p.groups_per_sample, false); break;
      case 2: bwd_kernel<T, VEC, 2><<<grid, op.threads, 0, st>>>(a, mg, q1, q2, tokens, p.rpg, p.groups_per_sample, false); break;
      default: bwd_kernel<T, VEC, kBwdMaxIters><<<grid, op.threads, 0, st>>>(a, mg, q1, q2, tokens, p.rpg, p.groups_per_sample, false); break;
    }
  }
  const unsigned cb = (unsigned)((a.n + 255) / 256);
  if (a.dshift != nullptr)
    colsum_kernel<<<dim3(cb, (unsigned)a.samples), 256, 0, st>>>(pdy, a.dshift, p.groups_per_sample, a.n);
  if (a.dbias != nullptr) colsum_kernel<<<dim3(cb, 1), 256, 0, st>>>(pdy, a.dbias, groups, a.n);
  if (a.dscale != nullptr)
    colsum_kernel<<<dim3(cb, (unsigned)a.samples), 256, 0, st>>>(pdyx, a.dscale, p.groups_per_sample, a.n);
}

template <typename T>
void dispatch_bwd(const BwdArgs& a, int64_t split_threshold, float* ws, int device, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const int vec = pick_vec(a.n, a.dtype, {a.x, a.dy, a.dx, a.scale});
  const BwdPlan p = bwd_plan(a.rows, a.n, a.samples, split_threshold, vec, device);
  if (vec == V) launch_bwd<T, V>(a, p, ws, st);
  else launch_bwd<T, 1>(a, p, ws, st);
}

}  // namespace

int64_t fwd_workspace_floats(int64_t rows, int64_t n, int64_t split_threshold, int dtype) {
  // worst case over the vector width (the pointers' alignment is only known at launch)
  int64_t need = 0;
  for (int vec : {1, 16 / elem_size(dtype)}) {
    if (!use_split(n, split_threshold, vec, kFwdMaxIters)) continue;
    const int64_t chunks = (n + chunk_span(vec) - 1) / chunk_span(vec);
    const int64_t w = rows * chunks * 4 + rows * 4;
    if (w > need) need = w;
  }
  return need;
}

int64_t bwd_workspace_floats(int64_t rows, int64_t n, int64_t samples, int64_t split_threshold, int dtype,
                             int device) {
  int64_t need = 0;
  for (int vec : {1, 16 / elem_size(dtype)}) {
    const BwdPlan p = bwd_plan(rows, n, samples, split_threshold, vec, device);
    const int64_t groups = samples * p.groups_per_sample;
    const int64_t w = 2 * groups * n + rows * 2 + (p.split ? rows * p.chunks * 2 : 0);
    if (w > need) need = w;
  }
  return need;
}

int forward(const FwdArgs& a, int64_t split_threshold, float* workspace, void* stream) {
  if (a.rows == 0 || a.n == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: dispatch_fwd<float>(a, split_threshold, workspace, st); break;
    case kBFloat16: dispatch_fwd<__nv_bfloat16>(a, split_threshold, workspace, st); break;
    case kFloat16: dispatch_fwd<__half>(a, split_threshold, workspace, st); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int backward(const BwdArgs& a, int64_t split_threshold, float* workspace, int device, void* stream) {
  if (a.rows == 0 || a.n == 0 || a.samples <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: dispatch_bwd<float>(a, split_threshold, workspace, device, st); break;
    case kBFloat16: dispatch_bwd<__nv_bfloat16>(a, split_threshold, workspace, device, st); break;
    case kFloat16: dispatch_bwd<__half>(a, split_threshold, workspace, device, st); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace nsln
}  // namespace lct_fast
