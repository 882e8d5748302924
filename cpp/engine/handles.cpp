#include "engine/handles.h"

#include "engine/api.h"

#include <c10/util/Exception.h>

#include <chrono>
#include <stdexcept>

namespace gradfuse::engine {

HandleTable& HandleTable::get() {
  static HandleTable* table = new HandleTable();  // never destroyed: no exit-order races
  return *table;
}

int64_t HandleTable::create(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t h = next_++;
  states_[h].name = name;
  return h;
}

void HandleTable::complete(int64_t handle, at::Tensor result, std::function<void()> on_release,
                           at::Tensor aux, std::shared_ptr<DeviceCompletion> device) {
  if (handle == kNoHandle) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    State& s = find_locked(handle);
    s.result = std::move(result);
    s.on_release = std::move(on_release);
    s.aux = std::move(aux);
    s.device = std::move(device);
    s.done = true;
  }
  done_cv_.notify_all();
}

void HandleTable::fail(int64_t handle, const std::string& error) {
  if (handle == kNoHandle) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    State& s = find_locked(handle);
    if (s.done && !s.device && s.error.empty()) return;  // finished: its result stands
    s.error = error.empty() ? "gradfuse: unknown error" : error;
    s.device.reset();
    s.done = true;
  }
  done_cv_.notify_all();
}

int HandleTable::fail_device_pending(const std::string& error) {
  int failed = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [handle, s] : states_) {
      if (!s.done || !s.device || !s.error.empty()) continue;
      s.error = error.empty() ? "gradfuse: unknown error" : error;
      s.device.reset();
      ++failed;
    }
  }
  done_cv_.notify_all();
  return failed;
}

bool HandleTable::finished_locked(State& s) {
  if (!s.done) return false;
  if (!s.error.empty() || !s.device) return true;
  try {
    if (!s.device->query()) return false;
  } catch (const std::exception& e) {
    s.error = e.what();
  }
  s.device.reset();
  return true;
}

HandleTable::State& HandleTable::wait_locked(std::unique_lock<std::mutex>& lock, int64_t handle) {
  done_cv_.wait(lock, [&] { return find_locked(handle).done; });
  // The engine's part is done; device work is polled rather than waited on with a blocking
  // CUDA call, so that fail() / fail_device_pending() (a dead peer, shutdown) end the wait.
  // The interval is short next to a collective and costs nothing while the device is busy.
  while (!finished_locked(find_locked(handle))) {
    done_cv_.wait_for(lock, std::chrono::microseconds(50));
  }
  return find_locked(handle);
}

HandleTable::State& HandleTable::find_locked(int64_t handle) {
  auto it = states_.find(handle);
  TORCH_CHECK_VALUE(it != states_.end(), "gradfuse: handle ", handle,
                    " is unknown (never returned by an async call, or already synchronized)");
  return it->second;
}

void HandleTable::discard(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  states_.erase(handle);
}

bool HandleTable::poll(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_locked(find_locked(handle));
}

void HandleTable::wait(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  find_locked(handle);
  const State& s = wait_locked(lock, handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
}

at::Tensor HandleTable::release(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  State s = std::move(wait_locked(lock, handle));
  states_.erase(handle);
  lock.unlock();
  if (!s.error.empty()) throw std::runtime_error(s.error);
  if (s.on_release) s.on_release();
  return s.result;
}

at::Tensor HandleTable::aux(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  const State& s = wait_locked(lock, handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
  return s.aux;
}

}  // namespace gradfuse::engine

namespace gradfuse::engine {
bool poll_handle(int64_t handle) { return HandleTable::get().poll(handle); }
void wait_handle(int64_t handle) { HandleTable::get().wait(handle); }
}  // namespace gradfuse::engine
