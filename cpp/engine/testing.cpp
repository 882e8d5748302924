#include "engine/testing.h"

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <stdexcept>

#include "engine/devices.h"
#include "engine/fusion.h"
#include "engine/handles.h"
#include "engine/hierarchical.h"
#include "engine/inline_allreduce.h"
#include "engine/negotiation.h"
#include "engine/negotiation_slot.h"
#include "engine/response_cache.h"
#include "engine/tensor_queue.h"

namespace gradfuse::engine::testing {

namespace {

c10::ScalarType dtype_from_name(const std::string& name) {
  static const std::pair<const char*, c10::ScalarType> kNames[] = {
      {"uint8", c10::kByte},        {"int8", c10::kChar},     {"int16", c10::kShort},
      {"int32", c10::kInt},         {"int64", c10::kLong},    {"float16", c10::kHalf},
      {"bfloat16", c10::kBFloat16}, {"float32", c10::kFloat}, {"float64", c10::kDouble},
  };
  for (const auto& [n, t] : kNames) {
    if (name == n) return t;
  }
  TORCH_CHECK_VALUE(false, "gradfuse._testing: unknown dtype '", name, "'");
}

Request request_from(const RequestSpec& spec) {
  Request r;
  r.name = std::get<0>(spec);
  r.op = static_cast<OpType>(std::get<1>(spec));
  r.dtype = dtype_from_name(std::get<2>(spec));
  // As Engine::enqueue does: only the device type is negotiated; the index stays with the rank.
  r.device_type = static_cast<int8_t>(c10::Device(std::get<3>(spec)).type());
  r.shape = std::get<4>(spec);
  return r;
}

std::string device_type_name(int8_t type) {
  return c10::DeviceTypeName(static_cast<c10::DeviceType>(type), /*lower_case=*/true);
}

}  // namespace

std::vector<std::vector<RoundResult>> simulate_negotiation(
    int size, int64_t cache_capacity, int64_t fusion_threshold_bytes,
    const std::vector<std::vector<std::vector<RequestSpec>>>& rounds,
    const std::vector<int64_t>& inline_max_bytes) {
  TORCH_CHECK_VALUE(size >= 1, "gradfuse._testing: size must be >= 1");
  TORCH_CHECK_VALUE(inline_max_bytes.empty() || static_cast<int>(inline_max_bytes.size()) == size,
                    "gradfuse._testing: inline_max_bytes needs one value per rank");
  std::vector<Negotiator> ranks;
  for (int r = 0; r < size; ++r) ranks.emplace_back(size, cache_capacity);
  std::vector<std::vector<RoundResult>> results;
  for (const auto& round : rounds) {
    TORCH_CHECK_VALUE(static_cast<int>(round.size()) == size,
                      "gradfuse._testing: each round needs one request list per rank");
    std::vector<RoundResult> per_rank(size);
    std::vector<RankMessage> messages(size);
    for (int r = 0; r < size; ++r) {
      std::vector<Request> requests;
      for (const RequestSpec& spec : round[r]) requests.push_back(request_from(spec));
      Negotiator::InlineInput input;
      if (!inline_max_bytes.empty()) {
        input = [&, r](const Request& q, size_t room) -> std::optional<std::vector<uint8_t>> {
          const int64_t bytes = inline_input_bytes(q);
          if (q.op != OpType::kAllreduce || bytes > inline_max_bytes[r] ||
              bytes > static_cast<int64_t>(room)) {
            return std::nullopt;
          }
          return std::vector<uint8_t>(bytes, static_cast<uint8_t>(r));
        };
      }
      Negotiator::Encoded encoded = ranks[r].encode(requests, input, kSlotInline);
      per_rank[r].cache_hits = encoded.cache_hits;
      per_rank[r].cache_misses = encoded.cache_misses;
      per_rank[r].inlined = encoded.inlined;
      messages[r] = std::move(encoded.message);
    }
    for (int r = 0; r < size; ++r) {
      const int64_t fast_before = ranks[r].fast_rounds();
      std::vector<Response> responses = ranks[r].decide(messages);
      per_rank[r].fast = ranks[r].fast_rounds() > fast_before;
      std::vector<Response> runnable;
      for (const Response& resp : responses) {
        const bool run = resp.kind == Response::Kind::kRun;
        per_rank[r].responses.emplace_back(run ? "run" : "error", resp.name,
                                           device_type_name(resp.request.device_type), resp.error);
        if (!resp.inline_inputs.empty()) {
          std::vector<int> first_bytes;
          for (const auto& input : resp.inline_inputs) {
            first_bytes.push_back(input.empty() ? -1 : input[0]);
          }
          per_rank[r].inline_responses.emplace_back(resp.name, std::move(first_bytes));
        } else if (run) {
          runnable.push_back(resp);
        }
      }
      for (const Batch& batch : make_batches(std::move(runnable), fusion_threshold_bytes)) {
        std::vector<std::string> names;
        for (const Response& resp : batch.responses) names.push_back(resp.name);
        per_rank[r].batches.push_back(std::move(names));
      }
    }
    results.push_back(std::move(per_rank));
  }
  return results;
}

std::string encode_requests(const std::vector<RequestSpec>& requests) {
  std::vector<Request> rs;
  for (const RequestSpec& spec : requests) rs.push_back(request_from(spec));
  const std::vector<uint8_t> bytes = Negotiator(1, 0).encode(rs).message.requests;
  return std::string(bytes.begin(), bytes.end());
}

int64_t decode_requests(const std::string& bytes, int sender) {
  const ResponseCache empty(16);
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  return static_cast<int64_t>(
      deserialize_requests(data, bytes.size(), sender, [&](uint32_t index) -> const Request& {
        return empty.at(index, sender);
      }).size());
}

std::string device_error(const std::string& op, const std::string& device, bool built_with_cuda,
                         bool has_cuda_group) {
  return unsupported_device_error(op.c_str(), c10::Device(device), built_with_cuda, has_cuda_group);
}

std::vector<std::string> device_binding(
    const std::vector<std::pair<std::string, std::string>>& steps) {
  CudaDeviceBinding binding;
  std::vector<std::string> out;
  for (const auto& [action, device_str] : steps) {
    const c10::Device device(device_str);
    try {
      if (action == "bind") {
        binding.bind("allreduce", device);
        out.emplace_back("");
      } else if (action == "bind_if_unbound") {
        binding.bind_if_unbound(device);
        out.emplace_back("");
      } else if (action == "placeholder") {
        out.push_back(binding.placeholder_device(device.type(), device.index()).str());
      } else {
        TORCH_CHECK_VALUE(false, "gradfuse._testing: unknown action '", action, "'");
      }
    } catch (const c10::ValueError& e) {
      if (action != "bind" && action != "bind_if_unbound") throw;
      out.emplace_back(e.what_without_backtrace());
    }
  }
  return out;
}

struct FakeDeviceWork::State : DeviceCompletion {
  std::mutex mu;
  bool finished = false;
  std::string error;
  bool query() override {
    std::lock_guard<std::mutex> lock(mu);
    if (!error.empty()) throw std::runtime_error(error);
    return finished;
  }
};

FakeDeviceWork::FakeDeviceWork() : state(std::make_shared<State>()) {}

void FakeDeviceWork::finish() {
  std::lock_guard<std::mutex> lock(state->mu);
  state->finished = true;
}

void FakeDeviceWork::fail(const std::string& error) {
  std::lock_guard<std::mutex> lock(state->mu);
  state->error = error;
}

int64_t handle_with_device_work(const std::string& name, const FakeDeviceWork& work) {
  const int64_t handle = HandleTable::get().create(name);
  HandleTable::get().complete(handle, at::Tensor(), {}, {}, work.state);
  return handle;
}

int fail_device_pending(const std::string& error) {
  return HandleTable::get().fail_device_pending(error);
}

void discard_handle(int64_t handle) { HandleTable::get().discard(handle); }

std::vector<std::string> name_reuse(const std::vector<std::pair<std::string, std::string>>& steps) {
  TensorQueue queue;
  std::map<std::string, int64_t> handles;  // name -> its latest handle
  std::map<std::string, FakeDeviceWork> work;
  std::vector<std::string> out;
  for (const auto& [action, name] : steps) {
    out.emplace_back("");
    if (action == "push") {
      Entry e;
      e.request.name = name;
      const int64_t handle = HandleTable::get().create(name);
      e.handle = handle;
      try {
        queue.push(std::move(e));
        handles[name] = handle;
      } catch (const c10::ValueError& error) {
        HandleTable::get().discard(handle);
        out.back() = error.what_without_backtrace();
      }
      continue;
    }
    TORCH_CHECK_VALUE(handles.count(name), "gradfuse._testing: '", name, "' was never pushed");
    const int64_t handle = handles[name];
    if (action == "negotiate") {
      queue.take(name);
    } else if (action == "complete") {
      work[name] = FakeDeviceWork();
      HandleTable::get().complete(handle, at::Tensor(), {}, {}, work[name].state);
    } else if (action == "finish") {
      work.at(name).finish();
    } else if (action == "complete_cpu") {
      HandleTable::get().complete(handle, at::Tensor());
    } else if (action == "fail") {
      HandleTable::get().fail(handle, "gradfuse._testing: failed");
    } else if (action == "release") {
      HandleTable::get().discard(handle);
    } else {
      TORCH_CHECK_VALUE(false, "gradfuse._testing: unknown action '", action, "'");
    }
  }
  for (const auto& [name, handle] : handles) HandleTable::get().discard(handle);
  return out;
}

int64_t hierarchical_allreduce_count() { return engine::hierarchical_allreduce_count(); }

namespace {
std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return {d.data_ptr<double>(), d.data_ptr<double>() + d.numel()};
}
}  // namespace

FusionRoundTrip fusion_round_trip(const std::vector<int64_t>& numels, const std::string& dtype,
                                  const std::string& flat_dtype, double scale) {
  const auto type = dtype_from_name(dtype);
  const auto flat_type = dtype_from_name(flat_dtype);
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < numels.size(); ++i) {
    tensors.push_back(
        (at::arange(numels[i], at::kLong).remainder(7) + static_cast<int64_t>(i + 1)).to(type));
  }
  const auto offsets = fusion_offsets(numels, c10::elementSize(flat_type));
  const bool floats = at::isFloatingType(flat_type);
  at::Tensor flat = at::full({offsets.back()}, floats ? NAN : -1.0, at::dtype(flat_type));
  pack(tensors, flat, scale);
  std::vector<at::Tensor> outputs;
  for (const at::Tensor& t : tensors) outputs.push_back(at::empty_like(t));
  std::optional<at::Tensor> norms;
  if (floats && at::isFloatingType(type)) {
    norms = at::empty({static_cast<int64_t>(numels.size())}, at::kDouble);
  }
  unpack(flat, outputs, 1.0, norms);
  std::vector<std::vector<double>> unpacked;
  for (const at::Tensor& out : outputs) unpacked.push_back(as_doubles(out));
  return {offsets, as_doubles(flat), unpacked, norms ? as_doubles(*norms) : std::vector<double>{}};
}

}  // namespace gradfuse::engine::testing
