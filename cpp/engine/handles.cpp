#include "engine/handles.h"

#include "engine/api.h"

#include <c10/util/Exception.h>

#include <algorithm>
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

HandleTable::State* HandleTable::wait_locked(std::unique_lock<std::mutex>& lock, int64_t handle,
                                             std::chrono::steady_clock::time_point deadline) {
  const auto engine_done = [&] { return find_locked(handle).done; };
  if (deadline == std::chrono::steady_clock::time_point::max()) {
    done_cv_.wait(lock, engine_done);  // (no time arithmetic on the largest time point)
  } else if (!done_cv_.wait_until(lock, deadline, engine_done)) {
    return nullptr;
  }
  // The engine's part is done; device work is polled rather than waited on with a blocking
  // CUDA call, so that fail() / fail_device_pending() (a dead peer, shutdown) end the wait.
  // The interval is short next to a collective and costs nothing while the device is busy.
  while (!finished_locked(find_locked(handle))) {
    if (std::chrono::steady_clock::now() >= deadline) return nullptr;
    done_cv_.wait_for(lock, std::chrono::microseconds(50));
  }
  return &find_locked(handle);
}

HandleTable::State& HandleTable::find_locked(int64_t handle) {
  auto it = states_.find(handle);
  TORCH_CHECK_VALUE(it != states_.end(), "gradfuse: handle ", handle,
                    " is unknown (never returned by an async call, or already synchronized)");
  return it->second;
}

int64_t HandleTable::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(states_.size());
}

void HandleTable::discard(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  states_.erase(handle);
}

bool HandleTable::poll(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_locked(find_locked(handle));
}

bool HandleTable::finished(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = states_.find(handle);
  return it == states_.end() || finished_locked(it->second);
}

void HandleTable::wait(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  find_locked(handle);
  const State& s = *wait_locked(lock, handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
}

bool HandleTable::wait_for(int64_t handle, std::chrono::microseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  find_locked(handle);
  const State* s = wait_locked(lock, handle, std::chrono::steady_clock::now() + timeout);
  if (s == nullptr) return false;
  if (!s->error.empty()) throw std::runtime_error(s->error);
  return true;
}

at::Tensor HandleTable::release(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  State s = std::move(*wait_locked(lock, handle));
  states_.erase(handle);
  lock.unlock();
  if (!s.error.empty()) throw std::runtime_error(s.error);
  if (s.on_release) s.on_release();
  return s.result;
}

at::Tensor HandleTable::aux(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  const State& s = *wait_locked(lock, handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
  return s.aux;
}

}  // namespace gradfuse::engine

namespace gradfuse::engine {
bool poll_handle(int64_t handle) { return HandleTable::get().poll(handle); }
void wait_handle(int64_t handle) { HandleTable::get().wait(handle); }
bool wait_handle_for(int64_t handle, double timeout_s) {
  return HandleTable::get().wait_for(
      handle, std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, timeout_s) * 1e6)));
}
void forget_handle(int64_t handle) { HandleTable::get().discard(handle); }
int64_t handle_count() { return HandleTable::get().size(); }
}  // namespace gradfuse::engine
