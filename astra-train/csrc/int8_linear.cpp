// fbgemm's dynamic int8 linear (what torch.ao's quantize_dynamic runs on x86 CPUs) for tch, which
// does not bind the `quantized::` dispatcher ops: int8 weights per output channel, activations
// quantized per tensor at run time, int32 accumulation, fp32 out. Called through the dispatcher's
// boxed interface, so no header of the packed-weight class is needed. Every function catches C++
// exceptions and returns the message instead (nothing may unwind into Rust).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdio>
#include <cstring>

namespace {

struct Packed {
  c10::IValue params;  // a LinearPackedParamsBase custom-class object
};

void write_error(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", what);
  }
}

// The first line of a c10 message (the rest is a C++ backtrace).
const char* first_line(const std::exception& e, std::string& keep) {
  keep = e.what();
  auto nl = keep.find('\n');
  if (nl != std::string::npos) keep.resize(nl);
  return keep.c_str();
}

}  // namespace

extern "C" {

// Packs `qweight` (int8 [out, in]) with per-output-channel `scales` (float [out]) and an optional
// float `bias` [out]; returns the handle, or null with the reason in `err`.
void* astra_int8_prepack(const at::Tensor* qweight, const at::Tensor* scales, const at::Tensor* bias,
                         char* err, size_t err_len) {
  std::string keep;
  try {
    auto s = scales->to(at::kDouble).contiguous();
    auto zp = at::zeros({s.numel()}, at::TensorOptions().dtype(at::kLong));
    auto w = at::_make_per_channel_quantized_tensor(qweight->contiguous(), s, zp, 0);
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
    torch::jit::Stack stack;
    stack.emplace_back(w);
    stack.emplace_back(bias != nullptr ? c10::IValue(bias->contiguous()) : c10::IValue());
    op.callBoxed(&stack);
    return new Packed{std::move(stack.at(0))};
  } catch (const std::exception& e) {
    write_error(err, err_len, first_line(e, keep));
    return nullptr;
  }
}

// y = x W^T + b for float `x` [..., in]; returns a new tensor (free it as tch frees tensors), or
// null with the reason in `err`.
at::Tensor* astra_int8_linear(void* packed, const at::Tensor* x, bool reduce_range, char* err,
                              size_t err_len) {
  std::string keep;
  try {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    torch::jit::Stack stack;
    stack.emplace_back(x->contiguous());
    stack.emplace_back(static_cast<Packed*>(packed)->params);
    stack.emplace_back(reduce_range);
    op.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception& e) {
    write_error(err, err_len, first_line(e, keep));
    return nullptr;
  }
}

void astra_int8_free(void* packed) { delete static_cast<Packed*>(packed); }

}  // extern "C"
