// Test drivers for engine logic that needs neither a process group nor a GPU: the negotiation
// of several simulated ranks (engine/negotiation.h, engine/fusion.h), the per-rank device
// decisions (engine/devices.h) and handles with device work (engine/handles.h). Bound as
// gradfuse._C._testing; tests/test_devices.py drives them. Plain types only.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace gradfuse::engine::testing {

// (name, op, dtype name e.g. "float32", device e.g. "cuda:1", shape)
using RequestSpec = std::tuple<std::string, int, std::string, std::string, std::vector<int64_t>>;

// What one simulated rank decided in one round.
struct RoundResult {
  // (kind "run" | "error", name, device type of the agreed request, error message)
  std::vector<std::tuple<std::string, std::string, std::string, std::string>> responses;
  std::vector<std::vector<std::string>> batches;  // names, per fused batch, in order
  int64_t cache_hits = 0;
  int64_t cache_misses = 0;
  bool fast = false;     // decided from cache references alone (Negotiator::fast_rounds)
  int64_t inlined = 0;   // inputs this rank sent inline
  // Responses completed from inline inputs: (name, the first byte of each rank's input).
  std::vector<std::pair<std::string, std::vector<int>>> inline_responses;
};

// rounds[k][r]: the requests rank r submits in round k. Each rank has its own Negotiator (its
// own controller and response cache), encodes its requests, reads every rank's bytes and forms
// batches, exactly as Engine::negotiate / execute do (batches leave out the responses completed
// inline). Returns [round][rank]. With inline_max_bytes (one value per rank), rank r sends the
// input of each cached allreduce of at most that many bytes inline (each byte = r), as the
// engine does within its slot (engine/inline_allreduce.h).
std::vector<std::vector<RoundResult>> simulate_negotiation(
    int size, int64_t cache_capacity, int64_t fusion_threshold_bytes,
    const std::vector<std::vector<std::vector<RequestSpec>>>& rounds,
    const std::vector<int64_t>& inline_max_bytes = {});

// The bytes a rank sends for `requests` (all in full: an empty response cache).
std::string encode_requests(const std::vector<RequestSpec>& requests);
// How many requests a message from rank `sender` holds, read as the engine reads a peer's
// message (with an empty response cache); throws (RuntimeError) when it is corrupt.
int64_t decode_requests(const std::string& bytes, int sender);

// Messages this process reduced hierarchically (engine/hierarchical.h): which path the hybrid
// all-reduce chose.
int64_t hierarchical_allreduce_count();

// unsupported_device_error for a device given as a string ("cuda:0", "cpu", "meta").
std::string device_error(const std::string& op, const std::string& device, bool built_with_cuda,
                         bool has_cuda_group);

// Drives a CudaDeviceBinding. Each step is (action, device): "bind" and "bind_if_unbound"
// answer "" or the error raised; "placeholder" answers the placeholder device for the device's
// type, with the device's index as the fallback (the current device).
std::vector<std::string> device_binding(
    const std::vector<std::pair<std::string, std::string>>& steps);

// Device work whose completion a test controls.
class FakeDeviceWork {
 public:
  FakeDeviceWork();
  void finish();
  void fail(const std::string& error);
  struct State;
  std::shared_ptr<State> state;
};
// A handle completed by the engine part, still waiting for `work`.
int64_t handle_with_device_work(const std::string& name, const FakeDeviceWork& work);
int fail_device_pending(const std::string& error);
void discard_handle(int64_t handle);

// Drives one TensorQueue and the handles of its entries as the engine does, to show when a
// name is free again. Each step is (action, name): "push" submits a tensor of that name and
// answers "" or the ValueError raised; "negotiate" takes it out of the queue (Engine::execute);
// "complete" completes its handle with device work still running, "finish" ends that work;
// "complete_cpu" completes it with no device work; "fail" fails it; "release" forgets it (as
// synchronize() does once it finished). Answers "" for every action but a refused push.
std::vector<std::string> name_reuse(const std::vector<std::pair<std::string, std::string>>& steps);

// The engine's fusion buffer layout and its pack()/unpack() (engine/fusion.h) on the CPU: tensors
// of `numels` in `dtype` (values (i + 1) + k % 7: exact in every dtype) are packed with `scale`
// into a flat buffer of `flat_dtype` prefilled with NaN (a float buffer) or -1, which is then
// unpacked (scale 1) into new tensors. Returns (fusion_offsets, the whole buffer as float64,
// each unpacked tensor as float64, their sums of squares as unpack took them (float dtypes; else
// empty)).
using FusionRoundTrip = std::tuple<std::vector<int64_t>, std::vector<double>,
                                   std::vector<std::vector<double>>, std::vector<double>>;
FusionRoundTrip fusion_round_trip(const std::vector<int64_t>& numels, const std::string& dtype,
                                  const std::string& flat_dtype, double scale);

}  // namespace gradfuse::engine::testing
