"""Joining event tables on their ids (correlation ids): one sort join, used by the readers and analyzers."""

from __future__ import annotations

import numpy as np


def first_match(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per value of ``wanted``: the index of the first row of ``keys`` that holds it, -1 where none does or
    the value is negative (an unknown id; negative keys match nothing either). A sort join: a hash join of
    ten million ids costs several times more."""
    keys = np.asarray(keys, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]] & (sorted_keys >= 0) if len(keys) else np.zeros(0, bool)
    unique, rows = sorted_keys[first], order[first]
    if not len(unique):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(unique, wanted), len(unique) - 1)
    return np.where((wanted >= 0) & (unique[at] == wanted), rows[at], -1)
