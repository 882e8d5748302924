#include "engine/engine.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <pthread.h>

#include <cstring>
#include <map>
#include <mutex>

#include "engine/alltoall.h"
#include "engine/collectives.h"
#include "engine/fault_injection.h"
#include "engine/handles.h"
#include "engine/join.h"

#ifdef GRADFUSE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace gradfuse::engine {

namespace {
// A transport error already turned into the message every pending handle fails with.
struct ExplainedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A peer's engine did not start: this rank's start fails too, but the fault is not its own.
struct PeerStartFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Gloo reports a broken connection or a timed-out wait as a plain std::runtime_error naming its
// source file; c10d's own transport errors are c10::DistError. Any other error happened here.
bool is_transport_error(const std::exception& e) {
  if (dynamic_cast<const c10::DistError*>(&e)) return true;
  if (dynamic_cast<const c10::Error*>(&e)) return false;
  return std::string(e.what()).find("gloo") != std::string::npos;
}

// The error's words, without a backtrace or a leading "gradfuse: " (the message they go into
// starts with one).
std::string message_of(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
  const std::string ours = "gradfuse: ";
  return what.rfind(ours, 0) == 0 ? what.substr(ours.size()) : what;
}
}  // namespace

Engine::Engine(EngineConfig config)
    : config_(std::move(config)),
      negotiator_(config_.size, config_.cache_capacity),
      stall_(config_.rank, config_.stall_warning_s, config_.stall_shutdown_s,
             config_.pending_names_limit, config_.global_ranks, config_.process_set_id) {
  validate(config_);
  if (!config_.store_host.empty() && config_.size > 1) {
    board_ = std::make_shared<PeerBoard>(config_.store_host, config_.store_port,
                                         config_.heartbeat_prefix, config_.rank, config_.size,
                                         config_.timeout_s);
  }
  try {
    connect();
    if (board_) await_peers_started();
  } catch (const PeerStartFailure&) {
    throw;
  } catch (const std::exception& e) {
    // The peers wait for this rank in the start handshake: tell them why it will not come.
    // This rank raises the same words (and the same type for a bad value).
    const std::string why = "gradfuse.init() failed on rank " + std::to_string(config_.rank) +
                            ": its engine did not start: " + message_of(e);
    post_failure(why);
    TORCH_CHECK_VALUE(!dynamic_cast<const c10::ValueError*>(&e), why);
    TORCH_CHECK(false, why);
  }
  thread_ = std::thread([this] { loop(); });
}

void Engine::connect() {
  control_ = c10d::resolve_process_group(config_.control_group);
  cpu_ = c10d::resolve_process_group(config_.cpu_group);
  if (!config_.cuda_group.empty()) {
    cuda_ = c10d::resolve_process_group(config_.cuda_group);
#ifdef GRADFUSE_WITH_CUDA
    cuda_runner_ = std::make_unique<CudaBatchRunner>(
        std::make_shared<const TransportHealth>(cuda_, c10::DeviceType::CUDA, config_.rank));
#endif
  }
  if (!config_.local_group.empty()) {
    cpu_hierarchy_.local = c10d::resolve_process_group(config_.local_group);
    cpu_hierarchy_.cross = c10d::resolve_process_group(config_.cross_group);
  }
  if (!config_.cuda_local_group.empty()) {
    cuda_hierarchy_.local = c10d::resolve_process_group(config_.cuda_local_group);
    cuda_hierarchy_.cross = c10d::resolve_process_group(config_.cuda_cross_group);
  }
  TORCH_CHECK_VALUE(control_->getSize() == config_.size && control_->getRank() == config_.rank,
                    "gradfuse: control group '", config_.control_group, "' has rank ",
                    control_->getRank(), " of ", control_->getSize(), ", expected rank ",
                    config_.rank, " of ", config_.size);
  if (board_) {
    liveness_ = std::make_unique<LivenessMonitor>(
        board_, config_.timeout_s, [this](const std::string& why) { abort(why); });
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

std::string Engine::shutdown_reason(int rank) {
  // A rank that ends on an uncaught exception posts it before its exit calls shutdown()
  // (gradfuse/_fault_report.py): that is the news, not the shutdown.
  try {
    std::string fault = board_ ? board_->fault(rank) : "";
    if (!fault.empty()) return fault;
  } catch (const std::exception&) {
    // The store left with its host: the shutdown is all there is to say.
  }
  return "gradfuse: shutdown() was called on rank " + std::to_string(rank);
}

void Engine::post_failure(const std::string& why) {
  if (!board_) return;
  try {
    board_->publish_fault(config_.rank, why);
  } catch (const std::exception&) {
    // The store is gone with its host: the peers learn of that themselves.
  }
}

Engine::~Engine() { stop(); }

void Engine::abort(const std::string& why) {
  // The engine thread may be blocked in a collective with the silent rank until the Gloo
  // timeout; the handles fail now, so synchronize() raises at once.
  aborted_ = true;
  fail_all(why);
  fail_executing(stopped_reason());
  queue_.wake();
}

void Engine::track_executing(const Batch& batch) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (const Entry& e : batch.entries) executing_.emplace_back(e.handle, e.request.name);
}

void Engine::fail_executing(const std::string& why) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (const auto& [handle, name] : executing_) {
    try {
      HandleTable::get().fail(handle, why + " while '" + name + "' was running");
    } catch (const c10::Error&) {
      // Completed and already collected by its caller (or failed and collected): nothing to
      // fail.
    }
  }
}

void Engine::forget_executing() {
  std::lock_guard<std::mutex> lock(executing_mu_);
  executing_.clear();
}

std::string Engine::explain(const std::exception& e) {
  if (const auto* explained = dynamic_cast<const ExplainedError*>(&e)) return explained->what();
  const std::string reason = stopped_reason();
  if (!reason.empty()) return reason;
  const std::string what = message_of(e);
  if (!is_transport_error(e)) {
    const std::string why = "gradfuse: rank " + std::to_string(config_.rank) + " failed: " + what;
    post_failure(why);
    return why;
  }
  if (liveness_) {
    // A peer that died broke the connection just now; its heartbeat goes stale within the
    // timeout, and then the monitor names it.
    const auto deadline = std::chrono::steady_clock::now() + liveness_->verdict_delay();
    const std::string verdict = liveness_->wait_for_verdict(deadline);
    if (!verdict.empty()) return verdict + " (transport error: " + what + ")";
  }
  return "gradfuse: the engine stopped after an error: " + what;
}

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
  e.request.device_type =
      static_cast<int8_t>(carries_data ? device.type() : c10::DeviceType::CPU);
  e.request.root = a.op == OpType::kBroadcast ? a.root : 0;
  e.request.shape = a.tensor.sizes().vec();
  e.request.splits = std::move(splits);
  // A non-contiguous input is copied now: the value at enqueue time is what gets reduced.
  e.tensor = a.tensor.is_contiguous() ? a.tensor : a.tensor.contiguous();
  if (a.output.has_value()) e.output = *a.output;
  e.prescale = a.prescale;
  e.postscale = a.postscale;
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
  liveness_.reset();                            // after the thread: explain() may be waiting on it
  fail_all("gradfuse: shutdown() was called");  // anything that raced with the thread's exit
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
  HandleTable::get().fail_device_pending(stopped_reason() +
                                         " while a CUDA collective was running");
}

Entry Engine::take_entry(const Response& response) {
  if (auto e = queue_.try_take(response.name)) return std::move(*e);
  TORCH_CHECK(joined_in(response, config_.rank), "gradfuse: negotiated tensor '", response.name,
              "' is not in flight on this rank (internal error)");
  const auto type = static_cast<c10::DeviceType>(response.request.device_type);
  return joined_placeholder(response, local_device(type));
}

c10::Device Engine::local_device(c10::DeviceType type) const {
#ifdef GRADFUSE_WITH_CUDA
  // Asked only when the rank has a CUDA group (or the type is CPU): no CUDA context otherwise.
  const c10::DeviceIndex current =
      type == c10::DeviceType::CUDA && cuda_ ? c10::cuda::current_device() : 0;
#else
  const c10::DeviceIndex current = 0;
#endif
  return cuda_device_.placeholder_device(type, current);
}

at::Tensor Engine::second_output(const Response& response) const {
  if (response.request.op != OpType::kAlltoall) return {};
  return received_splits(response, config_.rank, config_.size);
}

void Engine::loop() {
  const auto cycle = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double, std::milli>(config_.cycle_time_ms));
  // Idle back-off: while no rank submits anything and this rank has nothing in flight, the
  // wait between negotiations doubles up to kMaxIdleBackoff cycle times, so an idle job (the
  // forward pass) does not spend CPU on an allgather every cycle. It costs no latency when
  // work resumes, because every rank wakes on its own enqueue; a rank with work in flight
  // never backs off, so a straggler's late tensor is negotiated within one cycle.
  constexpr int kMaxIdleBackoff = 16;
  int backoff = 1;
  try {
    while (true) {
      // Sleep until work is enqueued or the (backed-off) cycle time has passed: the other
      // ranks are in the same loop, and negotiation needs all of them.
      queue_.wait_for_work(std::chrono::steady_clock::now() + cycle * backoff);
      if (aborted_) return;  // handles already failed with the liveness verdict
      int stop_rank = -1;
      const auto negotiate_start = std::chrono::steady_clock::now();
      const int64_t busy_before = stats_.busy_cycles;
      std::vector<Response> responses = negotiate(stop_rank);
      const bool idle = stats_.busy_cycles == busy_before && responses.empty();
      backoff = idle && !queue_.has_in_flight() ? std::min(2 * backoff, kMaxIdleBackoff) : 1;
      stats_.negotiate_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::steady_clock::now() - negotiate_start)
                                 .count();
      if (stop_rank >= 0) {
        fail_all(shutdown_reason(stop_rank));
        return;
      }
      execute(std::move(responses));
    }
  } catch (const std::exception& e) {
    fail_all(explain(e));
  }
}

std::vector<Response> Engine::negotiate(int& stop_rank) {
  // Each rank sends one fixed-size slot: [length, stop flag, clock (ms), the first bytes of its
  // requests]. Rank 0's clock is the one every rank ages stalled tensors by.
  // Steady state (a few dozen names) fits in one slot, so a cycle is a single allgather; only
  // longer messages need a second round for the rest.
  constexpr int64_t kSlot = 4096;
  constexpr int64_t kHeader = 3 * sizeof(int64_t);
  constexpr int64_t kInline = kSlot - kHeader;
  const int n = config_.size;
  // Requests the other ranks have seen run with these exact attributes go as cache indices.
  Negotiator::Encoded encoded = negotiator_.encode(queue_.take_new_requests());
  stats_.cache_hits += encoded.cache_hits;
  stats_.cache_misses += encoded.cache_misses;
  const std::vector<uint8_t>& mine = encoded.bytes;
  const auto my_len = static_cast<int64_t>(mine.size());

  at::Tensor slot = at::zeros({kSlot}, at::kByte);
  auto* header = reinterpret_cast<int64_t*>(slot.data_ptr<uint8_t>());
  header[0] = my_len;
  header[1] = stop_requested_.load() ? 1 : 0;
  header[2] = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::steady_clock::now() - started_)
                  .count();
  std::memcpy(slot.data_ptr<uint8_t>() + kHeader, mine.data(), std::min(my_len, kInline));
  std::vector<std::vector<at::Tensor>> slots(1);
  for (int r = 0; r < n; ++r) slots[0].push_back(at::empty({kSlot}, at::kByte));
  std::vector<at::Tensor> slot_in{slot};
  control_->allgather(slots, slot_in)->wait();

  std::vector<int64_t> lengths(n);
  int64_t longest = 0;
  // A peer's length is checked before it sizes a copy or an allocation: a corrupt slot fails
  // the engine with an error naming the rank (every rank reads the same slots, so every rank
  // fails alike) instead of a crash or a huge allocation.
  constexpr int64_t kMaxMessage = int64_t{1} << 30;
  for (int r = 0; r < n; ++r) {
    const auto* h = reinterpret_cast<const int64_t*>(slots[0][r].data_ptr<uint8_t>());
    TORCH_CHECK(h[0] >= 0 && h[0] <= kMaxMessage, "gradfuse: rank ", r,
                " announced a negotiation message of ", h[0], " bytes (at most ", kMaxMessage,
                " are possible): a corrupt message, or a peer running another version");
    lengths[r] = h[0];
    longest = std::max(longest, h[0]);
    if (h[1] && stop_rank < 0) stop_rank = r;
  }
  const int64_t clock_ms = reinterpret_cast<const int64_t*>(slots[0][0].data_ptr<uint8_t>())[2];
  std::vector<Response> responses;
  stats_.cycles++;
  if (longest == 0) {
    stall_.check(negotiator_.controller(), clock_ms, responses);
    return responses;
  }
  stats_.busy_cycles++;

  // Every rank's full message: the inline part, plus the overflow round when needed.
  std::vector<std::vector<uint8_t>> messages(n);
  for (int r = 0; r < n; ++r) {
    const uint8_t* p = slots[0][r].data_ptr<uint8_t>() + kHeader;
    messages[r].assign(p, p + std::min(lengths[r], kInline));
  }
  if (longest > kInline) {
    const int64_t rest = longest - kInline;
    at::Tensor overflow = at::zeros({rest}, at::kByte);
    if (my_len > kInline) {
      std::memcpy(overflow.data_ptr(), mine.data() + kInline, my_len - kInline);
    }
    std::vector<std::vector<at::Tensor>> overflows(1);
    for (int r = 0; r < n; ++r) overflows[0].push_back(at::empty({rest}, at::kByte));
    std::vector<at::Tensor> overflow_in{overflow};
    control_->allgather(overflows, overflow_in)->wait();
    for (int r = 0; r < n; ++r) {
      if (lengths[r] <= kInline) continue;
      const uint8_t* p = overflows[0][r].data_ptr<uint8_t>();
      messages[r].insert(messages[r].end(), p, p + (lengths[r] - kInline));
    }
  }
  responses = negotiator_.decide(messages);
  stall_.check(negotiator_.controller(), clock_ms, responses);
  return responses;
}

void Engine::record(const Batch& batch, std::chrono::steady_clock::time_point negotiated,
                    std::chrono::steady_clock::time_point started, const BatchTimes& times) {
  const auto done = std::chrono::steady_clock::now();
  for (const Entry& e : batch.entries) {
    const std::string& name = e.request.name;
    timeline_.phase(name, "negotiate", e.enqueued, negotiated);
    timeline_.phase(name, "queue", negotiated, started);
    timeline_.phase(name, "pack", started, times.packed);
    timeline_.phase(name, "collective", times.packed, times.reduced);
    timeline_.phase(name, "unpack", times.reduced, done);
  }
}

void Engine::execute(std::vector<Response> responses) {
  const auto negotiated = std::chrono::steady_clock::now();
  std::vector<Response> runnable;
  for (Response& r : responses) {
    if (r.kind == Response::Kind::kError) {
      // A rank without an entry (it joined, or never sent a stalled tensor) has nothing to
      // fail: the error is the other ranks'.
      if (auto entry = queue_.try_take(r.name)) HandleTable::get().fail(entry->handle, r.error);
      if (r.error.rfind("gradfuse: stall:", 0) == 0) stats_.stalled++;
    } else {
      runnable.push_back(std::move(r));
    }
  }
  std::vector<Batch> batches = make_batches(std::move(runnable), config_.fusion_threshold_bytes);
  // Per batch (two may be in progress): when it started, packed and reduced, for the timeline.
  const bool timed = timeline_.active();
  std::vector<std::chrono::steady_clock::time_point> started_at(batches.size());
  std::vector<BatchTimes> times(batches.size());
  // CPU batches are pipelined, one collective at a time: batch k+1 is packed while batch k's
  // collective runs, and batch k is unpacked while k+1's runs (each uses its own fusion
  // buffer slot).
  std::optional<PreparedBatch> in_flight;
  size_t in_flight_index = 0;
  auto finish_in_flight = [&] {
    if (!in_flight) return;
    PreparedBatch prepared = std::move(*in_flight);
    in_flight.reset();
    const Batch& batch = batches[in_flight_index];
    std::vector<at::Tensor> outputs = prepared.finish();
    if (timed) record(batch, negotiated, started_at[in_flight_index], times[in_flight_index]);
    for (size_t i = 0; i < batch.entries.size(); ++i) {
      HandleTable::get().complete(batch.entries[i].handle, outputs[i], {},
                                  second_output(batch.responses[i]));
    }
  };
  try {
    for (size_t index = 0; index < batches.size(); ++index) {
      Batch& batch = batches[index];
      for (const Response& r : batch.responses) inject_fault("execute", r.name);
      const bool on_cuda =
          static_cast<c10::DeviceType>(batch.key.device_type) == c10::DeviceType::CUDA;
      CollectiveContext ctx{on_cuda ? cuda_ : cpu_, config_.rank, config_.size, &buffers_,
                            on_cuda ? cuda_hierarchy_ : cpu_hierarchy_,
                            timed ? &times[index] : nullptr,
                            // CUDA batches go through run_batch, which counts them here.
                            on_cuda ? &stats_.in_place : nullptr};
      started_at[index] = std::chrono::steady_clock::now();
      stats_.collectives++;
      stats_.tensors += static_cast<int64_t>(batch.responses.size());
#ifdef GRADFUSE_WITH_CUDA
      if (on_cuda) {
        finish_in_flight();
        // This rank's own GPU, not rank 0's: the negotiated request carries no device index.
        cuda_runner_->run(
            batch, ctx, local_device(c10::DeviceType::CUDA),
            [this](const Response& r) { return take_entry(r); },
            [this](const Response& r) { return second_output(r); });
        for (const Entry& e : batch.entries) stats_.bytes += e.tensor.nbytes();
        // Host-side times: when the work was queued on the stream, not when the GPU ran it.
        if (timed) record(batch, negotiated, started_at[index], times[index]);
        continue;
      }
#endif
      // The enqueue check keeps CUDA tensors out of an engine without CUDA.
      TORCH_CHECK(!on_cuda,
                  "gradfuse: a CUDA batch reached an engine without CUDA (internal error)");
      for (const Response& r : batch.responses) batch.entries.push_back(take_entry(r));
      track_executing(batch);
      for (const Entry& e : batch.entries) stats_.bytes += e.tensor.nbytes();
      PreparedBatch prepared = prepare_batch(batch, ctx, static_cast<int>(index % 2));
      if (prepared.in_place) stats_.in_place++;
      if (in_flight) in_flight->wait();
      prepared.launch();
      finish_in_flight();
      in_flight = std::move(prepared);
      in_flight_index = index;
    }
    finish_in_flight();
    forget_executing();
  } catch (const std::exception& e) {
    // A failed collective leaves the ranks out of step: fail the batches that were running
    // (those that finished keep their results), then stop the engine (the remaining entries
    // fail with it).
    const std::string why = explain(e);
    fail_executing(why);
    forget_executing();
    throw ExplainedError(why);
  }
}

// ---- the engines of this process, one per process set ---------------------------------------

namespace {
std::mutex g_mu;
// By process set id; 0 (the global set) runs between init() and shutdown(), the others between
// add_process_set and remove_process_set on their members only.
std::map<int, std::shared_ptr<Engine>> g_engines;
// How many hold_submissions() are not yet released: an engine started meanwhile starts held as
// deep, so every release() finds a hold in every engine.
int g_holds = 0;
// Why enqueue fails when no engine runs.
std::string g_not_running = "gradfuse has not been initialized: call gradfuse.init() first";

// After fork() the child has a copy of the engines' memory but none of their threads (the
// background threads, the liveness monitors): stopping one would join threads that do not
// exist, and using it would talk on the parent's connections. The child forgets them without
// destroying them and says why when asked for one. g_mu is held across fork() (prepare / parent /
// child handlers), so the child never inherits it locked by a thread it does not have.
void forget_engines_in_child() {
  if (!g_engines.empty()) {
    new std::map<int, std::shared_ptr<Engine>>(std::move(g_engines));  // leaked on purpose
    g_engines.clear();
  }
  g_holds = 0;
  g_not_running =
      "gradfuse: this process is a fork of one that ran the engine; its threads and connections "
      "stay in the parent, so a forked child cannot run collectives (the gradfuse ops, "
      "torch.ops.gradfuse.*, work)";
  g_mu.unlock();
}

void install_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_mu.lock(); }, [] { g_mu.unlock(); }, forget_engines_in_child);
  });
}

// Every running engine, the global set's first (callers hold g_mu).
std::vector<std::shared_ptr<Engine>> all_engines_locked() {
  TORCH_CHECK(g_engines.count(0), g_not_running);
  std::vector<std::shared_ptr<Engine>> out;
  for (const auto& [id, engine] : g_engines) out.push_back(engine);
  return out;
}
}  // namespace

void start_engine(const EngineConfig& config) {
  install_fork_handlers();
  std::lock_guard<std::mutex> lock(g_mu);
  const int id = config.process_set_id;
  if (id == 0) {
    TORCH_CHECK(g_engines.empty(),
                "gradfuse: the engine is already running; call shutdown() first");
  } else {
    TORCH_CHECK(g_engines.count(0), g_not_running);
    TORCH_CHECK_VALUE(!g_engines.count(id), "gradfuse: process set ", id,
                      " already has an engine on this rank");
  }
  auto engine = std::make_shared<Engine>(config);
  for (int i = 0; i < g_holds; ++i) engine->hold();
  g_engines[id] = std::move(engine);
}

void stop_engine() {
  std::map<int, std::shared_ptr<Engine>> engines;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    engines.swap(g_engines);
    g_holds = 0;
    if (!engines.empty()) {
      g_not_running = "gradfuse has been shut down: call gradfuse.init() again first";
    }
  }
  // The process sets' engines first, then the global one (every rank stops them in this order).
  for (auto it = engines.rbegin(); it != engines.rend(); ++it) it->second->stop();
}

void stop_process_set_engine(int process_set_id) {
  TORCH_CHECK_VALUE(process_set_id != 0,
                    "gradfuse: the global process set (id 0) cannot be removed; call shutdown()");
  std::shared_ptr<Engine> engine;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_engines.find(process_set_id);
    if (it == g_engines.end()) return;
    engine = std::move(it->second);
    g_engines.erase(it);
  }
  engine->stop();
}

void start_timeline(const std::string& path) { current_engine()->start_timeline(path); }

void stop_timeline() { current_engine()->stop_timeline(); }

void hold_submissions() {
  std::lock_guard<std::mutex> lock(g_mu);
  for (const auto& engine : all_engines_locked()) engine->hold();
  ++g_holds;
}

void release_submissions() {
  std::lock_guard<std::mutex> lock(g_mu);
  const auto engines = all_engines_locked();
  TORCH_CHECK(g_holds > 0, "gradfuse: release_submissions() without hold_submissions()");
  --g_holds;
  for (const auto& engine : engines) engine->release();
}

bool engine_running() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_engines.count(0) > 0;
}

std::shared_ptr<Engine> current_engine() { return process_set_engine(0); }

std::shared_ptr<Engine> process_set_engine(int process_set_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(g_engines.count(0), g_not_running);
  auto it = g_engines.find(static_cast<int>(process_set_id));
  TORCH_CHECK_VALUE(it != g_engines.end(), "gradfuse: process set ", process_set_id,
                    " has no engine on this rank: it was removed, was never added, or this rank "
                    "is not a member of it");
  return it->second;
}

std::vector<int64_t> engine_stats(int process_set_id) {
  const Engine::Stats& s = process_set_engine(process_set_id)->stats();
  return {s.cycles.load(),       s.busy_cycles.load(), s.tensors.load(),
          s.collectives.load(),  s.bytes.load(),       s.negotiate_ns.load(),
          s.stalled.load(),      s.cache_hits.load(),  s.cache_misses.load(),
          s.in_place.load()};
}

}  // namespace gradfuse::engine
