{
  "targets": [
    {
      "target_name": "adafisher",
      "sources": [
        "native/addon.cc",
        "native/glue.cc",
        "native/buffer_wrap.cc",
        "native/optimizer_wrap.cc",
        "native/timing_wrap.cc",
        "native/core/cpu_backend.cc",
        "native/core/optimizer.cc",
        "native/core/thread_pool.cc",
        "native/core/cuda_stub.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native"
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED",
                  "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS",
                  "ADAFISHER_VERSION=\"<!(node -p \"require('./package.json').version\")\"",
                  "ADAFISHER_BUILD_SYSTEM=\"node-gyp\""],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-ffp-contract=off", "-fexceptions", "-pthread"],
      "ldflags": ["-pthread"],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
        "OTHER_CPLUSPLUSFLAGS": ["-ffp-contract=off"],
        "MACOSX_DEPLOYMENT_TARGET": "11.0"
      },
      "msvs_settings": { "VCCLCompilerTool": { "ExceptionHandling": 1 } }
    }
  ]
}
