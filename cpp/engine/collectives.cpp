#include "engine/collectives.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "engine/alltoall.h"
#include "engine/reducescatter.h"

namespace gradfuse::engine {

namespace {

// Fusion buffer slots: 0 and 1 alternate between pipelined allreduce batches, 2 is broadcast's,
// 3 and 4 allgather's; the hierarchical allreduce pads in its own.
constexpr int kHierarchyPadSlot = 5;

void stamp(BatchTimes* times, std::chrono::steady_clock::time_point BatchTimes::* field) {
  if (times) times->*field = std::chrono::steady_clock::now();
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAverage:  // Sum, then a postscale of 1/size in unpack
      return c10d::ReduceOp::SUM;
    case ReduceOp::kMin:
      return c10d::ReduceOp::MIN;
    case ReduceOp::kMax:
      return c10d::ReduceOp::MAX;
    case ReduceOp::kProduct:
      return c10d::ReduceOp::PRODUCT;
  }
  TORCH_CHECK(false, "gradfuse: bad reduce op");
}

// Calls fn(begin, end) for each maximal run of entries sharing the same value of scale(e), so
// the usual case (one scale for the whole batch) is one pack/unpack kernel call.
template <class Scale, class Fn>
void for_each_scale_run(const std::vector<Entry>& entries, Scale scale, Fn fn) {
  size_t begin = 0;
  for (size_t i = 1; i <= entries.size(); ++i) {
    if (i == entries.size() || scale(entries[i]) != scale(entries[begin])) {
      fn(begin, i, scale(entries[begin]));
      begin = i;
    }
  }
}

// The batch's tensors as one flat span of their shared storage, when they are reduced in place
// (output == input), lie back to back in batch order with no gap (a gap would be memory the
// caller did not hand over, which an allreduce of the span would overwrite) in the wire dtype, and
// share one prescale and one postscale (applied in place; integers only unscaled).
// DistributedOptimizer(gradient_as_bucket_view=True) lays gradients out this way; the collective
// then needs no fusion buffer and no copies.
std::optional<at::Tensor> in_place_span(const std::vector<Entry>& entries, double average) {
  const at::Tensor& first = entries[0].tensor;
  if (wire_dtype(first.scalar_type()) != first.scalar_type()) return std::nullopt;
  const bool scaled = entries[0].prescale != 1.0 || entries[0].postscale * average != 1.0;
  if (scaled && !at::isFloatingType(first.scalar_type())) return std::nullopt;
  const auto* next = static_cast<const char*>(first.data_ptr());
  int64_t total = 0;
  for (const Entry& e : entries) {
    const at::Tensor& t = e.tensor;
    if (!e.output.defined() || e.output.data_ptr() != t.data_ptr() || !t.is_contiguous() ||
        t.scalar_type() != first.scalar_type() || !t.is_alias_of(first) ||
        static_cast<const char*>(t.data_ptr()) != next || e.prescale != entries[0].prescale ||
        e.postscale != entries[0].postscale) {
      return std::nullopt;
    }
    next += t.nbytes();
    total += t.numel();
  }
  return first.as_strided({total}, {1}, first.storage_offset());
}

// Squared norms of reduced tensors (Entry::sq_norm). In the fusion-buffer path they are taken by
// the unpack kernel as it writes each output (no extra pass): sq_norms_for() gives the run's
// float64 scratch when an entry of [b, end) asks, scatter_sq_norms() hands each its element.
std::optional<at::Tensor> sq_norms_for(const std::vector<Entry>& entries, size_t b, size_t end) {
  for (size_t i = b; i < end; ++i) {
    if (entries[i].sq_norm.defined()) {
      return at::empty({static_cast<int64_t>(end - b)}, entries[i].sq_norm.options());
    }
  }
  return std::nullopt;
}

void scatter_sq_norms(const at::Tensor& norms, const std::vector<Entry>& entries, size_t b,
                      size_t end) {
  for (size_t i = b; i < end; ++i) {
    if (entries[i].sq_norm.defined()) {
      entries[i].sq_norm.view(-1).copy_(norms.narrow(0, static_cast<int64_t>(i - b), 1));
    }
  }
}

// Outputs reduced in place (one tensor, or a span): no unpack to take the norm in, so a
// read-only pass over each asking output, with the same kernel as the unpack's norms.
void write_sq_norms_after(const std::vector<Entry>& entries,
                          const std::vector<at::Tensor>& outputs) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradfuse::sum_squares", "")
                       .typed<at::Tensor(at::TensorList)>();
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!entries[i].sq_norm.defined()) continue;
    entries[i].sq_norm.view(-1).copy_(op.call({outputs[i]}));
  }
}

std::vector<int64_t> numels_of(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const at::Tensor& t : tensors) numels.push_back(t.numel());
  return numels;
}

std::vector<at::Tensor> inputs_of(const std::vector<Entry>& entries) {
  std::vector<at::Tensor> inputs;
  inputs.reserve(entries.size());
  for (const Entry& e : entries) inputs.push_back(e.tensor);
  return inputs;
}

// A lone float tensor (or one whose dtype travels as is and needs no scaling) is reduced in
// its output, scaled there in place: one pass (the prescaled copy) instead of a pack and an
// unpack through a fusion buffer.
bool reduces_alone(const std::vector<Entry>& entries, double average) {
  if (entries.size() != 1) return false;
  const Entry& e = entries[0];
  const at::ScalarType dtype = e.tensor.scalar_type();
  if (wire_dtype(dtype) != dtype) return false;
  const bool scaled = e.prescale != 1.0 || e.postscale * average != 1.0;
  return !scaled || at::isFloatingType(dtype);
}

// The collective's completion (success or error) calls `callback` once, on any thread; a
// collective that is not running (never launched, or ran to completion in launch()) calls it at
// once. Returns false when the transport cannot say (its Work has no future): the caller then
// waits instead.
bool call_when_done(const c10::intrusive_ptr<c10d::Work>& work, std::function<void()> callback) {
  if (!work) {
    callback();
    return true;
  }
  c10::intrusive_ptr<c10::ivalue::Future> future;
  try {
    future = work->getFuture();
  } catch (const std::exception&) {
    return false;  // this backend's Work has no future
  }
  if (!future) return false;
  future->addCallback([callback = std::move(callback)](c10::ivalue::Future&) { callback(); });
  return true;
}

PreparedBatch prepare_allreduce(const Batch& batch, const CollectiveContext& ctx, int slot) {
  const auto& entries = batch.entries;
  const double average = batch.key.reduce_op == ReduceOp::kAverage ? 1.0 / ctx.size : 1.0;
  std::vector<at::Tensor> outputs;
  for (const Entry& e : entries) outputs.push_back(e.output);
  const at::Tensor& first = entries[0].tensor;

  c10d::AllreduceOptions opts;
  opts.reduceOp = to_c10d(batch.key.reduce_op);

  // Where the collective runs: in the one tensor's output (reduces_alone), in place on tensors
  // that already lie back to back (in_place_span), or in a fusion buffer the tensors are
  // packed into.
  const bool lone = reduces_alone(entries, average);
  std::optional<at::Tensor> span = lone ? std::nullopt : in_place_span(entries, average);
  at::Tensor buffer;
  std::vector<int64_t> offsets;     // fusion buffer only: where each entry starts
  double in_place_postscale = 1.0;  // lone or span: applied in place once the collective is done
  if (lone) {
    const double prescale = entries[0].prescale;
    if (prescale != 1.0) {
      at::mul_out(outputs[0], first, prescale);
    } else if (!outputs[0].is_same(first)) {
      outputs[0].copy_(first);
    }
    buffer = outputs[0].view(-1);
    in_place_postscale = entries[0].postscale * average;
  } else if (span) {
    buffer = *span;
    if (entries[0].prescale != 1.0) buffer.mul_(entries[0].prescale);
    in_place_postscale = entries[0].postscale * average;
  } else {
    const at::ScalarType wire = wire_dtype(first.scalar_type());
    offsets = fusion_offsets(numels_of(inputs_of(entries)), c10::elementSize(wire));
    buffer = ctx.buffers->get(wire, first.device(), slot, offsets.back());
    for_each_scale_run(
        entries, [](const Entry& e) { return e.prescale; },
        [&](size_t b, size_t end, double scale) {
          std::vector<at::Tensor> ts;
          for (size_t i = b; i < end; ++i) ts.push_back(entries[i].tensor);
          pack(ts, buffer.narrow(0, offsets[b], buffer.numel() - offsets[b]), scale);
        });
  }
  const bool packed = !lone && !span;

  struct State {
    c10::intrusive_ptr<c10d::Work> work;
    bool launched = false;
    bool waited = false;
  };
  auto state = std::make_shared<State>();
  auto launch = [state, buffer, opts, group = ctx.group, hierarchy = ctx.hierarchy,
                 buffers = ctx.buffers, times = ctx.times] {
    stamp(times, &BatchTimes::packed);
    state->launched = true;
    if (hierarchy.takes(buffer.nbytes())) {
      // Three dependent collectives: they run here, to completion.
      hierarchical_allreduce(buffer, opts.reduceOp, hierarchy, buffers, kHierarchyPadSlot);
      return;
    }
    std::vector<at::Tensor> ts{buffer};
    state->work = group->allreduce(ts, opts);
  };
  auto wait = [state, times = ctx.times] {
    if (state->waited) return;
    if (state->work) state->work->wait();
    state->waited = true;
    stamp(times, &BatchTimes::reduced);
  };
  auto when_done = [state](std::function<void()> callback) {
    TORCH_CHECK(state->launched, "gradfuse: when_done() before launch() (internal error)");
    return call_when_done(state->work, std::move(callback));
  };
  // `batch` outlives finish(): the engine keeps it until the handles complete.
  auto finish = [wait, packed, in_place_postscale, buffer, outputs, offsets, average, &entries] {
    wait();
    if (in_place_postscale != 1.0) buffer.mul_(in_place_postscale);
    if (!packed) {
      write_sq_norms_after(entries, outputs);
      return outputs;
    }
    for_each_scale_run(
        entries, [](const Entry& e) { return e.postscale; },
        [&](size_t b, size_t end, double scale) {
          std::vector<at::Tensor> outs(outputs.begin() + b, outputs.begin() + end);
          const auto norms = sq_norms_for(entries, b, end);
          unpack(buffer.narrow(0, offsets[b], buffer.numel() - offsets[b]), outs, scale * average,
                 norms);
          if (norms) scatter_sq_norms(*norms, entries, b, end);
        });
    return outputs;
  };
  return {launch, wait, finish, when_done, /*in_place=*/!packed};
}

std::vector<at::Tensor> run_broadcast(const Batch& batch, const CollectiveContext& ctx) {
  const auto& entries = batch.entries;
  const bool is_root = ctx.rank == batch.key.root;
  std::vector<at::Tensor> outputs;
  for (const Entry& e : entries) outputs.push_back(e.output);
  const std::vector<at::Tensor> inputs = inputs_of(entries);
  const at::Tensor& first = entries[0].tensor;
  const at::ScalarType wire = wire_dtype(first.scalar_type());
  const auto offsets = fusion_offsets(numels_of(inputs), c10::elementSize(wire));
  c10d::BroadcastOptions opts;
  opts.rootRank = batch.key.root;

  at::Tensor flat = ctx.buffers->get(wire, first.device(), /*slot=*/2, offsets.back());
  if (is_root) pack(inputs, flat, 1.0);
  std::vector<at::Tensor> ts{flat};
  stamp(ctx.times, &BatchTimes::packed);
  ctx.group->broadcast(ts, opts)->wait();
  stamp(ctx.times, &BatchTimes::reduced);
  for (size_t i = 0; i < entries.size(); ++i) {
    // The root's in-place outputs already hold the data.
    if (is_root && outputs[i].is_same(inputs[i])) continue;
    if (is_root) {
      outputs[i].copy_(inputs[i]);
    } else {
      unpack(flat.narrow(0, offsets[i], inputs[i].numel()), {outputs[i]}, 1.0);
    }
  }
  return outputs;
}

// Allgather with a first dimension that may differ per rank. Every rank's segment of the
// gathered buffer holds its tensors back to back; segments are padded to the longest one
// (Gloo's allgather needs equal sizes).
std::vector<at::Tensor> run_allgather(const Batch& batch, const CollectiveContext& ctx) {
  const auto& entries = batch.entries;
  const int n = ctx.size;
  const at::Tensor& first = entries[0].tensor;
  const at::ScalarType wire = wire_dtype(first.scalar_type());
  // layouts[r]: rank r's segment, its tensors in the fusion layout (the same one pack() gives
  // rank r's own inputs); segments are padded to the longest, aligned so each starts aligned.
  std::vector<std::vector<int64_t>> counts(n);  // counts[r][i]: tensor i's elements on rank r
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& shape = batch.responses[i].request.shape;
    int64_t row = 1;
    for (size_t d = 1; d < shape.size(); ++d) row *= shape[d];
    for (int r = 0; r < n; ++r) counts[r].push_back(batch.responses[i].first_dims[r] * row);
  }
  std::vector<std::vector<int64_t>> layouts;
  int64_t segment = 0;
  for (int r = 0; r < n; ++r) {
    layouts.push_back(fusion_offsets(counts[r], c10::elementSize(wire)));
    segment = std::max(segment, layouts.back().back());
  }
  segment = align_numel(segment, c10::elementSize(wire));

  at::Tensor send = ctx.buffers->get(wire, first.device(), /*slot=*/3, segment);
  at::Tensor recv = ctx.buffers->get(wire, first.device(), /*slot=*/4, segment * n);
  pack(inputs_of(entries), send, 1.0);

  std::vector<std::vector<at::Tensor>> gathered(1);
  for (int r = 0; r < n; ++r) gathered[0].push_back(recv.narrow(0, r * segment, segment));
  std::vector<at::Tensor> send_list{send};
  stamp(ctx.times, &BatchTimes::packed);
  ctx.group->allgather(gathered, send_list)->wait();
  stamp(ctx.times, &BatchTimes::reduced);

  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Response& resp = batch.responses[i];
    std::vector<int64_t> shape = resp.request.shape;
    shape[0] = std::accumulate(resp.first_dims.begin(), resp.first_dims.end(), int64_t{0});
    at::Tensor out = at::empty(shape, first.options());
    at::Tensor out_flat = out.view(-1);
    int64_t out_offset = 0;
    for (int r = 0; r < n; ++r) {
      const int64_t count = counts[r][i];
      out_flat.narrow(0, out_offset, count)
          .copy_(recv.narrow(0, r * segment + layouts[r][i], count));
      out_offset += count;
    }
    outputs.push_back(out);
  }
  return outputs;
}

}  // namespace

namespace {
// A batch that already ran: nothing to launch or wait for.
PreparedBatch completed(std::vector<at::Tensor> outputs) {
  auto done_now = [](std::function<void()> callback) {
    callback();
    return true;
  };
  return {[] {}, [] {}, [outputs] { return outputs; }, done_now, /*in_place=*/false};
}
}  // namespace

PreparedBatch prepare_batch(const Batch& batch, const CollectiveContext& ctx, int slot) {
  switch (batch.key.op) {
    case OpType::kAllreduce:
      return prepare_allreduce(batch, ctx, slot);
    case OpType::kBroadcast:
      return completed(run_broadcast(batch, ctx));
    case OpType::kAllgather:
      return completed(run_allgather(batch, ctx));
    case OpType::kReducescatter:
      return completed(run_reducescatter(batch, ctx));
    case OpType::kAlltoall:
      return completed(run_alltoall(batch, ctx));
    case OpType::kBarrier:
    case OpType::kJoin: {
      // Negotiation did the work: every rank had submitted (or joined). Join answers with the
      // rank that joined last (Response::request.root); barrier with an empty tensor.
      std::vector<at::Tensor> outputs;
      for (const Response& r : batch.responses) {
        outputs.push_back(r.request.op == OpType::kJoin ? at::tensor({int64_t{r.request.root}})
                                                        : at::empty({0}));
      }
      return completed(std::move(outputs));
    }
  }
  TORCH_CHECK(false, "gradfuse: bad operation");
}

std::vector<at::Tensor> run_batch(const Batch& batch, const CollectiveContext& ctx) {
  PreparedBatch prepared = prepare_batch(batch, ctx, /*slot=*/0);
  if (prepared.in_place && ctx.in_place_count) ++*ctx.in_place_count;
  prepared.launch();
  return prepared.finish();
}

}  // namespace gradfuse::engine
