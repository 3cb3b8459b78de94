"""Kernel categories from kernel names, decided once per distinct name (names are categoricals)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gpudoctor.model.columns import per_value
from gpudoctor.model.kernel_names import short_kernel_name

if TYPE_CHECKING:
    from gpudoctor.model.columns import Column


class _InOrder:
    """``first`` somewhere before ``second``, case-insensitively: what the regex ``first.*second`` says,
    in linear time (``re.search`` retries ``.*`` from every occurrence of ``first``: quadratic)."""

    def __init__(self, first: str, second: str):
        self.first, self.second = first.lower(), second.lower()

    def search(self, name: str) -> bool:
        low = name.lower()
        i = low.find(self.first)
        return i >= 0 and low.find(self.second, i + len(self.first)) >= 0


class _AnyOf:
    """Matches when any of ``rules`` does (each a compiled regex or an ``_InOrder``)."""

    def __init__(self, *rules):
        self.rules = rules

    def search(self, name: str) -> bool:
        return any(r.search(name) for r in self.rules)


# Order matters: the first pattern that matches wins. Communication and attention come before GEMM
# because fused attention kernels and NCCL kernels contain GEMM-like words. Every rule runs in time
# linear in the name: alternations of literals only, no ``.*`` or nested repetition (names are
# untrusted input; tests/test_bad_inputs.py::test_category_rules_linear_on_adversarial_names).
_RULES: list[tuple[str, re.Pattern | _AnyOf]] = [
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv|alltoall", re.I)),
    ("attention", re.compile(
        r"flash|fmha|attention|attn|xformers|cutlassF|cutlassB|pagedattention|paged_attention|"
        r"xqa|flashinfer|sdpa|mha_|_mha|fused_mha", re.I)),
    ("gemm", _AnyOf(re.compile(
        r"gemm|nvjet|cutlass|cublas|xmma|matmul|dot_kernel|gemv|gemvx|sgemm|hgemm|"
        r"implicit_convolve|conv2d|convolution|wgrad|dgrad|fprop|winograd|fft2d_r2c|fft2d_c2r|"
        r"pointwise_mult_and_sum_complex|cgemm|splitkreduce|_mm_|triton_mm|bmm", re.I),
        _InOrder("cudnn", "conv"))),
    ("reduction", re.compile(r"reduce|softmax|norm|sum_|argmax|argmin|cross_entropy|nll_loss|topk|sort|scan|cumsum", re.I)),
    ("memory", re.compile(r"memcpy|memset|copy_kernel|direct_copy|cat_|catarray|index_select|gather|scatter|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|pointwise|triton_poi|activation|gelu|relu|silu|dropout|add|mul|foreach", re.I)),
]


_ALL = sorted({c for c, _ in _RULES} | {"other"})  # sorted: the categories pd.Categorical(values) would have
_OTHER = _ALL.index("other")


def category_of(name: str) -> str:
    for cat, rx in _RULES:
        if rx.search(name):
            return cat
    return "other"


def categorize(names: pd.Series) -> pd.Categorical:
    """Category of each kernel name. Works on the distinct names only, then maps back."""
    return pd.Categorical.from_codes(_category_codes(names), categories=_ALL).remove_unused_categories()


def _category_codes(names) -> np.ndarray:
    """Index into _ALL of each name's category, decided once per distinct name (missing: "other")."""
    return per_value(names, lambda n: _ALL.index(category_of(n)), dtype=np.int64, missing=_OTHER)


def categorize_kernels(short_names: Column, demangled_names: Column) -> pd.Categorical:
    """Category from the short name; where that says "other", from the demangled name.

    Works on category codes end to end: no per-row string is built, even for millions of kernels."""
    by_short = _category_codes(short_names)
    if len(by_short) == 0:
        return pd.Categorical([])
    by_demangled = _category_codes(demangled_names)
    out = np.where(by_short == _OTHER, by_demangled, by_short)
    return pd.Categorical.from_codes(out, categories=_ALL).remove_unused_categories()


def short_names(names: Column) -> pd.Categorical:
    """Short kernel names (as nsys's shortName) for full demangled names, decided once per distinct name."""
    cat = pd.Series(names).astype("category")
    uniq = np.array([short_kernel_name(str(n)) for n in cat.cat.categories], dtype=object)
    codes = cat.cat.codes.to_numpy()
    return pd.Categorical(uniq[codes] if len(uniq) else np.array([], dtype=object))
