#include "buffer_wrap.h"

#include <algorithm>

#include "glue.h"

namespace adafisher {

Napi::Function BufferWrap::Init(Napi::Env env) {
  using C = CheckedClass<BufferWrap>;
  Napi::Function ctor = DefineClass(env, kClassName, {});
  C::Method<&BufferWrap::Upload>(env, ctor, "upload");
  C::Method<&BufferWrap::Download>(env, ctor, "download");
  C::Method<&BufferWrap::Fill>(env, ctor, "fill");
  C::Method<&BufferWrap::CopyFrom>(env, ctor, "copyFrom");
  C::Method<&BufferWrap::Sync>(env, ctor, "sync");
  C::Method<&BufferWrap::Dispose>(env, ctor, "dispose");
  C::Getter<&BufferWrap::GetLength>(env, ctor, "length");
  C::Getter<&BufferWrap::GetBackendName>(env, ctor, "backend");
  C::Getter<&BufferWrap::GetDisposed>(env, ctor, "disposed");
  return ctor;
}

// new DeviceBuffer(backend, lengthOrData)
BufferWrap::BufferWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BufferWrap>(info) {
  Napi::Env env = info.Env();
  Guarded(env, [&]() -> Napi::Value {
    TagObject(env, info.This(), kTypeTag);  // see NOTE: [receiver checks]
    backend_ = GetBackend(env, info[0], "backend");
    const Napi::Value init = info[1];
    if (init.IsNumber()) {
      length_ = ToInteger(init, "length", 0, int64_t{1} << 40);
      data_ = backend_->Allocate(static_cast<size_t>(length_));
    } else if (init.IsTypedArray() && init.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array) {
      const auto src = init.As<Napi::Float32Array>();
      length_ = static_cast<int64_t>(src.ElementLength());
      data_ = backend_->Allocate(static_cast<size_t>(length_));
      try {
        backend_->Upload(data_, src.Data(), src.ElementLength());
      } catch (...) {
        backend_->Release(data_);
        data_ = nullptr;
        throw;
      }
    } else {
      ThrowTypeError(env, "Expected a length or a Float32Array for data but received " + Describe(init));
    }
    external_.Add(env, length_ * static_cast<int64_t>(sizeof(float)));  // see NOTE: [external memory]
    return env.Undefined();
  });
}

BufferWrap::~BufferWrap() {
  if (data_ != nullptr) backend_->Release(data_);
  external_.Clear(Env());
}

void BufferWrap::CheckAlive(Napi::Env env) const {
  if (data_ == nullptr) ThrowCoded(env, ErrorCode::kDisposed, "DeviceBuffer already disposed.");
}

Napi::Value BufferWrap::GetLength(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(length_)); }
Napi::Value BufferWrap::GetBackendName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), backend_ ? backend_->name() : "");
}
Napi::Value BufferWrap::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), data_ == nullptr);
}

// upload(data: Float32Array, offset = 0)
Napi::Value BufferWrap::Upload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env);
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      ThrowTypeError(env, "Expected a Float32Array for data but received " + Describe(info[0]));
    const auto src = info[0].As<Napi::Float32Array>();
    const int64_t offset = info[1].IsUndefined() ? 0 : ToInteger(info[1], "offset", 0, length_);
    if (static_cast<int64_t>(src.ElementLength()) > length_ - offset)
      ThrowRangeError(env, "Expected at most " + std::to_string(length_ - offset) + " elements for data but received " +
                               std::to_string(src.ElementLength()));
    backend_->Upload(data_ + offset, src.Data(), src.ElementLength());
    return env.Undefined();
  });
}

// download(): Float32Array (a new host copy), or download(into: Float32Array)
Napi::Value BufferWrap::Download(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env);
    Napi::Float32Array out;
    if (info[0].IsUndefined()) {
      out = Napi::Float32Array::New(env, static_cast<size_t>(length_));
    } else {
      if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
        ThrowTypeError(env, "Expected a Float32Array for into but received " + Describe(info[0]));
      out = info[0].As<Napi::Float32Array>();
      if (static_cast<int64_t>(out.ElementLength()) != length_)
        ThrowRangeError(env, "Expected " + std::to_string(length_) + " elements for into but received " +
                                 std::to_string(out.ElementLength()));
    }
    backend_->Download(out.Data(), data_, static_cast<size_t>(length_));
    return out;
  });
}

// fill(value: number)
Napi::Value BufferWrap::Fill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env);
    if (!info[0].IsNumber()) ThrowTypeError(env, "Expected a number for value but received " + Describe(info[0]));
    backend_->Fill(data_, info[0].As<Napi::Number>().FloatValue(), static_cast<size_t>(length_));
    return env.Undefined();
  });
}

// copyFrom(src: DeviceBuffer): copies src into this buffer on the device (same backend,
// same length); the benchmark's in-process copy-bandwidth reference.
Napi::Value BufferWrap::CopyFrom(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env);
    BufferWrap* src = TaggedUnwrap<BufferWrap>(env, info[0]);
    if (src == nullptr) ThrowTypeError(env, "Expected a DeviceBuffer for src but received " + Describe(info[0]));
    if (src->data_ == nullptr) ThrowCoded(env, ErrorCode::kDisposed, "DeviceBuffer already disposed (src).");
    if (src->backend_.get() != backend_.get())
      ThrowCoded(env, ErrorCode::kForeignBuffer, "Expected a DeviceBuffer of the " + std::string(backend_->name()) +
                                                     " backend for src but received one of the " + src->backend_->name() + " backend");
    if (src->length_ != length_)
      ThrowRangeError(env, "Expected " + std::to_string(length_) + " elements for src but received a DeviceBuffer of " +
                               std::to_string(src->length_));
    backend_->Copy(data_, src->data_, static_cast<size_t>(length_));
    return env.Undefined();
  });
}

// dispose(): frees the memory now; idempotent.
// sync(): a Promise settled when the work queued on this buffer's backend so far is done.
Napi::Value BufferWrap::Sync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    CheckAlive(env);
    return SynchronizeBackend(env, backend_);
  });
}

Napi::Value BufferWrap::Dispose(const Napi::CallbackInfo& info) {
  if (data_ != nullptr) {
    backend_->Release(data_);
    data_ = nullptr;
  }
  external_.Clear(info.Env());
  return info.Env().Undefined();
}

Napi::Value IsDeviceBuffer(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), HasTypeTag(info.Env(), info[0], BufferWrap::kTypeTag));
}

}  // namespace adafisher
