#include "timing_wrap.h"

#include <string>

#include "glue.h"

namespace adafisher {

Napi::Function TimingEventWrap::Init(Napi::Env env) {
  using C = CheckedClass<TimingEventWrap>;
  Napi::Function ctor = DefineClass(env, kClassName, {});
  C::Method<&TimingEventWrap::Record>(env, ctor, "record");
  C::Method<&TimingEventWrap::ElapsedMs>(env, ctor, "elapsedMs");
  C::Method<&TimingEventWrap::Dispose>(env, ctor, "dispose");
  C::Getter<&TimingEventWrap::GetBackendName>(env, ctor, "backend");
  C::Getter<&TimingEventWrap::GetDisposed>(env, ctor, "disposed");
  C::Getter<&TimingEventWrap::GetRecorded>(env, ctor, "recorded");
  return ctor;
}

// new TimingEvent(backend)
TimingEventWrap::TimingEventWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TimingEventWrap>(info) {
  Napi::Env env = info.Env();
  Guarded(env, [&]() -> Napi::Value {
    TagObject(env, info.This(), kTypeTag);  // see NOTE: [receiver checks]
    backend_ = GetBackend(env, info[0], "backend");
    mark_ = backend_->CreateTimingMark();
    return env.Undefined();
  });
}

TimingEventWrap::~TimingEventWrap() {
  if (mark_ != nullptr) backend_->DestroyTimingMark(mark_);
}

void TimingEventWrap::CheckAlive(Napi::Env env, const char* which) const {
  if (mark_ == nullptr) ThrowCoded(env, ErrorCode::kDisposed, std::string("TimingEvent already disposed") + which + ".");
}

Napi::Value TimingEventWrap::GetBackendName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), backend_ ? backend_->name() : "");
}
Napi::Value TimingEventWrap::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), mark_ == nullptr);
}
Napi::Value TimingEventWrap::GetRecorded(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), recorded_);
}

// record(): marks the backend's queue after all work submitted so far.
Napi::Value TimingEventWrap::Record(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env, "");
    backend_->RecordTimingMark(mark_);
    recorded_ = true;
    return env.Undefined();
  });
}

// elapsedMs(end: TimingEvent): milliseconds from this mark to `end`, once the backend has
// reached both (it waits for them: after `await synchronize()` it does not block).
Napi::Value TimingEventWrap::ElapsedMs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env, "");
    TimingEventWrap* end = TaggedUnwrap<TimingEventWrap>(env, info[0]);
    if (end == nullptr) ThrowTypeError(env, "Expected a TimingEvent for end but received " + Describe(info[0]));
    end->CheckAlive(env, " (end)");
    if (end->backend_.get() != backend_.get())
      ThrowCoded(env, ErrorCode::kForeignBuffer, "Expected a TimingEvent of the " + std::string(backend_->name()) +
                                                     " backend for end but received one of the " + end->backend_->name() + " backend");
    if (!recorded_) ThrowRangeError(env, "Expected a recorded TimingEvent (call record() first) but this one was never recorded");
    if (!end->recorded_)
      ThrowRangeError(env, "Expected a recorded TimingEvent for end (call record() first) but received one that was never recorded");
    return Napi::Number::New(env, backend_->ElapsedMs(mark_, end->mark_));
  });
}

// dispose(): frees the mark now; idempotent.
Napi::Value TimingEventWrap::Dispose(const Napi::CallbackInfo& info) {
  if (mark_ != nullptr) {
    backend_->DestroyTimingMark(mark_);
    mark_ = nullptr;
  }
  return info.Env().Undefined();
}

}  // namespace adafisher
