"""Host call stacks in the trace model: interning frames and stacks, linking calls to them, and telling
the user's own code from library code.

A stack is stored as a tree (``stacks``: stack_id, parent_id, frame_id, depth): its innermost frame plus
the stack of its caller, so each distinct stack is one row and common prefixes are shared. Readers hand
``build_stacks`` one node per call or per sampled frame (its frame and the index of its caller node)
and get back the tables and a stack id per node. Everything is vectorized per depth level (a Python
stack is at most a few hundred frames deep), never per node.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd

from gpudoctor.model.trace import conform

# Top-level packages whose frames are library code (besides anything under site-packages / dist-packages
# and the standard library): a stack is attributed to the first frame outside these, counting from the
# innermost frame.
LIBRARY_PACKAGES = frozenset({
    "torch", "torchvision", "torchaudio", "functorch", "triton", "transformers", "tokenizers", "datasets",
    "huggingface_hub", "safetensors", "accelerate", "peft", "deepspeed", "megatron", "apex", "timm", "numpy",
    "scipy", "pandas", "PIL", "cv2", "einops", "flash_attn", "xformers", "vllm", "lightning",
    "pytorch_lightning", "tqdm", "typing_extensions", "sympy", "jinja2", "gpudoctor", "nvtx", "wandb",
    "tensorboard", "google", "absl", "sklearn", "matplotlib", "_pytest", "pytest", "pluggy", "cupy",
})
_LIBRARY_DIRS = re.compile(r"(^|/)(site-packages|dist-packages|lib/python\d[\d.]*|lib-dynload)/")
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))


def is_library_file(file: str) -> bool:
    """True for frames of library or interpreter code: native functions (no file, or a file that is not
    Python source: shared objects, the interpreter), ``<frozen ...>`` / ``<string>`` pseudo files, anything under site-packages / dist-packages / lib/pythonX.Y, and files
    whose first path component is a known library package or a standard-library module."""
    if not file or file.startswith("<") or not file.endswith(".py"):
        return True  # native code (shared objects, the interpreter) and pseudo files
    if _LIBRARY_DIRS.search(file):
        return True
    if file.startswith("/"):
        return False  # an absolute path outside the library directories: the user's code
    head = file.split("/", 1)[0]
    head = head[:-3] if head.endswith(".py") else head
    return head in LIBRARY_PACKAGES or head in _STDLIB


def build_stacks(rank: int, file: np.ndarray, line: np.ndarray, function: np.ndarray, parent: np.ndarray,
                 node_frame: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Intern the frames and stacks of a forest of nodes.

    ``file``, ``line``, ``function``: candidate frames (duplicates allowed); ``node_frame``: the index of
    each node's frame among them (default: one candidate per node). ``parent``: index of the caller's
    node, -1 for an outermost one (a node's parent must not be itself or its descendant). Returns the
    ``frames`` and ``stacks`` tables and the stack id of every node.
    """
    n = len(parent)
    if n == 0:
        return conform("frames", {}), conform("stacks", {}), np.zeros(0, np.int64)
    key = pd.MultiIndex.from_arrays([np.asarray(file, dtype=object), np.asarray(line, dtype=np.int64),
                                     np.asarray(function, dtype=object)])
    cand_code, uniq = pd.factorize(key)  # over the candidates: few when the caller passes node_frame
    frame_code = cand_code if node_frame is None else cand_code[np.asarray(node_frame, dtype=np.int64)]
    frames = conform("frames", {
        "rank": np.full(len(uniq), rank, np.int64), "frame_id": np.arange(len(uniq), dtype=np.int64),
        "file": uniq.get_level_values(0).astype(str), "line": uniq.get_level_values(1).to_numpy(np.int64),
        "function": uniq.get_level_values(2).astype(str),
    })
    parent = np.asarray(parent, dtype=np.int64)
    depth = np.zeros(n, np.int64)
    cur = parent.copy()
    while (live := cur >= 0).any():
        depth[live] += 1
        cur[live] = parent[cur[live]]
        if depth.max() > n:
            raise ValueError("call tree has a cycle")
    node_stack = np.full(n, -1, np.int64)
    s_parent, s_frame, s_depth = [], [], []
    next_id = 0
    for d in range(int(depth.max()) + 1):
        at = np.flatnonzero(depth == d)
        pstack = node_stack[parent[at]] if d else np.full(len(at), -1, np.int64)
        pair = (pstack + 1) * (len(uniq) + 1) + frame_code[at]
        keys, inv = np.unique(pair, return_inverse=True)
        node_stack[at] = next_id + inv.ravel()
        s_parent.append(keys // (len(uniq) + 1) - 1)
        s_frame.append(keys % (len(uniq) + 1))
        s_depth.append(np.full(len(keys), d, np.int64))
        next_id += len(keys)
    stacks = conform("stacks", {
        "rank": np.full(next_id, rank, np.int64), "stack_id": np.arange(next_id, dtype=np.int64),
        "parent_id": np.concatenate(s_parent), "frame_id": np.concatenate(s_frame), "depth": np.concatenate(s_depth),
    })
    return frames, stacks, node_stack


def innermost_enclosing(span_thread: np.ndarray, span_start: np.ndarray, span_end: np.ndarray,
                        span_parent: np.ndarray, thread: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each (thread, time t): the index of the innermost span of that thread that contains t, or -1.

    Spans of a thread must nest (a call tree); ``span_parent`` is the index of the enclosing span (-1 at
    the top). Found as the last span starting at or before t, then walking up to the first ancestor
    that has not ended before t.
    """
    if len(span_start) == 0 or len(t) == 0:
        return np.full(len(t), -1, np.int64)
    depth = np.zeros(len(span_start), np.int64)
    cur = span_parent.copy()
    while (live := cur >= 0).any():
        depth[live] += 1
        cur[live] = span_parent[cur[live]]
    order = np.lexsort((depth, span_start, span_thread))
    th, st = span_thread[order], span_start[order]
    # search on (thread, start) with one key: threads as dense codes in the high bits
    codes, uniq_threads = pd.factorize(np.r_[th, thread])
    tcode, qcode = codes[:len(th)], codes[len(th):]
    lo = st.min() if len(st) else 0
    span_key = tcode.astype(np.int64) * (1 << 42) + (st - lo)
    q_key = qcode.astype(np.int64) * (1 << 42) + np.clip(t - lo, -1, (1 << 42) - 1)
    j = np.searchsorted(span_key, q_key, side="right") - 1
    ok = (j >= 0) & (tcode[np.clip(j, 0, None)] == qcode) & (t >= lo)
    out = np.where(ok, order[np.clip(j, 0, None)], -1)
    for _ in range(int(depth.max()) + 1):
        bad = (out >= 0) & (span_end[np.clip(out, 0, None)] < t)
        if not bad.any():
            break
        out[bad] = span_parent[out[bad]]
    return out


def stack_frames(stacks: pd.DataFrame, frames: pd.DataFrame) -> pd.DataFrame:
    """Per stack (one rank's tables, stack_id = row position): its frame, whether the frame is library
    code, the innermost user frame of the stack (``user_stack``: the stack whose innermost frame it is,
    -1 when the whole stack is library code) and the library frame that user frame called on the way to
    this stack (``callee_stack``, -1 when the stack ends in user code)."""
    n = len(stacks)
    sid = stacks["stack_id"].to_numpy(np.int64)
    if n and not (sid == np.arange(n)).all():
        raise ValueError("stacks must be ordered by stack_id = 0..n-1")
    fid = stacks["frame_id"].to_numpy(np.int64)
    parent = stacks["parent_id"].to_numpy(np.int64)
    depth = stacks["depth"].to_numpy(np.int64)
    files = frames["file"].astype(str).to_numpy(dtype=object)
    lib_of_frame = np.array([is_library_file(f) for f in pd.unique(files)], dtype=bool)
    lib_frame = lib_of_frame[pd.factorize(files)[0]] if len(files) else np.zeros(0, bool)
    lib = lib_frame[fid] if n else np.zeros(0, bool)
    user_stack = np.full(n, -1, np.int64)
    callee = np.full(n, -1, np.int64)
    for d in range(int(depth.max()) + 1 if n else 0):  # parents (depth d-1) are done before depth d
        at = np.flatnonzero(depth == d)
        p = parent[at]
        has_p = p >= 0
        up_user = np.where(has_p, user_stack[np.clip(p, 0, None)], -1)
        user_stack[at] = np.where(~lib[at], at, up_user)
        p_user = has_p & ~lib[np.clip(p, 0, None)]
        up_callee = np.where(has_p, callee[np.clip(p, 0, None)], -1)
        callee[at] = np.where(~lib[at], -1, np.where(p_user, at, up_callee))
    return pd.DataFrame({"frame_id": fid, "parent_id": parent, "depth": depth, "library": lib,
                         "user_stack": user_stack, "callee_stack": callee})


def innermost_at(host_stacks: pd.DataFrame, stack_depth: np.ndarray, thread: int, t: np.ndarray) -> np.ndarray:
    """The stack id that ``thread`` was running at each time ``t`` (sorted or not), from ``host_stacks``
    rows of nested calls: per depth level, the last call starting at or before t (calls of one depth on
    one thread never overlap) if it has not ended; the deepest such call wins. -1 where none runs."""
    out = np.full(len(t), -1, np.int64)
    hs = host_stacks[host_stacks["thread_id"].to_numpy() == thread]
    if hs.empty or len(t) == 0:
        return out
    sid = hs["stack_id"].to_numpy(np.int64)
    depth = np.where(sid >= 0, stack_depth[np.clip(sid, 0, None)], -1)
    start = hs["start_ns"].to_numpy(np.int64)
    end = hs["end_ns"].to_numpy(np.int64)
    best = np.full(len(t), -1, np.int64)
    for d in np.unique(depth[depth >= 0]):
        at = np.flatnonzero(depth == d)
        at = at[np.argsort(start[at], kind="stable")]
        j = np.searchsorted(start[at], t, side="right") - 1
        row = at[np.clip(j, 0, None)]
        hit = (j >= 0) & (end[row] > t) & (d > best)
        out[hit] = sid[row[hit]]
        best[hit] = d
    return out
