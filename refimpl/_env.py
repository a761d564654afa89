"""Process-level settings applied by the entry points (CLI, ``python -m figures``, ``python -m proofs_check``,
the test suite), never on ``import refimpl``: a library must not change its host process behind its back."""
import os

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_blas() -> None:
    """Ask BLAS for one thread unless the user chose otherwise (effective only before NumPy is first imported).

    refimpl multiplies many small matrices; on a shared 2-core machine multi-threaded OpenBLAS was measured 2-5x
    slower for a training run and up to 100x slower for a 30000 x 16 mat-vec, and timings against a threaded
    baseline would be noise. Benchmarks compare single-threaded against single-threaded.
    """
    for var in _THREAD_VARS:
        os.environ.setdefault(var, "1")
