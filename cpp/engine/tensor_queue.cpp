#include "engine/tensor_queue.h"

#include <c10/util/Exception.h>

namespace gradfuse::engine {

void TensorQueue::push(Entry entry) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK(closed_reason_.empty(), closed_reason_);
    const std::string& name = entry.request.name;
    TORCH_CHECK_VALUE(in_flight_.find(name) == in_flight_.end(), "gradfuse: a tensor named '", name,
                      "' is already in flight; synchronize it before submitting the "
                      "name again, or use another name");
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

Entry TensorQueue::take(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_.find(name);
  TORCH_CHECK(it != in_flight_.end(), "gradfuse: negotiated tensor '", name,
              "' is not in flight on this rank (internal error)");
  Entry e = std::move(it->second);
  in_flight_.erase(it);
  return e;
}

std::optional<Entry> TensorQueue::try_take(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_.find(name);
  if (it == in_flight_.end()) return std::nullopt;
  Entry e = std::move(it->second);
  in_flight_.erase(it);
  return e;
}

bool TensorQueue::has_in_flight() {
  std::lock_guard<std::mutex> lock(mu_);
  return !in_flight_.empty() || !new_requests_.empty();
}

std::vector<Entry> TensorQueue::close(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_reason_.empty()) {
    closed_reason_ = reason.empty() ? "gradfuse: the engine has stopped" : reason;
  }
  std::vector<Entry> out;
  for (auto& [name, e] : in_flight_) out.push_back(std::move(e));
  in_flight_.clear();
  new_requests_.clear();
  return out;
}

}  // namespace gradfuse::engine
