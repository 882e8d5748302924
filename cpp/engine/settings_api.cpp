// The control calls of engine/settings.h for cpp/python/module.cpp (api.h): a process set's
// engine asked for new settings, and the settings it has agreed.
#include "engine/api.h"
#include "engine/engine.h"

namespace gradfuse::engine {

int64_t request_settings(int process_set_id, int64_t fusion_threshold_bytes, double cycle_time_ms) {
  const std::shared_ptr<Engine> engine = process_set_engine(process_set_id);
  const int64_t generation = engine->settings().request({fusion_threshold_bytes, cycle_time_ms});
  engine->wake();  // an idle engine announces it now, not after its idle wait
  return generation;
}

AgreedSettings agreed_settings(int process_set_id) {
  const SettingsAgreement::Agreed a = process_set_engine(process_set_id)->settings().agreed();
  return {a.generation, a.settings.fusion_threshold_bytes, a.settings.cycle_time_ms, a.since_cycle,
          a.requested_generation};
}

}  // namespace gradfuse::engine
