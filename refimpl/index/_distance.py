"""Row primitives of every kernel: inner product, squared distance, distance, squared norm, prefetch (Numba).

Rows may be float64 or float32; every sum is accumulated in float64 from the exact stored values, so a bound
computed from float32 rows is exactly as valid for them as one computed from float64 rows. One loop
(:func:`dot_sqdist`) computes both sums, vectorised by the compiler (reassociation only, see there).
Re-exported by :mod:`refimpl.index` as ``dot``, ``sqdist``, ``dist``, ``sqnorm``, ``dot_sqdist``, ``prefetch_row``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["dot", "sqdist", "dist", "sqnorm", "dot_sqdist", "prefetch_row"]


def _make_prefetch():
    """``prefetch(a, i, j)``: ask the CPU to load the cache line of a[i, j] (llvm.prefetch), so that random rows are
    fetched in parallel; a no-op if this llvmlite cannot emit it."""
    try:
        from llvmlite import ir  # optional: only the intrinsic needs llvmlite's IR builder
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic

        @intrinsic
        def prefetch(typingctx, arr, row, col):
            def codegen(context, builder, signature, args):
                aryty = signature.args[0]
                ary = context.make_array(aryty)(context, builder, args[0])
                r = context.cast(builder, args[1], signature.args[1], types.intp)
                c = context.cast(builder, args[2], signature.args[2], types.intp)
                ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r, c], wraparound=False)
                i8p = ir.IntType(8).as_pointer()
                fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
                i32 = ir.IntType(32)
                builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                  ir.Constant(i32, 1)])
                return context.get_dummy_value()

            return types.void(arr, row, col), codegen

        @njit
        def _probe(a):
            prefetch(a, 0, 0)

        _probe(np.zeros((1, 1)))
        return prefetch
    except Exception:  # pragma: no cover - depends on the llvmlite build
        @njit
        def prefetch(a, i, j):
            pass

        return prefetch


_prefetch = _make_prefetch()


@njit(cache=True)
def prefetch_row(A, i):
    """Prefetch row i of the 2-D array A (every 64-byte cache line of it)."""
    step = 64 // A.itemsize
    for j in range(0, A.shape[1], step):
        _prefetch(A, i, j)


@njit(cache=True)
def dot(A, i, B, j):
    """<A[i], B[j]> accumulated in float64 (the first half of :func:`dot_sqdist`; the compiler drops the rest)."""
    return dot_sqdist(A, i, B, j)[0]


@njit(cache=True)
def sqdist(A, i, B, j):
    """||A[i] - B[j]||^2 accumulated in float64 (may underflow to 0 for tiny differences: see :func:`dist`)."""
    return dot_sqdist(A, i, B, j)[1]


@njit(cache=True)
def dist(A, i, B, j):
    """||A[i] - B[j]||; exactly 0 iff the rows are identical (tiny differences are rescaled, never lost)."""
    s = sqdist(A, i, B, j)
    if s >= 1e-280:
        return math.sqrt(s)
    m = 0.0  # possible underflow of tiny differences: recompute scaled by the largest one
    for k in range(A.shape[1]):
        t = abs(np.float64(A[i, k]) - np.float64(B[j, k]))
        if t > m:
            m = t
    if m == 0.0:
        return 0.0
    s = 0.0
    for k in range(A.shape[1]):
        t = (np.float64(A[i, k]) - np.float64(B[j, k])) / m
        s += t * t
    return m * math.sqrt(s)


@njit(cache=True)
def sqnorm(A, i):
    """||A[i]||^2 accumulated in float64."""
    return dot(A, i, A, i)


@njit(cache=True, fastmath={"reassoc"})
def dot_sqdist(A, i, B, j):
    """(<A[i], B[j]>, ||A[i] - B[j]||^2) in one pass over the two rows, in float64.

    The only floating-point licence taken is reassociation of the two sums (so that the compiler vectorises
    them; ~3x faster than a strict order): no fused multiply-add, no assumption about NaN / Inf / signed zeros.
    The result is the exact sum up to a few ulps, deterministic on a given CPU type (the order is the compiler's
    choice for the vector width); every bound of the callers carries a rounding slack far larger than that."""
    a = 0.0
    s = 0.0
    for k in range(A.shape[1]):
        x = np.float64(A[i, k])
        y = np.float64(B[j, k])
        a += x * y
        t = x - y
        s += t * t
    return a, s
