// One kernel launch over many tensors.
//
// An optimizer step touches hundreds of tensors, most of them small (biases, norms): a launch
// per tensor would be dominated by launch latency. Instead every tensor is cut into chunks of
// `chunk_elems` elements, each CUDA block takes one chunk, and the launch's kernel argument
// carries the pointers of up to kMaxTensors tensors plus a block -> (tensor slot, chunk) map.
// When either table fills, the launch goes out and the tables start over (a tensor cut by a
// relaunch continues in slot 0 of the next one). The argument is passed by value, so it lives in
// the constant bank: no device allocation, no host->device copy, nothing to synchronize.
//
// The tables must fit the classic 4 KiB kernel-parameter limit (with the kernel's other
// arguments), which bounds kDepth * kMaxTensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gradfuse::cuda {

constexpr int kMaxBlocksPerLaunch = 320;
// What every launch built on this header may spend on its tables, leaving the rest of the
// 4096-byte parameter space to the kernel's own scalar arguments.
constexpr size_t kMaxTensorListMetaBytes = 3840;

// The kernel argument: kDepth pointers per tensor (e.g. param, grad, momentum, copy), its
// element count, a per-tensor Extra (flags, an offset, a global index), and per block the slot
// of its tensor and the index of its chunk within that tensor.
template <int kDepth, int kMaxTensors, class Extra>
struct TensorListMeta {
  static constexpr int depth = kDepth;
  static constexpr int max_tensors = kMaxTensors;
  using ExtraType = Extra;

  void* ptr[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  Extra extra[kMaxTensors];
  int32_t block_chunk[kMaxBlocksPerLaunch];
  uint8_t block_slot[kMaxBlocksPerLaunch];
};

// The element range one block owns: elements [begin, begin + len) of the tensor in `slot`.
struct BlockRange {
  int slot;
  int64_t begin;
  int64_t len;
};

template <class Meta>
__device__ __forceinline__ BlockRange block_range(const Meta& meta, int64_t chunk_elems) {
  BlockRange r;
  r.slot = meta.block_slot[blockIdx.x];
  r.begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * chunk_elems;
  const int64_t left = meta.numel[r.slot] - r.begin;
  r.len = left < chunk_elems ? left : chunk_elems;
  return r;
}

// Host side. For i in [0, num_items): get(i, ptrs, numel, extra) fills one tensor's kDepth
// pointers, element count and Extra, returning false to leave the item out (empty tensors are
// left out regardless). launch(meta, num_blocks) enqueues one kernel over num_blocks blocks
// (block b handles meta.block_slot[b] / block_chunk[b]) and returns cudaGetLastError().
// Returns the first launch error, after which nothing more is launched.
template <class Meta, class Get, class Launch>
cudaError_t multi_tensor_apply(int64_t num_items, int64_t chunk_elems, Get&& get, Launch&& launch) {
  static_assert(Meta::max_tensors <= 256, "block_slot is a uint8_t");
  static_assert(sizeof(Meta) <= kMaxTensorListMetaBytes, "kernel argument too large");
  constexpr int kDepth = Meta::depth;

  Meta meta{};
  int slot = 0;    // next free tensor slot
  int blocks = 0;  // blocks recorded so far in this launch
  for (int64_t i = 0; i < num_items; ++i) {
    void* ptrs[kDepth] = {};
    int64_t numel = 0;
    typename Meta::ExtraType extra{};
    if (!get(i, ptrs, numel, extra) || numel <= 0) continue;
    for (int d = 0; d < kDepth; ++d) meta.ptr[d][slot] = ptrs[d];
    meta.numel[slot] = numel;
    meta.extra[slot] = extra;

    const int64_t chunks = (numel + chunk_elems - 1) / chunk_elems;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_slot[blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      const bool blocks_full = blocks == kMaxBlocksPerLaunch;
      const bool slots_full = slot + 1 == Meta::max_tensors;
      if (!blocks_full && !(slots_full && last_chunk)) continue;

      const cudaError_t err = launch(meta, blocks);
      if (err != cudaSuccess) return err;
      blocks = 0;
      if (last_chunk) {
        slot = -1;  // this tensor is done: the next one takes slot 0 (after the ++ below)
      } else {
        // The tensor has chunks left: it continues in slot 0 of the next launch.
        for (int d = 0; d < kDepth; ++d) meta.ptr[d][0] = meta.ptr[d][slot];
        meta.numel[0] = meta.numel[slot];
        meta.extra[0] = meta.extra[slot];
        slot = 0;
      }
    }
    ++slot;
  }
  return blocks > 0 ? launch(meta, blocks) : cudaSuccess;
}

}  // namespace gradfuse::cuda
