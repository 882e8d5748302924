// The engine's life: construction (groups, liveness, the start handshake), enqueue, the
// background thread's loop, and stop. Negotiation is in engine_negotiate.cpp, execution in
// engine_execute.cpp, failure handling in engine_failures.cpp, the process's engines (one per
// process set) in registry.cpp.
#include "engine/engine.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "engine/engine_errors.h"
#include "engine/engine_thread.h"
#include "engine/fault_injection.h"
#include "engine/handles.h"

namespace gradfuse::engine {

namespace {
// The timeline's track of the negotiation rounds that had work (engine_execute.cpp has the
// collectives'), so a step's timeline shows a round overlapping the running collective.
constexpr const char* kNegotiationTrack = "engine: negotiation";
}  // namespace

Engine::Engine(EngineConfig config)
    : config_(std::move(config)),
      negotiator_(config_.size, config_.cache_capacity),
      settings_({config_.fusion_threshold_bytes, config_.cycle_time_ms}, config_.global_ranks),
      stall_(config_.rank, config_.stall_warning_s, config_.stall_shutdown_s,
             config_.pending_names_limit, config_.global_ranks, config_.process_set_id) {
  validate(config_);
  if (!config_.store_host.empty() && config_.size > 1) {
    board_ = std::make_shared<PeerBoard>(config_.store_host, config_.store_port,
                                         config_.heartbeat_prefix, config_.rank, config_.size,
                                         config_.timeout_s, config_.global_ranks);
  }
  try {
    connect();
    if (board_) await_peers_started();
  } catch (const PeerStartFailure&) {
    throw;
  } catch (const std::exception& e) {
    // The peers wait for this rank in the start handshake: tell them why it will not come.
    // This rank raises the same words (and the same type for a bad value).
    const std::string why = "gradfuse.init() failed on rank " +
                            std::to_string(config_.global_rank(config_.rank)) +
                            ": its engine did not start: " + message_of(e);
    post_failure(why);
    TORCH_CHECK_VALUE(!dynamic_cast<const c10::ValueError*>(&e), why);
    TORCH_CHECK(false, why);
  }
  executor_ = std::thread([this] {
    prepare_engine_thread("gradfuse-exec");
    run_batches();
  });
  thread_ = std::thread([this] {
    prepare_engine_thread("gradfuse-negot");
    loop();
  });
}

void Engine::connect() {
  control_ = c10d::resolve_process_group(config_.control_group);
  cpu_ = c10d::resolve_process_group(config_.cpu_group);
  if (!config_.cuda_group.empty()) {
    cuda_ = c10d::resolve_process_group(config_.cuda_group);
#ifdef GRADFUSE_WITH_CUDA
    cuda_runner_ = std::make_unique<CudaBatchRunner>(std::make_shared<const TransportHealth>(
        cuda_, c10::DeviceType::CUDA, config_.global_rank(config_.rank)));
#endif
  }
  if (!config_.local_group.empty()) {
    cpu_hierarchy_.local = c10d::resolve_process_group(config_.local_group);
    cpu_hierarchy_.cross = c10d::resolve_process_group(config_.cross_group);
    cpu_hierarchy_.max_bytes = config_.hierarchical_max_bytes;
  }
  if (!config_.cuda_local_group.empty()) {
    cuda_hierarchy_.local = c10d::resolve_process_group(config_.cuda_local_group);
    cuda_hierarchy_.cross = c10d::resolve_process_group(config_.cuda_cross_group);
    cuda_hierarchy_.max_bytes = config_.hierarchical_max_bytes;
  }
  TORCH_CHECK_VALUE(control_->getSize() == config_.size && control_->getRank() == config_.rank,
                    "gradfuse: control group '", config_.control_group, "' has rank ",
                    control_->getRank(), " of ", control_->getSize(), ", expected rank ",
                    config_.rank, " of ", config_.size);
  if (board_) {
    liveness_ = std::make_unique<LivenessMonitor>(board_, config_.timeout_s,
                                                  [this](const std::string& why) { abort(why); });
  }
  inject_fault("engine_start");
  if (!config_.timeline_path.empty()) timeline_.start(config_.timeline_path);
}

void Engine::await_peers_started() {
  board_->mark_started();
  // The monitor's verdict ends the wait: a peer that posted its start failure, exited, or
  // stayed silent for timeout_s.
  const auto poll = std::chrono::milliseconds(10);
  while (!board_->all_started()) {
    const auto until = std::chrono::steady_clock::now() + poll;
    const std::string verdict = liveness_->wait_for_verdict(until);
    if (verdict.rfind("gradfuse.init()", 0) == 0) throw PeerStartFailure(verdict);
    if (!verdict.empty()) throw PeerStartFailure("gradfuse.init() failed: " + verdict);
  }
}

Engine::~Engine() { stop(); }

int64_t Engine::enqueue(EnqueueArgs a) {
  const char* op = op_name(a.op);
  std::vector<int64_t> splits = check_enqueue(a, config_.size);
  const auto device = a.tensor.device();
#ifdef GRADFUSE_WITH_CUDA
  constexpr bool kBuiltWithCuda = true;
#else
  constexpr bool kBuiltWithCuda = false;
#endif
  const std::string device_error =
      unsupported_device_error(op, device, kBuiltWithCuda, cuda_ != nullptr);
  TORCH_CHECK_VALUE(device_error.empty(), device_error);
  // barrier and join move no data: their (empty) tensor only says where a joined rank's
  // placeholders go (join(device=...)), and is not negotiated.
  const bool carries_data = a.op != OpType::kBarrier && a.op != OpType::kJoin;
  if (device.is_cuda()) {
    if (carries_data) {
      cuda_device_.bind(op, device);
    } else {
      cuda_device_.bind_if_unbound(device);
    }
  }

  Entry e;
  e.request.name = a.name;
  e.request.op = a.op;
  const bool reduces = a.op == OpType::kAllreduce || a.op == OpType::kReducescatter;
  e.request.reduce_op = reduces ? a.reduce_op : ReduceOp::kSum;
  e.request.dtype = a.tensor.scalar_type();
  e.request.device_type = static_cast<int8_t>(carries_data ? device.type() : c10::DeviceType::CPU);
  e.request.root = a.op == OpType::kBroadcast ? a.root : 0;
  e.request.shape = a.tensor.sizes().vec();
  e.request.splits = std::move(splits);
  // A non-contiguous input is copied now: the value at enqueue time is what gets reduced.
  e.tensor = a.tensor.is_contiguous() ? a.tensor : a.tensor.contiguous();
  if (a.output.has_value()) e.output = *a.output;
  e.prescale = a.prescale;
  e.postscale = a.postscale;
  if (a.sq_norm.has_value()) e.sq_norm = *a.sq_norm;
#ifdef GRADFUSE_WITH_CUDA
  // Backward may still be writing the tensor on the caller's stream.
  if (device.is_cuda() && carries_data) e.wait_for_producer = order_after_producer(device);
#endif
  e.handle = HandleTable::get().create(a.name);
  const int64_t handle = e.handle;
  try {
    queue_.push(std::move(e));
  } catch (...) {
    HandleTable::get().discard(handle);
    throw;
  }
  return handle;
}

void Engine::stop() {
  stop_requested_ = true;
  queue_.wake();
  if (thread_.joinable()) thread_.join();
  batches_->discard();  // (the loop's exit did; also when it never ran)
  if (executor_.joinable()) executor_.join();
  liveness_.reset();                            // after the threads: explain() may be waiting on it
  fail_all("gradfuse: shutdown() was called");  // anything that raced with the threads' exit
  fail_executing(stopped_reason());
}

void Engine::loop() {
  // Idle wait: while nothing is pending on any rank (the controller's table, the same on every
  // rank), nothing is waiting here to be sent and no settings change is asked for, a round has
  // nothing to decide. The engine then runs one more round 16 cycles after the last busy round
  // and sleeps up to kMaxIdleWait after that. (It used to negotiate every cycle while this
  // rank's own collective ran, and to double its wait from one cycle otherwise: about ten
  // empty rounds per training step, each an allgather on cores the ranks compute on.) Work
  // resumes at once, because every rank wakes on its own enqueue (and stop()). The one early
  // round is for what only other ranks submit soon after a round (a rank's join(), a
  // straggler's tensor): it is seen within 16 cycles, so join() still tells which rank joined
  // last. While some rank waits for another (a name pending, a rank in join()), every rank
  // negotiates each cycle, so a straggler's late tensor, a stall and a mismatch are handled
  // within a cycle. After a quiet spell, a submission of one rank alone (or its shutdown) is
  // seen when the others submit or wake, up to kMaxIdleWait later.
  constexpr auto kMaxIdleWait = std::chrono::milliseconds(500);
  constexpr int kAfterBusyCycles = 16;
  // The cycle time is the agreed one (engine/settings.h), which the autotuner may change.
  auto agreed_cycle = [this] {
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double, std::milli>(settings_.cycle_time_ms()));
  };
  auto wait = agreed_cycle();
  try {
    while (true) {
      // Sleep until work is enqueued or the (backed-off) cycle time has passed: the other
      // ranks are in the same loop, and negotiation needs all of them.
      queue_.wait_for_work(std::chrono::steady_clock::now() + wait);
      // Overlap, not run-ahead: the round may run beside the executor's collective, but waits
      // until it took the batches already given (BatchQueue::wait_until_taken).
      batches_->wait_until_taken();
      // Aborted (the handles already failed with the liveness verdict), or the executor failed.
      if (stopped()) break;
      int stop_rank = -1;
      const auto negotiate_start = std::chrono::steady_clock::now();
      const int64_t busy_before = stats_.busy_cycles;
      std::vector<Response> responses = negotiate(stop_rank);
      const bool busy = stats_.busy_cycles != busy_before || !responses.empty();
      const auto cycle = agreed_cycle();
      const auto max_wait = std::max<std::chrono::steady_clock::duration>(cycle, kMaxIdleWait);
      const bool waiting =
          queue_.has_unsent() || negotiator_.controller().pending() > 0 || settings_.pending();
      if (waiting) {
        wait = cycle;  // some rank waits for another: every cycle
      } else if (busy) {
        wait = kAfterBusyCycles * cycle;  // work just ran: what follows it is seen soon
      } else {
        wait = max_wait;
      }
      const auto negotiate_end = std::chrono::steady_clock::now();
      stats_.negotiate_ns +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(negotiate_end - negotiate_start)
              .count();
      // Busy rounds only: they are the ones a step's timeline needs to show overlapping the
      // previous bucket's collective (engine_execute.cpp's collectives track).
      if (busy && timeline_.active()) {
        timeline_.phase(kNegotiationTrack, "negotiate", negotiate_start, negotiate_end);
      }
      if (stop_rank >= 0) {
        // Every rank runs what was negotiated before the stop, then fails what was not.
        drain_executor();
        fail_all(shutdown_reason(stop_rank));
        return;
      }
      if (stopped()) break;
      dispatch(std::move(responses));
    }
  } catch (const std::exception& e) {
    fail_all(explain(e));
    fail_executing(stopped_reason());
  }
  batches_->discard();  // the executor runs nothing more once the engine stopped
}

}  // namespace gradfuse::engine
