"""The profiler's own cost: how much of the host-side idle time torch.profiler itself may have added.

torch.profiler records every operator on the host; with ``record_shapes`` (and more with ``with_stack``)
each operator costs the host microseconds more, so a loop that keeps the GPU busy unprofiled can look
host-bound under the profiler. Two ways to know, the first that applies wins:

* **measured**: ``unprofiled_step_ms`` (``gpudoctor profile --backend torch`` times a few steps before
  turning the profiler on and records it in the trace's metadata or the run manifest). The profiler's
  cost per step = profiled step period - unprofiled step time.
* **estimated**: operators per step (every ``cpu_op`` event of the trace / steps) x the per-operator cost
  ``profiler_op_overhead_ns`` (``_stack_ns`` when Python stacks were recorded). What torch.profiler with
  record_shapes adds per operator shows in the host-bound fixtures, as (step under torch.profiler - step
  under Nsight Systems) / operators per step: 1.2 us for ``tiny_fused`` (15 operators, 362.5 vs 380.2 us,
  H100), 2.2 us for ``tiny_sync`` (960 elementwise operators, 9.02 vs 11.17 ms, H100), 4.85 us for the
  timm ResNet-50 bf16 training step (3,698 operators, 33.97 vs 51.91 ms, H200): operators with more
  inputs cost more to record. The default is the middle one, 2.2 us. The other two costs keep the ratios
  measured on a CPU-only loop (torch 2.13, 2-core AMD EPYC guest, min of 5 runs: 1.6 / 7.7 / 15.4 us per
  op plain / shapes / shapes + stack): 2x with with_stack, 0.2x without record_shapes. A measured
  ``unprofiled_step_ms`` is always better.

gpu_idle calls :func:`profiler_overhead` for torch.profiler traces only (Nsight Systems costs the host
no per-operator work).
"""

from __future__ import annotations

from gpudoctor.analyzers.context import AnalysisContext, measured_fact

PLAIN_OP_NS_RATIO = 0.2  # per-op cost without record_shapes / with it (see above)


def _unprofiled_step_ns(meta: dict) -> float | None:
    ms = measured_fact(meta, "unprofiled_step_ms")
    return None if ms is None else ms * 1e6


def profiler_overhead(ctx: AnalysisContext, op_ns: float, stack_op_ns: float) -> dict | None:
    """The profiler's estimated host cost per steady step, or None for traces not from torch.profiler.

    Keys: per_step_ns, how ('measured' | 'estimated'), ops_per_step, per_op_ns, record_shapes, with_stack,
    unprofiled_step_ns, profiled_step_ns."""
    tp = ctx.trace.meta.get("torch_profiler")
    if tp is None:
        return None
    counts = tp.get("event_counts") or {}
    with_stack = any("python_function" in k for k in counts)
    record_shapes = bool(tp.get("record_shapes")) or ctx.ops is not None
    steps = max(len(ctx.window.steps), 1)
    n_steady = max(len(ctx.window.steady), 1)
    profiled_step = ctx.window_ns / n_steady
    out = {"record_shapes": record_shapes, "with_stack": with_stack, "profiled_step_ns": round(profiled_step)}
    unprofiled = _unprofiled_step_ns(ctx.trace.meta)
    if unprofiled is not None:
        out.update(how="measured", unprofiled_step_ns=round(unprofiled),
                   per_step_ns=max(profiled_step - unprofiled, 0.0))
        return out
    ops = float(ctx.trace.meta.get("cpu_op_count") or 0) / steps
    per_op = stack_op_ns if with_stack else op_ns if record_shapes else op_ns * PLAIN_OP_NS_RATIO
    out.update(how="estimated", ops_per_step=round(ops, 1), per_op_ns=per_op, per_step_ns=ops * per_op)
    return out
