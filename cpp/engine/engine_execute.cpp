// Running negotiated responses: errors fail their handles, the rest become fused batches, run
// (CPU batches pipelined two at a time, CUDA batches on the engine's stream) and completed.
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
  // The threshold agreed in the cycle that negotiated these responses (engine/settings.h: the
  // same on every rank), read before the loop negotiates again.
  std::vector<Batch> batches =
      make_batches(std::move(runnable), settings_.fusion_threshold_bytes());
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

void Engine::track_executing(const Batch& batch) {
  std::lock_guard<std::mutex> lock(executing_mu_);
  for (const Entry& e : batch.entries) executing_.emplace_back(e.handle, e.request.name);
}

void Engine::forget_executing() {
  std::lock_guard<std::mutex> lock(executing_mu_);
  executing_.clear();
}

}  // namespace gradfuse::engine
