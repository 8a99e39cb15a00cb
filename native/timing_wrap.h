// TimingEvent: a mark on a backend's queue for timing device work (a CUDA event on the
// cuda backend; the host clock on the cpu backend, whose calls finish before they return).
#pragma once

#include <napi.h>

#include <memory>

#include "core/backend.h"

namespace adafisher {

class TimingEventWrap : public Napi::ObjectWrap<TimingEventWrap> {
 public:
  static constexpr napi_type_tag kTypeTag = {0x6164616669736865ULL, 0x7454696d696e6703ULL};
  static constexpr const char* kClassName = "TimingEvent";
  static Napi::Function Init(Napi::Env env);

  explicit TimingEventWrap(const Napi::CallbackInfo& info);
  ~TimingEventWrap() override;

 private:
  Napi::Value GetBackendName(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value GetRecorded(const Napi::CallbackInfo& info);
  Napi::Value Record(const Napi::CallbackInfo& info);
  Napi::Value ElapsedMs(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  void CheckAlive(Napi::Env env, const char* which) const;

  std::shared_ptr<Backend> backend_;
  void* mark_ = nullptr;
  bool recorded_ = false;
};

}  // namespace adafisher
