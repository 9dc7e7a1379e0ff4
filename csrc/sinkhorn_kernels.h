// Torch-free interface of the Sinkhorn OT kernels (csrc/sinkhorn_kernels.cu), used by csrc/sinkhorn.cpp.
//
// Layout: C is a contiguous fp32 [P, n, n] batch of (reduced, scaled) costs, one independent problem per
// block. Potentials f, g are fp32 [P, n]; permutations int32 [P, n]. Streams are passed as void* (a
// cudaStream_t) so that this header and the binding need no CUDA headers. Functions return 0 or a
// cudaError_t code (see error_string).
#pragma once
#include <cstdint>

namespace lct_fast {
namespace sinkhorn {

// Log-domain Sinkhorn (SPEC §4) with the ε schedule read from the device vector `sched` [iters]. f and g are
// zero-initialised here and written in place. Stops on the device once max|Δf| <= tol·ε at the final ε
// (tol = 0: only at an exact fixed point, i.e. the full fixed budget). log_w = log(1/n).
int sinkhorn(const float* C, float* f, float* g, const float* sched, int64_t P, int64_t n, int64_t iters,
             float log_w, float tol, float eps_final, void* stream);

// Number of int32 workspace values round_and_refine needs.
int64_t round_workspace_ints(int64_t P, int64_t n);

// Mutual-best greedy rounding of R = C − f − g to permutations (device-side termination after all rows are
// fixed or max_rounds rounds; leftovers paired k-th free row with k-th free column), then up to
// refine_rounds of parallel 2-opt on C (stops when a round swaps nothing). perm: int32 [P, n] output.
int round_and_refine(const float* C, const float* f, const float* g, int32_t* perm, int32_t* workspace, int64_t P,
                     int64_t n, int64_t max_rounds, int64_t refine_rounds, void* stream);

const char* error_string(int code);

}  // namespace sinkhorn
}  // namespace lct_fast
