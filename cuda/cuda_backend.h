// The CUDA backend's extras beyond core/backend.h, as plain C++ declarations (no CUDA or
// N-API headers), for the N-API glue. Only defined when the addon is built with CUDA
// (ADAFISHER_WITH_CUDA); guard every use with `#if ADAFISHER_WITH_CUDA`.
//
// NOTE: [cuda threading]
// A CudaBackend is driven from one thread at a time (the JS thread of its addon
// instance); every method takes an internal mutex, so stray concurrent calls serialize
// instead of racing. The one exception is waiting for the GPU: SynchronizeStream (and
// CudaBackend::Synchronize) touch nothing but the immutable stream handle and take no
// lock, so the glue may run them on a worker thread (napi_async_work) while the JS
// thread keeps enqueueing work. Such a wait returns once everything enqueued before it
// started has finished (and possibly work enqueued while it waited).
#pragma once

#include <cstddef>
#include <string>

#include "core/backend.h"

namespace adafisher {
namespace cuda {

// Blocks the calling thread (any thread) until the backend's stream has drained.
// Returns true on success. Returns false and sets *error (when non-null) to
// "<cudaErrorName>: <description>" when CUDA reports an error (for instance a fault of an
// earlier kernel), or to a short message when `backend` is not a CUDA backend. Never throws.
bool SynchronizeStream(Backend* backend, std::string* error) noexcept;

// True when `backend` was made by CreateCudaBackend.
bool IsCudaBackend(const Backend* backend) noexcept;

// True while work queued on `backend`'s stream has not finished (cudaStreamQuery says
// cudaErrorNotReady): the parity harness checks with it that a call returned without
// waiting for the GPU. False for a backend that is not CUDA.
bool StreamBusy(Backend* backend) noexcept;

// The bytes of device memory that `backend` keeps in idle transient blocks for later calls
// (NOTE: [transient device copies] in backend.cu); 0 for a backend that is not CUDA.
size_t IdleTransientBytes(const Backend* backend) noexcept;

}  // namespace cuda
}  // namespace adafisher
