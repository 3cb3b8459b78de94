"""The culprit's cost, measured in the very steps gpudoctor sampled, against what gpudoctor says it costs.

fixtures/pysamples/ab: culprit loops of fixtures/workloads/culprits.py profiled on an H200 with
``gpudoctor profile --backend nsys|torch`` while the program ran its loop in blocks of 4 steps with the
culprit and 4 without it (``--alternate 4``), so that the window holds both, at the same host speed
(the VM's Python speed moves by up to 2x between runs: bench/gpu/host-steadiness). bench/culprit_costs.py
measures the removal cost there on the GPU's clock (median over blocks of the mean step period, the
first and last step of each block left out) and scales gpu_idle's per-step charge to the steps that ran
the culprit. The runs' nsys exports are gzipped (read as they are); torch dataloader0 (5 MB of trace) is
kept as its cost, manifest and the program's own logs in bench/gpu/culprit-ab/.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from gpudoctor.analyzers.runner import run_all
from gpudoctor.readers.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
AB = ROOT / "fixtures" / "pysamples" / "ab"
sys.path.insert(0, str(ROOT / "bench"))
import culprit_costs  # noqa: E402

_READ: dict = {}


def trace(run: str):
    if run not in _READ:
        _READ[run] = read_input(AB / run)
    return _READ[run]


def cost(run: str) -> culprit_costs.CulpritCost:
    return culprit_costs.culprit_cost(AB / run, trace(run))


def culprit_line(case: str) -> int:
    lines = (AB / "culprits.py").read_text().splitlines()
    return next(i for i, x in enumerate(lines, 1) if x.rstrip().endswith(f"# culprit: {case}"))


def frames(run: str) -> list[dict]:
    (f,) = run_all(trace(run), only=["gpu_idle"])
    return [x for x in f.evidence["frames"] if x["file"].endswith("culprits.py")]


# run: (estimate ms per step with the culprit, cost ms measured in the window)
WITHIN_20 = {
    "torch_item_sync": (3.351, 2.972), "nsys_item_sync": (3.467, 3.611),
    "torch_slow_preprocess": (14.006, 15.741), "nsys_slow_preprocess": (13.139, 14.859),
    "torch_tiny_kernels": (9.153, 8.081), "nsys_tiny_kernels": (7.768, 9.481),
    "torch_shape_change": (383.466, 426.749), "nsys_shape_change": (616.783, 644.297),
    "torch_recompile": (143.983, 134.724),
}


@pytest.mark.parametrize("run", sorted(WITHIN_20))
def test_the_estimate_is_within_20_percent_of_the_cost_in_the_window(run):
    c = cost(run)
    estimate_ms, cost_ms = WITHIN_20[run]
    assert c.estimate_ms == pytest.approx(estimate_ms, abs=0.001)
    assert c.cost_ms == pytest.approx(cost_ms, abs=0.001)
    assert abs(c.error_fraction) <= 0.2
    # both variants in the window: three or four blocks each, about half of the steady steps with it
    assert min(c.blocks_with, c.blocks_without) >= 2 and 11 <= c.steady_with <= 13 and c.steady_steps >= 23


@pytest.mark.parametrize("run", sorted(WITHIN_20) + ["nsys_dataloader0"])
def test_the_named_line_is_the_culprit(run):
    case = culprit_costs.alternation(AB / run)[0]
    mine = frames(run)
    top = culprit_costs._culprit_frames(mine, case)
    assert top, [(x["line"], x["function"], x["kind"], x["context"]) for x in mine]
    line = culprit_line(case)
    if case == "dataloader0":  # the loader's lines: the random image, then the marked clip/flip/copy
        assert top[0]["function"] == "__getitem__" and top[0]["line"] in (line - 1, line)
    elif case == "shape_change":  # the new shape costs in the forward and backward of the next two lines
        assert [x["line"] for x in top][:2] == [line + 2, line + 1]
    else:
        assert top[0]["line"] == line, (top[0]["line"], top[0]["function"])
    if case == "dataloader0":  # its work spreads over the loader's lines; together they cost the most
        others = [x["idle_ns_per_step"] for x in mine if x.get("context") != "dataloader_main_process"]
        assert top[0]["dataloader_idle_ns_per_step"] > 2 * max(others)
    elif case != "tiny_kernels":  # (the launch-bound loop's forward and backward lines launch more kernels)
        assert mine[0] is top[0]


def test_a_cost_later_in_the_same_process_moves_with_the_host():
    """The same loops timed after the window in the same process (blocks of 10, unprofiled): the removal
    costs differ from the window's by up to a third, which is why the window holds both variants."""
    after = {r: json.loads((AB / r / "cost.json").read_text())["cost_ms"] for r in WITHIN_20}
    assert after["nsys_item_sync"] == 3.068 and after["torch_shape_change"] == 286.868
    assert after["torch_shape_change"] / cost("torch_shape_change").cost_ms == pytest.approx(0.672, abs=0.001)


EVIDENCE = ROOT / "bench" / "gpu" / "culprit-ab"


def test_the_whole_recording_as_kept():
    """bench/culprit_costs.py over the whole recording, torch dataloader0 included (bench/gpu/culprit-ab): 10
    of 11 within 20%; the runs tested here come out as the tests compute them."""
    rows = {r["run"]: r for r in map(json.loads, (EVIDENCE / "costs_fixtures.jsonl").read_text().splitlines())}
    assert len(rows) == 11 and sorted(r for r in rows if abs(rows[r]["error"]) > 0.2) == ["nsys_dataloader0"]
    for run, (estimate_ms, cost_ms) in WITHIN_20.items():
        assert (rows[run]["estimate_ms"], rows[run]["cost_ms"]) == (estimate_ms, cost_ms)
    assert (rows["torch_dataloader0"]["estimate_ms"], rows["torch_dataloader0"]["cost_ms"]) == (160.922, 135.25)
    assert (EVIDENCE / "runs" / "torch_dataloader0" / "manifest.json").is_file()


def test_dataloader0_under_nsys_the_fix_slows_the_rest_of_the_step():
    """The loader's sampled main-thread time matches the program's own timing of ``next(it)`` in the window's
    steps with the culprit (117.9 vs 118.1 ms), but num_workers=12 saves less than that, 95.5 ms: the steps
    without the culprit are bound by the main thread's launches (54 ms against at most 16 ms of GPU work),
    slower than the same launches beside the main-process loader, while 12 workers refill their queues on the
    VM's 16 vCPUs. The estimate is 23.5% over the saving: what the loader costs the main thread, not what this
    fix returns."""
    c = cost("nsys_dataloader0")
    assert (round(c.estimate_ms, 3), round(c.cost_ms, 3), round(c.without_ms, 3)) == (117.943, 95.485, 54.435)
    assert c.error_fraction == pytest.approx(0.235, abs=0.001)
    cap = json.loads((AB / "nsys_dataloader0" / "manifest.json").read_text())["capture"]
    rows = [json.loads(x) for x in (AB / "nsys_dataloader0" / "host_log.jsonl").read_text().splitlines()]
    loads = [r["ns"] / 1e6 for r in rows if r["fn"] == "load_batch" and cap["start_ns"] <= r["end_ns"] <= cap["end_ns"]
             and r["ns"] > 1e6]  # the worker loader's next() takes ~0.1 ms
    assert len(loads) == 14 and statistics.mean(loads) == pytest.approx(c.estimate_ms, rel=0.01)
    t = trace("nsys_dataloader0")
    k, start = t.kernels, culprit_costs.step_starts(t).to_numpy()
    busy_ms = [float((k["end_ns"] - k["start_ns"])[(k["start_ns"] >= a) & (k["start_ns"] < b)].sum()) / 1e6
               for a, b in zip(start[:-1], start[1:])]
    assert max(busy_ms) < 16 and c.without_ms > 3 * max(busy_ms)  # the fixed loop is host-bound, not GPU-bound


def test_window_cost_leaves_out_the_ends_of_each_block():
    """A host-bound step's culprit runs before its first kernel: the period before a block's first step holds
    it, and a block's last period reaches into the next block. Kept, they move the cost by 2/K of it."""
    t = trace("torch_slow_preprocess")
    steps = culprit_costs.steady_program_steps(t, culprit_costs.contexts(t)[0].window)
    inner = culprit_costs.window_cost(t, 4, steps)
    assert inner["with_ms"] - inner["without_ms"] == pytest.approx(15.741, abs=0.001)
    start = culprit_costs.step_starts(t)
    start = start[start.index.isin(steps)]
    period = start.diff().shift(-1).dropna() / 1e6
    off = culprit_costs.without_culprit(period.index.to_numpy(), 4)
    naive = period[~off].mean() - period[off].mean()
    assert naive < 0.7 * (inner["with_ms"] - inner["without_ms"])


def test_a_run_without_alternation_is_refused():
    with pytest.raises(ValueError, match="not recorded with --alternate"):
        culprit_costs.alternation(ROOT / "fixtures" / "pysamples" / "torch_item_sync")


ROUND3 = EVIDENCE / "round3"


@pytest.mark.parametrize("rep, item_sync, slow_preprocess", [
    ("rep1", (2.370, 2.489), (12.733, 14.065)), ("rep2", (1.883, 1.820), (14.284, 16.132)),
    ("rep3", (1.996, 2.040), (14.272, 15.859))])
def test_three_more_nsys_recordings(rep, item_sync, slow_preprocess):
    """The same two loops recorded three more times under nsys (bench/gpu/culprit-ab/round3, the runs kept
    whole). A sync line's saving is its idle capped by the step's slack: within 5% of the cost here, where
    the bookkeeping it exposes alone was 13-19% short (the GPU's restart after the drain is the rest)."""
    for case, (estimate_ms, cost_ms) in (("item_sync", item_sync), ("slow_preprocess", slow_preprocess)):
        run = ROUND3 / rep / f"nsys_{case}"
        c = culprit_costs.culprit_cost(run)
        assert (round(c.estimate_ms, 3), round(c.cost_ms, 3)) == (estimate_ms, cost_ms)
        assert abs(c.error_fraction) <= (0.05 if case == "item_sync" else 0.2)
        if case == "item_sync":
            (f,) = run_all(read_input(run), only=["gpu_idle"])
            sync = next(x for x in f.evidence["frames"] if x["kind"] == "sync")
            exposed_ms = sync["host_after_sync_ns_per_step"] / 1e6 * c.steady_steps / c.steady_with
            assert exposed_ms < 0.9 * c.cost_ms


def test_the_loaders_lines_rank_by_the_loaders_total():
    """Half the steps load in the main process: the backward line (17.1 ms per step) costs more than two of
    the loader's three lines alone (16.3, 12.8 ms), but the loader as a whole costs 61 ms per step, so its
    lines come first, each by its own idle."""
    mine = frames("nsys_dataloader0")
    loader = [x for x in mine if x.get("context") == "dataloader_main_process"]
    assert mine[:len(loader)] == loader and len(loader) == 3
    assert [x["idle_ns_per_step"] for x in loader] == sorted((x["idle_ns_per_step"] for x in loader), reverse=True)
    backward = mine[len(loader)]
    assert backward["callee"] == "backward" and backward["idle_ns_per_step"] > loader[1]["idle_ns_per_step"]
    assert loader[0]["dataloader_idle_ns_per_step"] > 3 * backward["idle_ns_per_step"]


def test_compile_marks_name_the_gaps_a_compile_holds():
    """torch.profiler records Dynamo / Inductor's compile phases as ranges holding ``compile_id=``: the
    gaps with one inside are compilation, whichever thread compiled. In the alternating recompile run 12
    gaps hold 95% of the idle time; the backward line, whose graph came from Inductor's caches, has none."""
    from gpudoctor.analyzers import gpu_idle, source_lines
    from gpudoctor.analyzers.runner import contexts

    t = trace("torch_recompile")
    ctx = contexts(t)[0]
    gaps = gpu_idle.measure(ctx).gaps
    compiling = source_lines._compile_marks_per_gap(ctx, gaps) == "compile"
    dur = (gaps["g1"] - gaps["g0"]).to_numpy()
    assert int(compiling.sum()) == 12 and dur[compiling].sum() / dur.sum() == pytest.approx(0.949, abs=0.001)
    backward = next(x for x in frames("torch_recompile") if x["callee"] == "backward")
    assert backward["context"] == "" and "saving_ns_per_step" not in backward


def test_a_cold_recompile_compiles_its_backward_on_autograds_thread():
    """The same loop on a fresh machine, Inductor's caches empty (bench/gpu/culprit-ab/recompile-cold: the
    11 MB trace is not kept). Each recompile took 3.0 s; the backward graph compiles lazily on autograd's
    thread while the main thread's samples show only the wait in ``loss.backward()``, whose gaps the compile
    marks name: charged as compilation, 321 ms per step, not as a sync. Both lines: 17% short of the cost
    (40% short with the compiled call's line alone)."""
    cold = ROOT / "bench" / "gpu" / "culprit-ab" / "recompile-cold"
    (f,) = [f for f in json.loads((cold / "analysis.json").read_text())["findings"] if f["analyzer"] == "gpu_idle"]
    lines = {x["line"]: x for x in f["evidence"]["frames"]}
    call, backward = lines[culprit_line("recompile")], lines[culprit_line("recompile") + 1]
    assert (call["context"], backward["context"], backward["kind"]) == ("compile", "compile", "sync")
    assert backward["saving_ns_per_step"] == backward["idle_ns_per_step"] == 321358074
    assert "Keep the value on the GPU" not in f["recommendation"]
    (row,) = map(json.loads, (cold / "costs.jsonl").read_text().splitlines())
    assert (row["estimate_ms"], row["cost_ms"], row["error"]) == (2514.837, 3042.687, -0.173)
