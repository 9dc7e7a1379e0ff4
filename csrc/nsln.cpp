// torch.library binding of the fused NsLN kernels (csrc/nsln_kernels.cu): ops
//   lct_fast::nsln_fwd_cuda, lct_fast::nsln_bwd_cuda, lct_fast::nsln_jvp_cuda
// with the same schemas as the Triton ops in lct_fast/ops/nsln_fused.py (fake implementations live there).
// CPU-side torch headers only; the stream comes from the CUDA device-guard implementation.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "nsln_kernels.h"

namespace {

namespace K = lct_fast::nsln;
using at::Tensor;
using OptT = std::optional<Tensor>;

int dtype_code(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return K::kFloat32;
    case at::kBFloat16: return K::kBFloat16;
    case at::kHalf: return K::kFloat16;
    default: TORCH_CHECK(false, "nsln (cuda): x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return -1;
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be a [rows, n] matrix, got ", x.dim(), " dims");
}

// small parameters (bias [n], shift/scale [B, n] and their tangents) go to the kernels as contiguous fp32
OptT f32(const OptT& t, const Tensor& x, at::IntArrayRef shape, const char* what) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->sizes() == shape, "nsln (cuda): ", what, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "nsln (cuda): ", what, " is on ", t->device(), ", x on ", x.device());
  return t->to(at::kFloat).contiguous();
}

const float* fptr(const OptT& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void* stream_of(const Tensor& x) {
  return c10::impl::getDeviceGuardImpl(c10::kCUDA)->getStream(x.device()).native_handle();
}

void check_rc(int rc, const char* op) { TORCH_CHECK(rc == 0, op, ": CUDA error ", K::error_string(rc)); }

int64_t num_samples_of(const OptT& scale, const Tensor& x, const char* op) {
  if (!scale.has_value()) return 1;
  const int64_t b = scale->size(0);
  TORCH_CHECK(b > 0 && x.size(0) % b == 0, op, ": rows ", x.size(0), " not divisible by B = ", b);
  return b;
}

std::tuple<Tensor, Tensor, Tensor> nsln_fwd_cuda(const Tensor& x_in, const OptT& bias, const OptT& shift,
                                                 const OptT& scale, double eps, int64_t split_threshold) {
  check_x(x_in, "nsln_fwd_cuda");
  c10::DeviceGuard guard(x_in.device());
  TORCH_CHECK(shift.has_value() == scale.has_value(), "nsln_fwd_cuda: shift and scale must be given together");
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1), b = num_samples_of(scale, x, "nsln_fwd_cuda");
  const OptT bi = f32(bias, x, {n}, "bias"), sh = f32(shift, x, {b, n}, "shift"), sc = f32(scale, x, {b, n}, "scale");
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  K::FwdArgs a;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.bias = fptr(bi);
  a.shift = fptr(sh);
  a.scale = fptr(sc);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.n = n;
  a.tokens = rows / b;
  a.eps = (float)eps;
  a.dtype = dtype_code(x);
  const int64_t ws_n = K::fwd_workspace_floats(rows, n, split_threshold, a.dtype);
  Tensor ws = at::empty({ws_n > 0 ? ws_n : 1}, x.options().dtype(at::kFloat));
  check_rc(K::forward(a, split_threshold, ws.data_ptr<float>(), stream_of(x)), "nsln_fwd_cuda");
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nsln_bwd_cuda(const Tensor& dy_in, const Tensor& x_in,
                                                         const Tensor& mean, const Tensor& rstd, const OptT& scale,
                                                         int64_t num_samples, bool need_dx, bool need_dbias,
                                                         bool need_dshift, bool need_dscale, int64_t split_threshold) {
  check_x(x_in, "nsln_bwd_cuda");
  c10::DeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t b = scale.has_value() ? num_samples_of(scale, x, "nsln_bwd_cuda") : num_samples;
  TORCH_CHECK(b > 0 && rows % b == 0, "nsln_bwd_cuda: rows ", rows, " not divisible by B = ", b);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "nsln_bwd_cuda: dy ", dy_in.sizes(), " vs x ", x.sizes());
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "nsln_bwd_cuda: mean/rstd must have ", rows, " values");
  const Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
  const OptT sc = f32(scale, x, {b, n}, "scale");
  const auto f32opts = x.options().dtype(at::kFloat);
  Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor db = at::empty({need_dbias ? n : 0}, f32opts);
  Tensor dsh = need_dshift ? at::empty({b, n}, f32opts) : at::empty({0}, f32opts);
  Tensor dsc = need_dscale ? at::empty({b, n}, f32opts) : at::empty({0}, f32opts);
  if (rows == 0 || n == 0) {
    db.zero_();
    dsh.zero_();
    dsc.zero_();
    return {dx, db, dsh, dsc};
  }
  K::BwdArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.dx = need_dx ? dx.data_ptr() : nullptr;
  a.scale = fptr(sc);
  a.mean = m.data_ptr<float>();
  a.rstd = r.data_ptr<float>();
  a.dbias = need_dbias ? db.data_ptr<float>() : nullptr;
  a.dshift = need_dshift ? dsh.data_ptr<float>() : nullptr;
  a.dscale = need_dscale ? dsc.data_ptr<float>() : nullptr;
  a.rows = rows;
  a.n = n;
  a.samples = b;
  a.dtype = dtype_code(x);
  const int dev = x.device().index();
  Tensor ws = at::empty({K::bwd_workspace_floats(rows, n, b, split_threshold, a.dtype, dev)}, f32opts);
  check_rc(K::backward(a, split_threshold, ws.data_ptr<float>(), dev, stream_of(x)), "nsln_bwd_cuda");
  return {dx, db, dsh, dsc};
}

std::tuple<Tensor, Tensor> nsln_jvp_cuda(const Tensor& x_in, const OptT& xd_in, const OptT& bias, const OptT& biasd,
                                         const OptT& shift, const OptT& scale, const OptT& shiftd,
                                         const OptT& scaled, double eps, bool with_primal, int64_t split_threshold) {
  check_x(x_in, "nsln_jvp_cuda");
  c10::DeviceGuard guard(x_in.device());
  TORCH_CHECK(shift.has_value() == scale.has_value(), "nsln_jvp_cuda: shift and scale must be given together");
  TORCH_CHECK(scale.has_value() || (!shiftd.has_value() && !scaled.has_value()),
              "nsln_jvp_cuda: shift/scale tangents given without shift/scale");
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1), b = num_samples_of(scale, x, "nsln_jvp_cuda");
  OptT xd;
  if (xd_in.has_value()) {
    TORCH_CHECK(xd_in->sizes() == x.sizes(), "nsln_jvp_cuda: xd ", xd_in->sizes(), " vs x ", x.sizes());
    xd = xd_in->to(x.scalar_type()).contiguous();
  }
  const OptT bi = f32(bias, x, {n}, "bias"), bid = f32(biasd, x, {n}, "bias tangent");
  const OptT sh = f32(shift, x, {b, n}, "shift"), sc = f32(scale, x, {b, n}, "scale");
  const OptT shd = f32(shiftd, x, {b, n}, "shift tangent"), scd = f32(scaled, x, {b, n}, "scale tangent");
  Tensor y = with_primal ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor yd = at::empty_like(x);
  K::FwdArgs a;
  a.x = x.data_ptr();
  a.y = with_primal ? y.data_ptr() : nullptr;
  a.xd = xd.has_value() ? xd->data_ptr() : nullptr;
  a.yd = yd.data_ptr();
  a.bias = fptr(bi);
  a.biasd = fptr(bid);
  a.shift = fptr(sh);
  a.scale = fptr(sc);
  a.shiftd = fptr(shd);
  a.scaled = fptr(scd);
  a.rows = rows;
  a.n = n;
  a.tokens = rows / b;
  a.eps = (float)eps;
  a.dtype = dtype_code(x);
  a.write_y = with_primal;
  a.jvp = true;
  const int64_t ws_n = K::fwd_workspace_floats(rows, n, split_threshold, a.dtype);
  Tensor ws = at::empty({ws_n > 0 ? ws_n : 1}, x.options().dtype(at::kFloat));
  check_rc(K::forward(a, split_threshold, ws.data_ptr<float>(), stream_of(x)), "nsln_jvp_cuda");
  return {y, yd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lct_fast, m) {
  m.def("nsln_fwd_cuda(Tensor x, Tensor? bias, Tensor? shift, Tensor? scale, float eps, int split_threshold)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("nsln_bwd_cuda(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? scale, int num_samples, "
        "bool need_dx, bool need_dbias, bool need_dshift, bool need_dscale, int split_threshold)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("nsln_jvp_cuda(Tensor x, Tensor? xd, Tensor? bias, Tensor? biasd, Tensor? shift, Tensor? scale, "
        "Tensor? shiftd, Tensor? scaled, float eps, bool with_primal, int split_threshold) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lct_fast, CUDA, m) {
  m.impl("nsln_fwd_cuda", &nsln_fwd_cuda);
  m.impl("nsln_bwd_cuda", &nsln_bwd_cuda);
  m.impl("nsln_jvp_cuda", &nsln_jvp_cuda);
}
