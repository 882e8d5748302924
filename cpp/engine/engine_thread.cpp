#include "engine/engine_thread.h"

#include <ATen/Parallel.h>
#include <pthread.h>

// libgomp's entry point, when torch was built with OpenMP (Linux wheels are): weak, so a torch
// with another intra-op backend still loads us. Its setting is per thread in OpenMP, unlike
// at::set_num_threads, which would change the user's threads too.
extern "C" void omp_set_num_threads(int) __attribute__((weak));

namespace gradfuse::engine {

void prepare_engine_thread(const char* name) {
  pthread_setname_np(pthread_self(), name);
  // ATen sets each thread's OpenMP thread count the first time it asks for it; ask first, so
  // that first setting cannot undo ours.
  at::get_num_threads();
  if (omp_set_num_threads != nullptr) omp_set_num_threads(1);
}

}  // namespace gradfuse::engine
