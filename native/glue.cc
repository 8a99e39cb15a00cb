#include "glue.h"

#include <algorithm>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include "buffer_wrap.h"

namespace adafisher {

// NOTE: [context awareness]
// Everything the addon keeps lives in InstanceData, owned by the Node environment that
// loaded it (napi_set_instance_data), so each worker thread has its own backends and
// thread pool and its own cleanup when it exits. Buffers and optimizers hold their
// backend by shared_ptr, so finalizers that run after the environment's cleanup still
// find it alive.
InstanceData& Instance(Napi::Env env) { return *env.GetInstanceData<InstanceData>(); }

namespace {
// ADAFISHER_NUM_THREADS as this JavaScript environment sees it: a worker_threads Worker has a
// process.env of its own (its `env` option), which std::getenv (the process's) does not see,
// and reading it here also avoids racing the main thread's writes to the C environment.
std::string ThreadsSetting(Napi::Env env) {
  Napi::Value process = env.Global().Get("process");
  if (!process.IsObject()) return std::string();
  Napi::Value vars = process.As<Napi::Object>().Get("env");
  if (!vars.IsObject()) return std::string();
  Napi::Value v = vars.As<Napi::Object>().Get("ADAFISHER_NUM_THREADS");
  return v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
}

std::shared_ptr<Backend> CpuBackendOf(Napi::Env env, InstanceData& inst) {
  if (!inst.cpu) {
    const std::string setting = ThreadsSetting(env);
    inst.cpu = CreateCpuBackend(0, &setting);
  }
  return inst.cpu;
}
}  // namespace

std::shared_ptr<Backend> GetBackend(Napi::Env env, const Napi::Value& name, const std::string& what) {
  if (!name.IsString()) ThrowTypeError(env, "Expected 'cpu' or 'cuda' for " + what + " but received " + Describe(name));
  const std::string n = name.As<Napi::String>().Utf8Value();
  InstanceData& inst = Instance(env);
  if (n == "cpu") return CpuBackendOf(env, inst);
  if (n == "cuda") {
    if (!inst.cuda_tried) {
      inst.cuda_tried = true;
      inst.cuda = CreateCudaBackend(&inst.cuda_reason);
    }
    if (!inst.cuda) ThrowCoded(env, ErrorCode::kBackendUnavailable, "The CUDA backend is not available: " + inst.cuda_reason);
    return inst.cuda;
  }
  ThrowRangeError(env, "Expected 'cpu' or 'cuda' for " + what + " but received '" + n + "'");
}

// A number the way JavaScript's String() prints it (Number::toString in ECMA-262): the
// shortest digits that read back as the same double, positional for exponents -7 < e < 21
// (100, 123456789, 0.000001, 1.5), else 1e-7, 1.5e+21; NaN, Infinity, -Infinity; -0 as 0.
std::string FormatNumber(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == 0) return "0";
  const std::string sign = d < 0 ? "-" : "";
  d = std::fabs(d);
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*e", precision - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  // buf is "D.DDDe+XX" (or "De+XX"): the digits and the decimal exponent.
  const std::string text = buf;
  const size_t e = text.find('e');
  std::string digits = text.substr(0, 1) + (e > 1 ? text.substr(2, e - 2) : "");
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int k = static_cast<int>(digits.size());
  const int n = std::atoi(text.c_str() + e + 1) + 1;  // value = 0.digits x 10^n
  if (k <= n && n <= 21) return sign + digits + std::string(static_cast<size_t>(n - k), '0');
  if (0 < n && n <= 21) return sign + digits.substr(0, static_cast<size_t>(n)) + "." + digits.substr(static_cast<size_t>(n));
  if (-6 < n && n <= 0) return sign + "0." + std::string(static_cast<size_t>(-n), '0') + digits;
  const std::string exponent = (n - 1 < 0 ? "-" : "+") + std::to_string(std::abs(n - 1));
  return sign + digits.substr(0, 1) + (k > 1 ? "." + digits.substr(1) : "") + "e" + exponent;
}

namespace {
[[noreturn]] void ThrowWithCode(Napi::Error error, const char* code) {
  error.Set("code", Napi::String::New(error.Env(), code));
  throw error;
}
}  // namespace

void ThrowTypeError(Napi::Env env, const std::string& message) {
  ThrowWithCode(Napi::TypeError::New(env, message), ErrorCodeName(ErrorCode::kInvalidArgument));
}
void ThrowRangeError(Napi::Env env, const std::string& message) {
  ThrowWithCode(Napi::RangeError::New(env, message), ErrorCodeName(ErrorCode::kInvalidArgument));
}
void ThrowCoded(Napi::Env env, ErrorCode code, const std::string& message) {
  if (code == ErrorCode::kInvalidArgument) ThrowRangeError(env, message);
  ThrowWithCode(Napi::Error::New(env, message), ErrorCodeName(code));
}

std::string Describe(const Napi::Value& value) {
  std::string type;
  std::string shown;
  switch (value.Type()) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: type = "boolean"; shown = value.As<Napi::Boolean>().Value() ? "true" : "false"; break;
    case napi_number: {
      type = "number";
      const double d = value.As<Napi::Number>().DoubleValue();
      shown = FormatNumber(d);
      break;
    }
    case napi_string: {
      type = "string";
      std::string s = value.As<Napi::String>().Utf8Value();
      if (s.size() > 40) s = s.substr(0, 40) + "...";
      shown = "'" + s + "'";
      break;
    }
    case napi_object:
      if (value.IsTypedArray()) {
        static const char* kNames[] = {"Int8Array",    "Uint8Array",   "Uint8ClampedArray", "Int16Array",
                                       "Uint16Array",  "Int32Array",   "Uint32Array",       "Float32Array",
                                       "Float64Array", "BigInt64Array", "BigUint64Array"};
        const auto t = value.As<Napi::TypedArray>().TypedArrayType();
        return std::string("a ") + (t >= 0 && t <= 10 ? kNames[t] : "typed array") + " of length " +
               std::to_string(value.As<Napi::TypedArray>().ElementLength());
      }
      if (value.IsArray()) return "an array of length " + std::to_string(value.As<Napi::Array>().Length());
      return "an object";
    case napi_symbol: return "a symbol";
    case napi_function: return "a function";
    case napi_external: return "an external";
    case napi_bigint: return "a bigint";
    default: return "a value of type " + std::to_string(static_cast<int>(value.Type()));
  }
  return shown + " of type " + type;
}

Napi::Value Guarded(Napi::Env env, const std::function<Napi::Value()>& fn) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const BackendError& e) {
    ThrowCoded(env, e.code(), e.what());
  } catch (const std::bad_alloc&) {
    ThrowCoded(env, ErrorCode::kOutOfMemory, "out of host memory");
  } catch (const std::exception& e) {
    ThrowCoded(env, ErrorCode::kInternal, std::string("internal error: ") + e.what());
  }
}

namespace {
// NOTE: [type tags per build]
// N-API's type tags are shared by the whole isolate: two copies of this addon loaded in one
// process (two versions of the package in one node_modules tree) would each take the other's
// objects for their own, and unwrap them as a C++ class of a possibly different layout. So the
// low half of every class's tag is mixed with this build's identity (version, build system,
// source hash): a foreign copy's DeviceBuffer is then not a DeviceBuffer here (a TypeError),
// while two loads of the same binary agree.
uint64_t BuildSalt() {
  static const uint64_t salt = [] {
    uint64_t h = 1469598103934665603ULL;  // FNV-1a, 64-bit
    auto mix = [&h](const char* s) {
      for (; *s != '\0'; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ULL;
      h = (h ^ 0xffU) * 1099511628211ULL;  // separator
    };
    mix(ADAFISHER_VERSION);
    mix(ADAFISHER_BUILD_SYSTEM);
    mix(kSourceHash);
    return h;
  }();
  return salt;
}

napi_type_tag Salted(const napi_type_tag& tag) { return {tag.lower ^ BuildSalt(), tag.upper}; }
}  // namespace

bool HasTypeTag(Napi::Env env, napi_value value, const napi_type_tag& tag) {
  napi_valuetype type = napi_undefined;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_object) return false;
  const napi_type_tag salted = Salted(tag);
  bool result = false;
  return napi_check_object_type_tag(env, value, &salted, &result) == napi_ok && result;
}

void TagObject(Napi::Env env, napi_value value, const napi_type_tag& tag) {
  const napi_type_tag salted = Salted(tag);
  if (napi_type_tag_object(env, value, &salted) != napi_ok) {
    ThrowCoded(env, ErrorCode::kInternal, "cannot tag a native object");
  }
}

std::string ArgName::str() const {
  switch (kind_) {
    case kText:
      return text_;
    case kFull:
      return *full_;
    case kIndexed:
      return std::string(text_) + "[" + std::to_string(index_) + "]";
    case kMade:
      return (*make_)();
    case kKey:
      return parent_->str() + "." + text_;
    case kParentIndexed:
      return parent_->str() + "[" + std::to_string(index_) + "]";
    case kSuffix:
      return parent_->str() + text_;
  }
  return std::string();
}

// NOTE: [property keys]
// obj.Get("layer") makes the JS string "layer" on every call: V8 hashes it and looks it up
// in its table of internalized strings. PropertyKey makes each key once per environment and
// keeps it as an own element of an object the instance holds (Node-API before version 10
// makes no reference to a string), defined rather than assigned and read as an own element,
// so no setter or getter a program puts on Object.prototype runs or answers; keys are found
// by value (a few dozen of them). A reader of many objects (recordFactors: four fields per
// record) takes its keys once per call. Measured with 32 records of 8 floats each on the
// 2-core VM: 38-43 us a call before, 32 with the names made only on failure, 24-29 with the
// keys made once (40-49 against 26-29 in a later, busier run, alternating the two builds).
Napi::Value GetProperty(const Napi::Object& obj, const char* key) { return obj.Get(PropertyKey(obj.Env(), key)); }

Napi::Value PropertyKey(Napi::Env env, const char* key) {
  InstanceData& inst = Instance(env);
  if (inst.property_key_store.IsEmpty()) inst.property_key_store = Napi::Persistent(Napi::Object::New(env));
  Napi::Object store = inst.property_key_store.Value();
  auto& keys = inst.property_keys;
  for (uint32_t k = 0; k < keys.size(); ++k) {
    if (keys[k] == key) return store.Get(k);  // an own element: nothing inherited is consulted
  }
  const Napi::String name = Napi::String::New(env, key);
  store.DefineProperty(Napi::PropertyDescriptor::Value(std::to_string(keys.size()), name, napi_default));
  keys.emplace_back(key);
  return name;
}

Napi::Object ToObject(const Napi::Value& v, const ArgName& what) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    ThrowTypeError(v.Env(), "Expected an object for " + what.str() + " but received " + Describe(v));
  return v.As<Napi::Object>();
}

Napi::Array ToArray(const Napi::Value& v, const ArgName& what) {
  if (!v.IsArray()) ThrowTypeError(v.Env(), "Expected an array for " + what.str() + " but received " + Describe(v));
  return v.As<Napi::Array>();
}

double ToNumber(const Napi::Value& v, const ArgName& what) {
  if (!v.IsNumber()) ThrowTypeError(v.Env(), "Expected a number for " + what.str() + " but received " + Describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) ThrowRangeError(v.Env(), "Expected a finite number for " + what.str() + " but received " + Describe(v));
  return d;
}

double ReadNumber(const Napi::Object& obj, const char* key, const ArgName& what) {
  return ToNumber(GetProperty(obj, key), ArgName::Key(what, key));
}

int64_t ToInteger(const Napi::Value& v, const ArgName& what, int64_t lo, int64_t hi) {
  if (!v.IsNumber()) ThrowTypeError(v.Env(), "Expected an integer for " + what.str() + " but received " + Describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d) || d < static_cast<double>(lo) || d > static_cast<double>(hi))
    ThrowRangeError(v.Env(), "Expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] for " +
                                 what.str() + " but received " + Describe(v));
  return static_cast<int64_t>(d);
}

int64_t ReadInteger(const Napi::Object& obj, const char* key, const ArgName& what, int64_t lo, int64_t hi) {
  return ToInteger(GetProperty(obj, key), ArgName::Key(what, key), lo, hi);
}

bool ReadBool(const Napi::Object& obj, const char* key, const ArgName& what) {
  const Napi::Value v = GetProperty(obj, key);
  if (!v.IsBoolean())
    ThrowTypeError(obj.Env(), "Expected a boolean for " + ArgName::Key(what, key).str() + " but received " + Describe(v));
  return v.As<Napi::Boolean>().Value();
}

std::vector<index_t> ToShape(const Napi::Value& v, const ArgName& what) {
  const Napi::Array a = ToArray(v, what);
  // The length is read once: a getter of an element may change it (NOTE: [read lengths once]).
  const uint32_t dims = a.Length();
  if (dims > 16) ThrowRangeError(v.Env(), "Expected at most 16 dims for " + what.str());
  std::vector<index_t> shape(dims);
  for (uint32_t i = 0; i < dims; ++i) shape[i] = ToInteger(a.Get(i), ArgName::Index(what, i), 0, index_t{1} << 50);
  return shape;
}

TensorRef::TensorRef(Napi::Env env, const std::shared_ptr<Backend>& backend, const Napi::Value& value, int64_t expected,
                     const ArgName& what, bool output)
    : backend_(backend), output_(output) {
  if (value.IsTypedArray()) {
    // One napi_get_typedarray_info call for type, length and data (the Napi:: wrappers
    // make one per wrapper; a step resolves two tensors per parameter).
    napi_typedarray_type type = napi_int8_array;
    size_t length = 0;
    void* data = nullptr;
    if (napi_get_typedarray_info(env, value, &type, &length, &data, nullptr, nullptr) != napi_ok)
      ThrowCoded(env, ErrorCode::kInternal, "cannot read the typed array " + what.str());
    if (type != napi_float32_array)
      ThrowTypeError(env, "Expected a Float32Array or DeviceBuffer for " + what.str() + " but received " + Describe(value));
    length_ = static_cast<int64_t>(length);
    if (length_ != expected)
      ThrowRangeError(env, "Expected " + std::to_string(expected) + " elements for " + what.str() + " but received " +
                               std::to_string(length_) + (length_ == 0 ? " (is its ArrayBuffer detached?)" : ""));
    host_ = static_cast<float*>(data);
    if (std::strcmp(backend->name(), "cpu") == 0) {
      ptr_ = host_;
    } else {
      // Device memory for this call only (NOTE: [transient device copies] in cuda/backend.cu).
      staging_ = backend->AcquireTransient(static_cast<size_t>(length_));
      try {
        backend->UploadAsync(staging_, host_, static_cast<size_t>(length_));  // queued: the kernels follow it
      } catch (...) {
        backend->ReleaseTransient(staging_);  // a throwing constructor runs no destructor
        staging_ = nullptr;
        throw;
      }
      keep_ = Napi::Persistent(value);
      ptr_ = staging_;
    }
    return;
  }
  BufferWrap* buffer = TaggedUnwrap<BufferWrap>(env, value);
  if (buffer == nullptr)
    ThrowTypeError(env, "Expected a Float32Array or DeviceBuffer for " + what.str() + " but received " + Describe(value));
  if (buffer->data() == nullptr) ThrowCoded(env, ErrorCode::kDisposed, "DeviceBuffer already disposed (" + what.str() + ").");
  if (buffer->backend().get() != backend.get())
    ThrowCoded(env, ErrorCode::kForeignBuffer,
               "Expected a DeviceBuffer of the " + std::string(backend->name()) + " backend for " + what.str() +
                   " but received one of the " + buffer->backend()->name() + " backend");
  length_ = buffer->length();
  if (length_ != expected)
    ThrowRangeError(env, "Expected " + std::to_string(expected) + " elements for " + what.str() + " but received a DeviceBuffer of " +
                             std::to_string(length_));
  ptr_ = buffer->data();
  keep_ = Napi::Persistent(value);  // the buffer cannot be collected while in use
}

void ExternalMemory::Add(Napi::Env env, int64_t bytes) {
  if (bytes <= 0) return;
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);
  bytes_ += bytes;
}

void ExternalMemory::Clear(Napi::Env env) {
  if (bytes_ == 0) return;
  Napi::MemoryManagement::AdjustExternalMemory(env, -bytes_);
  bytes_ = 0;
}

void CheckNoAliasing(Napi::Env env, const std::vector<const TensorRef*>& refs, const std::vector<ArgName>& names,
                     const std::vector<bool>& writable) {
  // Sorted by start address, a range can only overlap the ones that start before it ends.
  std::vector<size_t> order;
  for (size_t i = 0; i < refs.size(); ++i) {
    if (refs[i] != nullptr && refs[i]->source() != nullptr && refs[i]->length() > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return refs[a]->source() < refs[b]->source(); });
  for (size_t x = 0; x < order.size(); ++x) {
    const TensorRef& a = *refs[order[x]];
    const float* a_end = a.source() + a.length();
    for (size_t y = x + 1; y < order.size() && refs[order[y]]->source() < a_end; ++y) {
      if (!writable[order[x]] && !writable[order[y]]) continue;  // two read-only tensors may share memory
      const size_t i = std::min(order[x], order[y]), j = std::max(order[x], order[y]);
      ThrowRangeError(env, "Expected separate memory for " + names[i].str() + " and " + names[j].str() +
                               ", but they overlap: the step writes " + (writable[i] ? names[i] : names[j]).str() +
                               " while reading or writing the other");
    }
  }
}

TensorRef::TensorRef(TensorRef&& o) noexcept { *this = std::move(o); }
TensorRef& TensorRef::operator=(TensorRef&& o) noexcept {
  if (this != &o) {
    if (staging_ != nullptr) backend_->ReleaseTransient(staging_);
    backend_ = std::move(o.backend_);
    ptr_ = o.ptr_;
    staging_ = o.staging_;
    host_ = o.host_;
    length_ = o.length_;
    output_ = o.output_;
    keep_ = std::move(o.keep_);
    o.staging_ = nullptr;
    o.ptr_ = nullptr;
  }
  return *this;
}

TensorRef::~TensorRef() {
  if (staging_ != nullptr) backend_->ReleaseTransient(staging_);
}

void TensorRef::Finish() {
  if (output_ && staging_ != nullptr) backend_->Download(host_, staging_, static_cast<size_t>(length_));
}

Napi::Value BackendInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    const CudaInfo cuda = QueryCuda();
    InstanceData& inst = Instance(env);
    CpuBackendOf(env, inst);
    Napi::Object out = Napi::Object::New(env);
    out.Set("cudaCompiled", cuda.compiled);
    out.Set("cudaUsable", cuda.usable);
    out.Set("cudaReason", cuda.reason);
    out.Set("deviceName", cuda.device_name);
    out.Set("computeCapability",
            cuda.usable ? std::to_string(cuda.compute_major) + "." + std::to_string(cuda.compute_minor) : std::string());
    out.Set("deviceMemory", cuda.usable ? cuda.memory_bytes : 0.0);
    out.Set("driverVersion", cuda.driver_version);
    out.Set("runtimeVersion", cuda.runtime_version);
    out.Set("cudaArchitectures", cuda.architectures);
    out.Set("cpuThreads", inst.cpu->Threads());
    out.Set("napiVersion", NAPI_VERSION);
    return out;
  });
}

Napi::Value LiveAllocations(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value {
    auto backend = GetBackend(env, info[0], "backend");
    return Napi::Number::New(env, static_cast<double>(backend->LiveAllocations()));
  });
}

namespace {
// NOTE: [one wait per backend]
// A device wait blocks the libuv thread that runs it, and libuv has few (4 by default) for all
// of Node's fs, dns, crypto and zlib work: one thread per pending synchronize() would starve
// those (an fs.readFile took 1.6 s behind four pending waits). So each backend of an
// environment has at most one wait running. A call made while none runs starts one; calls
// made while one runs are settled by the next wait, started when the running one ends (the
// running wait may have begun before work they expect to see finished was queued).
class SyncWorker : public Napi::AsyncWorker {
 public:
  SyncWorker(Napi::Env env, std::shared_ptr<Backend> backend, std::shared_ptr<SyncQueue> queue)
      : Napi::AsyncWorker(env), backend_(std::move(backend)), queue_(std::move(queue)) {}

  // Starts a wait for queue->current on a libuv thread.
  static void Start(Napi::Env env, std::shared_ptr<Backend> backend, std::shared_ptr<SyncQueue> queue) {
    auto* worker = new SyncWorker(env, std::move(backend), queue);
    try {
      worker->Queue();
    } catch (...) {
      delete worker;
      throw;
    }
    queue->running = true;
  }

  void Execute() override {
    try {
      backend_->Synchronize();
    } catch (const BackendError& e) {
      code_ = e.code();
      SetError(e.what());
    } catch (const std::exception& e) {
      code_ = ErrorCode::kInternal;
      SetError(e.what());
    }
  }
  void OnOK() override { Settle(nullptr); }
  void OnError(const Napi::Error& e) override {
    const std::string message = e.Message();
    Settle(&message);
  }

 private:
  void Settle(const std::string* error) {
    Napi::Env env = Env();
    std::vector<Napi::Promise::Deferred> done;
    done.swap(queue_->current);
    queue_->running = false;
    if (!queue_->next.empty()) {
      queue_->current.swap(queue_->next);
      try {
        Start(env, backend_, queue_);
      } catch (const Napi::Error& e) {  // the next wait cannot start: its calls fail with the reason
        for (Napi::Promise::Deferred& d : queue_->current) d.Reject(e.Value());
        queue_->current.clear();
      }
    }
    for (Napi::Promise::Deferred& d : done) {
      if (error == nullptr) {
        d.Resolve(env.Undefined());
      } else {
        Napi::Error err = Napi::Error::New(env, *error);
        err.Set("code", Napi::String::New(env, ErrorCodeName(code_)));
        d.Reject(err.Value());
      }
    }
  }

  std::shared_ptr<Backend> backend_;
  std::shared_ptr<SyncQueue> queue_;
  ErrorCode code_ = ErrorCode::kCudaError;  // of the error Execute met: what the waits reject with
};
}  // namespace

// synchronize(backend): a Promise that resolves once all work queued on the backend before
// the call is done, waiting on a libuv worker thread (one per backend at a time: NOTE: [one
// wait per backend]) so the event loop keeps running.
Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return Guarded(env, [&]() -> Napi::Value { return SynchronizeBackend(env, GetBackend(env, info[0], "backend")); });
}

Napi::Value SynchronizeBackend(Napi::Env env, const std::shared_ptr<Backend>& backend) {
  InstanceData& inst = Instance(env);
  std::shared_ptr<SyncQueue> queue = backend == inst.cpu ? inst.cpu_sync : inst.cuda_sync;
  Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
  if (queue->running) {
    queue->next.push_back(deferred);
  } else {
    queue->current.push_back(deferred);
    try {
      SyncWorker::Start(env, backend, queue);
    } catch (...) {
      queue->current.clear();
      throw;
    }
  }
  return deferred.Promise();
}

}  // namespace adafisher
