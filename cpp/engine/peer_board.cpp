#include "engine/peer_board.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace gradfuse::engine {

namespace {
std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses):
// [0] is the state (field 3), [19] the start time (field 22). Empty when there is no process.
std::vector<std::string> stat_fields(int64_t pid) {
  const std::string line = read_line("/proc/" + std::to_string(pid) + "/stat");
  const auto close = line.rfind(')');
  if (close == std::string::npos) return {};
  std::istringstream rest(line.substr(close + 1));
  std::vector<std::string> fields;
  for (std::string f; rest >> f;) fields.push_back(f);
  return fields;
}

bool test_remote_peers() {
  const char* raw = std::getenv("GRADFUSE_TEST_REMOTE_PEERS");
  return raw != nullptr && std::string(raw) == "1";
}

std::string machine_id() {
  char ns[128] = {0};
  const ssize_t n = readlink("/proc/self/ns/pid", ns, sizeof(ns) - 1);
  const std::string boot = read_line("/proc/sys/kernel/random/boot_id");
  if (boot.empty() || n <= 0) return "";  // no /proc: never compared equal (see below)
  const std::string id = boot + "/" + std::string(ns, static_cast<size_t>(n));
  return test_remote_peers() ? id + "/test-remote/" + std::to_string(getpid()) : id;
}
}  // namespace

ProcessId ProcessId::self() {
  ProcessId id;
  id.machine = machine_id();
  id.pid = getpid();
  const auto fields = stat_fields(id.pid);
  if (fields.size() > 19) id.start_time = std::stoll(fields[19]);
  return id;
}

std::string ProcessId::state_seen_from(const ProcessId& observer) const {
  if (machine.empty() || machine != observer.machine) return "";
  const auto fields = stat_fields(pid);
  if (fields.size() <= 19 || std::stoll(fields[19]) != start_time) return "exited";
  switch (fields[0].empty() ? '?' : fields[0][0]) {
    case 'Z':  // exited, not yet reaped by its parent
    case 'X':
      return "exited";
    case 'T':  // SIGSTOP / SIGTSTP
    case 't':  // a debugger
      return "stopped";
    default:
      return "running";
  }
}

PeerBoard::PeerBoard(const std::string& host, int port, std::string prefix, int rank, int size,
                     double timeout_s, std::vector<int> global_ranks)
    : prefix_(std::move(prefix)),
      rank_(rank),
      size_(size),
      global_ranks_(std::move(global_ranks)) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(port);
  opts.isServer = false;
  opts.waitWorkers = false;
  opts.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::duration<double>(timeout_s));
  store_ = std::make_unique<c10d::TCPStore>(host, opts);
}

std::string PeerBoard::key(const std::string& what, int r) const {
  return prefix_ + what + std::to_string(r);
}

void PeerBoard::beat() { store_->add(key("", rank_), 1); }

std::vector<int64_t> PeerBoard::beats() {
  std::vector<int64_t> out(size_);
  // add(0) reads without blocking on a missing key.
  for (int r = 0; r < size_; ++r) out[r] = store_->add(key("", r), 0);
  return out;
}

void PeerBoard::publish_process() {
  const ProcessId me = ProcessId::self();
  store().set(key("proc/", rank_), me.machine + " " + std::to_string(me.pid) + " " +
                                       std::to_string(me.start_time));
}

std::optional<ProcessId> PeerBoard::process(int r) {
  const std::string k = key("proc/", r);
  if (!store_->check({k})) return std::nullopt;
  const auto raw = store_->get(k);
  std::istringstream in(std::string(raw.begin(), raw.end()));
  ProcessId id;
  in >> id.machine >> id.pid >> id.start_time;
  if (!in) return std::nullopt;
  return id;
}

std::string PeerBoard::publish_fault(int r, const std::string& message) {
  // compareSet from "" creates the key only when it is missing: the first account stands.
  const std::string standing = store().compareSet(key("fault/", r), "", message);
  if (standing == message) store_->add(prefix_ + "faults", 1);
  return standing;
}

int64_t PeerBoard::fault_count() { return store_->add(prefix_ + "faults", 0); }

std::string PeerBoard::fault(int r) {
  const std::string k = key("fault/", r);
  if (!store_->check({k})) return "";
  const auto raw = store_->get(k);
  return std::string(raw.begin(), raw.end());
}

void PeerBoard::mark_started() { store().set(key("started/", rank_), "1"); }

bool PeerBoard::all_started() {
  std::vector<std::string> keys;
  for (int r = 0; r < size_; ++r) keys.push_back(key("started/", r));
  return store_->check(keys);
}

void PeerBoard::publish_broken_connection() {
  store_->add(prefix_ + "broken", 1);
  store_->add(prefix_ + "faults", 1);
}

int64_t PeerBoard::broken_connections() { return store_->add(prefix_ + "broken", 0); }

void PeerBoard::mark_left() { store().set(key("left/", rank_), "1"); }

bool PeerBoard::has_left(int r) { return store_->check({key("left/", r)}); }

}  // namespace gradfuse::engine
