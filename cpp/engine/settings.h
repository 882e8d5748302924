// Engine settings that may change while the engine runs (the autotuner's, python/gradfuse/
// autotune.py): the fusion threshold and the cycle time. The fusion threshold decides how
// negotiated responses are grouped into collectives, so two ranks using different thresholds
// in the same cycle would run different collectives and hang or corrupt. A change therefore
// takes effect by agreement, at the same negotiation cycle on every rank:
//  - a rank asks for new settings (request(): generation g = its own request count);
//  - every cycle, each rank announces its latest requested generation and settings in its
//    negotiation slot header (announce());
//  - every rank reads the same headers (agree()) and switches to the smallest generation any
//    rank announces, once that exceeds the agreed one, taking the settings of the lowest rank
//    at that generation. Every rank decides from the same bytes, so every rank switches in the
//    same cycle; a rank that never asks holds every rank at the old generation.
// Two ranks announcing different settings for the same generation is a programming error
// (the ranks asked for different things): agree() throws, on every rank alike.
// The cycle time only paces this rank's loop (safe to differ) but follows the same rule.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace gradfuse::engine {

struct EngineSettings {
  int64_t fusion_threshold_bytes = 64 << 20;
  double cycle_time_ms = 1.0;
};

// c10::ValueError naming the bad field (fusion_threshold_bytes >= 0; cycle_time_ms finite > 0).
void validate_settings(const EngineSettings& settings);

class SettingsAgreement {
 public:
  // Header words a rank announces per cycle: generation, fusion threshold, cycle time (the
  // double's bits, so every rank reads back the identical value).
  static constexpr int kWords = 3;

  // global_ranks[r]: rank r's global rank, for messages (empty: the identity).
  SettingsAgreement(EngineSettings initial, std::vector<int> global_ranks);

  // Any thread. Validates (ValueError naming the field), then asks for `next` from the first
  // cycle in which every rank has asked as often. Returns the request's generation (1, 2, ...).
  int64_t request(const EngineSettings& next);

  // The loop thread: this rank's header words for the coming cycle.
  void announce(int64_t* words) const;

  // The loop thread: every rank's header words, in rank order (identical on every rank), of
  // cycle `cycle`. Switches as described above; returns true when it did. Throws (c10::Error)
  // when ranks announce different settings for the same generation.
  bool agree(const std::vector<const int64_t*>& words, int64_t cycle);

  struct Agreed {
    int64_t generation = 0;
    EngineSettings settings;
    int64_t since_cycle = 0;  // the cycle whose negotiation switched to it (0: from the start)
    int64_t requested_generation = 0;  // this rank's latest request
  };
  Agreed agreed() const;
  // The agreed fusion threshold: read by dispatch() right after the cycle that agreed it.
  int64_t fusion_threshold_bytes() const;
  double cycle_time_ms() const;
  // Whether this rank has asked for a generation not yet agreed (a negotiation fast path must
  // still announce while this holds).
  bool pending() const;

 private:
  int global_rank(int r) const;

  std::vector<int> global_ranks_;
  mutable std::mutex mu_;
  Agreed agreed_;
  int64_t requested_generation_ = 0;
  EngineSettings requested_;
};

}  // namespace gradfuse::engine
