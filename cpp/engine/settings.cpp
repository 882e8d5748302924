#include "engine/settings.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <utility>

namespace gradfuse::engine {

namespace {

int64_t bits_of(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

double double_of(int64_t bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

EngineSettings settings_of(const int64_t* words) {
  return {words[1], double_of(words[2])};
}

}  // namespace

void validate_settings(const EngineSettings& s) {
  TORCH_CHECK_VALUE(s.fusion_threshold_bytes >= 0,
                    "gradfuse: fusion_threshold_bytes must be an integer >= 0 (bytes), got ",
                    s.fusion_threshold_bytes);
  TORCH_CHECK_VALUE(std::isfinite(s.cycle_time_ms) && s.cycle_time_ms > 0,
                    "gradfuse: cycle_time_ms must be a finite number > 0 (milliseconds), got ",
                    s.cycle_time_ms);
}

SettingsAgreement::SettingsAgreement(EngineSettings initial, std::vector<int> global_ranks)
    : global_ranks_(std::move(global_ranks)), requested_(initial) {
  agreed_.settings = initial;
}

int64_t SettingsAgreement::request(const EngineSettings& next) {
  validate_settings(next);
  std::lock_guard<std::mutex> lock(mu_);
  requested_ = next;
  agreed_.requested_generation = ++requested_generation_;
  return requested_generation_;
}

void SettingsAgreement::announce(int64_t* words) const {
  std::lock_guard<std::mutex> lock(mu_);  // generation and settings from the same request
  words[0] = requested_generation_;
  words[1] = requested_.fusion_threshold_bytes;
  words[2] = bits_of(requested_.cycle_time_ms);
}

int SettingsAgreement::global_rank(int r) const {
  return global_ranks_.empty() ? r : global_ranks_.at(r);
}

bool SettingsAgreement::agree(const std::vector<const int64_t*>& words, int64_t cycle) {
  int64_t lowest = words.at(0)[0];
  for (const int64_t* w : words) lowest = std::min(lowest, w[0]);
  std::lock_guard<std::mutex> lock(mu_);
  if (lowest <= agreed_.generation) return false;
  int first = -1;  // the lowest rank at the agreed generation: its settings are the ones
  for (int r = 0; r < static_cast<int>(words.size()); ++r) {
    if (words[r][0] != lowest) continue;
    if (first < 0) {
      first = r;
    } else if (words[r][1] != words[first][1] || words[r][2] != words[first][2]) {
      const EngineSettings a = settings_of(words[first]), b = settings_of(words[r]);
      std::ostringstream why;
      why << "gradfuse: ranks asked for different engine settings as their request number "
          << lowest << ": rank " << global_rank(first)
          << " fusion_threshold_bytes=" << a.fusion_threshold_bytes
          << ", cycle_time_ms=" << a.cycle_time_ms << "; rank " << global_rank(r)
          << " fusion_threshold_bytes=" << b.fusion_threshold_bytes
          << ", cycle_time_ms=" << b.cycle_time_ms
          << " (every rank must ask for the same settings in the same order)";
      TORCH_CHECK(false, why.str());
    }
  }
  const EngineSettings next = settings_of(words[first]);
  validate_settings(next);  // a corrupt slot fails here, on every rank alike
  agreed_.generation = lowest;
  agreed_.settings = next;
  agreed_.since_cycle = cycle;
  return true;
}

SettingsAgreement::Agreed SettingsAgreement::agreed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return agreed_;
}

int64_t SettingsAgreement::fusion_threshold_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return agreed_.settings.fusion_threshold_bytes;
}

double SettingsAgreement::cycle_time_ms() const {
  std::lock_guard<std::mutex> lock(mu_);
  return agreed_.settings.cycle_time_ms;
}

bool SettingsAgreement::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requested_generation_ > agreed_.generation;
}

}  // namespace gradfuse::engine
