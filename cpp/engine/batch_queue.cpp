#include "engine/batch_queue.h"

namespace gradfuse::engine {

bool BatchQueue::push(Batch batch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    batches_.push_back(std::move(batch));
  }
  cv_.notify_one();
  return true;
}

std::optional<Batch> BatchQueue::pop(const std::atomic<bool>* done) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !batches_.empty() || closed_ || (done && done->load()); });
  if (batches_.empty()) return std::nullopt;
  Batch batch = std::move(batches_.front());
  batches_.pop_front();
  if (batches_.empty()) cv_.notify_all();  // wait_until_taken()
  return batch;
}

void BatchQueue::wait_until_taken() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return batches_.empty() || closed_; });
}

void BatchQueue::notify() {
  // Under the lock, so a pop() between its check of `done` and its wait cannot miss it.
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

void BatchQueue::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

void BatchQueue::discard() {
  std::deque<Batch> dropped;  // destroyed outside the lock
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    dropped.swap(batches_);
  }
  cv_.notify_all();
}

}  // namespace gradfuse::engine
