// A small fixed-size thread pool for the CPU backend. Work is split into a number of
// tasks fixed by the data size (never by the thread count), and partial results are
// combined in task order, so results are bit-identical whatever the number of threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace adafisher {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(task) for every task in [0, tasks), on the pool's threads and the caller's;
  // returns when all are done. Calls from several threads serialize. If fn throws (say
  // std::bad_alloc for a task's scratch), the tasks not yet started are skipped and Run
  // rethrows the first exception once no thread runs fn any more.
  void Run(int64_t tasks, const std::function<void(int64_t)>& fn);

 private:
  void WorkerLoop();
  void Drain();

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one Run at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t job_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> finished_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;  // the first exception of the current Run (under mutex_)
  uint64_t generation_ = 0;
  int busy_ = 0;
  bool stop_ = false;
};

}  // namespace adafisher
