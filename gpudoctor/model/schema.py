"""The columns of every table of the trace model.

One run = many ranks; every table carries ``rank``. All times are int64 nanoseconds on one clock per
run (UTC epoch nanoseconds when the input says when it started, else the input's own clock). Readers
build each table as a pandas DataFrame with exactly these columns (extra columns are not allowed, so
that run.db and every analyzer see the same shape); missing values use the fill given here.

Strings that repeat (kernel names, API names, range texts) are pandas categoricals to keep millions
of rows cheap.
"""

from __future__ import annotations

# dtype codes: i8 int64, f8 float64, cat categorical string, str plain string, b bool
# (name, dtype, fill for "unknown")
TABLES: dict[str, list[tuple[str, str, object]]] = {
    # One row per GPU seen in the run (per rank).
    "devices": [
        ("rank", "i8", 0),
        ("device_id", "i8", 0),
        ("name", "str", ""),
        ("sm_count", "i8", -1),
        ("memory_bytes", "i8", -1),
        ("memory_bandwidth_bytes_per_s", "f8", float("nan")),
        ("sm_clock_hz", "f8", float("nan")),
        ("compute_capability", "str", ""),
        ("uuid", "str", ""),
    ],
    # One row per rank (process): where it came from and how its clock was aligned.
    "ranks": [
        ("rank", "i8", 0),
        ("pid", "i8", -1),
        ("hostname", "str", ""),
        ("source_file", "str", ""),
        ("source_format", "str", ""),  # nsys_sqlite | kineto_json | ncu_csv | nccl_tests | ...
        ("clock_offset_ns", "i8", 0),  # added to the input's timestamps to reach the run clock
        ("clock_source", "str", ""),  # what the offset came from (e.g. TARGET_INFO_SESSION_START_TIME)
    ],
    # GPU kernels.
    "kernels": [
        ("rank", "i8", 0),
        ("device_id", "i8", 0),
        ("stream_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("name", "cat", ""),  # short name (nsys shortName; Kineto: the name as given)
        ("demangled_name", "cat", ""),
        ("grid_x", "i8", -1),
        ("grid_y", "i8", -1),
        ("grid_z", "i8", -1),
        ("block_x", "i8", -1),
        ("block_y", "i8", -1),
        ("block_z", "i8", -1),
        ("registers_per_thread", "i8", -1),
        ("shared_memory_bytes", "i8", -1),  # static + dynamic
        ("correlation_id", "i8", -1),
        ("graph_id", "i8", -1),  # CUDA graph (node) id when launched from a graph, else -1
        ("category", "cat", ""),  # gemm | attention | elementwise | reduction | communication | memory | other
    ],
    # memcpy / memset on the GPU.
    "memops": [
        ("rank", "i8", 0),
        ("device_id", "i8", 0),
        ("stream_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("kind", "cat", ""),  # memcpy_htod | memcpy_dtoh | memcpy_dtod | memcpy_htoh | memcpy_peer | memset
        ("bytes", "i8", 0),
        ("src_kind", "cat", ""),  # pageable | pinned | device | managed | array | unknown
        ("dst_kind", "cat", ""),
        ("correlation_id", "i8", -1),
    ],
    # CUDA runtime / driver API calls on the host.
    "api_calls": [
        ("rank", "i8", 0),
        ("thread_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("name", "cat", ""),
        ("api", "cat", ""),  # runtime | driver
        ("correlation_id", "i8", -1),
        ("return_value", "i8", 0),
        ("stack_id", "i8", -1),  # the host call stack of the call (``stacks``), -1 when not recorded
    ],
    # NVTX / record_function / ProfilerStep ranges (host time), with their projection onto the GPU:
    # the span of the kernels and memops whose launch calls happened inside the range on its thread.
    "ranges": [
        ("rank", "i8", 0),
        ("thread_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("text", "cat", ""),
        ("domain", "cat", ""),  # NVTX domain ("" = default); "record_function" / "profiler_step" for Kineto
        ("depth", "i8", 0),  # nesting depth on its thread, 0 = outermost
        ("gpu_start_ns", "i8", -1),  # -1 when no GPU work was launched inside the range
        ("gpu_end_ns", "i8", -1),
        ("gpu_kernel_count", "i8", 0),
        ("stack_id", "i8", -1),  # the host call stack where the range was opened, -1 when not recorded
    ],
    # Collective / point-to-point communication calls where the input describes them.
    "collectives": [
        ("rank", "i8", 0),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("op", "cat", ""),  # all_reduce | all_gather | reduce_scatter | broadcast | all_to_all | send | recv | ...
        ("bytes", "i8", -1),
        ("dtype", "cat", ""),
        ("comm_size", "i8", -1),
        ("source", "cat", ""),  # nvtx_range | nvtx_nccl | kineto_args | kineto_range | kernel_name | nccl_tests
    ],
    # Named time series (NVML samples, engine metrics, annotations).
    "counters": [
        ("rank", "i8", 0),
        ("device_id", "i8", -1),
        ("ts_ns", "i8", 0),
        ("name", "cat", ""),
        ("value", "f8", float("nan")),
    ],
    # GPU memory allocation events (positive bytes = allocate, negative = free).
    "memory_events": [
        ("rank", "i8", 0),
        ("device_id", "i8", 0),
        ("ts_ns", "i8", 0),
        ("address", "i8", -1),
        ("bytes", "i8", 0),
        ("kind", "cat", ""),  # alloc | free
        ("source", "cat", ""),  # nsys_cuda_memory | kineto_memory
    ],
    # Per-kernel hardware counters (Nsight Compute), one row per profiled kernel launch.
    "kernel_metrics": [
        ("rank", "i8", 0),
        ("device_id", "i8", 0),
        ("launch_id", "i8", -1),  # ncu "ID": order of profiled launches
        ("pid", "i8", -1),
        ("name", "cat", ""),
        ("nvtx_range", "cat", ""),  # innermost NVTX push/pop range when ncu ran with --nvtx
        ("grid_x", "i8", -1),
        ("grid_y", "i8", -1),
        ("grid_z", "i8", -1),
        ("block_x", "i8", -1),
        ("block_y", "i8", -1),
        ("block_z", "i8", -1),
        ("duration_ns", "f8", float("nan")),
        ("dram_read_bytes", "f8", float("nan")),
        ("dram_write_bytes", "f8", float("nan")),
        ("flops_fp64", "f8", float("nan")),  # non-tensor FLOPs (FMA = 2)
        ("flops_fp32", "f8", float("nan")),
        ("flops_fp16", "f8", float("nan")),
        ("flops_tensor", "f8", float("nan")),  # tensor-core FLOPs, all precisions
        ("tensor_pipe_fraction", "f8", float("nan")),  # tensor pipe active, 0..1
        ("sm_throughput_fraction", "f8", float("nan")),
        ("memory_throughput_fraction", "f8", float("nan")),
        ("dram_throughput_fraction", "f8", float("nan")),
        ("achieved_occupancy_fraction", "f8", float("nan")),
        ("sm_clock_hz", "f8", float("nan")),
        ("kernel_row", "i8", -1),  # index into kernels of the same rank when joined to a timeline, else -1
    ],
    # Host-side framework operators (PyTorch ``aten::`` ops from torch.profiler ``cpu_op`` events) with
    # their input shapes (``record_shapes``). Readers keep only the operators analyzers use (matrix
    # products, attention, convolution, softmax: ``gpudoctor.readers.kineto.SHAPE_OPS``), not every op.
    "cpu_ops": [
        ("rank", "i8", 0),
        ("thread_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("name", "cat", ""),  # e.g. aten::addmm
        ("external_id", "i8", -1),  # Kineto "External id": the same id is on the kernels/launches it caused
        ("input_dims", "str", ""),  # JSON text of "Input Dims": a list per input ([] if not a tensor); "" = none
        ("input_types", "str", ""),  # JSON text of "Input type", e.g. ["c10::BFloat16", "Scalar"]; "" = none
        ("sequence_number", "i8", -1),  # autograd sequence number (pairs forward and backward ops)
        ("stack_id", "i8", -1),  # the host call stack that called the op, -1 when not recorded
    ],
    # Host call-stack frames, each distinct (file, line, function) once per rank.
    "frames": [
        ("rank", "i8", 0),
        ("frame_id", "i8", -1),
        ("file", "cat", ""),  # as the profiler gives it ("" for native functions such as built-in methods)
        ("line", "i8", -1),  # torch.profiler: the function's first line; -1 for native frames
        ("function", "cat", ""),
    ],
    # Call stacks as a tree: a stack is its innermost frame plus the stack of its caller (parent_id), so
    # every distinct stack is one row and shared prefixes are stored once.
    "stacks": [
        ("rank", "i8", 0),
        ("stack_id", "i8", -1),
        ("parent_id", "i8", -1),  # the caller's stack, -1 for an outermost frame
        ("frame_id", "i8", -1),
        ("depth", "i8", 0),  # 0 = outermost frame
    ],
    # What a host thread was running, over time: Python function calls (torch.profiler with_stack, one
    # row per call, nested) and call-stack samples (nsys CPU sampling, start = end = sample time).
    "host_stacks": [
        ("rank", "i8", 0),
        ("thread_id", "i8", -1),
        ("start_ns", "i8", 0),
        ("end_ns", "i8", 0),
        ("stack_id", "i8", -1),
        ("source", "cat", ""),  # torch_python_call | nsys_cpu_sample
    ],
    # Events that a reader could not place, counted by reason. Never silently dropped.
    "dropped": [
        ("rank", "i8", 0),
        ("source", "str", ""),  # which reader / table
        ("reason", "str", ""),
        ("count", "i8", 0),
    ],
}

KERNEL_CATEGORIES = ("gemm", "attention", "elementwise", "reduction", "communication", "memory", "other")
