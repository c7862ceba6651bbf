// Kernel launches through the CUDA driver API, resolved at run time (dlopen "libcuda.so.1", as Triton's own
// launcher does), so that this library builds from torch's headers and the cuda.h Triton ships, on a
// machine without a CUDA toolkit or a GPU. Two stand-ins replace the driver for tests and measurements:
// "record" keeps every launch (kernel, grid, block, shared memory, the packed parameter values) and
// "null" does nothing.
#include "plan.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>

namespace triton_bn_cuda {
namespace {

enum class Mode { kReal, kRecord, kNull };
Mode mode = Mode::kReal;

struct Recorded {
  std::string name;
  std::array<int64_t, 3> grid;
  int64_t block, shared;
  std::vector<std::pair<ParamKind, uint64_t>> params;
};
std::mutex recorded_mutex;
std::vector<Recorded> recorded;

// The driver entry points this file calls, looked up once.
struct Driver {
  decltype(&::cuLaunchKernel) launch_kernel = nullptr;
  decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&::cuStreamIsCapturing) stream_is_capturing = nullptr;
};

const Driver& driver_api() {
  static const Driver api = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(lib != nullptr, "triton_bn: libcuda.so.1 could not be loaded (", dlerror(), ")");
    // the versioned names cuda.h maps these to (cuLaunchKernel is itself; the context calls are _v2 where
    // they have one)
    d.launch_kernel = reinterpret_cast<decltype(d.launch_kernel)>(dlsym(lib, "cuLaunchKernel"));
    d.ctx_get_current = reinterpret_cast<decltype(d.ctx_get_current)>(dlsym(lib, "cuCtxGetCurrent"));
    d.ctx_set_current = reinterpret_cast<decltype(d.ctx_set_current)>(dlsym(lib, "cuCtxSetCurrent"));
    d.device_get = reinterpret_cast<decltype(d.device_get)>(dlsym(lib, "cuDeviceGet"));
    d.primary_ctx_retain = reinterpret_cast<decltype(d.primary_ctx_retain)>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
    d.stream_is_capturing = reinterpret_cast<decltype(d.stream_is_capturing)>(dlsym(lib, "cuStreamIsCapturing"));
    TORCH_CHECK(d.launch_kernel && d.ctx_get_current && d.ctx_set_current && d.device_get && d.primary_ctx_retain &&
                    d.stream_is_capturing,
                "triton_bn: libcuda.so.1 lacks an entry point this launcher needs");
    return d;
  }();
  return api;
}

// As Triton's launcher: a thread without a current context gets the device's primary one.
void ensure_context(const Driver& api, int device_index) {
  CUcontext context = nullptr;
  api.ctx_get_current(&context);
  if (context != nullptr) return;
  CUdevice device;
  TORCH_CHECK(api.device_get(&device, device_index) == CUDA_SUCCESS, "triton_bn: cuDeviceGet failed");
  TORCH_CHECK(api.primary_ctx_retain(&context, device) == CUDA_SUCCESS, "triton_bn: cuDevicePrimaryCtxRetain failed");
  api.ctx_set_current(context);
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

}  // namespace

void set_driver(const std::string& name) {
  if (name == "real" || name.empty()) {
    mode = Mode::kReal;
  } else if (name == "record") {
    mode = Mode::kRecord;
  } else if (name == "null") {
    mode = Mode::kNull;
  } else {
    TORCH_CHECK(false, "triton_bn: unknown CUDA driver '", name, "' (real, record or null)");
  }
}

std::string driver() { return mode == Mode::kReal ? "real" : mode == Mode::kRecord ? "record" : "null"; }

void launch(const Launch& spec, void** params, const std::vector<uint64_t>& words, const at::Device& device) {
  if (mode == Mode::kNull) return;
  if (mode == Mode::kRecord) {
    Recorded r{spec.name, spec.grid, spec.block, spec.shared, {}};
    for (size_t i = 0; i < spec.params.size(); ++i) r.params.emplace_back(spec.params[i].kind, words[i]);
    std::lock_guard<std::mutex> lock(recorded_mutex);
    recorded.push_back(std::move(r));
    return;
  }
  const Driver& api = driver_api();
  const c10::impl::DeviceGuardImplInterface* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  c10::DeviceGuard guard(device);
  ensure_context(api, device.index());
  auto stream = static_cast<CUstream>(cuda->getStream(device).native_handle());
  const CUresult result = api.launch_kernel(
      reinterpret_cast<CUfunction>(spec.function), static_cast<unsigned>(spec.grid[0]),
      static_cast<unsigned>(spec.grid[1]), static_cast<unsigned>(spec.grid[2]), static_cast<unsigned>(spec.block), 1, 1,
      static_cast<unsigned>(spec.shared), stream, params, nullptr);
  TORCH_CHECK(result == CUDA_SUCCESS, "triton_bn: cuLaunchKernel(", spec.name, ") failed with CUresult ",
              static_cast<int>(result));
}

uint64_t current_stream(const at::Device& device) {
  if (mode != Mode::kReal || !device.is_cuda()) return 0;
  return reinterpret_cast<uint64_t>(c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle());
}

bool capturing(const at::Device& device) {
  const uint64_t stream = current_stream(device);
  if (stream == 0 && (mode != Mode::kReal || !device.is_cuda())) return false;
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  TORCH_CHECK(driver_api().stream_is_capturing(reinterpret_cast<CUstream>(stream), &status) == CUDA_SUCCESS,
              "triton_bn: cuStreamIsCapturing failed");
  return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

std::string recorded_json() {
  std::lock_guard<std::mutex> lock(recorded_mutex);
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < recorded.size(); ++i) {
    const Recorded& r = recorded[i];
    out << (i ? "," : "") << "{\"kernel\":" << json_string(r.name) << ",\"grid\":[" << r.grid[0] << ","
        << r.grid[1] << "," << r.grid[2] << "],\"block\":" << r.block << ",\"shared\":" << r.shared
        << ",\"params\":[";
    for (size_t j = 0; j < r.params.size(); ++j) {
      const auto& [kind, word] = r.params[j];
      out << (j ? "," : "");
      if (kind == kF32) {
        float value;
        uint32_t bits = static_cast<uint32_t>(word);
        std::memcpy(&value, &bits, sizeof(value));
        out.precision(9);
        if (std::isfinite(value)) {
          out << "{\"f32\":" << value << "}";
        } else {
          out << "{\"f32\":\"" << value << "\"}";  // nan / inf: not JSON numbers
        }
      } else if (kind == kPointer || kind == kNullPointer) {
        out << "{\"ptr\":" << word << "}";
      } else if (kind == kI32) {
        out << "{\"int\":" << static_cast<int32_t>(static_cast<uint32_t>(word)) << "}";
      } else if (kind == kI8) {
        out << "{\"int\":" << static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(word))) << "}";
      } else {
        out << "{\"int\":" << static_cast<int64_t>(word) << "}";
      }
    }
    out << "]}";
  }
  out << "]";
  return out.str();
}

void clear_recorded() {
  std::lock_guard<std::mutex> lock(recorded_mutex);
  recorded.clear();
}

}  // namespace triton_bn_cuda
