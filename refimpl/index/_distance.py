"""Row primitives of every kernel: inner product, squared distance, distance, squared norm, prefetch (Numba).

Rows may be float64 or float32; every sum is accumulated in float64 from the exact stored values, so a bound
computed from float32 rows is exactly as valid for them as one computed from float64 rows. Four independent
accumulators in a fixed order: deterministic results that the compiler can vectorise.
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
    """<A[i], B[j]> accumulated in float64."""
    d = A.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:
        s0 += np.float64(A[i, k]) * np.float64(B[j, k])
        s1 += np.float64(A[i, k + 1]) * np.float64(B[j, k + 1])
        s2 += np.float64(A[i, k + 2]) * np.float64(B[j, k + 2])
        s3 += np.float64(A[i, k + 3]) * np.float64(B[j, k + 3])
        k += 4
    while k < d:
        s0 += np.float64(A[i, k]) * np.float64(B[j, k])
        k += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True)
def sqdist(A, i, B, j):
    """||A[i] - B[j]||^2 accumulated in float64 (may underflow to 0 for tiny differences: see :func:`dist`)."""
    d = A.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:
        t0 = np.float64(A[i, k]) - np.float64(B[j, k])
        t1 = np.float64(A[i, k + 1]) - np.float64(B[j, k + 1])
        t2 = np.float64(A[i, k + 2]) - np.float64(B[j, k + 2])
        t3 = np.float64(A[i, k + 3]) - np.float64(B[j, k + 3])
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        k += 4
    while k < d:
        t0 = np.float64(A[i, k]) - np.float64(B[j, k])
        s0 += t0 * t0
        k += 1
    return (s0 + s1) + (s2 + s3)


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


@njit(cache=True)
def dot_sqdist(A, i, B, j):
    """(<A[i], B[j]>, ||A[i] - B[j]||^2) in one pass over the two rows."""
    d = A.shape[1]
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:
        x0 = np.float64(A[i, k])
        x1 = np.float64(A[i, k + 1])
        x2 = np.float64(A[i, k + 2])
        x3 = np.float64(A[i, k + 3])
        y0 = np.float64(B[j, k])
        y1 = np.float64(B[j, k + 1])
        y2 = np.float64(B[j, k + 2])
        y3 = np.float64(B[j, k + 3])
        a0 += x0 * y0
        a1 += x1 * y1
        a2 += x2 * y2
        a3 += x3 * y3
        s0 += (x0 - y0) * (x0 - y0)
        s1 += (x1 - y1) * (x1 - y1)
        s2 += (x2 - y2) * (x2 - y2)
        s3 += (x3 - y3) * (x3 - y3)
        k += 4
    while k < d:
        x0 = np.float64(A[i, k])
        y0 = np.float64(B[j, k])
        a0 += x0 * y0
        s0 += (x0 - y0) * (x0 - y0)
        k += 1
    return (a0 + a1) + (a2 + a3), (s0 + s1) + (s2 + s3)
