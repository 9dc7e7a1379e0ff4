// torch.library binding of the Sinkhorn OT kernels (csrc/sinkhorn_kernels.cu): ops
//   lct_fast::sinkhorn_cuda(C, sched, tol, eps_final) -> (f, g)
//   lct_fast::sinkhorn_round_cuda(C, f, g, max_rounds, refine_rounds) -> perm (int64)
// Fake (meta) implementations live in lct_fast/ops/sinkhorn_cuda.py. CPU-side torch headers only; the stream comes from
// the CUDA device-guard implementation.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "sinkhorn_kernels.h"

namespace {

namespace K = lct_fast::sinkhorn;
using at::Tensor;

void* stream_of(const Tensor& x) {
  return c10::impl::getDeviceGuardImpl(c10::kCUDA)->getStream(x.device()).native_handle();
}

void check_rc(int rc, const char* op) { TORCH_CHECK(rc == 0, op, ": CUDA error ", K::error_string(rc)); }

void check_cost(const Tensor& C, const char* op) {
  TORCH_CHECK(C.is_cuda(), op, ": C must be a CUDA tensor, got ", C.device());
  TORCH_CHECK(C.dim() == 3 && C.size(1) == C.size(2), op, ": C must have shape [P, n, n], got ", C.sizes());
  TORCH_CHECK(C.size(1) < (int64_t{1} << 31) / (C.size(1) > 0 ? C.size(1) : 1), op, ": n = ", C.size(1),
              " too large");
}

Tensor potential(const Tensor& t, const Tensor& C, const char* what) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef({C.size(0), C.size(1)}), "sinkhorn_round_cuda: ", what,
              " must have shape [", C.size(0), ", ", C.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.device() == C.device(), "sinkhorn_round_cuda: ", what, " is on ", t.device(), ", C on ", C.device());
  return t.to(at::kFloat).contiguous();
}

std::tuple<Tensor, Tensor> sinkhorn_cuda(const Tensor& C_in, const Tensor& sched_in, double tol, double eps_final) {
  check_cost(C_in, "sinkhorn_cuda");
  c10::DeviceGuard guard(C_in.device());
  TORCH_CHECK(sched_in.dim() == 1 && sched_in.numel() > 0, "sinkhorn_cuda: sched must be a non-empty vector, got ",
              sched_in.sizes());
  TORCH_CHECK(sched_in.device() == C_in.device(), "sinkhorn_cuda: sched is on ", sched_in.device(), ", C on ",
              C_in.device());
  TORCH_CHECK(tol >= 0.0, "sinkhorn_cuda: tol must be >= 0, got ", tol);
  const Tensor C = C_in.to(at::kFloat).contiguous();
  const Tensor sched = sched_in.to(at::kFloat).contiguous();
  const int64_t P = C.size(0), n = C.size(1);
  Tensor f = at::zeros({P, n}, C.options());
  Tensor g = at::zeros({P, n}, C.options());
  if (P == 0 || n == 0) return {f, g};
  check_rc(K::sinkhorn(C.data_ptr<float>(), f.data_ptr<float>(), g.data_ptr<float>(), sched.data_ptr<float>(), P, n,
                       sched.numel(), (float)-std::log((double)n), (float)tol, (float)eps_final, stream_of(C)),
           "sinkhorn_cuda");
  return {f, g};
}

Tensor sinkhorn_round_cuda(const Tensor& C_in, const Tensor& f_in, const Tensor& g_in, int64_t max_rounds,
                           int64_t refine_rounds) {
  check_cost(C_in, "sinkhorn_round_cuda");
  c10::DeviceGuard guard(C_in.device());
  TORCH_CHECK(max_rounds >= 0 && refine_rounds >= 0, "sinkhorn_round_cuda: max_rounds and refine_rounds must be "
              ">= 0, got ", max_rounds, ", ", refine_rounds);
  const Tensor C = C_in.to(at::kFloat).contiguous();
  const Tensor f = potential(f_in, C, "f"), g = potential(g_in, C, "g");
  const int64_t P = C.size(0), n = C.size(1);
  Tensor perm = at::empty({P, n}, C.options().dtype(at::kInt));
  if (P == 0 || n == 0) return perm.to(at::kLong);
  Tensor ws = at::empty({K::round_workspace_ints(P, n)}, C.options().dtype(at::kInt));
  check_rc(K::round_and_refine(C.data_ptr<float>(), f.data_ptr<float>(), g.data_ptr<float>(), perm.data_ptr<int32_t>(),
                               ws.data_ptr<int32_t>(), P, n, max_rounds, refine_rounds, stream_of(C)),
           "sinkhorn_round_cuda");
  return perm.to(at::kLong);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lct_fast, m) {
  m.def("sinkhorn_cuda(Tensor C, Tensor sched, float tol, float eps_final) -> (Tensor, Tensor)");
  m.def("sinkhorn_round_cuda(Tensor C, Tensor f, Tensor g, int max_rounds, int refine_rounds) -> Tensor");
}

TORCH_LIBRARY_IMPL(lct_fast, CUDA, m) {
  m.impl("sinkhorn_cuda", &sinkhorn_cuda);
  m.impl("sinkhorn_round_cuda", &sinkhorn_round_cuda);
}
