#include "engine/message.h"

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace gradfuse::engine {

const char* op_name(OpType op) {
  switch (op) {
    case OpType::kAllreduce:
      return "allreduce";
    case OpType::kAllgather:
      return "allgather";
    case OpType::kBroadcast:
      return "broadcast";
    case OpType::kReducescatter:
      return "reducescatter";
    case OpType::kAlltoall:
      return "alltoall";
    case OpType::kBarrier:
      return "barrier";
    case OpType::kJoin:
      return "join";
  }
  return "?";
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "Sum";
    case ReduceOp::kAverage:
      return "Average";
    case ReduceOp::kMin:
      return "Min";
    case ReduceOp::kMax:
      return "Max";
    case ReduceOp::kProduct:
      return "Product";
  }
  return "?";
}

namespace {

template <class T>
void put(std::vector<uint8_t>& out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

// Reads fields in order; every read is bounds-checked so a corrupt message is an error, not a
// crash. All ranks run the same binary, so the native byte order is shared.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, int rank) : data_(data), size_(size), rank_(rank) {}
  template <class T>
  T get() {
    TORCH_CHECK(pos_ + sizeof(T) <= size_, "gradfuse: truncated negotiation message from rank ",
                rank_);
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string get_string(size_t n) {
    TORCH_CHECK(pos_ + n <= size_, "gradfuse: truncated negotiation message from rank ", rank_);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }
  // The next n bytes, in place.
  const uint8_t* skip(size_t n) {
    TORCH_CHECK(pos_ + n <= size_, "gradfuse: truncated negotiation message from rank ", rank_);
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  bool done() const { return pos_ >= size_; }
  // A field whose value no gradfuse rank sends.
  void check(bool ok, const char* field, int64_t value) const {
    TORCH_CHECK(ok, "gradfuse: rank ", rank_, " sent a negotiation message with an invalid ",
                field, " (", value, "): a corrupt message, or a peer running another version");
  }

 private:
  const uint8_t* data_;
  size_t size_;
  int rank_;
  size_t pos_ = 0;
};

}  // namespace

namespace {
constexpr uint32_t kCachedFlag = 0x80000000u;  // top bit of a record's first word
}  // namespace

void serialize_requests(const std::vector<Request>& requests,
                        const std::function<std::optional<uint32_t>(const Request&)>& cached_index,
                        std::vector<uint8_t>& out) {
  for (const Request& r : requests) {
    if (const auto index = cached_index(r)) {
      TORCH_CHECK(*index < kCachedFlag, "gradfuse: response cache index ", *index, " too large");
      put<uint32_t>(out, kCachedFlag | *index);
      continue;
    }
    TORCH_CHECK_VALUE(r.name.size() < kCachedFlag, "gradfuse: tensor name of ", r.name.size(),
                      " bytes is too long");
    put<uint32_t>(out, static_cast<uint32_t>(r.name.size()));
    out.insert(out.end(), r.name.begin(), r.name.end());
    put<int8_t>(out, static_cast<int8_t>(r.op));
    put<int8_t>(out, static_cast<int8_t>(r.reduce_op));
    put<int8_t>(out, static_cast<int8_t>(r.dtype));
    put<int8_t>(out, r.device_type);
    put<int32_t>(out, r.root);
    put<uint8_t>(out, static_cast<uint8_t>(r.shape.size()));
    for (int64_t d : r.shape) put<int64_t>(out, d);
    put<uint32_t>(out, static_cast<uint32_t>(r.splits.size()));
    for (int64_t s : r.splits) put<int64_t>(out, s);
  }
}

std::vector<Request> deserialize_requests(const uint8_t* data, size_t size, int rank,
                                          const std::function<const Request&(uint32_t)>& cached,
                                          std::vector<int64_t>* cache_indices) {
  std::vector<Request> requests;
  Reader in(data, size, rank);
  while (!in.done()) {
    const auto first = in.get<uint32_t>();
    const bool is_cached = (first & kCachedFlag) != 0;
    if (cache_indices) {
      cache_indices->push_back(is_cached ? static_cast<int64_t>(first & ~kCachedFlag) : -1);
    }
    if (is_cached) {
      requests.push_back(cached(first & ~kCachedFlag));
      continue;
    }
    // Every field is checked against what a gradfuse rank can send: a message from a
    // corrupt or foreign peer is an error naming it, never an invalid enum or a negative size
    // that reaches an allocation.
    Request r;
    r.name = in.get_string(first);
    const auto op = in.get<int8_t>();
    const auto reduce_op = in.get<int8_t>();
    const auto dtype = in.get<int8_t>();
    r.device_type = in.get<int8_t>();
    r.root = in.get<int32_t>();
    in.check(op >= 0 && op <= static_cast<int8_t>(OpType::kJoin), "operation", op);
    in.check(reduce_op >= 0 && reduce_op <= static_cast<int8_t>(ReduceOp::kProduct),
             "reduce op", reduce_op);
    in.check(dtype >= 0 && dtype < static_cast<int8_t>(c10::ScalarType::NumOptions), "dtype",
             dtype);
    in.check(r.device_type == static_cast<int8_t>(c10::DeviceType::CPU) ||
                 r.device_type == static_cast<int8_t>(c10::DeviceType::CUDA),
             "device type", r.device_type);
    r.op = static_cast<OpType>(op);
    r.reduce_op = static_cast<ReduceOp>(reduce_op);
    r.dtype = static_cast<c10::ScalarType>(dtype);
    const auto ndim = in.get<uint8_t>();
    for (int i = 0; i < ndim; ++i) {
      r.shape.push_back(in.get<int64_t>());
      in.check(r.shape.back() >= 0, "dimension", r.shape.back());
    }
    const auto nsplits = in.get<uint32_t>();
    for (uint32_t i = 0; i < nsplits; ++i) {
      r.splits.push_back(in.get<int64_t>());
      in.check(r.splits.back() >= 0, "split", r.splits.back());
    }
    requests.push_back(std::move(r));
  }
  return requests;
}

std::optional<std::vector<uint32_t>> cache_references_only(const uint8_t* data, size_t size) {
  if (size % sizeof(uint32_t) != 0) return std::nullopt;
  std::vector<uint32_t> indices(size / sizeof(uint32_t));
  std::memcpy(indices.data(), data, size);
  for (uint32_t& word : indices) {
    if (!(word & kCachedFlag)) return std::nullopt;
    word &= ~kCachedFlag;
  }
  return indices;
}

void serialize_inline(uint32_t cache_index, const std::vector<uint8_t>& bytes,
                      std::vector<uint8_t>& out) {
  put<uint32_t>(out, cache_index);
  put<uint32_t>(out, static_cast<uint32_t>(bytes.size()));
  out.insert(out.end(), bytes.begin(), bytes.end());
}

std::vector<InlineRecord> deserialize_inline(const uint8_t* data, size_t size, int rank) {
  std::vector<InlineRecord> records;
  Reader in(data, size, rank);
  while (!in.done()) {
    InlineRecord record;
    record.cache_index = in.get<uint32_t>();
    record.size = in.get<uint32_t>();
    record.data = in.skip(record.size);
    records.push_back(record);
  }
  return records;
}

}  // namespace gradfuse::engine
