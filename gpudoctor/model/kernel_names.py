"""A kernel's identity and its names.

``name`` in the trace model is the short name (nsys ``shortName``: no scope, template arguments or
parameters), for display. PyTorch's generic kernels share one short name across hundreds of ops
(``vectorized_elementwise_kernel``), so wherever kernels are grouped or compared the key is
``kernel_key``: the short name, with the op's functor for those generic kernels
(``vectorized_elementwise_kernel<MulFunctor>``), readable and distinct.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

# PyTorch's generic kernels: one short name for hundreds of ops. Attribution names them by their functor.
GENERIC_KERNELS = {"vectorized_elementwise_kernel", "elementwise_kernel", "unrolled_elementwise_kernel", "reduce_kernel",
                   "index_elementwise_kernel", "vectorized_templated_elementwise_kernel", "multi_tensor_apply_kernel",
                   "elementwise_kernel_with_index"}
_WRAPPERS = GENERIC_KERNELS | {"gpu_kernel_impl_nocast", "gpu_kernel_impl", "gpu_kernel", "ReduceOp", "func_wrapper_t",
                               "BUnaryFunctor", "AUnaryFunctor", "BinaryFunctor", "UnaryFunctor", "memory", "detail",
                               "launch_vectorized_kernel", "launch_legacy_kernel", "TensorListMetadata", "opmath_gpu_kernel_with_scalars",
                               "binary_internal", "native", "void", "at"}
_NATIVE_ID = re.compile(r"at::native::(?:(?:<unnamed>|\(anonymous namespace\)|binary_internal|detail)::)*([A-Za-z_]\w*)")


def kernel_key(name: str, demangled: str) -> str:
    """The name attribution uses: the short name, with the op's functor for PyTorch's generic kernels
    (``vectorized_elementwise_kernel<MulFunctor>``)."""
    if name not in GENERIC_KERNELS or not demangled:
        return name
    for ident in _NATIVE_ID.findall(demangled):
        if ident not in _WRAPPERS:
            return f"{name}<{ident}>"
    return name


def kernel_keys(k: pd.DataFrame) -> pd.Categorical:
    """``kernel_key`` of every kernel row (``name``, ``demangled_name``), decided once per distinct pair."""
    if k.empty:
        return pd.Categorical([])
    names = pd.Categorical(k["name"].astype(str)) if not isinstance(k["name"].dtype, pd.CategoricalDtype) else k["name"].values
    dem = (pd.Categorical(k["demangled_name"].astype(str)) if not isinstance(k["demangled_name"].dtype, pd.CategoricalDtype)
           else k["demangled_name"].values)
    nc = np.asarray(names.codes, dtype=np.int64)
    dc = np.asarray(dem.codes, dtype=np.int64)
    pair = nc * (len(dem.categories) + 1) + (dc + 1)
    uniq, inv = np.unique(pair, return_inverse=True)
    nn, dd = uniq // (len(dem.categories) + 1), uniq % (len(dem.categories) + 1) - 1
    ncat, dcat = np.asarray(names.categories, dtype=object), np.asarray(dem.categories, dtype=object)
    keys = np.array([kernel_key(str(ncat[a]) if a >= 0 else "", str(dcat[b]) if b >= 0 else "")
                     for a, b in zip(nn, dd)], dtype=object)
    distinct, per_pair = np.unique(keys, return_inverse=True)
    return pd.Categorical.from_codes(per_pair.ravel()[inv.ravel()], categories=distinct)


def short_kernel_name(name: str) -> str:
    """nsys-style short name of a demangled kernel signature: no return type, scope, template
    arguments or parameters ("void at::native::elementwise_kernel<128, 4, ...>(int, ...)" ->
    "elementwise_kernel"). Kineto gives only the full name; this matches nsys ``shortName`` on the
    committed fixtures (the Kineto reader names its kernels with it, through categories.short_names).
    """
    s = name.strip()
    if s.endswith(")"):  # parameter list
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += s[i] in ")>"
            depth -= s[i] in "(<"
            if depth == 0:
                s = s[:i]
                break
    while s.endswith(">"):  # template arguments
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += s[i] == ">"
            depth -= s[i] == "<"
            if depth == 0:
                s = s[:i]
                break
        else:
            break
    depth, cut = 0, 0
    for i, c in enumerate(s):  # last scope component; a space at depth 0 ends the return type
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        elif depth == 0 and (c == " " or (c == ":" and s.startswith("::", i))):
            cut = i + (2 if c == ":" else 1)
    return s[cut:] or name
