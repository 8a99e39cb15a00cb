// The addon's one export list. Everything JavaScript can reach is registered here.
#include <napi.h>

#include "buffer_wrap.h"
#include "glue.h"
#include "timing_wrap.h"

#ifndef ADAFISHER_VERSION
#define ADAFISHER_VERSION "unknown"
#endif
#ifndef ADAFISHER_BUILD_SYSTEM
#define ADAFISHER_BUILD_SYSTEM "unknown"
#endif

namespace adafisher {

// The hash of the native sources (NOTE: [prebuild stamp] in scripts/source-hash.mjs): generated
// by the CMake build; node-gyp builds have none.
#ifdef ADAFISHER_HAS_SOURCE_HASH
extern const char kSourceHash[];
#else
constexpr char kSourceHash[] = "";
#endif

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new InstanceData());  // deleted by Node when this environment exits
  exports.Set("version", Napi::String::New(env, ADAFISHER_VERSION));
  exports.Set("buildSystem", Napi::String::New(env, ADAFISHER_BUILD_SYSTEM));
  exports.Set("sourceHash", Napi::String::New(env, kSourceHash));
  exports.Set("backendInfo", Napi::Function::New(env, BackendInfo, "backendInfo"));
  exports.Set("liveAllocations", Napi::Function::New(env, LiveAllocations, "liveAllocations"));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize, "synchronize"));
  exports.Set("DeviceBuffer", BufferWrap::Init(env));
  exports.Set("NativeOptimizer", InitOptimizer(env));
  exports.Set("TimingEvent", TimingEventWrap::Init(env));
  return exports;
}

}  // namespace adafisher

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return adafisher::Init(env, exports); }

NODE_API_MODULE(adafisher, InitAddon)
