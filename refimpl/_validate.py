"""Input validation and randomness helpers shared by every module.

DESIGN.md principle 5: bad input gets a clear ``ValueError``/``TypeError`` naming the argument, never a silent
NaN, a crash inside Numba, or a hang. Principle 4: every random function takes ``rng`` (a
``numpy.random.Generator`` or an int seed); :func:`as_rng` is the one place that turns it into a Generator.
"""
from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = [
    "as_rng",
    "check_matrix",
    "check_vector",
    "check_features",
    "csr_arrays",
    "check_positive",
    "check_int",
    "check_ids",
]


def as_rng(rng) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from ``rng``.

    ``rng`` may be a Generator (returned as is, so that a caller's stream is consumed), an int seed, a
    ``numpy.random.SeedSequence`` or ``None`` (fresh OS entropy: not reproducible, allowed only because NumPy
    allows it; every documented example passes a seed).
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (numbers.Integral, np.random.SeedSequence)):
        if isinstance(rng, numbers.Integral) and int(rng) < 0:
            raise ValueError(f"rng: a seed must be non-negative, got {rng}")
        return np.random.default_rng(rng)
    raise TypeError(f"rng: expected a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def _check_finite(name: str, a: np.ndarray) -> None:
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or Inf")


def check_matrix(name: str, a, *, dtype=np.float64, n_rows: int | None = None, n_cols: int | None = None,
                 allow_empty: bool = False, copy: bool = False) -> np.ndarray:
    """Validate a dense 2-D float array and return it as a C-contiguous array of ``dtype``."""
    if sp.issparse(a):
        raise TypeError(f"{name}: expected a dense 2-D array, got a scipy.sparse matrix")
    try:
        arr = np.array(a, dtype=dtype, copy=copy, order="C") if copy else np.ascontiguousarray(a, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot be converted to a {np.dtype(dtype).name} array ({exc})") from None
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 rows)")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ValueError(f"{name}: expected {n_rows} rows, got {arr.shape[0]}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise ValueError(f"{name}: expected {n_cols} columns, got {arr.shape[1]}")
    _check_finite(name, arr)
    return arr


def check_vector(name: str, v, *, dtype=np.float64, size: int | None = None) -> np.ndarray:
    """Validate a finite 1-D array (e.g. a query embedding) and return it contiguous."""
    if sp.issparse(v):
        raise TypeError(f"{name}: expected a dense 1-D array, got a scipy.sparse matrix")
    try:
        arr = np.ascontiguousarray(v, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot be converted to a {np.dtype(dtype).name} array ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name}: expected length {size}, got {arr.shape[0]}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    _check_finite(name, arr)
    return arr


def check_features(name: str, X, *, n_cols: int | None = None, allow_empty: bool = False):
    """Validate an encoder input: a dense 2-D array or a ``scipy.sparse`` CSR matrix.

    Returns a float64 C-contiguous ndarray, or a canonical float64 ``csr_matrix`` (sorted indices, duplicates
    summed; scipy may keep int32 indices: use :func:`csr_arrays` to hand it to a Numba kernel). Other sparse formats (COO, CSC, ...) raise ``TypeError``: converting them silently
    would hide an O(nnz log nnz) copy on every call.
    """
    if sp.issparse(X):
        if X.format != "csr":
            raise TypeError(f"{name}: sparse input must be CSR (scipy.sparse.csr_matrix/csr_array), got {X.format!r}")
        if X.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D matrix, got {X.ndim}-D")
        X = sp.csr_matrix(X, dtype=np.float64, copy=False)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
            X.sort_indices()
        if not allow_empty and X.shape[0] == 0:
            raise ValueError(f"{name}: is empty (0 rows)")
        if n_cols is not None and X.shape[1] != n_cols:
            raise ValueError(f"{name}: expected {n_cols} columns, got {X.shape[1]}")
        _check_finite(name, X.data)
        return X
    return check_matrix(name, X, n_cols=n_cols, allow_empty=allow_empty)


def csr_arrays(X):
    """``(data float64, indices int64, indptr int64)`` of a CSR matrix: one signature for every Numba kernel."""
    return (np.ascontiguousarray(X.data, dtype=np.float64), np.ascontiguousarray(X.indices, dtype=np.int64),
            np.ascontiguousarray(X.indptr, dtype=np.int64))


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high] (either end optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name}: must be <= {high}, got {v}")
    return v


def check_ids(name: str, ids, n: int, *, allow_empty: bool = True) -> np.ndarray:
    """A 1-D int64 array of ids, each in [0, n)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of ids, got shape {arr.shape}")
    if arr.size == 0:
        if not allow_empty:
            raise ValueError(f"{name}: is empty")
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= n)
    if bad.any():
        raise ValueError(f"{name}: id {int(arr[bad][0])} out of range [0, {n})")
    return np.ascontiguousarray(arr)
