"""gpudoctor.model.columns: per-distinct-value tests on text columns, same answers as row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpudoctor.model.columns import equals, isin, per_value


def _cols():
    values = ["communication", "gemm", None, "gemm", "attention", "communication"]
    return pd.Series(values, dtype="category"), pd.Series(values, dtype=object)


def test_equals_and_isin_match_row_by_row():
    for col in _cols():
        assert equals(col, "gemm").tolist() == [False, True, False, True, False, False]
        assert isin(col, ["communication", "attention"]).tolist() == [True, False, False, False, True, True]
        assert isin(col, [""]).tolist() == [False, False, True, False, False, False]  # missing is ""
        assert equals(col, "nccl").sum() == 0


def test_per_value():
    cat, obj = _cols()
    expected = ["communication", "gemm", "", "gemm", "attention", "communication"]
    assert per_value(cat, str).tolist() == expected and per_value(obj, str).tolist() == expected
    calls = []
    out = per_value(cat, lambda v: calls.append(v) or len(v), dtype=np.int64)
    assert out.tolist() == [13, 4, 0, 4, 9, 13]
    assert sorted(calls) == ["", "attention", "communication", "gemm"]  # once per distinct value, + missing


def test_empty_column():
    empty = pd.Series([], dtype="category")
    assert equals(empty, "x").shape == (0,) and per_value(empty, str).shape == (0,)


def test_kernel_categories_match_the_rule_row_by_row():
    """categorize_kernels works on category codes; it must give what the rule gives kernel by kernel
    (short name first, the demangled name where the short one says "other"), on real fixtures."""
    from pathlib import Path

    from gpudoctor.model.categories import category_of
    from gpudoctor.readers import kineto, nsys

    root = Path(__file__).resolve().parent.parent / "fixtures"
    for reader, path in ((nsys, root / "nsys" / "attn_naive.nsys.sqlite"), (kineto, root / "torch" / "attn_naive.torch.json.gz"),
                         (nsys, root / "nsys" / "mlp_fp32.nsys.sqlite")):
        k = reader.read(path).kernels
        ref = []
        for s, d in zip(k["name"].astype(object).fillna(""), k["demangled_name"].astype(object).fillna("")):
            c = category_of(str(s))
            ref.append(c if c != "other" else category_of(str(d)))
        assert len(ref) > 100
        assert k["category"].astype(str).tolist() == ref, path.name
        assert list(k["category"].cat.categories) == sorted(set(ref))  # only the categories present


def test_first_match_joins_on_ids():
    """The correlation-id join of the readers and analyzers: the first row holding each id; unknown
    (negative) ids on either side match nothing."""
    from gpudoctor.model.joins import first_match

    keys = np.array([5, 3, 5, -1, 7])
    assert first_match(keys, np.array([5, 7, 3, -1, 4, 9, 0])).tolist() == [0, 4, 1, -1, -1, -1, -1]
    assert first_match(np.array([], np.int64), np.array([1, 2])).tolist() == [-1, -1]
    assert first_match(keys, np.array([], np.int64)).tolist() == []
