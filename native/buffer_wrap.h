// DeviceBuffer: float32 memory owned by one backend (host memory for `cpu`, device
// memory for `cuda`), freed by dispose() or by the garbage collector's finalizer.
#pragma once

#include <napi.h>

#include <memory>

#include "core/backend.h"
#include "glue.h"

namespace adafisher {

// isDeviceBuffer(value): whether `value` is a DeviceBuffer made by this addon (its type tag:
// NOTE: [receiver checks]); runs no JS, so no Proxy trap or getter, and never throws.
Napi::Value IsDeviceBuffer(const Napi::CallbackInfo& info);

class BufferWrap : public Napi::ObjectWrap<BufferWrap> {
 public:
  static constexpr napi_type_tag kTypeTag = {0x6164616669736865ULL, 0x7242756666657201ULL};
  static constexpr const char* kClassName = "DeviceBuffer";
  static Napi::Function Init(Napi::Env env);

  explicit BufferWrap(const Napi::CallbackInfo& info);
  ~BufferWrap() override;

  float* data() const { return data_; }
  int64_t length() const { return length_; }
  const std::shared_ptr<Backend>& backend() const { return backend_; }

 private:
  Napi::Value GetLength(const Napi::CallbackInfo& info);
  Napi::Value GetBackendName(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value Upload(const Napi::CallbackInfo& info);
  Napi::Value Download(const Napi::CallbackInfo& info);
  Napi::Value Fill(const Napi::CallbackInfo& info);
  Napi::Value CopyFrom(const Napi::CallbackInfo& info);
  Napi::Value Sync(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  void CheckAlive(Napi::Env env) const;

  std::shared_ptr<Backend> backend_;
  float* data_ = nullptr;
  int64_t length_ = 0;
  ExternalMemory external_;
};

}  // namespace adafisher
