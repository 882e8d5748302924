// The engines of this process, one per process set: started by init() (the global set, id 0)
// and add_process_set (the others, on their members), found by id, held and released together,
// and forgotten by a forked child.
#include <pthread.h>

#include <map>
#include <mutex>

#include "engine/engine.h"

namespace gradfuse::engine {

namespace {
std::mutex g_mu;
// By process set id; 0 (the global set) runs between init() and shutdown(), the others between
// add_process_set and remove_process_set on their members only.
std::map<int, std::shared_ptr<Engine>> g_engines;
// How many hold_submissions() are not yet released: an engine started meanwhile starts held as
// deep, so every release() finds a hold in every engine.
int g_holds = 0;
// Why enqueue fails when no engine runs.
std::string g_not_running = "gradfuse has not been initialized: call gradfuse.init() first";

// After fork() the child has a copy of the engines' memory but none of their threads (the
// background threads, the liveness monitors): stopping one would join threads that do not
// exist, and using it would talk on the parent's connections. The child forgets them without
// destroying them and says why when asked for one. g_mu is held across fork() (prepare / parent /
// child handlers), so the child never inherits it locked by a thread it does not have.
void forget_engines_in_child() {
  if (!g_engines.empty()) {
    new std::map<int, std::shared_ptr<Engine>>(std::move(g_engines));  // leaked on purpose
    g_engines.clear();
  }
  g_holds = 0;
  g_not_running =
      "gradfuse: this process is a fork of one that ran the engine; its threads and connections "
      "stay in the parent, so a forked child cannot run collectives (the gradfuse ops, "
      "torch.ops.gradfuse.*, work)";
  g_mu.unlock();
}

void install_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_mu.lock(); }, [] { g_mu.unlock(); }, forget_engines_in_child);
  });
}

// Every running engine, the global set's first (callers hold g_mu).
std::vector<std::shared_ptr<Engine>> all_engines_locked() {
  TORCH_CHECK(g_engines.count(0), g_not_running);
  std::vector<std::shared_ptr<Engine>> out;
  for (const auto& [id, engine] : g_engines) out.push_back(engine);
  return out;
}
}  // namespace

void start_engine(const EngineConfig& config) {
  install_fork_handlers();
  std::lock_guard<std::mutex> lock(g_mu);
  const int id = config.process_set_id;
  if (id == 0) {
    TORCH_CHECK(g_engines.empty(),
                "gradfuse: the engine is already running; call shutdown() first");
  } else {
    TORCH_CHECK(g_engines.count(0), g_not_running);
    TORCH_CHECK_VALUE(!g_engines.count(id), "gradfuse: process set ", id,
                      " already has an engine on this rank");
  }
  auto engine = std::make_shared<Engine>(config);
  for (int i = 0; i < g_holds; ++i) engine->hold();
  g_engines[id] = std::move(engine);
}

void stop_engine() {
  std::map<int, std::shared_ptr<Engine>> engines;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    engines.swap(g_engines);
    g_holds = 0;
    if (!engines.empty()) {
      g_not_running = "gradfuse has been shut down: call gradfuse.init() again first";
    }
  }
  // The process sets' engines first, then the global one (every rank stops them in this order).
  for (auto it = engines.rbegin(); it != engines.rend(); ++it) it->second->stop();
}

void stop_process_set_engine(int process_set_id) {
  TORCH_CHECK_VALUE(process_set_id != 0,
                    "gradfuse: the global process set (id 0) cannot be removed; call shutdown()");
  std::shared_ptr<Engine> engine;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_engines.find(process_set_id);
    if (it == g_engines.end()) return;
    engine = std::move(it->second);
    g_engines.erase(it);
  }
  engine->stop();
}

void start_timeline(const std::string& path) { current_engine()->start_timeline(path); }

void stop_timeline() { current_engine()->stop_timeline(); }

void hold_submissions() {
  std::lock_guard<std::mutex> lock(g_mu);
  for (const auto& engine : all_engines_locked()) engine->hold();
  ++g_holds;
}

void release_submissions() {
  std::lock_guard<std::mutex> lock(g_mu);
  const auto engines = all_engines_locked();
  TORCH_CHECK(g_holds > 0, "gradfuse: release_submissions() without hold_submissions()");
  --g_holds;
  for (const auto& engine : engines) engine->release();
}

bool engine_running() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_engines.count(0) > 0;
}

std::shared_ptr<Engine> current_engine() { return process_set_engine(0); }

std::shared_ptr<Engine> process_set_engine(int process_set_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(g_engines.count(0), g_not_running);
  auto it = g_engines.find(static_cast<int>(process_set_id));
  TORCH_CHECK_VALUE(it != g_engines.end(), "gradfuse: process set ", process_set_id,
                    " has no engine on this rank: it was removed, was never added, or this rank "
                    "is not a member of it");
  return it->second;
}

std::vector<int64_t> engine_stats(int process_set_id) {
  const Engine::Stats& s = process_set_engine(process_set_id)->stats();
  return {s.cycles.load(),       s.busy_cycles.load(),  s.tensors.load(), s.collectives.load(),
          s.bytes.load(),        s.negotiate_ns.load(), s.stalled.load(), s.cache_hits.load(),
          s.cache_misses.load(), s.in_place.load(),    s.fast_cycles.load(),
          s.inline_reduced.load()};
}

}  // namespace gradfuse::engine
