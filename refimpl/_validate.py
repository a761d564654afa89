"""Input validation and randomness helpers shared by every module.

Bad input gets a clear ``ValueError``/``TypeError`` naming the argument, never a silent
NaN, a crash inside Numba, or a hang. Every random function takes ``rng`` (a
``numpy.random.Generator`` or an int seed); :func:`as_rng` is the one place that turns it into a Generator.
"""
from __future__ import annotations

import numbers
import os

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
    "INT_LIMIT",
]

INT_LIMIT = 2**62  # |integer arguments| above this are refused (int64 arithmetic in the kernels must not overflow)
_REAL_KINDS = "fiu"  # dtype kinds accepted as real numbers (bool, complex, object, strings are refused)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 2**48


def _real_array(name: str, a, dtype, what: str) -> np.ndarray:
    """``a`` as an array of real numbers converted to ``dtype``; TypeError naming ``name`` for bool, complex,
    object, string or ragged input (nothing is dropped or coerced silently)."""
    if sp.issparse(a):
        raise TypeError(f"{name}: expected a dense {what} array, got a scipy.sparse matrix")
    try:
        raw = np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot be converted to a numeric array ({exc})") from None
    if raw.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"{name}: expected real numbers (float or int), got dtype {raw.dtype}")
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(raw, dtype=dtype)
    if arr.size and raw.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        if np.all(np.isfinite(raw)):
            raise ValueError(f"{name}: values overflow {np.dtype(dtype).name}")
    return arr


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
    """Validate a dense 2-D array of real numbers and return it as a C-contiguous array of ``dtype``.

    TypeError (naming ``name``) for sparse, bool, complex, object or string input; ValueError for a wrong shape,
    an empty array (unless ``allow_empty``), NaN/Inf, or values that overflow ``dtype``."""
    arr = _real_array(name, a, dtype, "2-D")
    if copy and isinstance(a, np.ndarray) and np.shares_memory(arr, a):
        arr = arr.copy()
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 rows)")
    if not allow_empty and arr.shape[1] == 0:
        raise ValueError(f"{name}: has no columns (shape {arr.shape})")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ValueError(f"{name}: expected {n_rows} rows, got {arr.shape[0]}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise ValueError(f"{name}: expected {n_cols} columns, got {arr.shape[1]}")
    _check_finite(name, arr)
    return arr


def check_vector(name: str, v, *, dtype=np.float64, size: int | None = None) -> np.ndarray:
    """Validate a finite 1-D array of real numbers (e.g. a query embedding) and return it contiguous (same
    TypeError / ValueError classes as :func:`check_matrix`)."""
    arr = _real_array(name, v, dtype, "1-D")
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
        if X.dtype.kind not in _REAL_KINDS:
            raise TypeError(f"{name}: expected real numbers (float or int), got dtype {X.dtype}")
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


def check_positive(name: str, value, *, allow_zero: bool = False, low: float | None = None,
                   high: float | None = None) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``), optionally within [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name}: must be finite, got {value}") from None
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    if low is not None and v < low:
        raise ValueError(f"{name}: must be >= {low:g}, got {v:g}")
    if high is not None and v > high:
        raise ValueError(f"{name}: must be <= {high:g}, got {v:g}")
    return v


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              itemsize: int | None = None) -> int:
    """An integer in [low, high] (either end optional) and within +-:data:`INT_LIMIT` always.

    ``itemsize``: the value counts items of that many bytes that will be allocated; a value whose allocation
    would exceed the machine's physical memory is refused here (ValueError naming ``name``, not a MemoryError
    later)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name}: must be <= {high}, got {v}")
    if abs(v) > INT_LIMIT:
        raise ValueError(f"{name}: must have magnitude <= 2**62, got {v}")
    if itemsize is not None and v * itemsize > _physical_memory():
        raise ValueError(f"{name}: {v} items of {itemsize} bytes exceed this machine's memory "
                         f"({_physical_memory() / 2**30:.0f} GiB)")
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
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= n)  # before the cast to int64: a huge uint64 must not wrap around
    if bad.any():
        raise ValueError(f"{name}: id {int(arr[bad][0])} out of range [0, {n})")
    return np.ascontiguousarray(arr, dtype=np.int64)
