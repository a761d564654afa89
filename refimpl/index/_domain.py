"""The numerical domain of an SG tree: the base, coordinate magnitudes and levels its level arithmetic supports.

Levels are integers l with radii b^l (paper §3.3). Outside this domain that arithmetic degenerates: a base too
close to 1 spreads a range of scales over astronomically many levels (b = 1 + 1e-9: ~1e10), a large base puts most
points in one child group (quadratic construction), magnitudes above MAX_ABS overflow squared distances, and
non-zero magnitudes below MIN_ABS allow subnormal differences where b^l is no longer exact. Inside it every level
satisfies |l| <= log(1e300) / log(MIN_BASE) < 70,000 < LEVEL_LIMIT.
"""
from __future__ import annotations

import numpy as np

from refimpl._validate import check_int, check_matrix, check_positive

__all__ = ["MIN_BASE", "MAX_BASE", "MAX_ABS", "MIN_ABS", "LEVEL_LIMIT", "DTYPES", "check_points", "check_base",
           "check_level", "check_dtype"]

MIN_BASE = 1.01
MAX_BASE = 16.0
MAX_ABS = 1e140
MIN_ABS = 1e-150
LEVEL_LIMIT = 100_000
DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


def check_dtype(dtype) -> np.dtype:
    """float64 or float32 (the point storage types); TypeError naming ``dtype`` otherwise."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float64 or float32, got {dtype!r}") from None
    if dt not in DTYPES:
        raise TypeError(f"dtype: expected float64 or float32, got {dt.name}")
    return dt


def check_points(name: str, points, dim: int | None = None, dtype=np.float64) -> np.ndarray:
    """(N, D) finite real points converted to ``dtype``, magnitudes in {0} U [MIN_ABS, MAX_ABS]; ValueError naming
    ``name`` (with the hint to rescale) otherwise."""
    arr = check_matrix(name, points, n_cols=dim, dtype=dtype)
    if arr.size:
        a = np.abs(arr)
        if float(a.max()) > MAX_ABS:
            raise ValueError(f"{name}: values must have magnitude <= {MAX_ABS:g} (squared distances would "
                             "overflow); rescale the data")
        tiny = (a > 0) & (a < MIN_ABS) if arr.dtype == np.float64 else None  # float32 cannot go below 1e-45
        if tiny is not None and tiny.any():
            raise ValueError(f"{name}: non-zero values must have magnitude >= {MIN_ABS:g} (got "
                             f"{float(a[tiny].min()):.3g}: differences could be subnormal and the levels b^l "
                             "inexact); rescale the data")
    return arr


def check_base(base) -> float:
    """The base b of the levels, a real number in [MIN_BASE, MAX_BASE]."""
    return check_positive("base", base, low=MIN_BASE, high=MAX_BASE)


def check_level(level, name: str = "level") -> int:
    """An integer level within +-LEVEL_LIMIT."""
    return check_int(name, level, low=-LEVEL_LIMIT, high=LEVEL_LIMIT)
