"""Fast tests on the model's text columns.

Text columns of a million rows are categoricals. ``col.astype(str)`` on them builds a million Python
(or Arrow) strings, which costs ~0.4 s per column; these helpers decide once per distinct value and map
back through the codes instead. They accept plain object / string columns too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy.typing as npt

    # A text column: a Series (categorical or not), an array or any sequence of values.
    Column: TypeAlias = pd.Series | np.ndarray | Iterable[object]


def as_categorical(col: Column) -> pd.Series:
    """The column as a categorical Series (missing values become "")."""
    col = col if isinstance(col, pd.Series) else pd.Series(col)
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col
    return col.astype(object).where(col.notna(), "").astype(str).astype("category")


def per_value(col: Column, fn: Callable[[str], object], dtype: npt.DTypeLike = object,
              missing: object = None) -> np.ndarray:
    """``fn(str(value))`` decided once per distinct value, mapped back to every row (missing -> ``missing``,
    or ``fn("")`` when not given)."""
    c = as_categorical(col)
    cats = c.cat.categories
    per = np.array([fn(str(v)) for v in cats] + [fn("") if missing is None else missing], dtype=dtype)
    codes = c.cat.codes.to_numpy()
    return per[np.where(codes >= 0, codes, len(per) - 1)]


def equals(col: Column, value: str) -> np.ndarray:
    """Boolean mask: rows whose text is ``value``."""
    return isin(col, (value,))


def isin(col: Column, values: Iterable[str]) -> np.ndarray:
    """Boolean mask: rows whose text is one of ``values``."""
    wanted = {str(v) for v in values}
    return per_value(col, lambda v: v in wanted, dtype=bool, missing="" in wanted)
