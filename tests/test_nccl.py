"""nccl-tests reader, gpudoctor nccl-bench (formatting, sizes, check, CPU/gloo end to end), corruption finding.

tests/data/nccl_tests_all_reduce_handmade.log is HAND-MADE (its first lines say so): written for these
parser tests in nccl-tests 2.13's stdout layout; its numbers are illustrative, not a measurement. The real
recordings (fixtures/multigpu/nccl_bench.log, .json) are tested when present.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpudoctor.analyzers import nccl_dominated
from gpudoctor.analyzers.config import Config
from gpudoctor.analyzers.context import build_context
from gpudoctor.collect import ncclbench as nb
from gpudoctor.collect import nccltests_layout
from gpudoctor.collect.nccltests_layout import format_footer, format_row, format_run_header, format_table_header
from gpudoctor.errors import InputError
from gpudoctor.model import collectives
from gpudoctor.model.collectives import bandwidths, bus_factor, op_sizes
from gpudoctor.readers import detect, nccltests

ROOT = Path(__file__).resolve().parent.parent
HANDMADE = ROOT / "tests" / "data" / "nccl_tests_all_reduce_handmade.log"
FIX = ROOT / "fixtures" / "multigpu"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------ conventions


@pytest.mark.parametrize("op,n,factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 8, 1.75), ("all_reduce", 1, 0.0), ("all_reduce", 4, 1.5),
    ("all_gather", 2, 0.5), ("all_gather", 8, 0.875), ("reduce_scatter", 8, 0.875), ("all_to_all", 4, 0.75),
    ("broadcast", 8, 1.0), ("reduce", 8, 1.0),
])
def test_bus_factors(op, n, factor):
    assert bus_factor(op, n) == pytest.approx(factor)


def test_bus_factor_unknown_op():
    with pytest.raises(ValueError):
        bus_factor("hypercube", 2)


def test_op_sizes_follow_nccl_tests():
    # all_gather: the size column is the total output; count is the per-rank chunk
    s = op_sizes("all_gather", 1024, 2, 4)
    assert (s.size_bytes, s.count, s.send_count, s.recv_count) == (1024, 128, 128, 256)
    # reduce_scatter: the size column is the total input
    s = op_sizes("reduce_scatter", 1024, 2, 4)
    assert (s.size_bytes, s.count, s.send_count, s.recv_count) == (1024, 128, 256, 128)
    s = op_sizes("all_reduce", 1024, 8, 4)
    assert (s.size_bytes, s.count, s.send_count, s.recv_count) == (1024, 256, 256, 256)
    s = op_sizes("all_to_all", 1024, 4, 4)
    assert (s.size_bytes, s.count, s.send_count, s.recv_count) == (1024, 64, 256, 256)
    s = op_sizes("broadcast", 8, 2, 4)
    assert (s.size_bytes, s.count) == (8, 2)
    # sizes that do not divide: nccl-tests rounds the per-rank chunk down
    assert op_sizes("all_gather", 12, 2, 4).size_bytes == 8
    assert op_sizes("all_gather", 6, 2, 2).count == 1
    assert op_sizes("all_gather", 4, 8, 4).count == 0  # fewer elements than ranks: no row


def test_bandwidths():
    alg, bus = bandwidths("all_reduce", 1 << 30, 5239.6e-6, 8)
    assert alg == pytest.approx(204.93, abs=0.01)
    assert bus == pytest.approx(358.62, abs=0.01)
    assert bandwidths("all_gather", 1 << 20, 0.0, 2) == (0.0, 0.0)


def test_float_str_is_nccl_tests_getfloatstr():
    f = nccltests_layout._float_str
    assert f(17.0, 7) == "  17.00"
    assert f(346.2, 7) == " 346.20"
    assert f(12345.6, 7) == "12345.6"
    assert f(1234567.0, 7) == "1234567"
    assert f(0.004, 6) == "  0.00"
    assert f(358.62, 6) == "358.62"
    assert f(1234.5, 6) == "1234.5"
    assert f(float("nan"), 6) == "   N/A"


def test_parse_size_and_ops_and_sweep():
    assert nb.parse_size("8") == 8
    assert nb.parse_size("64K") == 64 << 10
    assert nb.parse_size("128M") == 128 << 20
    assert nb.parse_size("1G") == 1 << 30
    assert nb.parse_size("1g") == 1 << 30
    with pytest.raises(Exception):
        nb.parse_size("lots")
    assert nb.parse_ops("allreduce,alltoall") == ["all_reduce", "all_to_all"]
    assert nb.parse_ops("all") == list(nb.ALL_OPS)
    with pytest.raises(Exception):
        nb.parse_ops("all_reduce,hypercube")
    assert nb.sizes(8, 64, 2) == [8, 16, 32, 64]
    assert nb.sizes(8, 100, 4) == [8, 32]
    assert nb.sizes(1 << 20, 1 << 20, 2) == [1 << 20]
    assert len(nb.sizes(8, 1 << 30, 2)) == 28


def test_nvlink_generation_and_ceilings():
    assert nb.nvlink_generation(4, 9) == 4  # plain major (older NVML)
    assert nb.nvlink_generation(6, 9) == 4  # nvmlNvlinkVersion_t NVML_NVLINK_VERSION_4_0
    assert nb.nvlink_generation(7, 10) == 5
    assert nb.nvlink_generation(3, 8) == 3
    assert nb.nvlink_generation(4, 8) == 3  # enum 3.0
    assert nb.nvlink_generation(6, None) == 4
    c = nb.link_ceiling({"kind": "nvlink", "generation": 4, "links": 18})
    assert c["gbps"] == pytest.approx(450.0)
    assert "NVLink 4" in c["basis"] and "900 GB/s" in c["source"]
    assert nb.link_ceiling({"kind": "nvlink", "generation": 3, "links": 12})["gbps"] == pytest.approx(300.0)
    assert nb.link_ceiling({"kind": "pcie", "generation": 5, "width": 16})["gbps"] == pytest.approx(63.0, abs=0.1)
    assert nb.link_ceiling({"kind": "pcie", "generation": 4, "width": 16})["gbps"] == pytest.approx(31.5, abs=0.1)
    assert nb.link_ceiling({"kind": "unknown"})["gbps"] is None
    assert nb.describe_link({"kind": "nvlink", "generation": 4, "links": 18}) == "NVLink 4, 18 links"
    assert nb.describe_link({"kind": "pcie", "generation": 5, "width": 16}) == "PCIe gen5 x16"


# ------------------------------------------------------------------------------------------------ check pattern


def test_fill_and_count_wrong():
    torch = pytest.importorskip("torch")
    vec = nb.pattern(torch, 1, nb.pattern_k("bfloat16", 2), torch.bfloat16, "cpu")
    assert vec.tolist() == [((1 + i) % 8) % 8 + 1 for i in range(8)]
    for n in (0, 1, 7, 8, 9, 1001):
        x = torch.zeros(n, dtype=torch.bfloat16)
        nb.fill(x, vec, offset=5)
        assert nb.count_wrong(x, vec, offset=5) == 0
        if n:
            expect = [float(vec[(5 + i) % 8]) for i in range(n)]
            assert x.float().tolist() == expect
            x[n // 2] += 1
            x[-1] = -3
            assert nb.count_wrong(x, vec, offset=5) == (2 if n > 1 and n // 2 != n - 1 else 1)


def test_pattern_sums_stay_exact():
    assert nb.pattern_k("bfloat16", 2) == 8
    assert nb.pattern_k("bfloat16", 64) == 4
    assert nb.pattern_k("bfloat16", 512) == 1
    assert nb.pattern_k("float16", 256) == 8
    assert nb.pattern_k("float32", 4096) == 8


class _OneRank:
    """torch.distributed with one rank (every collective is a copy), optionally corrupting outputs."""

    def __init__(self, corrupt: int = 0):
        self.corrupt = corrupt

    def _bad(self, t):
        if self.corrupt and t.numel():
            t.view(-1)[: self.corrupt] += 100

    def all_reduce(self, t):
        self._bad(t)

    def broadcast(self, t, src=0):
        self._bad(t)

    def all_gather_into_tensor(self, out, inp):
        out.copy_(inp)
        self._bad(out)

    def reduce_scatter_tensor(self, out, inp):
        out.copy_(inp)
        self._bad(out)

    def all_to_all_single(self, out, inp):
        out.copy_(inp)
        self._bad(out)


@pytest.mark.parametrize("op", nb.ALL_OPS)
@pytest.mark.parametrize("in_place", [False, True])
def test_opbench_check_counts_wrong_elements(op, in_place):
    torch = pytest.importorskip("torch")
    dev = torch.device("cpu")
    for corrupt, expect in ((0, 0), (3, 3)):
        b = nb.OpBench(torch, _OneRank(corrupt), op, "float32", dev, 0, 1, 4096)
        b.set_size(1024)
        got = b.check(in_place)
        if op == "all_to_all" and in_place:
            assert got is None  # nccl-tests reports N/A: in-place all-to-all is not defined
        else:
            assert got == expect, (op, in_place, corrupt)


# ------------------------------------------------------------------------------------------------ the reader


def test_handmade_log_is_read():
    assert detect(HANDMADE) == "nccl_tests"
    t = nccltests.read(HANDMADE)
    nt = t.meta["nccl_tests"]
    assert len(nt["rows"]) == 28
    assert nt["complete"] and nt["wrong_total"] == 0
    assert nt["avg_busbw_gbps"] == pytest.approx(110.483)
    sec = nt["sections"][0]
    assert sec["op"] == "all_reduce" and sec["comm_size"] == 8
    assert sec["parameters"]["ngpus"] == 8 and sec["parameters"]["max_bytes"] == 1 << 30
    assert sec["parameters"]["iters"] == 20 and sec["parameters"]["validation"] == 1
    last = nt["rows"][-1]
    assert last["size_bytes"] == 1 << 30 and last["count"] == 1 << 28 and last["dtype"] == "float32"
    assert last["out_of_place_time_us"] == pytest.approx(5239.6)
    assert last["out_of_place_busbw_gbps"] == pytest.approx(358.62)
    assert last["in_place_algbw_gbps"] == pytest.approx(203.81)
    assert last["redop"] == "sum" and last["root"] == -1
    # every row is consistent with nccl-tests' bandwidth formulas (to the printed precision)
    for r in nt["rows"]:
        alg, bus = bandwidths("all_reduce", r["size_bytes"], r["out_of_place_time_us"] * 1e-6, 8)
        assert r["out_of_place_algbw_gbps"] == pytest.approx(alg, abs=0.011)
        assert r["out_of_place_busbw_gbps"] == pytest.approx(bus, abs=0.011)
    c = t.collectives
    assert len(c) == 28 and set(c["source"].astype(str)) == {"nccl_tests"}
    assert set(c["op"].astype(str)) == {"all_reduce"} and (c["comm_size"] == 8).all()
    assert (c["start_ns"] == 0).all() and (c["end_ns"] == 0).all()
    assert c["bytes"].max() == 1 << 30
    assert nt["devices"][3] == {"rank": 3, "group": 0, "pid": 41230, "host": "gpu-node-3", "device": 3,
                                "bus": "0x5d", "name": "NVIDIA H100 80GB HBM3"}
    assert t.ranks.empty and t.devices.empty  # the log claims no rank: it joins a run's per-rank traces
    assert t.meta["inputs"] == [{"path": str(HANDMADE), "format": "nccl_tests", "rank": 0}]
    assert t.dropped_counts() == {}


def test_log_joins_the_traces_of_a_run():
    from gpudoctor.model.trace import merge
    from gpudoctor.readers import nsys
    p = ROOT / "fixtures" / "nsys" / "mlp_bf16.nsys.sqlite"
    if not p.exists():
        pytest.skip("no nsys fixture")
    t = merge([nsys.read(p), nccltests.read(HANDMADE)])
    assert len(t.meta["nccl_tests"]["rows"]) == 28 and len(t.kernels) > 0


def test_read_input_picks_the_reader():
    from gpudoctor.readers.inputs import read_input
    t = read_input(HANDMADE)
    assert len(t.meta["nccl_tests"]["rows"]) == 28


def test_op_from_data_when_nothing_names_it(tmp_path):
    p = _write(tmp_path, "results.txt", HANDMADE.read_text())
    assert nccltests.read(p).meta["nccl_tests"]["sections"][0]["op"] == "all_reduce"


def test_cut_short_log_is_read_and_counted(tmp_path):
    lines = HANDMADE.read_text().splitlines()
    first_row = next(i for i, ln in enumerate(lines) if ln.strip() and ln.split()[0].isdigit())
    p = _write(tmp_path, "all_reduce_cut.log", "\n".join(lines[: first_row + 10]) + "\n      4096  ")
    t = nccltests.read(p)
    nt = t.meta["nccl_tests"]
    assert len(nt["rows"]) == 10
    assert not nt["complete"]
    assert t.dropped_counts() == {nccltests.R_ENDS_EARLY: 1}


def test_unknown_column_is_a_one_line_error(tmp_path):
    text = HANDMADE.read_text().replace("busbw #wrong", "foobw #wrong", 1)
    p = _write(tmp_path, "all_reduce_x.log", text)
    with pytest.raises(InputError) as e:
        nccltests.read(p)
    msg = str(e.value)
    assert "\n" not in msg and "unknown column" in msg and "foobw" in msg


def test_no_table_is_an_error(tmp_path):
    p = _write(tmp_path, "x.log", "# nThread 1 nGpus 2 minBytes 8 maxBytes 64 step: 2(factor) warmup iters: 5\n#\n")
    with pytest.raises(InputError, match="no nccl-tests result table"):
        nccltests.read(p)
    with pytest.raises(InputError, match="empty"):
        nccltests.read(_write(tmp_path, "e.log", "  \n"))


def test_old_layouts(tmp_path):
    # nccl-tests 2.0-era all_gather: no root column, "error" instead of "#wrong", blank... no redop column
    old = """# nThread 1 nGpus 2 minBytes 8 maxBytes 64 step: 2(factor) warmup iters: 5 iters: 20 validation: 1
#
# Using devices
#   Rank  0 Pid  1234 on  host device  0 [0x07] Tesla V100-SXM2-16GB
#   Rank  1 Pid  1234 on  host device  1 [0x0a] Tesla V100-SXM2-16GB
#
#                                                 out-of-place                    in-place
#       size         count    type     time   algbw   busbw  error     time   algbw   busbw  error
#        (B)    (elements)             (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
           8             1   float    12.55    0.00    0.00  0e+00    12.19    0.00    0.00  0e+00
          64             8   float    12.65    0.01    0.00  1e+00    12.33    0.01    0.00  0e+00
 Out of bounds values : 0 OK
 Avg bus bandwidth    : 0.001
"""
    t = nccltests.read(_write(tmp_path, "all_gather_perf.txt", old))
    nt = t.meta["nccl_tests"]
    assert [r["size_bytes"] for r in nt["rows"]] == [8, 64]
    assert nt["sections"][0]["op"] == "all_gather"
    assert nt["rows"][1]["out_of_place_wrong"] == 1  # a non-zero max error means wrong data
    # 2.x all_gather printing an empty redop ("%6s" of ""): one token fewer than the header
    blank = HANDMADE.read_text().replace("float     sum      -1", "float            -1")
    t = nccltests.read(_write(tmp_path, "all_gather_blank.log", blank))
    assert len(t.meta["nccl_tests"]["rows"]) == 28 and t.meta["nccl_tests"]["rows"][0]["redop"] == ""


def test_newest_layout_with_per_iteration_columns(tmp_path):
    text = """# nccl-tests version 2.17.6 nccl-headers=22807 nccl-library=22807
# Collective test starting: reduce_scatter_perf
# nThread 1 nGpus 1 minBytes 1048576 maxBytes 2097152 step: 2(factor) warmup iters: 1 iters: 20 agg iters: 1 validation: 1 graph: 0 unalign: 0
#
# Using devices
#  Rank  0 Group  0 Pid  22222 on       node device  0 [0000:18:00] NVIDIA H200
#  Rank  1 Group  0 Pid  22223 on       node device  1 [0000:2a:00] NVIDIA H200
#
#                                    out-of-place (+ per-iteration)                                in-place (+ per-iteration)
#       size         count      type   redop    root     time   algbw   busbw  #wrong    i_min    i_max    i_p99    i_cv%     time   algbw   busbw  #wrong    i_min    i_max    i_p99    i_cv%
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)     (us)     (us)      (%)     (us)  (GB/s)  (GB/s)             (us)     (us)     (us)      (%)
     1048576        131072     float     sum      -1    20.50   51.15   25.58       0    19.90    22.10    22.10     2.50    20.40   51.40   25.70       0    19.80    21.90    21.90     2.40
     2097152        262144     float     sum      -1    30.10   69.67   34.84       0    29.70    31.00    31.00     1.10    30.00   69.91   34.95     N/A    29.60    30.90    30.90     1.00
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 30.2675
#
# Collective test concluded: reduce_scatter_perf
"""
    t = nccltests.read(_write(tmp_path, "log.txt", text))
    nt = t.meta["nccl_tests"]
    assert nt["sections"][0]["op"] == "reduce_scatter" and nt["sections"][0]["comm_size"] == 2
    r = nt["rows"][1]
    assert r["in_place_wrong"] is None and r["out_of_place_iter_p99_us"] == pytest.approx(31.0)
    assert r["in_place_iter_cv_pct"] == pytest.approx(1.0)
    assert nt["complete"] and nt["wrong_total"] == 0


def _table(op: str, n: int, rows: list[tuple]) -> str:
    """nccl-bench's own output for synthetic results: (size_bytes, time_us_oop, time_us_ip, wrong_oop, wrong_ip)."""
    devices = [{"rank": r, "pid": 100 + r, "host": "node", "device": r, "bus": f"0x{18 + r:02x}", "name": "NVIDIA H200"}
               for r in range(n)]
    text = format_run_header(nthreads=1, ngpus=1, min_bytes=rows[0][0], max_bytes=rows[-1][0], factor=2, warmup=5,
                             iters=20, check=True, devices=devices, binary=collectives.OP_BINARIES[op],
                             preamble=["# gpudoctor nccl-bench 0.1.0: NCCL collectives in the nccl-tests layout"])
    text += format_table_header()
    bus_all, oob = [], 0
    for size, t1, t2, w1, w2 in rows:
        sz = op_sizes(op, size, n, 4)
        res = []
        for t, w in ((t1, w1), (t2, w2)):
            alg, bus = bandwidths(op, sz.size_bytes, t * 1e-6, n)
            res.append((t, alg, bus, w))
            bus_all.append(bus)
            oob += bool(w)
        text += format_row(sz.size_bytes, sz.count, "float", collectives.redop_of(op), collectives.root_of(op), res)
    return text + format_footer(oob, sum(bus_all) / len(bus_all), collectives.OP_BINARIES[op])


def test_our_table_reads_back(tmp_path):
    rows = [(1 << 20, 25.123, 24.9, 0, 0), (1 << 26, 412.5, 410.0, 0, None), (1 << 30, 5600.0, 5590.0, 0, 0)]
    text = _table("all_gather", 2, rows) + _table("broadcast", 2, rows)
    text += "# gpudoctor link: NVLink 4, 18 links\n# gpudoctor ceiling: 450.0 GB/s per direction per GPU, x\n"
    p = _write(tmp_path, "bench.log", text)
    assert detect(p) == "nccl_tests"
    t = nccltests.read(p)
    nt = t.meta["nccl_tests"]
    assert [s["op"] for s in nt["sections"]] == ["all_gather", "broadcast"]
    assert all(s["complete"] and s["comm_size"] == 2 for s in nt["sections"])
    assert nt["gpudoctor"]["link"] == "NVLink 4, 18 links"
    ag = [r for r in nt["rows"] if r["op"] == "all_gather"]
    assert [r["size_bytes"] for r in ag] == [1 << 20, 1 << 26, 1 << 30]
    assert [r["count"] for r in ag] == [1 << 17, 1 << 23, 1 << 27]
    assert ag[1]["in_place_wrong"] is None and ag[1]["out_of_place_wrong"] == 0
    for r, (size, t1, t2, *_ ) in zip(ag, rows):
        alg, bus = bandwidths("all_gather", size, t1 * 1e-6, 2)
        assert r["out_of_place_time_us"] == pytest.approx(t1, rel=1e-3)
        assert r["out_of_place_algbw_gbps"] == pytest.approx(alg, abs=0.01)
        assert r["out_of_place_busbw_gbps"] == pytest.approx(bus, abs=0.01)
        assert r["redop"] == "none" and r["root"] == -1
    bc = [r for r in nt["rows"] if r["op"] == "broadcast"]
    assert bc[0]["root"] == 0
    assert t.dropped_counts() == {}
    # the header lines line up with nccl-tests' column widths
    header = format_table_header().splitlines()[2]
    row = format_row(1024, 256, "float", "sum", -1, [(17.0, 0.06, 0.11, 0), (16.6, 0.06, 0.11, 0)])
    assert header.index("#wrong") + len("#wrong") == row.index(" 0 ") + 2


def test_wrong_elements_make_a_high_finding(tmp_path):
    text = HANDMADE.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("1048576 "))
    bad = re.sub(r"0$", "5", line.rstrip())
    p = _write(tmp_path, "all_reduce_bad.log", text.replace(line, bad))
    t = nccltests.read(p)
    assert t.meta["nccl_tests"]["wrong_total"] == 5
    assert t.meta["nccl_tests"]["wrong_rows"] == [{"op": "all_reduce", "size_bytes": 1048576, "mode": "in_place", "wrong": 5}]
    ctx = build_context(t, 0, Config(), rank_view=t)
    found = nccl_dominated.analyze(ctx)
    high = [f for f in found if f.severity == "high"]
    assert len(high) == 1 and high[0].title == "data corruption: 5 wrong elements"
    assert high[0].analyzer == "nccl_dominated" and high[0].metrics["wrong_elements"] == 5
    # without corruption: bandwidth vs the link ceiling, info (358 of 450 GB/s on H100)
    ok = nccl_dominated.analyze(build_context(nccltests.read(HANDMADE), 0, Config()))
    assert [f.severity for f in ok] == ["info"]
    assert ok[0].metrics["ops"]["all_reduce"]["fraction_of_ceiling"] == pytest.approx(358.62 / 450, abs=1e-3)


# ------------------------------------------------------------------------------------------------ end to end (CPU)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_nccl_bench_gloo_end_to_end(tmp_path):
    """The whole command on CPU with the gloo backend: launch, check, table, JSON, read back."""
    pytest.importorskip("torch")
    js = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "gpudoctor", "nccl-bench", "--backend", "gloo", "--nproc", "2",
           "--min-bytes", "8", "--max-bytes", "4K", "--iters", "2", "--warmup", "1", "--json", str(js)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = _write(tmp_path, "bench.log", p.stdout)
    assert detect(log) == "nccl_tests"
    t = nccltests.read(log)
    nt = t.meta["nccl_tests"]
    assert [s["op"] for s in nt["sections"]] == list(nb.ALL_OPS)
    assert all(s["complete"] and s["comm_size"] == 2 and s["out_of_bounds"] == 0 for s in nt["sections"])
    assert nt["wrong_total"] == 0 and t.dropped_counts() == {}
    doc = json.loads(js.read_text())
    assert doc["world_size"] == 2 and doc["wrong_total"] == 0 and doc["backend"] == "gloo"
    for op in nb.ALL_OPS:
        jrows = doc["ops"][op]["rows"]
        trows = [r for r in nt["rows"] if r["op"] == op]
        assert [r["size_bytes"] for r in jrows] == [r["size_bytes"] for r in trows]
        assert [r["count"] for r in jrows] == [r["count"] for r in trows]
        for j, r in zip(jrows, trows):
            assert r["out_of_place_wrong"] == j["out_of_place"]["wrong"]
            assert r["in_place_wrong"] == j["in_place"]["wrong"]
            assert doc["ops"][op]["bus_factor"] == pytest.approx(bus_factor(op, 2))
    ag = doc["ops"]["all_gather"]["rows"]
    assert ag[0]["size_bytes"] == 8 and ag[0]["count"] == 1
    assert all(r["in_place"]["wrong"] is None for r in doc["ops"]["all_to_all"]["rows"])


@pytest.mark.slow
def test_nccl_bench_as_a_rank_of_torchrun(tmp_path):
    """Already under torchrun: the command measures as that rank (no second launch)."""
    pytest.importorskip("torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gpudoctor",
           "nccl-bench", "--backend", "gloo", "--ops", "all_reduce", "--max-bytes", "256", "--iters", "2",
           "--warmup", "1", "--dtype", "bfloat16"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    t = nccltests.read(_write(tmp_path, "b.log", p.stdout))
    nt = t.meta["nccl_tests"]
    assert len(nt["sections"]) == 1 and nt["sections"][0]["op"] == "all_reduce"
    assert [r["size_bytes"] for r in nt["rows"]] == [8, 16, 32, 64, 128, 256]
    assert {r["dtype"] for r in nt["rows"]} == {"bfloat16"} and nt["wrong_total"] == 0


def test_worker_refuses_without_a_launcher(monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert nb.main(["--backend", "gloo"]) == 2
    assert "not launched as a rank" in capsys.readouterr().err


def test_nccl_bench_imports_no_optional_packages():
    """The GPU box has no sqlite-utils: the command must not need it (nor rich)."""
    code = ("import sys; sys.modules['sqlite_utils'] = None; sys.modules['rich'] = None\n"
            "from gpudoctor.cli.main import main\n"
            "sys.argv = ['gpudoctor', 'nccl-bench', '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    sys.exit(e.code)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--max-bytes" in p.stdout


# ------------------------------------------------------------------------------------------------ real recording


@pytest.mark.skipif(not (FIX / "nccl_bench.log").exists(), reason="fixtures/multigpu/nccl_bench.log not recorded yet")
def test_recorded_nccl_bench():
    t = nccltests.read(FIX / "nccl_bench.log")
    nt = t.meta["nccl_tests"]
    assert [s["op"] for s in nt["sections"]] == list(nb.ALL_OPS)
    assert all(s["complete"] and s["comm_size"] == 2 for s in nt["sections"])
    assert nt["wrong_total"] == 0
    big = [r for r in nt["rows"] if r["op"] == "all_reduce" and r["size_bytes"] == 1 << 30]
    assert big and big[0]["out_of_place_busbw_gbps"] > 100
    doc = json.loads((FIX / "nccl_bench.json").read_text())
    assert doc["world_size"] == 2 and doc["wrong_total"] == 0
    if doc["link"].get("kind") == "nvlink":  # H200 NV18: NVLink 4, 18 links, 450 GB/s per direction
        assert "NVLink 4" in nt["gpudoctor"]["link"]
        assert doc["ceiling"]["gbps"] == pytest.approx(450.0)
        assert 0.3 < doc["ops"]["all_reduce"]["fraction_of_ceiling"] < 1.0
    loop = FIX / "allreduce_loop.json"
    if loop.exists():  # the plain torch loop and nccl-bench agree within 20% at 1 GiB
        plain = json.loads(loop.read_text())["busbw_gbps"]
        assert big[0]["out_of_place_busbw_gbps"] == pytest.approx(plain, rel=0.2)
