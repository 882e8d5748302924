// How the engine tells its errors apart (engine.cpp, engine_failures.cpp, engine_execute.cpp):
// a transport error (a peer's fault, to be explained) from a local one (this rank's, to be
// posted), and errors already turned into the message the handles fail with.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <stdexcept>
#include <string>

namespace gradfuse::engine {

// A transport error already turned into the message every pending handle fails with.
struct ExplainedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A peer's engine did not start: this rank's start fails too, but the fault is not its own.
struct PeerStartFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Gloo reports a broken connection or a timed-out wait as a plain std::runtime_error naming its
// source file; c10d's own transport errors are c10::DistError. Any other error happened here.
inline bool is_transport_error(const std::exception& e) {
  if (dynamic_cast<const c10::DistError*>(&e)) return true;
  if (dynamic_cast<const c10::Error*>(&e)) return false;
  return std::string(e.what()).find("gloo") != std::string::npos;
}

// A transport error that says a connection closed (Gloo: "Connection closed by peer", "Read
// error ...: Connection reset by peer", "Socket closed"): a peer may have died. A timed-out
// wait is not one: a stopped peer keeps its connections.
inline bool is_connection_error(const std::exception& e) {
  if (!is_transport_error(e)) return false;
  std::string what = e.what();
  std::transform(what.begin(), what.end(), what.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* words : {"connection closed", "closed the connection", "socket closed",
                            "connection reset", "broken pipe", "read error", "write error"}) {
    if (what.find(words) != std::string::npos) return true;
  }
  return false;
}

// The error's words, without a backtrace or a leading "gradfuse: " (the message they go into
// starts with one).
inline std::string message_of(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
  const std::string ours = "gradfuse: ";
  return what.rfind(ours, 0) == 0 ? what.substr(ours.size()) : what;
}

}  // namespace gradfuse::engine
