#include "engine/fault_injection.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace gradfuse::engine {

void inject_fault(const std::string& point, const std::string& name) {
  // Read once: this runs for every tensor the engine executes.
  static const std::string fault = [] {
    const char* raw = std::getenv("GRADFUSE_TEST_FAULT");
    return std::string(raw ? raw : "");
  }();
  if (fault.empty()) return;
  const std::string here = name.empty() ? point : point + ":" + name;
  TORCH_CHECK(here != fault, "injected fault (GRADFUSE_TEST_FAULT=", fault, ")");
}

}  // namespace gradfuse::engine
