// How the engine fails: the reason every pending handle fails with (a local error, posted to the
// peers; a peer's fault, explained by the liveness monitor; a shutdown), and failing the queued,
// in-flight and executing handles with it.
#include "engine/engine.h"
#include "engine/engine_errors.h"
#include "engine/handles.h"

namespace gradfuse::engine {

std::string Engine::shutdown_reason(int rank) {
  // A rank that ends on an uncaught exception posts it before its exit calls shutdown()
  // (gradfuse/_fault_report.py): that is the news, not the shutdown.
  try {
    std::string fault = board_ ? board_->fault(rank) : "";
    if (!fault.empty()) return fault;
  } catch (const std::exception&) {
    // The store left with its host: the shutdown is all there is to say.
  }
  return "gradfuse: shutdown() was called on rank " + std::to_string(config_.global_rank(rank));
}

void Engine::post_failure(const std::string& why) {
  if (!board_) return;
  try {
    board_->publish_fault(config_.rank, why);
  } catch (const std::exception&) {
    // The store is gone with its host: the peers learn of that themselves.
  }
}

void Engine::abort(const std::string& why) {
  // The negotiating thread or the executor may be blocked in a collective with the silent rank
  // until the Gloo timeout; the handles fail now, so synchronize() raises at once.
  fail_all(why);
  fail_executing(stopped_reason());
  batches_->discard();  // the executor starts nothing more; the loop stops waiting for it
  queue_.wake();
}

void Engine::fail_executing(const std::string& why) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (const auto& [handle, name] : executing_) {
    try {
      HandleTable::get().fail(handle, why + " while '" + name + "' was running");
    } catch (const c10::Error&) {
      // Discarded by its caller meanwhile: nothing to fail.
    }
  }
  // Failed once, with the first reason: the executor no longer completes them.
  executing_.clear();
}

std::string Engine::explain(const std::exception& e) {
  if (const auto* explained = dynamic_cast<const ExplainedError*>(&e)) return explained->what();
  const std::string reason = stopped_reason();
  if (!reason.empty()) return reason;
  const std::string what = message_of(e);
  if (!is_transport_error(e)) {
    const std::string why =
        "gradfuse: rank " + std::to_string(config_.global_rank(config_.rank)) + " failed: " + what;
    post_failure(why);
    return why;
  }
  if (liveness_) {
    // A peer that died broke the connection just now: the monitors watch who stopped beating
    // and name it within about a second. Otherwise (a timeout, or no beat stopped) the silent
    // peer's heartbeat goes stale within the timeout, and then the monitor names it.
    if (is_connection_error(e)) liveness_->report_broken_connection();
    const auto deadline = std::chrono::steady_clock::now() + liveness_->verdict_delay();
    const std::string verdict = liveness_->wait_for_verdict(deadline);
    if (!verdict.empty()) return verdict + " (transport error: " + what + ")";
  }
  return "gradfuse: the engine stopped after an error: " + what;
}

std::string Engine::stopped_reason() const {
  std::lock_guard<std::mutex> lock(reason_mu_);
  return stopped_reason_;
}

void Engine::fail_all(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(reason_mu_);
    if (stopped_reason_.empty()) stopped_reason_ = why;
  }
  for (Entry& e : queue_.close(stopped_reason())) {
    HandleTable::get().fail(e.handle,
                            stopped_reason() + " while '" + e.request.name + "' was pending");
  }
  // CUDA work already queued on the device waits on a transport that is gone.
  HandleTable::get().fail_device_pending(stopped_reason() + " while a CUDA collective was running");
}

}  // namespace gradfuse::engine
