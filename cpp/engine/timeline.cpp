#include "engine/timeline.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "engine/engine_thread.h"

namespace gradfuse::engine {

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// The metadata event that names track `tid` in the viewer.
std::string track_name_event(int tid, const std::string& name) {
  return "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": 0, \"tid\": " + std::to_string(tid) +
         ", \"args\": {\"name\": " + json_string(name) + "}}";
}

}  // namespace

void Timeline::start(const std::string& path) {
  std::lock_guard<std::mutex> control(control_mu_);
  stop_locked();
  std::FILE* f = std::fopen(path.c_str(), "w");
  TORCH_CHECK(f, "gradfuse: cannot open the timeline file '", path, "': ", std::strerror(errno));
  std::fputs("[\n", f);
  std::lock_guard<std::mutex> lock(mu_);
  file_ = f;
  stopping_ = false;
  tids_.clear();
  overflow_named_ = false;
  events_.clear();
  origin_ = Clock::now();
  writer_ = std::thread([this] {
    prepare_engine_thread("gradfuse-tline");
    write_loop();
  });
  active_ = true;
}

void Timeline::stop() {
  std::lock_guard<std::mutex> control(control_mu_);
  stop_locked();
}

void Timeline::stop_locked() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!writer_.joinable()) return;
    active_ = false;
    stopping_ = true;
  }
  cv_.notify_all();
  writer_.join();
  std::fputs("\n]\n", file_);
  std::fclose(file_);
  file_ = nullptr;
}

void Timeline::phase(const std::string& tensor, const char* phase, Clock::time_point begin,
                     Clock::time_point end) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!active_) return;
  int tid = kMaxTracks;  // the shared track of names past the cap
  auto it = tids_.find(tensor);
  if (it != tids_.end()) {
    tid = it->second;
  } else if (static_cast<int>(tids_.size()) < kMaxTracks - 1) {
    tid = static_cast<int>(tids_.size()) + 1;
    tids_.emplace(tensor, tid);
    events_.push_back(track_name_event(tid, tensor));
  } else if (!overflow_named_) {
    overflow_named_ = true;
    events_.push_back(track_name_event(kMaxTracks, "(more tensors: see args.tensor)"));
  }
  const auto us = [&](Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(t - origin_).count();
  };
  events_.push_back("{\"name\": \"" + std::string(phase) + "\", \"ph\": \"X\", \"pid\": 0, " +
                    "\"tid\": " + std::to_string(tid) + ", \"ts\": " + std::to_string(us(begin)) +
                    ", \"dur\": " + std::to_string(std::max<int64_t>(0, us(end) - us(begin))) +
                    ", \"args\": {\"tensor\": " + json_string(tensor) + "}}");
  cv_.notify_one();
}

void Timeline::write_loop() {
  bool first = true;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stopping_ || !events_.empty(); });
    std::vector<std::string> batch(std::make_move_iterator(events_.begin()),
                                   std::make_move_iterator(events_.end()));
    events_.clear();
    const bool last = stopping_;
    lock.unlock();
    for (const std::string& e : batch) {
      // The separator goes before each event, so a closed file has no trailing comma.
      if (!first) std::fputs(",\n", file_);
      std::fputs(e.c_str(), file_);
      first = false;
    }
    // Flushed (not fsynced) per burst: a killed process loses at most the last burst.
    std::fflush(file_);
    if (last) return;
    lock.lock();
  }
}

}  // namespace gradfuse::engine
