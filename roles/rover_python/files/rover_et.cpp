// A C interface to the ExecuTorch runtime (the executorch wheel's lib/), for rover_runtime's ctypes backend
// (rover_runtime/backends/executorch_model.py): load a .pte, run its forward method on float32 inputs, copy
// its float32 output. No torch, no Python API. Built per architecture by executorch_wheel.py.
// Errors are returned (null handle or -1) with a message in the caller's buffer; nothing here aborts.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {
struct Handle {
  std::unique_ptr<Module> module;
  std::vector<std::vector<int32_t>> input_shapes;
  std::vector<int32_t> output_shape;
};

void put(char* err, size_t len, const std::string& message) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", message.c_str());
  }
}

// ExecuTorch's own log: errors and fatal messages to stderr (the journal, on a car); its info lines (CPU
// probing, threadpool resets) would otherwise fill the journal at every start.
void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
              const char* message, size_t length) {
  if (level == kError || level == kFatal) {
    std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", static_cast<char>(level), filename, line,
                 static_cast<int>(length), message);
  }
}

void quiet_log() {
  static const bool registered =
      executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
  (void)registered;
}

std::string describe(Error error) {
  return std::string(executorch::runtime::to_string(error)) + " (error " +
         std::to_string(static_cast<int>(error)) + ")";
}
}  // namespace

extern "C" {

int rover_et_abi_version() { return 1; }

int rover_et_set_threads(uint32_t threads) {
  quiet_log();
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) return -1;
  return pool->_unsafe_reset_threadpool(threads) ? 0 : -1;
}

void* rover_et_open(const char* path, char* err, size_t errlen) {
  quiet_log();
  auto handle = std::make_unique<Handle>();
  handle->module = std::make_unique<Module>(path, Module::LoadMode::File);
  // Full verification of the flatbuffer: a damaged file is an error here, never a crash later.
  Error error = handle->module->load(executorch::runtime::Program::Verification::InternalConsistency);
  if (error != Error::Ok) {
    put(err, errlen, "the program does not load: " + describe(error));
    return nullptr;
  }
  error = handle->module->load_forward();
  if (error != Error::Ok) {
    put(err, errlen,
        "its forward method does not load (a delegate or an operator this runtime lacks?): " +
            describe(error));
    return nullptr;
  }
  auto meta = handle->module->method_meta("forward");
  if (!meta.ok()) {
    put(err, errlen, "no forward method: " + describe(meta.error()));
    return nullptr;
  }
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok() || info->scalar_type() != ScalarType::Float) {
      put(err, errlen, "input " + std::to_string(i) + " is not a float32 tensor");
      return nullptr;
    }
    auto sizes = info->sizes();
    handle->input_shapes.emplace_back(sizes.begin(), sizes.end());
  }
  if (meta->num_outputs() != 1) {
    put(err, errlen, "the program has " + std::to_string(meta->num_outputs()) + " outputs, expected 1");
    return nullptr;
  }
  auto out = meta->output_tensor_meta(0);
  if (!out.ok() || out->scalar_type() != ScalarType::Float) {
    put(err, errlen, "the output is not a float32 tensor");
    return nullptr;
  }
  handle->output_shape.assign(out->sizes().begin(), out->sizes().end());
  return handle.release();
}

int rover_et_num_inputs(void* h) { return static_cast<int>(static_cast<Handle*>(h)->input_shapes.size()); }

// Writes up to `max` dims of input `index` (or of the output for index -1); returns the rank or -1.
int rover_et_shape(void* h, int index, int64_t* dims, int max) {
  auto* handle = static_cast<Handle*>(h);
  const std::vector<int32_t>* shape = nullptr;
  if (index == -1) {
    shape = &handle->output_shape;
  } else if (index >= 0 && static_cast<size_t>(index) < handle->input_shapes.size()) {
    shape = &handle->input_shapes[index];
  } else {
    return -1;
  }
  for (size_t i = 0; i < shape->size() && static_cast<int>(i) < max; ++i) dims[i] = (*shape)[i];
  return static_cast<int>(shape->size());
}

// inputs: one contiguous float32 buffer per input, in the program's shapes; out: `out_len` floats.
int rover_et_run(void* h, float* const* inputs, int n_inputs, float* out, size_t out_len, char* err,
                 size_t errlen) {
  auto* handle = static_cast<Handle*>(h);
  if (n_inputs != static_cast<int>(handle->input_shapes.size())) {
    put(err, errlen, "got " + std::to_string(n_inputs) + " inputs, the program takes " +
                         std::to_string(handle->input_shapes.size()));
    return -1;
  }
  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> values;
  for (int i = 0; i < n_inputs; ++i) {
    tensors.push_back(executorch::extension::from_blob(inputs[i], handle->input_shapes[i]));
    values.emplace_back(*tensors.back());
  }
  auto result = handle->module->forward(values);
  if (!result.ok()) {
    put(err, errlen, "forward failed: " + describe(result.error()));
    return -1;
  }
  const auto& tensor = result->at(0).toTensor();
  if (static_cast<size_t>(tensor.numel()) != out_len) {
    put(err, errlen, "the output has " + std::to_string(tensor.numel()) + " values, expected " +
                         std::to_string(out_len));
    return -1;
  }
  std::memcpy(out, tensor.const_data_ptr<float>(), out_len * sizeof(float));
  return 0;
}

void rover_et_close(void* h) { delete static_cast<Handle*>(h); }
}
