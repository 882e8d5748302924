#include "engine/handles.h"

#include "engine/api.h"

#include <c10/util/Exception.h>

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
                           at::Tensor aux) {
  if (handle == kNoHandle) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    State& s = find_locked(handle);
    s.result = std::move(result);
    s.on_release = std::move(on_release);
    s.aux = std::move(aux);
    s.done = true;
  }
  done_cv_.notify_all();
}

void HandleTable::fail(int64_t handle, const std::string& error) {
  if (handle == kNoHandle) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    State& s = find_locked(handle);
    s.error = error.empty() ? "gradfuse: unknown error" : error;
    s.done = true;
  }
  done_cv_.notify_all();
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
  return find_locked(handle).done;
}

void HandleTable::wait(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  find_locked(handle);
  done_cv_.wait(lock, [&] { return find_locked(handle).done; });
  const State& s = find_locked(handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
}

at::Tensor HandleTable::release(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return find_locked(handle).done; });
  State s = std::move(find_locked(handle));
  states_.erase(handle);
  lock.unlock();
  if (!s.error.empty()) throw std::runtime_error(s.error);
  if (s.on_release) s.on_release();
  return s.result;
}

at::Tensor HandleTable::aux(int64_t handle) {
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return find_locked(handle).done; });
  const State& s = find_locked(handle);
  if (!s.error.empty()) throw std::runtime_error(s.error);
  return s.aux;
}

}  // namespace gradfuse::engine

namespace gradfuse::engine {
bool poll_handle(int64_t handle) { return HandleTable::get().poll(handle); }
void wait_handle(int64_t handle) { HandleTable::get().wait(handle); }
}  // namespace gradfuse::engine
