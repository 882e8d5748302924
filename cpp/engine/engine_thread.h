// What every thread the engine starts does first: it takes a name (so `top -H`, gdb and
// py-spy show which engine thread is which) and runs ATen's CPU work on itself alone.
//
// Why alone: torch's CPU builds parallelise with OpenMP, and libgomp keeps one thread team per
// thread that opens a parallel region. Once the engine's threads open regions of their own
// (pack and unpack use at::parallel_for), the process holds more OpenMP threads than cores,
// and libgomp then throttles the spinning of *every* team, the user's included: their workers
// sleep on a futex between regions, and the user's forward and backward ran 30-50% slower for
// the rest of the process (measured: a lone rank on 2 cores, resnet18-like). The engine's copies
// are memory-bound; one thread each loses little, and the user's compute keeps its threads.
#pragma once

namespace gradfuse::engine {

// `name`: at most 15 characters (the kernel's limit).
void prepare_engine_thread(const char* name);

}  // namespace gradfuse::engine
