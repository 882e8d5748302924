#include "engine/transport_health.h"

namespace gradfuse::engine {

TransportHealth::TransportHealth(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                 c10::DeviceType device_type, int rank)
    : rank_(rank) {
  if (!group) return;
  try {
    auto backend = group->getBackend(device_type);
    (void)backend->getError();  // Gloo throws: it does not track errors this way
    backend_ = backend;
  } catch (const c10::Error&) {
    backend_.reset();
  }
}

std::string TransportHealth::error() const {
  if (!backend_) return "";
  const std::string where = "gradfuse: the " + backend_->getBackendName() +
                            " transport reported on rank " + std::to_string(rank_) + " that ";
  switch (backend_->getError()) {
    case c10d::ErrorType::SUCCESS:
      return "";
    case c10d::ErrorType::TIMEOUT:
      return where + "a collective timed out (a peer stopped or is stuck; see init(timeout_s=...))";
    case c10d::ErrorType::COMM_ERROR:
      return where + "a collective failed (communicator error)";
    case c10d::ErrorType::REMOTE_ERROR:
      return where + "a peer failed (it died or its connection broke)";
  }
  return where + "an unknown error happened";
}

}  // namespace gradfuse::engine
