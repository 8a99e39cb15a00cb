// N-API glue shared by the wrapped classes: per-instance data (the backends of this
// Node environment), argument readers that throw TypeError/RangeError naming the
// argument, and the conversion of backend errors into JS errors with a stable `code`.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace adafisher {

// One per Node environment (main thread, each worker): see NOTE: [context awareness].
struct InstanceData {
  std::shared_ptr<Backend> cpu;
  std::shared_ptr<Backend> cuda;
  bool cuda_tried = false;
  std::string cuda_reason;
  Napi::FunctionReference buffer_constructor;
  Napi::FunctionReference optimizer_constructor;
};

InstanceData& Instance(Napi::Env env);
// "cpu" or "cuda"; throws ADAFISHER_BACKEND_UNAVAILABLE (with the reason) when CUDA is not usable.
std::shared_ptr<Backend> GetBackend(Napi::Env env, const Napi::Value& name, const std::string& what);

[[noreturn]] void ThrowTypeError(Napi::Env env, const std::string& message);
[[noreturn]] void ThrowRangeError(Napi::Env env, const std::string& message);
[[noreturn]] void ThrowCoded(Napi::Env env, ErrorCode code, const std::string& message);

// "Expected <expected> for <name> but received <value> of type <type>".
std::string Describe(const Napi::Value& value);
/** A number as JavaScript's String() prints it (shortest round-trip; NaN, Infinity). */
std::string FormatNumber(double d);

// Runs fn, turning BackendError / std::bad_alloc / std::exception into JS errors.
Napi::Value Guarded(Napi::Env env, const std::function<Napi::Value()>& fn);

double ReadNumber(const Napi::Object& obj, const char* key, const std::string& what);
double ToNumber(const Napi::Value& v, const std::string& what);
int64_t ReadInteger(const Napi::Object& obj, const char* key, const std::string& what, int64_t lo, int64_t hi);
int64_t ToInteger(const Napi::Value& v, const std::string& what, int64_t lo, int64_t hi);
bool ReadBool(const Napi::Object& obj, const char* key, const std::string& what);
Napi::Object ToObject(const Napi::Value& v, const std::string& what);
Napi::Array ToArray(const Napi::Value& v, const std::string& what);
std::vector<index_t> ToShape(const Napi::Value& v, const std::string& what);

// NOTE: [external memory]
// To V8 a DeviceBuffer or an optimizer is a small object, whatever memory it holds (host
// memory on cpu, device memory on cuda). Unless that memory is reported, V8 never feels
// pressure to collect abandoned ones, and their finalizers, which free it, never run: a
// loop that drops un-disposed 64 MB buffers grew to 23 GB and was killed. Each wrapper
// reports what it holds with AdjustExternalMemory and takes it back when it frees it.
class ExternalMemory {
 public:
  void Add(Napi::Env env, int64_t bytes);
  void Clear(Napi::Env env);  // idempotent

 private:
  int64_t bytes_ = 0;
};

// An argument's name for error messages ("layers[2] input", "grads[7]"), made into a string
// only when an error is thrown: a step names two tensors per parameter and throws rarely.
class ArgName {
 public:
  ArgName(const std::string& full) : full_(&full) {}  // NOLINT: implicit, like a string; must outlive the call
  ArgName(const char* base, size_t index) : base_(base), index_(index) {}
  std::string str() const { return full_ != nullptr ? *full_ : std::string(base_) + "[" + std::to_string(index_) + "]"; }

 private:
  const std::string* full_ = nullptr;
  const char* base_ = nullptr;
  size_t index_ = 0;
};

class BufferWrap;
// A Float32Array or a DeviceBuffer resolved to memory of `backend`. For a Float32Array
// on a non-host backend the data travels through a temporary device copy, written back
// by Finish() when the tensor is an output.
class TensorRef {
 public:
  TensorRef() = default;
  TensorRef(Napi::Env env, const std::shared_ptr<Backend>& backend, const Napi::Value& value, int64_t expected,
            const ArgName& what, bool output);
  TensorRef(TensorRef&&) noexcept;
  TensorRef& operator=(TensorRef&&) noexcept;
  TensorRef(const TensorRef&) = delete;
  ~TensorRef();
  float* data() const { return ptr_; }
  int64_t length() const { return length_; }
  // The memory the caller passed (the Float32Array's or the DeviceBuffer's), for aliasing checks.
  const float* source() const { return host_ != nullptr ? host_ : ptr_; }
  void Finish();  // copy a staged output back into its Float32Array

 private:
  std::shared_ptr<Backend> backend_;
  float* ptr_ = nullptr;
  float* staging_ = nullptr;
  float* host_ = nullptr;
  int64_t length_ = 0;
  bool output_ = false;
  Napi::Reference<Napi::Value> keep_;
};

// Throws a RangeError naming two of `refs` (described by `names`) whose memory overlaps;
// `writable[i]` marks the tensors a call writes: only overlaps involving one are refused.
void CheckNoAliasing(Napi::Env env, const std::vector<const TensorRef*>& refs, const std::vector<ArgName>& names,
                     const std::vector<bool>& writable);

// NOTE: [receiver checks]
// node-addon-api unwraps `this` without checking which class wrapped it: a method or getter
// taken from one prototype and called on another wrapped object would reinterpret it as the
// wrong C++ class. Every wrapped object is type-tagged when constructed (runs no JS, unlike
// instanceof, which runs Proxy traps), and every method and getter goes through
// CheckedMethod, which checks the tag before touching the object.
bool HasTypeTag(Napi::Env env, napi_value value, const napi_type_tag& tag);
void TagObject(Napi::Env env, napi_value value, const napi_type_tag& tag);

// The T wrapped in `value` when it carries T's tag, else nullptr. Runs no JS.
template <typename T>
T* TaggedUnwrap(Napi::Env env, napi_value value) {
  if (!HasTypeTag(env, value, T::kTypeTag)) return nullptr;
  void* wrapped = nullptr;
  if (napi_unwrap(env, value, &wrapped) != napi_ok || wrapped == nullptr) return nullptr;
  return static_cast<T*>(static_cast<Napi::ObjectWrap<T>*>(wrapped));
}

template <typename T, Napi::Value (T::*Method)(const Napi::CallbackInfo&)>
Napi::Value CheckedMethod(const Napi::CallbackInfo& info) {
  T* self = TaggedUnwrap<T>(info.Env(), info.This());
  if (self == nullptr) ThrowTypeError(info.Env(), std::string("Illegal receiver: expected a ") + T::kClassName);
  return (self->*Method)(info);
}

// Prototype methods and getters of T, all receiver-checked, defined on the prototype once
// the class exists (a class template can hold only primitive values).
template <typename T>
struct CheckedClass {
  template <Napi::Value (T::*Fn)(const Napi::CallbackInfo&)>
  static void Method(Napi::Env env, Napi::Function ctor, const char* name) {
    Napi::Object proto = ctor.Get("prototype").As<Napi::Object>();
    proto.DefineProperty(Napi::PropertyDescriptor::Value(
        name, Napi::Function::New(env, CheckedMethod<T, Fn>, name),
        static_cast<napi_property_attributes>(napi_writable | napi_configurable)));
  }
  template <Napi::Value (T::*Fn)(const Napi::CallbackInfo&)>
  static void Getter(Napi::Env env, Napi::Function ctor, const char* name) {
    Napi::Object proto = ctor.Get("prototype").As<Napi::Object>();
    proto.DefineProperty(Napi::PropertyDescriptor::Accessor(env, proto, name, CheckedMethod<T, Fn>, napi_configurable));
  }
};

Napi::Function InitBuffer(Napi::Env env);
Napi::Function InitOptimizer(Napi::Env env);
Napi::Value BackendInfo(const Napi::CallbackInfo& info);
Napi::Value LiveAllocations(const Napi::CallbackInfo& info);
Napi::Value Synchronize(const Napi::CallbackInfo& info);

}  // namespace adafisher
