// The engine: one per process set this rank is in (the global set's between gradfuse.init()
// and shutdown()). Callers enqueue named tensors; a background thread negotiates with the set's
// other ranks which are ready everywhere and fuses them into batches; an executor thread runs
// the batches' collectives in negotiated order and completes the handles. The next negotiation
// thus overlaps the running collective (the control group and the data groups are separate
// process groups), while the data plane still sees one sequence, the same on every rank.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>

#include "engine/batch_queue.h"
#include "engine/collectives.h"
#include "engine/config.h"
#include "engine/cuda_batch.h"
#include "engine/devices.h"
#include "engine/enqueue_checks.h"
#include "engine/fusion.h"
#include "engine/handles.h"
#include "engine/liveness.h"
#include "engine/negotiation.h"
#include "engine/negotiation_slot.h"
#include "engine/peer_board.h"
#include "engine/settings.h"
#include "engine/stall_inspector.h"
#include "engine/tensor_queue.h"
#include "engine/timeline.h"

namespace gradfuse::engine {

class Engine {
 public:
  explicit Engine(EngineConfig config);
  ~Engine();

  // Validates the arguments (c10::ValueError naming the bad one) and queues the tensor.
  int64_t enqueue(EnqueueArgs args);
  // Asks every rank's engine to stop (at the next negotiation), joins the background thread and
  // fails what is still pending.
  void stop();
  // Fails every pending handle with `why` and stops the engine (liveness verdict).
  void abort(const std::string& why);
  // Chrome-trace timeline of this rank's engine, started / stopped at run time.
  void start_timeline(const std::string& path) { timeline_.start(path); }
  void stop_timeline() { timeline_.stop(); }
  // Requests enqueued between hold() and release() are negotiated together (TensorQueue).
  void hold() { queue_.hold(); }
  void release() { queue_.release(); }
  // Empty while healthy; otherwise why the engine stopped.
  std::string stopped_reason() const;
  const EngineConfig& config() const { return config_; }
  // The fusion threshold and cycle time in force, changed by agreement (engine/settings.h).
  SettingsAgreement& settings() { return settings_; }
  // Ends the idle wait now (a settings request is announced at the next round).
  void wake() { queue_.wake(); }

  // Counters since start (observability; the benchmark prints them).
  struct Stats {
    std::atomic<int64_t> cycles{0};          // negotiation rounds
    std::atomic<int64_t> busy_cycles{0};     // rounds in which some rank had requests
    std::atomic<int64_t> tensors{0};         // tensors completed
    std::atomic<int64_t> collectives{0};     // data-plane collectives (fused batches)
    std::atomic<int64_t> bytes{0};           // bytes through data-plane collectives
    std::atomic<int64_t> negotiate_ns{0};    // time spent in negotiation (control plane)
    std::atomic<int64_t> stalled{0};         // tensors the stall inspector gave up on
    std::atomic<int64_t> cache_hits{0};      // requests this rank sent as a response-cache index
    std::atomic<int64_t> cache_misses{0};    // requests this rank sent in full
    std::atomic<int64_t> in_place{0};        // allreduce batches reduced with no fusion buffer
    std::atomic<int64_t> fast_cycles{0};     // rounds decided from cache references alone
    std::atomic<int64_t> inline_reduced{0};  // allreduces completed from inline inputs
  };
  const Stats& stats() const { return stats_; }

 private:
  void loop();
  // One negotiation round. Returns the negotiated responses; sets `stop_rank` (>= 0) when some
  // rank asked to stop.
  std::vector<Response> negotiate(int& stop_rank);
  // Completes (and removes) the responses whose inputs came inline (engine/inline_allreduce.h).
  void complete_inline(std::vector<Response>& responses);
  // The negotiating thread's half of running responses: errors fail their handles, the rest
  // become fused batches (fusion threshold read now) whose entries leave the tensor queue and
  // which go to the executor in negotiated order.
  void dispatch(std::vector<Response> responses);
  // The executor thread: runs the batches (CPU batches pipelined, two fusion-buffer slots: one
  // is packed while the other's collective runs; CUDA batches queued on the engine's stream),
  // completes their handles; on an error, fails the engine.
  void run_batches();
  struct Running;  // a batch the executor started (engine_execute.cpp)
  // Packs `running` into fusion-buffer slot `slot`, waits for `in_flight`'s collective,
  // launches running's, and finishes in_flight (unpacked while running's collective runs).
  void start_cpu_batch(Running& running, int slot, std::unique_ptr<Running> in_flight);
  void run_cuda_batch(Running& running);
  void finish_running(std::unique_ptr<Running> running);
  CollectiveContext context_for(const Batch& batch, BatchTimes* times);
  // Completes the handles of a finished batch, except those failed meanwhile (abort()).
  void complete_batch(const Batch& batch, const std::vector<at::Tensor>& outputs,
                      const std::vector<std::function<void()>>& on_release = {},
                      const std::shared_ptr<DeviceCompletion>& device = nullptr);
  // Lets the executor run what it was given, then joins it (shutdown: every rank runs what was
  // negotiated before the stop).
  void drain_executor();
  // Timeline events of a finished batch: negotiate, queue, pack, collective, unpack per tensor,
  // and the collective on the engine's collectives track.
  void record(const Batch& batch, std::chrono::steady_clock::time_point started,
              const BatchTimes& times);
  void fail_all(const std::string& why);
  bool stopped() const { return !stopped_reason().empty(); }
  // The handles of the batches given to the executor and not yet completed, which the queue no
  // longer holds: abort() fails them too, since their collective may wait for the lost rank
  // until the timeout.
  void track_executing(const Batch& batch);
  void fail_executing(const std::string& why);
  // Takes a batch's entries from the tensor queue (negotiating thread). A joined rank's missing
  // entry stays an empty slot (undefined tensor) until fill_placeholders (executor thread)
  // makes its placeholder (engine/join.h) on this rank's device: for CUDA under the engine's
  // stream, so the stream that reads the zeros is the one that wrote them.
  void claim_entries(Batch& batch);
  void fill_placeholders(Batch& batch);
  // This rank's device for a collective on `type`: the CPU, or its bound GPU (engine/devices.h),
  // or the current GPU when none is bound yet.
  c10::Device local_device(c10::DeviceType type) const;
  // alltoall's received splits (HandleTable aux); undefined for other operations.
  at::Tensor second_output(const Response& response) const;
  // The message for an error that stopped the engine. A transport error names the dead,
  // stopped or failed ranks when the liveness monitor finds them within the timeout; a local
  // error is posted on the peer board, so the peers fail with it at once.
  std::string explain(const std::exception& e);
  // The constructor's part after validation: groups, monitor, timeline.
  void connect();
  // The start handshake: returns once every rank's engine started; throws (without posting a
  // fault of its own) when a peer's start failed or a peer died first.
  void await_peers_started();
  // Posts this rank's failure on the peer board (if there is one and it still answers).
  void post_failure(const std::string& why);
  // Why the engine stops when rank `rank` called shutdown(): its posted fault, if any.
  std::string shutdown_reason(int rank);

  EngineConfig config_;
  c10::intrusive_ptr<c10d::ProcessGroup> control_;
  c10::intrusive_ptr<c10d::ProcessGroup> cpu_;
  c10::intrusive_ptr<c10d::ProcessGroup> cuda_;
  HierarchyGroups cpu_hierarchy_;  // empty unless allreduce is hierarchical
  HierarchyGroups cuda_hierarchy_;
#ifdef GRADFUSE_WITH_CUDA
  std::unique_ptr<CudaBatchRunner> cuda_runner_;  // set when there is a CUDA group
#endif
  TensorQueue queue_;
  Negotiator negotiator_;
  SettingsAgreement settings_;
  SlotBuffers slots_;              // negotiation slots, kept between rounds
  CudaDeviceBinding cuda_device_;  // this rank's one GPU (engine/devices.h)
  BufferPool buffers_;             // the executor's
  StallInspector stall_;
  Timeline timeline_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::atomic<bool> stop_requested_{false};
  Stats stats_;
  mutable std::mutex reason_mu_;
  std::string stopped_reason_;
  std::mutex executing_mu_;
  std::unordered_map<int64_t, std::string> executing_;  // handle -> tensor name
  // Shared: a collective's completion callback may outlive the engine (it holds a weak_ptr).
  std::shared_ptr<BatchQueue> batches_ = std::make_shared<BatchQueue>();
  std::thread executor_;
  std::thread thread_;
  std::shared_ptr<PeerBoard> board_;  // null without a TCP store or with one rank
  // Last member: its thread calls abort() and must stop before the rest is destroyed.
  std::unique_ptr<LivenessMonitor> liveness_;
};

// The engines of this process, one per process set (config.process_set_id; 0 is the global set,
// started by init()). start fails if that set's engine runs (or, for a process set, if the
// global one does not); stop_engine() stops them all and is a no-op when none runs.
void start_engine(const EngineConfig& config);
void stop_engine();
// remove_process_set: stops that set's engine (no-op where this rank has none); never id 0.
void stop_process_set_engine(int process_set_id);
// Whether the global set's engine runs.
bool engine_running();
// Engine::hold() / release() of every running engine.
void hold_submissions();
void release_submissions();
// The global set's timeline.
void start_timeline(const std::string& path);
void stop_timeline();
// The global set's engine, or a RuntimeError saying init() was not called / shutdown() was.
std::shared_ptr<Engine> current_engine();
// That process set's engine on this rank; a ValueError when it has none (removed, unknown, or
// this rank is not a member).
std::shared_ptr<Engine> process_set_engine(int process_set_id);
// {cycles, busy_cycles, tensors, collectives, bytes, negotiate_ns, stalled, cache_hits,
// cache_misses, in_place, fast_cycles, inline_reduced} of that process set's engine.
std::vector<int64_t> engine_stats(int process_set_id);

}  // namespace gradfuse::engine
