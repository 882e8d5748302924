// One kernel launch over many tensors.
//
// An optimizer step touches hundreds of tensors, most of them small (biases, norms): a launch
// per tensor would be dominated by launch latency. Instead every tensor is cut into chunks of
// `chunk_elems` elements, each CUDA block takes one chunk, and the launch's kernel argument
// carries the pointers of up to max_tensors tensors plus a block -> (tensor slot, chunk) map.
// When either table fills, the launch goes out and the tables start over (a tensor cut by a
// relaunch continues in slot 0 of the next one). The argument is passed by value, so it lives in
// the constant bank: no device allocation, no host->device copy, nothing to synchronize.
//
// Two table sizes. The classic kernel-parameter limit is 4 KiB; CUDA 12.1 raised it to 32764
// bytes on Volta and newer with a driver of 12.1 or later. Where this file is compiled by a
// 12.1+ toolkit for Volta+ architectures only, every kernel is built for both sizes and
// with_table_size() picks the large one at run time when the driver and the device allow it
// (ResNet-50's 161 tensors then fit one launch instead of 8); otherwise only the 4 KiB tables
// exist. (PyTorch's MultiTensorApply.cuh makes the same choice.)
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace gradfuse::cuda {

// __CUDA_ARCH_LIST__ (nvcc 11.5+) lists the compiled architectures, lowest first.
#define GRADFUSE_ARCH_LIST_HEAD_IMPL(a, ...) a
#define GRADFUSE_ARCH_LIST_HEAD(...) GRADFUSE_ARCH_LIST_HEAD_IMPL(__VA_ARGS__)
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && defined(__CUDA_ARCH_LIST__) && \
    GRADFUSE_ARCH_LIST_HEAD(__CUDA_ARCH_LIST__) >= 700
#define GRADFUSE_LARGE_KERNEL_ARGS 1
#endif

// What a launch's tables may take of the parameter space, leaving the rest (256 and 764 bytes)
// to the kernel's own scalar arguments (each kernel static_asserts its total).
template <bool kLarge>
constexpr size_t kTableBytes = kLarge ? 32000 : 3840;
template <bool kLarge>
constexpr size_t kParamBytes = kLarge ? 32764 : 4096;

// The kernel argument: kDepth pointers per tensor (e.g. param, grad, momentum, copy), its
// element count, a per-tensor Extra (flags, an offset, a global index), and per block the slot
// of its tensor and the index of its chunk within that tensor. The table lengths follow from
// the byte budget: as many blocks as PyTorch uses, and as many tensors as then fit.
template <int kDepth, class Extra, bool kLarge>
struct TensorListMeta {
  static constexpr int depth = kDepth;
  static constexpr bool large = kLarge;
  using ExtraType = Extra;
  using Slot = std::conditional_t<kLarge, uint16_t, uint8_t>;
  static constexpr int max_blocks = kLarge ? 2240 : 320;
  static constexpr int max_tensors_by_bytes = static_cast<int>(
      (kTableBytes<kLarge> - 16 - max_blocks * (sizeof(int32_t) + sizeof(Slot))) /
      (kDepth * sizeof(void*) + sizeof(int64_t) + sizeof(Extra)));
  static constexpr int max_tensors =
      max_tensors_by_bytes < (kLarge ? 65535 : 255) ? max_tensors_by_bytes : (kLarge ? 65535 : 255);

  void* ptr[kDepth][max_tensors];
  int64_t numel[max_tensors];
  Extra extra[max_tensors];
  int32_t block_chunk[max_blocks];
  Slot block_slot[max_blocks];
};

// The element range one block owns: elements [begin, begin + len) of the tensor in `slot`,
// chunk `chunk` of `num_chunks`.
struct BlockRange {
  int slot;
  int64_t chunk;
  int64_t num_chunks;
  int64_t begin;
  int64_t len;
};

template <class Meta>
__device__ __forceinline__ BlockRange block_range(const Meta& meta, int64_t chunk_elems) {
  BlockRange r;
  r.slot = meta.block_slot[blockIdx.x];
  r.chunk = meta.block_chunk[blockIdx.x];
  r.begin = r.chunk * chunk_elems;
  const int64_t numel = meta.numel[r.slot];
  r.num_chunks = (numel + chunk_elems - 1) / chunk_elems;
  const int64_t left = numel - r.begin;
  r.len = left < chunk_elems ? left : chunk_elems;
  return r;
}

// True where the large tables may be launched on the current device: the driver supports
// 32 KiB parameters (12.1+) and the device is Volta or newer. Cached per device.
bool large_kernel_args_supported();

// Calls f(std::true_type{}) to use the 32 KiB tables, else f(std::false_type{}).
template <class F>
auto with_table_size(F&& f) {
#if defined(GRADFUSE_LARGE_KERNEL_ARGS)
  if (large_kernel_args_supported()) return f(std::true_type{});
#endif
  return f(std::false_type{});
}

// Host side. For i in [0, num_items): get(i, ptrs, numel, extra) fills one tensor's kDepth
// pointers, element count and Extra, returning false to leave the item out (empty tensors are
// left out regardless). launch(meta, num_blocks) enqueues one kernel over num_blocks blocks
// (block b handles meta.block_slot[b] / block_chunk[b]) and returns cudaGetLastError().
// Returns the first launch error, after which nothing more is launched.
template <class Meta, class Get, class Launch>
cudaError_t multi_tensor_apply(int64_t num_items, int64_t chunk_elems, Get&& get, Launch&& launch) {
  static_assert(sizeof(Meta) <= kTableBytes<Meta::large>, "kernel argument too large");
  constexpr int kDepth = Meta::depth;

  Meta meta;  // only the entries a launch's blocks name are filled (and read)
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
      meta.block_slot[blocks] = static_cast<typename Meta::Slot>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      const bool blocks_full = blocks == Meta::max_blocks;
      const bool slots_full = slot + 1 == Meta::max_tensors;
      if (!blocks_full && !(slots_full && last_chunk)) continue;

      const cudaError_t err = launch(static_cast<const Meta&>(meta), blocks);
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
  return blocks > 0 ? launch(static_cast<const Meta&>(meta), blocks) : cudaSuccess;
}

}  // namespace gradfuse::cuda
