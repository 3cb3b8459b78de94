"""What each culprit cost in the very steps gpudoctor sampled, against what gpudoctor says it costs.

    python bench/culprit_costs.py RUN_DIR...    # runs of ALTERNATE=4 scripts/record-pysamples.sh

A run of ``culprits.py --alternate K`` runs its loop in blocks of K steps with the culprit and K without it,
so its capture window holds both. The culprit's cost is measured there, on the GPU's clock: the mean step
period (one step's first kernel to the next step's) of the steps with it minus that of the steps without
it. The first and the last step of each block are left out: a host-bound step's culprit runs before its
first kernel, so it lengthens the period before it, and a block's last period reaches into the other
variant. Both variants run at the host speed of the sampled steps; a cost timed in another run, or later in
the same process, moves with the host's speed (bench/gpu/host-steadiness).

gpudoctor's estimate is gpu_idle's charge for the culprit, per step over the steady steps, scaled to the
steady steps that ran the culprit (steady steps / steady steps with it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gpudoctor.analyzers.runner import contexts, run_all
from gpudoctor.readers.inputs import read_input

STEP_NAME = r"step_(\d+)"


@dataclass(frozen=True)
class CulpritCost:
    run: str
    case: str
    block: int
    estimate_field: str
    estimate_ms: float  # per step with the culprit
    cost_ms: float  # measured in the window: mean period with - without
    with_ms: float
    without_ms: float
    blocks_with: int
    blocks_without: int
    steady_with: int
    steady_steps: int

    @property
    def error_fraction(self) -> float:
        return self.estimate_ms / self.cost_ms - 1


def program_args(run_dir: Path) -> list[str]:
    return [str(x) for x in json.loads((run_dir / "manifest.json").read_text())["command"]]


def alternation(run_dir: Path) -> tuple[str, int]:
    """The case and the block size K the program ran with (``culprits.py CASE ... --alternate K``)."""
    argv = program_args(run_dir)
    script = next(i for i, a in enumerate(argv) if a.endswith("culprits.py"))
    if "--alternate" not in argv:
        raise ValueError(f"{run_dir} was not recorded with --alternate")
    return argv[script + 1], int(argv[argv.index("--alternate") + 1])


def without_culprit(step: np.ndarray, block: int) -> np.ndarray:
    return (step // block) % 2 == 1


def program_steps(trace) -> pd.DataFrame:
    """The program's step_<i> ranges, with their step number ``i``."""
    r = trace.ranges
    r = r.loc[r["text"].astype(str).str.fullmatch(STEP_NAME)]
    return r.assign(i=r["text"].astype(str).str.slice(5).astype(int))


def step_starts(trace) -> pd.Series:
    """Each step_<i> range's first kernel, by i (the torch backend records each step twice: NVTX and
    record_function; both have the same kernels)."""
    found = program_steps(trace).dropna(subset=["gpu_start_ns"])
    return found["gpu_start_ns"].astype(np.int64).groupby(found["i"].to_numpy()).min().sort_index()


def steady_program_steps(trace, window) -> np.ndarray:
    """The program's step numbers in gpudoctor's steady window: the step_<i> ranges whose middle on the
    host's clock lies in it (the window's own steps are the agent's, cut at the optimizer's steps)."""
    r = program_steps(trace)
    middle = (r["start_ns"] + r["end_ns"]) // 2
    start, end = window.host_span
    return np.unique(r.loc[(middle >= start) & (middle < end), "i"].to_numpy())


def window_cost(trace, block: int, steps: np.ndarray) -> dict:
    """The median over blocks of their mean step period, with and without the culprit, over ``steps`` (the
    steady ones); the first and the last step of each block are left out. Medians, as ``culprits.py
    --interleave`` takes them: the host's speed can still change inside the window (a block at another
    speed moves a mean, not the median)."""
    start = step_starts(trace)
    start = start[start.index.isin(steps)]
    step = start.index.to_numpy()
    follows = np.r_[np.diff(step) == 1, False]
    period = pd.Series(np.r_[np.diff(start.to_numpy()), 0], index=step)[follows]
    pos = period.index.to_numpy() % block
    inner = period[(pos != 0) & (pos != block - 1)]
    blocks = inner.groupby(inner.index.to_numpy() // block).mean()
    off = without_culprit(blocks.index.to_numpy() * block, block)
    return {"with_ms": float(blocks[~off].median()) / 1e6, "without_ms": float(blocks[off].median()) / 1e6,
            "blocks_with": int((~off).sum()), "blocks_without": int(off.sum())}


def _culprit_frames(frames: list[dict], case: str) -> list[dict]:
    mine = [x for x in frames if x["file"].endswith("culprits.py")]
    if case == "item_sync":
        return [x for x in mine if x["kind"] == "sync"][:1]
    if case == "slow_preprocess":
        return [x for x in mine if x["function"] == "tokenize"][:1]
    if case == "dataloader0":
        return [x for x in mine if x.get("context") == "dataloader_main_process"][:1]
    if case == "tiny_kernels":
        return [x for x in mine if x["function"] == "update_ema"][:1]
    if case == "recompile":  # the compiled call's line, and loss.backward() where its backward compiles lazily
        return [x for x in mine if x.get("context") == "compile"]
    if case == "shape_change":  # cuDNN's planning (torch: its syncs) and the forward's module loads
        return [x for x in mine if x["kind"] == "module" or x.get("context") == "cudnn_benchmark"]
    raise ValueError(case)


ESTIMATE_FIELD = {"item_sync": "saving_ns_per_step", "slow_preprocess": "saving_ns_per_step",
                  "dataloader0": "saving_ns_per_step", "recompile": "saving_ns_per_step",
                  "tiny_kernels": "idle_ns_per_step", "shape_change": "idle_ns_per_step"}


def culprit_cost(run_dir: Path, trace=None) -> CulpritCost:
    case, block = alternation(run_dir)
    trace = trace if trace is not None else read_input(run_dir)
    (f,) = run_all(trace, only=["gpu_idle"])
    field = ESTIMATE_FIELD[case]
    per_step_ns = sum(x.get(field) or 0 for x in _culprit_frames(f.evidence.get("frames", []), case))
    window = contexts(trace)[0].window
    steady = steady_program_steps(trace, window)
    n_with = int((~without_culprit(steady, block)).sum())
    measured = window_cost(trace, block, steady)
    return CulpritCost(run_dir.name, case, block, field, per_step_ns / 1e6 * len(window.steady) / max(n_with, 1),
                       measured["with_ms"] - measured["without_ms"], steady_with=n_with, steady_steps=len(steady),
                       **measured)


def main(argv: list[str]) -> int:
    for path in argv:
        c = culprit_cost(Path(path))
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(c).items()}
        print(json.dumps(row | {"error": round(c.error_fraction, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
