// Running negotiated responses. The negotiating thread (dispatch) fails error responses, fuses
// the rest into batches, takes their entries and hands them to the executor thread
// (run_batches), which runs them in negotiated order: CPU batches pipelined (the next one is
// packed while the previous one's collective runs, and that one is unpacked while the next
// one's runs; two fusion-buffer slots), CUDA batches queued on the engine's stream.
#include <ATen/ATen.h>

#include "engine/alltoall.h"
#include "engine/collectives.h"
#include "engine/engine.h"
#include "engine/engine_errors.h"
#include "engine/fault_injection.h"
#include "engine/handles.h"
#include "engine/join.h"

#ifdef GRADFUSE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace gradfuse::engine {

namespace {
// The timeline's engine-wide track of data-plane collectives (one event per batch); the
// negotiation rounds have theirs (engine.cpp). Per-tensor tracks are named after the tensors.
constexpr const char* kCollectivesTrack = "engine: collectives";
}  // namespace

// A batch the executor started, at a fixed address: its PreparedBatch refers to the batch's
// entries and to `times`.
struct Engine::Running {
  Batch batch;
  BatchTimes times;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  PreparedBatch prepared;
  // Set (from a transport thread) when the launched collective ended; see BatchQueue::pop.
  std::shared_ptr<std::atomic<bool>> ended = std::make_shared<std::atomic<bool>>(false);
};

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

void Engine::record(const Batch& batch, std::chrono::steady_clock::time_point started,
                    const BatchTimes& times) {
  const auto done = std::chrono::steady_clock::now();
  for (const Entry& e : batch.entries) {
    const std::string& name = e.request.name;
    timeline_.phase(name, "negotiate", e.enqueued, batch.negotiated);
    timeline_.phase(name, "queue", batch.negotiated, started);
    timeline_.phase(name, "pack", started, times.packed);
    timeline_.phase(name, "collective", times.packed, times.reduced);
    timeline_.phase(name, "unpack", times.reduced, done);
  }
  timeline_.phase(kCollectivesTrack, op_name(batch.key.op), times.packed, times.reduced);
}

void Engine::dispatch(std::vector<Response> responses) {
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
  // The threshold agreed in the cycle that negotiated these responses (engine/settings.h: the
  // same on every rank), read before the loop negotiates again.
  for (Batch& batch : make_batches(std::move(runnable), settings_.fusion_threshold_bytes())) {
    batch.negotiated = negotiated;
    claim_entries(batch);
    track_executing(batch);
    // Closed only once the engine stopped, whose reason the tracked handles then fail with.
    if (!batches_->push(std::move(batch))) fail_executing(stopped_reason());
  }
}

void Engine::claim_entries(Batch& batch) {
  for (const Response& r : batch.responses) {
    if (auto e = queue_.try_take(r.name)) {
      batch.entries.push_back(std::move(*e));
      continue;
    }
    TORCH_CHECK(joined_in(r, config_.rank), "gradfuse: negotiated tensor '", r.name,
                "' is not in flight on this rank (internal error)");
    Entry empty;  // its placeholder is made by the executor
    empty.handle = kNoHandle;
    empty.request = r.request;
    batch.entries.push_back(std::move(empty));
  }
}

void Engine::fill_placeholders(Batch& batch) {
  for (size_t i = 0; i < batch.entries.size(); ++i) {
    if (batch.entries[i].tensor.defined()) continue;
    const Response& r = batch.responses[i];
    batch.entries[i] =
        joined_placeholder(r, local_device(static_cast<c10::DeviceType>(r.request.device_type)));
  }
}

CollectiveContext Engine::context_for(const Batch& batch, BatchTimes* times) {
  const bool on_cuda = static_cast<c10::DeviceType>(batch.key.device_type) == c10::DeviceType::CUDA;
  return {on_cuda ? cuda_ : cpu_, config_.rank, config_.size, &buffers_,
          on_cuda ? cuda_hierarchy_ : cpu_hierarchy_, times,
          // CUDA batches go through run_batch, which counts them here.
          on_cuda ? &stats_.in_place : nullptr};
}

void Engine::run_batches() {
  std::unique_ptr<Running> in_flight;  // a CPU batch whose collective was launched
  int slot = 0;
  try {
    while (true) {
      // A new batch, or (with none queued) the in-flight collective's end: its handles then
      // complete at once instead of waiting for the next batch.
      std::optional<Batch> next = batches_->pop(in_flight ? in_flight->ended.get() : nullptr);
      if (stopped()) {  // failed (abort, an error): the tracked handles already failed
        batches_->discard();
        return;
      }
      if (!next) {
        if (!in_flight) return;  // closed, and everything given was run
        finish_running(std::move(in_flight));
        continue;
      }
      auto running = std::make_unique<Running>();
      running->batch = std::move(*next);
      for (const Response& r : running->batch.responses) inject_fault("execute", r.name);
      stats_.collectives++;
      stats_.tensors += static_cast<int64_t>(running->batch.responses.size());
      if (static_cast<c10::DeviceType>(running->batch.key.device_type) == c10::DeviceType::CUDA) {
        if (in_flight) finish_running(std::move(in_flight));
        run_cuda_batch(*running);
        continue;
      }
      start_cpu_batch(*running, slot, std::move(in_flight));
      slot = 1 - slot;
      in_flight = std::move(running);
    }
  } catch (const std::exception& e) {
    // A failed collective leaves the ranks out of step: fail the batches that were running or
    // queued (those that finished keep their results), then stop the engine (the negotiating
    // thread stops at its next look; the pending entries fail with it).
    const std::string why = explain(e);
    fail_executing(why);
    fail_all(why);
    batches_->discard();  // nothing more runs; the negotiating thread stops waiting for it
    queue_.wake();
  }
}

void Engine::start_cpu_batch(Running& running, int slot, std::unique_ptr<Running> in_flight) {
  Batch& batch = running.batch;
  // The enqueue check keeps CUDA tensors out of an engine without CUDA.
  fill_placeholders(batch);
  for (const Entry& e : batch.entries) stats_.bytes += e.tensor.nbytes();
  CollectiveContext ctx = context_for(batch, timeline_.active() ? &running.times : nullptr);
  running.prepared = prepare_batch(batch, ctx, slot);
  if (running.prepared.in_place) stats_.in_place++;
  // One data-plane collective at a time (collectives.h): this one starts when the previous
  // one ended, which is then unpacked while this one runs.
  if (in_flight) in_flight->prepared.wait();
  running.prepared.launch();
  if (in_flight) finish_running(std::move(in_flight));
  std::weak_ptr<BatchQueue> wake = batches_;
  auto ended = running.ended;
  const bool watched = running.prepared.when_done([ended, wake] {
    ended->store(true);
    if (auto queue = wake.lock()) queue->notify();
  });
  // A transport that cannot say when it ends: treat it as ended, so the executor waits for it
  // (in finish) whenever no other batch is queued.
  if (!watched) ended->store(true);
}

void Engine::run_cuda_batch(Running& running) {
#ifdef GRADFUSE_WITH_CUDA
  Batch& batch = running.batch;
  CollectiveContext ctx = context_for(batch, timeline_.active() ? &running.times : nullptr);
  // This rank's own GPU, not rank 0's: the negotiated request carries no device index. Only
  // work on the engine's stream is queued here: nothing waits for the GPU.
  CudaBatchResult result = cuda_runner_->run(batch, ctx, local_device(c10::DeviceType::CUDA),
                                             [this](Batch& b) { fill_placeholders(b); });
  for (const Entry& e : batch.entries) stats_.bytes += e.tensor.nbytes();
  // Host-side times: when the work was queued on the stream, not when the GPU ran it.
  if (timeline_.active()) record(batch, running.started, running.times);
  complete_batch(batch, result.outputs, result.on_release, result.completion);
#else
  (void)running;
  TORCH_CHECK(false, "gradfuse: a CUDA batch reached an engine without CUDA (internal error)");
#endif
}

void Engine::finish_running(std::unique_ptr<Running> running) {
  const std::vector<at::Tensor> outputs = running->prepared.finish();
  if (timeline_.active()) record(running->batch, running->started, running->times);
  complete_batch(running->batch, outputs);
}

void Engine::complete_batch(const Batch& batch, const std::vector<at::Tensor>& outputs,
                            const std::vector<std::function<void()>>& on_release,
                            const std::shared_ptr<DeviceCompletion>& device) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (size_t i = 0; i < batch.entries.size(); ++i) {
    const int64_t handle = batch.entries[i].handle;
    // Failed meanwhile (abort(): a lost peer): that error stands, and the caller may already
    // have collected it.
    if (handle == kNoHandle || executing_.erase(handle) == 0) continue;
    HandleTable::get().complete(handle, outputs[i], on_release.empty() ? nullptr : on_release[i],
                                second_output(batch.responses[i]), device);
  }
}

void Engine::drain_executor() {
  batches_->close();
  if (executor_.joinable()) executor_.join();
}

void Engine::track_executing(const Batch& batch) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (const Entry& e : batch.entries) {
    if (e.handle != kNoHandle) executing_.emplace(e.handle, e.request.name);
  }
}

}  // namespace gradfuse::engine
