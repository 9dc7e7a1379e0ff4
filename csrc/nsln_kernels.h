// Torch-free interface of the fused NsLN kernels (csrc/nsln_kernels.cu), used by csrc/nsln.cpp.
//
// Layout: x is a contiguous [rows, n] matrix in fp32/bf16/fp16; sample b = row / tokens owns the rows
// [b·tokens, (b+1)·tokens). bias [n], shift/scale [B, n] and all their tangents are fp32 (the binding converts
// them; they are small). Statistics are fp32. Streams are passed as void* (a cudaStream_t) so that this header
// and the binding need no CUDA headers. Functions return 0 or a cudaError_t code (see nsln_error_string).
#pragma once
#include <cstdint>

namespace lct_fast {
namespace nsln {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct FwdArgs {
  const void* x = nullptr;  // [rows, n]
  void* y = nullptr;        // [rows, n] (written when write_y)
  const void* xd = nullptr; // tangent of x (same dtype as x), optional
  void* yd = nullptr;       // tangent of y (written when jvp)
  const float* bias = nullptr;
  const float* biasd = nullptr;
  const float* shift = nullptr;
  const float* scale = nullptr;
  const float* shiftd = nullptr;
  const float* scaled = nullptr;
  float* mean = nullptr;  // [rows]: written when non-null (may be null for the JVP)
  float* rstd = nullptr;
  int64_t rows = 0, n = 0, tokens = 1;
  float eps = 1e-6f;
  int dtype = kFloat32;
  bool write_y = true;
  bool jvp = false;
};

struct BwdArgs {
  const void* dy = nullptr;  // [rows, n], same dtype as x
  const void* x = nullptr;
  void* dx = nullptr;         // written when non-null
  const float* scale = nullptr;  // [B, n] or null (plain NsLN)
  const float* mean = nullptr;   // [rows] from the forward
  const float* rstd = nullptr;
  float* dbias = nullptr;   // [n] written when non-null
  float* dshift = nullptr;  // [B, n] written when non-null
  float* dscale = nullptr;  // [B, n] written when non-null
  int64_t rows = 0, n = 0, samples = 1;
  int dtype = kFloat32;
};

// Number of fp32 workspace values the forward/JVP (split rows) and the backward need.
int64_t fwd_workspace_floats(int64_t rows, int64_t n, int64_t split_threshold, int dtype);
int64_t bwd_workspace_floats(int64_t rows, int64_t n, int64_t samples, int64_t split_threshold, int dtype,
                             int device);

// y (and ẏ when a.jvp) from x; one kernel for rows up to split_threshold, else stats + combine + apply.
int forward(const FwdArgs& a, int64_t split_threshold, float* workspace, void* stream);
// dx and the fp32 parameter gradients; partial sums are kept in the workspace.
int backward(const BwdArgs& a, int64_t split_threshold, float* workspace, int device, void* stream);

const char* error_string(int code);

}  // namespace nsln
}  // namespace lct_fast
