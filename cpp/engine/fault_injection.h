// Test-only faults, so the fault matrix (tests/test_fault_matrix.py) can make one rank's engine
// fail for a local reason and watch what its peers see. GRADFUSE_TEST_FAULT, set in that one
// rank's environment, picks the place:
//   engine_start     the engine's start throws (after init()'s Python-side checks passed)
//   execute:<name>   running the negotiated tensor named <name> throws
// Unset (always, outside tests): nothing happens.
#pragma once

#include <string>

namespace gradfuse::engine {

// Throws c10::Error naming the fault when GRADFUSE_TEST_FAULT asks for `point` (and, when the
// fault names a tensor, `name` is that tensor).
void inject_fault(const std::string& point, const std::string& name = "");

}  // namespace gradfuse::engine
