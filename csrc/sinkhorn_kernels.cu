// Sinkhorn OT coupling kernels (SPEC §4): log-domain Sinkhorn, mutual-best rounding, 2-opt.
//
// One thread block per independent problem; every loop runs on the device with device-side termination, so
// the pipeline (cost bmm -> reduce & scale -> Sinkhorn -> rounding -> 2-opt) needs no host synchronisation.
//
//   row update     f_i = ε·log a − ε·LSE_j((g_j − C_ij)/ε)   one warp per row, lanes over columns (coalesced),
//                                                             online max/sum in base 2, warp-shuffle merge
//   column update  g_j = ε·log b − ε·LSE_i((f_i − C_ij)/ε)   32-column tiles: lane = column (coalesced),
//                                                             warp = row group, merged through shared memory
//   rounding       each round every free row picks its cheapest free column of R = C − f − g and every free
//                  column its cheapest free row (first index on ties, like torch.argmin); mutual pairs fixed
//   2-opt          every row picks its best swap partner by gain d_i + d_j − C[i,π_j] − C[j,π_i]; mutually
//                  chosen pairs with positive gain swap at once; stops when a round swaps nothing
// These are the same algorithms (and tie rules) as lct_fast.ot.sinkhorn_log / round_to_permutation / two_opt.
// Torch-free: raw pointers, sizes and a stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "sinkhorn_kernels.h"

namespace lct_fast {
namespace sinkhorn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegBig = -1.0e30f;  // finite "−inf": keeps exp2 of differences well defined under fast math
constexpr float kBig = 3.0e38f;

// (m, s) represents Σ 2^(v) = s·2^m; merge two partial sums.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  s = s * exp2f(m - M) + s2 * exp2f(m2 - M);
  m = M;
}

__device__ __forceinline__ void lse_add(float& m, float& s, float v) {
  if (v > m) {
    s = s * exp2f(m - v) + 1.0f;
    m = v;
  } else {
    s += exp2f(v - m);
  }
}

__device__ __forceinline__ void warp_lse(float& m, float& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
}

// lexicographic (value, index) minimum: smaller value, then smaller index (first occurrence on ties)
__device__ __forceinline__ void argmin_merge(float& v, int& i, float v2, int i2) {
  if (v2 < v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

__device__ __forceinline__ void warp_argmin(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
    argmin_merge(v, i, v2, i2);
  }
}

__global__ void __launch_bounds__(kThreads) sinkhorn_kernel(const float* __restrict__ C, float* F, float* G,
                                                            const float* __restrict__ sched, int n, int iters,
                                                            float log_w, float tol, float eps_final) {
  const float* Cp = C + (int64_t)blockIdx.x * n * n;
  float* Fp = F + (int64_t)blockIdx.x * n;
  float* Gp = G + (int64_t)blockIdx.x * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float sm[kWarps][32], ss[kWarps][32];
  // max |Δf| per iteration (non-negative floats order like their bit patterns); double-buffered so that
  // resetting the next iteration's slot never races with a slow thread still reading the previous one
  __shared__ unsigned delta_bits[2];
  if (threadIdx.x < 2) delta_bits[threadIdx.x] = 0u;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    Fp[i] = 0.0f;
    Gp[i] = 0.0f;
  }
  __syncthreads();
  for (int it = 0; it < iters; ++it) {
    const float eps = sched[it];
    const float k = kLog2e / eps;  // exp(x/ε) = 2^(x·log2(e)/ε)
    const float back = eps * kLn2;
    unsigned* dbits = &delta_bits[it & 1];
    // Row update: warp per row.
    float delta = 0.0f;
    for (int i = warp; i < n; i += kWarps) {
      const float* row = Cp + (int64_t)i * n;
      float m = kNegBig, s = 0.0f;
      for (int j = lane; j < n; j += 32) lse_add(m, s, (Gp[j] - row[j]) * k);
      warp_lse(m, s);
      const float f_new = eps * log_w - back * (m + log2f(s));
      if (lane == 0) {
        delta = fmaxf(delta, fabsf(f_new - Fp[i]));
        Fp[i] = f_new;
      }
    }
    if (lane == 0 && delta > 0.0f) atomicMax(dbits, __float_as_uint(delta));
    __syncthreads();
    // Every thread has passed iteration it − 1's convergence check: the other slot is free to reset.
    if (threadIdx.x == 0) delta_bits[(it + 1) & 1] = 0u;
    // Column update: tiles of 32 columns, lane = column, warp = rows warp, warp + kWarps, ...
    for (int c0 = 0; c0 < n; c0 += 32) {
      const int j = c0 + lane;
      float m = kNegBig, s = 0.0f;
      if (j < n)
        for (int i = warp; i < n; i += kWarps) lse_add(m, s, (Fp[i] - Cp[(int64_t)i * n + j]) * k);
      sm[warp][lane] = m;
      ss[warp][lane] = s;
      __syncthreads();
      if (warp == 0 && j < n) {
        float M = sm[0][lane], S = ss[0][lane];
        for (int w = 1; w < kWarps; ++w) lse_merge(M, S, sm[w][lane], ss[w][lane]);
        Gp[j] = eps * log_w - back * (M + log2f(S));
      }
      __syncthreads();
    }
    // Device-side convergence: only at the final ε, once f no longer moves (uniform across the block).
    if (eps <= eps_final && __uint_as_float(*dbits) <= tol * eps) break;
  }
}

struct RoundScratch {
  int* taken;   // [n] 1 = column fixed
  int* bestc;   // [n] best free column of each free row
  int* bestr;   // [n] best free row of each free column
  int* partner; // [n] 2-opt partner
  int* newp;    // [n] 2-opt next permutation
  float* d;     // [n] C[i, perm_i]
  float* gain;  // [n] best 2-opt gain
};

__device__ RoundScratch scratch_of(int32_t* ws, int n) {
  int32_t* b = ws + (int64_t)blockIdx.x * 7 * n;
  return {b, b + n, b + 2 * n, b + 3 * n, b + 4 * n, reinterpret_cast<float*>(b + 5 * n),
          reinterpret_cast<float*>(b + 6 * n)};
}

__global__ void __launch_bounds__(kThreads) round_kernel(const float* __restrict__ C, const float* __restrict__ F,
                                                         const float* __restrict__ G, int32_t* PERM, int32_t* WS,
                                                         int n, int max_rounds) {
  const float* Cp = C + (int64_t)blockIdx.x * n * n;
  const float* Fp = F + (int64_t)blockIdx.x * n;
  const float* Gp = G + (int64_t)blockIdx.x * n;
  int32_t* Pp = PERM + (int64_t)blockIdx.x * n;
  const RoundScratch w = scratch_of(WS, n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float sv[kWarps][32];
  __shared__ int si[kWarps][32];
  __shared__ int nfree;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    Pp[i] = -1;
    w.taken[i] = 0;
  }
  if (threadIdx.x == 0) nfree = n;
  __syncthreads();
  for (int rnd = 0; rnd < max_rounds && nfree > 0; ++rnd) {
    // Each free row: cheapest free column (warp per row).
    for (int i = warp; i < n; i += kWarps) {
      if (Pp[i] >= 0) continue;  // uniform within the warp
      const float* row = Cp + (int64_t)i * n;
      const float fi = Fp[i];
      float v = kBig;
      int idx = n;
      for (int j = lane; j < n; j += 32)
        if (!w.taken[j]) argmin_merge(v, idx, (row[j] - fi) - Gp[j], j);
      warp_argmin(v, idx);
      if (lane == 0) w.bestc[i] = idx < n ? idx : -1;
    }
    // Each free column: cheapest free row (32-column tiles, warps over rows, merged in shared memory).
    for (int c0 = 0; c0 < n; c0 += 32) {
      const int j = c0 + lane;
      float v = kBig;
      int idx = n;
      if (j < n && !w.taken[j]) {
        const float gj = Gp[j];
        for (int i = warp; i < n; i += kWarps)
          if (Pp[i] < 0) argmin_merge(v, idx, (Cp[(int64_t)i * n + j] - Fp[i]) - gj, i);
      }
      sv[warp][lane] = v;
      si[warp][lane] = idx;
      __syncthreads();
      if (warp == 0 && j < n) {
        float V = sv[0][lane];
        int I = si[0][lane];
        for (int q = 1; q < kWarps; ++q) argmin_merge(V, I, sv[q][lane], si[q][lane]);
        w.bestr[j] = I < n ? I : -1;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) nfree = 0;
    __syncthreads();
    // Fix mutually-best pairs (disjoint by construction: no two rows write the same column).
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      if (Pp[i] >= 0) continue;
      const int c = w.bestc[i];
      if (c >= 0 && w.bestr[c] == i) {
        Pp[i] = c;
        w.taken[c] = 1;
      } else {
        ++cnt;
      }
    }
    if (cnt) atomicAdd(&nfree, cnt);
    __syncthreads();
  }
  // Completion after the round budget (rare): k-th free row (ascending) gets the k-th free column (ascending).
  if (threadIdx.x == 0 && nfree > 0) {
    int c = 0;
    for (int i = 0; i < n; ++i) {
      if (Pp[i] >= 0) continue;
      while (w.taken[c]) ++c;
      Pp[i] = c++;
    }
  }
}

__global__ void __launch_bounds__(kThreads) two_opt_kernel(const float* __restrict__ C, int32_t* PERM, int32_t* WS,
                                                           int n, int rounds) {
  const float* Cp = C + (int64_t)blockIdx.x * n * n;
  int32_t* Pp = PERM + (int64_t)blockIdx.x * n;
  const RoundScratch w = scratch_of(WS, n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ int changed;
  __syncthreads();
  for (int rnd = 0; rnd < rounds; ++rnd) {
    for (int i = threadIdx.x; i < n; i += kThreads) w.d[i] = Cp[(int64_t)i * n + Pp[i]];
    if (threadIdx.x == 0) changed = 0;
    __syncthreads();
    // Best partner per row: maximise the gain (first index on ties) = minimise −gain.
    for (int i = warp; i < n; i += kWarps) {
      const int pi = Pp[i];
      const float di = w.d[i];
      float v = kBig;
      int idx = n;
      for (int j = lane; j < n; j += 32) {
        const float gain = ((di + w.d[j]) - Cp[(int64_t)i * n + Pp[j]]) - Cp[(int64_t)j * n + pi];
        argmin_merge(v, idx, -gain, j);
      }
      warp_argmin(v, idx);
      if (lane == 0) {
        w.partner[i] = idx;
        w.gain[i] = -v;
      }
    }
    __syncthreads();
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int q = w.partner[i];
      const bool swap = w.gain[i] > 0.0f && q != i && w.partner[q] == i;
      w.newp[i] = swap ? Pp[q] : Pp[i];
      cnt += swap;
    }
    if (cnt) atomicAdd(&changed, cnt);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) Pp[i] = w.newp[i];
    __syncthreads();
    if (changed == 0) break;
    __syncthreads();  // everyone has read `changed` before thread 0 resets it
  }
}

}  // namespace

int sinkhorn(const float* C, float* f, float* g, const float* sched, int64_t P, int64_t n, int64_t iters,
             float log_w, float tol, float eps_final, void* stream) {
  if (P <= 0 || n <= 0 || iters <= 0) return 0;
  sinkhorn_kernel<<<(unsigned)P, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      C, f, g, sched, (int)n, (int)iters, log_w, tol, eps_final);
  return (int)cudaGetLastError();
}

int64_t round_workspace_ints(int64_t P, int64_t n) { return 7 * P * n; }

int round_and_refine(const float* C, const float* f, const float* g, int32_t* perm, int32_t* workspace, int64_t P,
                     int64_t n, int64_t max_rounds, int64_t refine_rounds, void* stream) {
  if (P <= 0 || n <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  round_kernel<<<(unsigned)P, kThreads, 0, s>>>(C, f, g, perm, workspace, (int)n, (int)max_rounds);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || refine_rounds <= 0) return (int)e;
  two_opt_kernel<<<(unsigned)P, kThreads, 0, s>>>(C, perm, workspace, (int)n, (int)refine_rounds);
  return (int)cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace sinkhorn
}  // namespace lct_fast
