// What ranks tell each other during negotiation: a Request says "this rank has tensor `name`
// ready for this collective"; a Response says "every rank has it (or they disagree): run it
// (or fail it)". Requests travel between ranks as bytes, so they have a small binary format.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace gradfuse::engine {

// Numeric values are part of the Python <-> C++ contract (python/gradfuse/_engine.py).
enum class OpType : int8_t {
  kAllreduce = 0,
  kAllgather = 1,
  kBroadcast = 2,
  kReducescatter = 3,
  kAlltoall = 4,
  kBarrier = 5,
  kJoin = 6,
};
enum class ReduceOp : int8_t { kSum = 0, kAverage = 1, kMin = 2, kMax = 3, kProduct = 4 };

const char* op_name(OpType op);
const char* reduce_op_name(ReduceOp op);

struct Request {
  std::string name;
  OpType op = OpType::kAllreduce;
  ReduceOp reduce_op = ReduceOp::kSum;
  c10::ScalarType dtype = c10::ScalarType::Float;
  // c10::DeviceType. Only the type is negotiated: the index is each rank's own (rank r runs on
  // cuda:local_rank), so it stays with the rank's tensor (engine/devices.h) and never travels.
  int8_t device_type = 0;
  int32_t root = 0;  // broadcast only
  std::vector<int64_t> shape;
  std::vector<int64_t> splits;  // alltoall only: rows this rank sends to each rank

  bool operator==(const Request&) const = default;
};

// A rank's negotiation message: its new requests, in submission order (which becomes the order
// of the batches, and in-place fusion needs it kept). Each request travels in full, or as a
// 4-byte reference to an entry every rank holds in its response cache
// (engine/response_cache.h): the top bit set, then the entry's index. A full request starts
// with its name's length, whose top bit is always clear. `cached_index(r)` gives r's
// reference, if any; `cached(index)` resolves one. `rank` names the sender in errors.
// `cache_indices`, when given, receives each request's reference, or -1 for one sent in full.
void serialize_requests(const std::vector<Request>& requests,
                        const std::function<std::optional<uint32_t>(const Request&)>& cached_index,
                        std::vector<uint8_t>& out);
std::vector<Request> deserialize_requests(const uint8_t* data, size_t size, int rank,
                                          const std::function<const Request&(uint32_t)>& cached,
                                          std::vector<int64_t>* cache_indices = nullptr);

// The references of a message made only of response-cache references (the steady state), or
// nothing when it holds a request in full (or is not a whole number of references).
std::optional<std::vector<uint32_t>> cache_references_only(const uint8_t* data, size_t size);

// A rank's inline inputs for one round (engine/inline_allreduce.h): after its requests, records
// of [cache index (uint32), byte count (uint32), the bytes], one per small allreduce whose
// packed input the rank sends along with the negotiation. `rank` names the sender in errors.
struct InlineRecord {
  uint32_t cache_index = 0;
  const uint8_t* data = nullptr;
  uint32_t size = 0;
};
void serialize_inline(uint32_t cache_index, const std::vector<uint8_t>& bytes,
                      std::vector<uint8_t>& out);
std::vector<InlineRecord> deserialize_inline(const uint8_t* data, size_t size, int rank);

struct Response {
  enum class Kind { kRun, kError };
  Kind kind = Kind::kRun;
  std::string name;
  Request request;                  // rank 0's request: the attributes every rank agreed on
  std::vector<int64_t> first_dims;  // allgather: dim 0 of the tensor on each rank
  std::string error;                // kError: the message raised on every rank
  // alltoall: row k holds rank k's splits (size x size), so rank r receives all_splits[k][r].
  std::vector<int64_t> all_splits;
  // Ranks that had joined (gradfuse.join) and contribute a placeholder instead of a tensor.
  std::vector<int32_t> joined;
  // Allreduce only: every rank's packed input, in rank order, when every rank sent it inline in
  // the round that decided it (engine/inline_allreduce.h); empty otherwise.
  std::vector<std::vector<uint8_t>> inline_inputs;
};

}  // namespace gradfuse::engine
