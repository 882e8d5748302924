// Handles: what enqueue returns and what poll / wait look at. The table is process-wide and
// outlives any one engine, so a handle failed by shutdown() still reports its error after a
// later init().
#pragma once

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>

namespace gradfuse::engine {

// The handle of work nobody waits on (a joined rank's placeholder): complete / fail ignore it.
constexpr int64_t kNoHandle = 0;

class HandleTable {
 public:
  static HandleTable& get();

  int64_t create(const std::string& name);
  // `on_release` runs in the thread that collects the result (CUDA: makes the caller's
  // stream wait for the engine's).
  // `aux`: a second output some operations have (alltoall: the received splits).
  void complete(int64_t handle, at::Tensor result, std::function<void()> on_release = {},
                at::Tensor aux = {});
  // Forgets a handle whose enqueue failed.
  void discard(int64_t handle);
  void fail(int64_t handle, const std::string& error);

  // True once the handle completed or failed. Unknown handle -> c10::ValueError.
  bool poll(int64_t handle);
  // Blocks until done; throws std::runtime_error with the handle's error when it failed.
  void wait(int64_t handle);
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
  };
  State& find_locked(int64_t handle);

  std::mutex mu_;
  std::condition_variable done_cv_;
  int64_t next_ = 1;
  std::unordered_map<int64_t, State> states_;
};

}  // namespace gradfuse::engine
