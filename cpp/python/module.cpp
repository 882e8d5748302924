// gradfuse._C: importing it registers torch.ops.gradfuse.* (the TORCH_LIBRARY blocks in
// cpp/ops and cpp/engine are linked into this module). The pybind11 surface is thin: build
// facts, the CPU kernels' vector-path switch and the engine's control calls (start, stop,
// wait, stats, timeline) with plain types; tensors travel through torch.ops. No logic here.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "engine/api.h"
#include "engine/testing.h"
#include "ops/cpu/dispatch.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradfuse compiled extension";
  m.attr("version") = GRADFUSE_VERSION;
  // c10 errors as torch raises them (ValueError / RuntimeError, message without the C++
  // backtrace); pybind11 alone would turn them all into RuntimeError with a backtrace.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
#ifdef GRADFUSE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "cpu_simd", [] { return std::string(gradfuse::cpu::simd_name()); },
      "The vector instruction set the CPU kernels use: 'avx2' or 'scalar'.");
  m.def(
      "set_cpu_simd", [](const std::string& name) { gradfuse::cpu::set_simd(name); },
      py::arg("name"),
      "Force the CPU kernels' vector path: 'avx2', 'scalar' or 'auto' (tests use this to cover "
      "both paths). Raises ValueError for anything else or an unsupported choice.");

  // ---- communication engine (tensors go through torch.ops.gradfuse._enqueue) -------------
  m.def(
      "engine_start",
      [](int rank, int size, const std::string& control_group, const std::string& cpu_group,
         const std::string& cuda_group, int64_t fusion_threshold_bytes, double cycle_time_ms,
         const std::string& local_group, const std::string& cross_group,
         const std::string& cuda_local_group, const std::string& cuda_cross_group, double timeout_s,
         const std::string& store_host, int store_port, const std::string& heartbeat_prefix,
         double stall_warning_s, double stall_shutdown_s, const std::string& timeline_path,
         int64_t cache_capacity, int64_t pending_names_limit, int process_set_id,
         const std::vector<int>& global_ranks, int64_t hierarchical_max_bytes) {
        gradfuse::engine::EngineConfig c;
        c.process_set_id = process_set_id;
        c.global_ranks = global_ranks;
        c.rank = rank;
        c.size = size;
        c.control_group = control_group;
        c.cpu_group = cpu_group;
        c.cuda_group = cuda_group;
        c.fusion_threshold_bytes = fusion_threshold_bytes;
        c.cycle_time_ms = cycle_time_ms;
        c.local_group = local_group;
        c.cross_group = cross_group;
        c.cuda_local_group = cuda_local_group;
        c.cuda_cross_group = cuda_cross_group;
        c.hierarchical_max_bytes = hierarchical_max_bytes;
        c.timeout_s = timeout_s;
        c.store_host = store_host;
        c.store_port = store_port;
        c.heartbeat_prefix = heartbeat_prefix;
        c.stall_warning_s = stall_warning_s;
        c.stall_shutdown_s = stall_shutdown_s;
        c.timeline_path = timeline_path;
        c.cache_capacity = cache_capacity;
        c.pending_names_limit = pending_names_limit;
        gradfuse::engine::start_engine(c);
      },
      py::arg("rank"), py::arg("size"), py::arg("control_group"), py::arg("cpu_group"),
      py::arg("cuda_group"), py::arg("fusion_threshold_bytes"), py::arg("cycle_time_ms"),
      py::arg("local_group") = "", py::arg("cross_group") = "", py::arg("cuda_local_group") = "",
      py::arg("cuda_cross_group") = "", py::arg("timeout_s") = 300.0, py::arg("store_host") = "",
      py::arg("store_port") = 0, py::arg("heartbeat_prefix") = "",
      py::arg("stall_warning_s") = 60.0, py::arg("stall_shutdown_s") = 0.0,
      py::arg("timeline_path") = "", py::arg("cache_capacity") = 1024,
      py::arg("pending_names_limit") = 65536, py::arg("process_set_id") = 0,
      py::arg("global_ranks") = std::vector<int>{}, py::arg("hierarchical_max_bytes") = -1,
      "Start the engine of process set `process_set_id` (0: the global set, by init(); others "
      "by add_process_set on their members, rank and size within the set, global_ranks its "
      "members) with its background thread on the named process groups.");
  // Joining the thread waits for the other ranks' next negotiation: never hold the GIL then.
  m.def("engine_stop", &gradfuse::engine::stop_engine, py::call_guard<py::gil_scoped_release>(),
        "Stop every process set's engine on every rank; pending handles fail.");
  m.def("engine_stop_process_set", &gradfuse::engine::stop_process_set_engine,
        py::arg("process_set_id"), py::call_guard<py::gil_scoped_release>(),
        "Stop one process set's engine on its members (remove_process_set); its pending "
        "handles fail. No-op where this rank has none.");
  m.def("engine_running", &gradfuse::engine::engine_running);
  m.def("engine_hold", &gradfuse::engine::hold_submissions,
        "Hold what is enqueued (in every process set) from now on until engine_release(), so it "
        "is negotiated as one group (gradfuse.collectives.submitted_together).");
  m.def("engine_release", &gradfuse::engine::release_submissions,
        "End an engine_hold(): the held requests go out in the next negotiation.");
  m.def("engine_start_timeline", &gradfuse::engine::start_timeline, py::arg("path"),
        "Write a Chrome-trace timeline of the running engine to `path` (truncated).");
  m.def("engine_stop_timeline", &gradfuse::engine::stop_timeline,
        py::call_guard<py::gil_scoped_release>(), "Close the timeline file.");
  m.def(
      "engine_stats",
      [](int process_set_id) {
        const auto v = gradfuse::engine::engine_stats(process_set_id);
        py::dict d;
        const char* keys[] = {"cycles",       "busy_cycles",  "tensors",     "collectives",
                              "bytes",        "negotiate_ns", "stalled",     "cache_hits",
                              "cache_misses", "in_place",     "fast_cycles", "inline_reduced"};
        for (size_t i = 0; i < v.size(); ++i) d[keys[i]] = v[i];
        return d;
      },
      py::arg("process_set_id") = 0,
      "Counters of a process set's engine (default: the global set's): negotiation cycles, "
      "busy cycles, tensors, collectives, bytes, negotiation time (ns), stalled tensors given "
      "up on, requests sent as response cache indices and in full, allreduce batches reduced "
      "in place (no fusion buffer), rounds decided from cache references alone, allreduces "
      "completed from inputs sent inline with the negotiation.");
  m.def("engine_request_settings", &gradfuse::engine::request_settings, py::arg("process_set_id"),
        py::arg("fusion_threshold_bytes"), py::arg("cycle_time_ms"),
        "Ask a process set's engine for a new fusion threshold and cycle time, in force from "
        "the first negotiation cycle in which every rank has asked as often; returns the "
        "request's generation (1, 2, ...). ValueError naming a bad argument.");
  m.def(
      "engine_settings",
      [](int process_set_id) {
        const auto a = gradfuse::engine::agreed_settings(process_set_id);
        py::dict d;
        d["generation"] = a.generation;
        d["fusion_threshold_bytes"] = a.fusion_threshold_bytes;
        d["cycle_time_ms"] = a.cycle_time_ms;
        d["since_cycle"] = a.since_cycle;
        d["requested_generation"] = a.requested_generation;
        return d;
      },
      py::arg("process_set_id") = 0,
      "The settings a process set's engine runs with: generation (the last request every rank "
      "made; 0: init()'s), fusion_threshold_bytes, cycle_time_ms, since_cycle (the "
      "negotiation cycle that switched to them) and requested_generation (this rank's last).");
  m.def("engine_poll", &gradfuse::engine::poll_handle, py::arg("handle"),
        "True once the handle has completed or failed.");
  m.def("engine_wait_for", &gradfuse::engine::wait_handle_for, py::arg("handle"),
        py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>(),
        "engine_wait for at most timeout_s (GIL released): True once done, False on time out; "
        "RuntimeError if it failed. Python waits in slices so Ctrl-C is noticed.");
  m.def("engine_forget", &gradfuse::engine::forget_handle, py::arg("handle"),
        "Release a handle without its result (its failure was raised already).");
  m.def("engine_handle_count", &gradfuse::engine::handle_count,
        "How many handles are held (created, not yet released).");
  m.def("engine_wait", &gradfuse::engine::wait_handle, py::arg("handle"),
        py::call_guard<py::gil_scoped_release>(),
        "Block (GIL released) until the handle is done; RuntimeError if it failed.");

  // ---- test drivers (engine/testing.h): engine logic without process groups or a GPU ------
  namespace t = gradfuse::engine::testing;
  py::module_ testing = m.def_submodule("_testing", "Test drivers for the engine's host logic.");
  py::class_<t::RoundResult>(testing, "RoundResult")
      .def_readonly("responses", &t::RoundResult::responses)
      .def_readonly("batches", &t::RoundResult::batches)
      .def_readonly("cache_hits", &t::RoundResult::cache_hits)
      .def_readonly("cache_misses", &t::RoundResult::cache_misses)
      .def_readonly("fast", &t::RoundResult::fast)
      .def_readonly("inlined", &t::RoundResult::inlined)
      .def_readonly("inline_responses", &t::RoundResult::inline_responses);
  testing.def("simulate_negotiation", &t::simulate_negotiation, py::arg("size"),
              py::arg("cache_capacity"), py::arg("fusion_threshold_bytes"), py::arg("rounds"),
              py::arg("inline_max_bytes") = std::vector<int64_t>{},
              "rounds[k][r]: (name, op, dtype, device, shape) requests of rank r in round k; "
              "returns [round][rank] RoundResult. inline_max_bytes[r]: rank r sends cached "
              "allreduce inputs up to that size inline.");
  testing.def(
      "encode_requests",
      [](const std::vector<t::RequestSpec>& requests) {
        return py::bytes(t::encode_requests(requests));
      },
      py::arg("requests"));
  testing.def(
      "decode_requests",
      [](const py::bytes& data, int sender) {
        return t::decode_requests(std::string(data), sender);
      },
      py::arg("data"), py::arg("sender"));
  testing.def("device_error", &t::device_error, py::arg("op"), py::arg("device"),
              py::arg("built_with_cuda"), py::arg("has_cuda_group"));
  testing.def("device_binding", &t::device_binding, py::arg("steps"));
  testing.def("hierarchical_allreduce_count", &t::hierarchical_allreduce_count,
              "Messages this process reduced hierarchically (engine/hierarchical.h).");
  py::class_<t::FakeDeviceWork>(testing, "FakeDeviceWork")
      .def(py::init<>())
      .def("finish", &t::FakeDeviceWork::finish)
      .def("fail", &t::FakeDeviceWork::fail, py::arg("error"));
  testing.def("handle_with_device_work", &t::handle_with_device_work, py::arg("name"),
              py::arg("work"));
  testing.def("fail_device_pending", &t::fail_device_pending, py::arg("error"));
  testing.def("discard_handle", &t::discard_handle, py::arg("handle"));
  testing.def("name_reuse", &t::name_reuse, py::arg("steps"));
  testing.def("fusion_round_trip", &t::fusion_round_trip, py::arg("numels"), py::arg("dtype"),
              py::arg("flat_dtype"), py::arg("scale"));
}
