#include "engine/tensor_queue.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "engine/handles.h"

namespace gradfuse::engine {

void TensorQueue::push(Entry entry) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(closed_reason_.empty(), closed_reason_);
    const std::string& name = entry.request.name;
    TORCH_CHECK_VALUE(!in_use_locked(name), "gradfuse: a tensor named '", name,
                      "' is already in flight (submitted, and its operation has not completed); "
                      "synchronize it before submitting the name again, or use another name");
    new_requests_.push_back(entry.request);
    in_flight_.emplace(name, std::move(entry));
    // While held, the background thread would find nothing to take: release() wakes it.
    if (holds_ > 0) return;
    woken_ = true;
  }
  cv_.notify_one();
}

void TensorQueue::wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    woken_ = true;
  }
  cv_.notify_one();
}

void TensorQueue::wait_for_work(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_until(lock, deadline, [&] { return woken_; });
  woken_ = false;
}

void TensorQueue::hold() {
  std::lock_guard<std::mutex> lock(mu_);
  ++holds_;
}

void TensorQueue::release() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(holds_ > 0, "gradfuse: release() without hold()");
    --holds_;
    woken_ = true;
  }
  cv_.notify_one();
}

std::vector<Request> TensorQueue::take_new_requests() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Request> out;
  if (holds_ > 0) return out;
  out.swap(new_requests_);
  return out;
}

bool TensorQueue::in_use_locked(const std::string& name) {
  if (in_flight_.count(name)) return true;
  auto running = running_.find(name);
  if (running == running_.end()) return false;
  if (!HandleTable::get().finished(running->second)) return true;
  running_.erase(running);
  return false;
}

Entry TensorQueue::take_locked(std::unordered_map<std::string, Entry>::iterator it) {
  Entry e = std::move(it->second);
  in_flight_.erase(it);
  if (running_.size() >= sweep_at_) {
    for (auto r = running_.begin(); r != running_.end();) {
      r = HandleTable::get().finished(r->second) ? running_.erase(r) : std::next(r);
    }
    sweep_at_ = std::max<size_t>(64, 2 * running_.size());
  }
  running_[e.request.name] = e.handle;
  return e;
}

Entry TensorQueue::take(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_.find(name);
  TORCH_CHECK(it != in_flight_.end(), "gradfuse: negotiated tensor '", name,
              "' is not in flight on this rank (internal error)");
  return take_locked(it);
}

std::optional<Entry> TensorQueue::try_take(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_.find(name);
  if (it == in_flight_.end()) return std::nullopt;
  return take_locked(it);
}

bool TensorQueue::visit(const std::string& name, const std::function<void(const Entry&)>& fn) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_.find(name);
  if (it == in_flight_.end()) return false;
  fn(it->second);
  return true;
}

bool TensorQueue::has_unsent() {
  std::lock_guard<std::mutex> lock(mu_);
  return !new_requests_.empty();
}

std::vector<Entry> TensorQueue::close(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_reason_.empty()) {
    closed_reason_ = reason.empty() ? "gradfuse: the engine has stopped" : reason;
  }
  std::vector<Entry> out;
  for (auto& [name, e] : in_flight_) out.push_back(std::move(e));
  in_flight_.clear();
  running_.clear();
  new_requests_.clear();
  return out;
}

}  // namespace gradfuse::engine
