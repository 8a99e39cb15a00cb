// Built instead of cuda/ when the addon is compiled without CUDA (binding.gyp, or
// cmake-js where no CUDA compiler is found).
#include "core/backend.h"

namespace adafisher {

std::unique_ptr<Backend> CreateCudaBackend(std::string* reason) {
  if (reason != nullptr) *reason = "this binary was built without CUDA support";
  return nullptr;
}

CudaInfo QueryCuda() {
  CudaInfo info;
  info.compiled = false;
  info.usable = false;
  info.reason = "this binary was built without CUDA support";
  return info;
}

}  // namespace adafisher
