// Handles: what enqueue returns and what poll / wait look at. The table is process-wide and
// outlives any one engine, so a handle failed by shutdown() still reports its error after a
// later init().
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace gradfuse::engine {

// Work a handle still waits for on a device after the engine thread queued it (CUDA: the
// event recorded on the engine's stream after the collective). A handle with one is done only
// once query() says the device finished, so poll() never turns true early and wait() returns
// when the result is really there. query() must not block; it throws std::runtime_error when
// the transport reports that the work failed (e.g. NCCL: a peer died or the collective timed
// out), and that error becomes the handle's.
class DeviceCompletion {
 public:
  virtual ~DeviceCompletion() = default;
  virtual bool query() = 0;
};

// The handle of work nobody waits on (a joined rank's placeholder): complete / fail ignore it.
constexpr int64_t kNoHandle = 0;

class HandleTable {
 public:
  static HandleTable& get();

  int64_t create(const std::string& name);
  // `on_release` runs in the thread that collects the result (CUDA: makes the caller's
  // stream wait for the engine's).
  // `aux`: a second output some operations have (alltoall: the received splits).
  // `device`: work still running on a device (see DeviceCompletion); null for CPU work.
  void complete(int64_t handle, at::Tensor result, std::function<void()> on_release = {},
                at::Tensor aux = {}, std::shared_ptr<DeviceCompletion> device = nullptr);
  // Forgets a handle: one whose enqueue failed, or whose failure was already raised.
  void discard(int64_t handle);
  // Handles held (created and not yet released or discarded).
  int64_t size();
  // A handle that already finished successfully keeps its result; one still waiting (for the
  // engine, or for its device work) fails with `error`.
  void fail(int64_t handle, const std::string& error);
  // Fails every handle whose engine part is done but whose device work is not: the engine
  // stopped (a peer died, shutdown) and nothing will finish it. Returns how many.
  int fail_device_pending(const std::string& error);

  // True once the handle completed (including its device work) or failed. Unknown handle ->
  // c10::ValueError.
  bool poll(int64_t handle);
  // poll(), but true for a handle no longer held (released or discarded: it finished before).
  // The tensor queue asks it to know whether a name is free again (engine/tensor_queue.h).
  bool finished(int64_t handle);
  // Blocks until poll() would be true; throws std::runtime_error with the handle's error when
  // it failed. Device work is waited for by querying it (no blocking CUDA call), so an error
  // that arrives meanwhile (fail_device_pending) still ends the wait.
  void wait(int64_t handle);
  // wait() for at most `timeout`: true once done (throws like wait() when it failed), false
  // when the time ran out first. Callers that must stay interruptible (Ctrl-C in Python) wait
  // in slices and check for signals in between.
  bool wait_for(int64_t handle, std::chrono::microseconds timeout);
  // The output tensor of a finished handle; forgets the handle. Throws like wait().
  at::Tensor release(int64_t handle);
  // The second output of a finished handle (undefined if it has none); keeps the handle.
  // Throws like wait().
  at::Tensor aux(int64_t handle);

 private:
  struct State {
    std::string name;
    bool done = false;
    std::string error;  // empty: success
    at::Tensor result;
    at::Tensor aux;
    std::function<void()> on_release;
    std::shared_ptr<DeviceCompletion> device;  // reset once the device work finished
  };
  State& find_locked(int64_t handle);
  // Whether the handle finished: failed, or done with no device work left (queried here).
  static bool finished_locked(State& s);
  // Waits (lock held on entry and exit) until finished_locked or `deadline`; returns the
  // handle's state, or null when the deadline came first.
  State* wait_locked(std::unique_lock<std::mutex>& lock, int64_t handle,
                     std::chrono::steady_clock::time_point deadline =
                         std::chrono::steady_clock::time_point::max());

  std::mutex mu_;
  std::condition_variable done_cv_;
  int64_t next_ = 1;
  std::unordered_map<int64_t, State> states_;
};

}  // namespace gradfuse::engine
