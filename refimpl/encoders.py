"""The linear dual encoder of refimpl: paper §2 with linear maps.

Query encoder ``f(x) = n(A x)`` and target encoder ``g(y) = n(B y)``, where ``A`` is ``dim x n_query_features``,
``B`` is ``dim x n_target_features`` and ``n`` is L2 normalisation (on by default: the paper's experiments use
unit-norm outputs, assumption A3 of paper §2) or the identity. The logit of Eq. 1 is ``s = beta <f(x), g(y)>``;
the encoder stores ``beta`` but applies it nowhere: the losses of :mod:`refimpl.softmax` do.

Inputs are dense 2-D arrays or ``scipy.sparse`` CSR matrices (one row per query / target). The sparse forward
(``X A^T``) and the sparse weight gradient (``G^T X``, a scatter) are Numba kernels that never densify ``X``; dense
inputs go through BLAS. Both give the same encodings to ~1e-15 (the order of a floating-point sum differs).

Tower initialisation (``init``): ``"independent"`` draws ``A`` and ``B`` separately; ``"shared"`` starts both from
the same random projection (``B = A`` at step 0, then trained separately), so that with a shared feature space the
initial logit ``beta <n(R x), n(R y)>`` is a random projection of the feature overlap ``<x, y>``
(Johnson-Lindenstrauss); ``tied=True`` keeps one matrix for both towers (a Siamese encoder, ``params == [A]``, the
gradient is the sum of both towers' gradients).

Fixed input weights (``query_weights``, ``target_weights``): optional positive per-feature weights ``w`` applied to
the input before the linear map, ``f(x) = n(A (w * x))`` (e.g. inverse document frequencies, so that a shared
random start projects the TF-IDF vector); they are part of the model, not trained, and every encoding and gradient
uses them. With Adam they also set how fast a feature's weights move relative to the others (Adam's step is
invariant to a gradient's scale, so the change of ``A[:, j] w_j`` per step is proportional to ``w_j``).

Sparse gradients: :meth:`LinearDualEncoder.gradients` returns, for CSR inputs, only the columns the batch touches
as ``(cols, values)`` pairs (the format of :class:`refimpl.optim.ColumnGrad`), at a cost independent of the number
of features.

Zero-norm rows under normalisation: a row whose raw encoding ``A x`` is exactly the zero vector (e.g. an all-zero
feature row) has no direction. We encode it as the zero vector (logit 0 against everything) and give it a zero
gradient, instead of producing NaN. This is the limit of ``z / max(||z||, eps)`` as ``eps -> 0`` and is the only
choice that keeps every output finite; no epsilon is added to non-zero norms, so all other rows are exactly unit.
Norms are computed with max-abs scaling, and under normalisation an input row whose largest entry lies outside
``[2^-400, 2^400]`` is first divided by that entry (``n(A x) = n(A x / s)`` for ``s > 0``, and the weight
gradient is unchanged by the same identity), so inputs of any finite magnitude (1e-310 or 1e308) encode
correctly. Without normalisation an encoding beyond the float64 range is a ValueError naming the input.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from refimpl._validate import (as_rng, check_features, check_int, check_matrix, check_positive, check_vector,
                               csr_arrays)

__all__ = ["LinearDualEncoder", "normalize_rows", "normalize_vjp"]


# --------------------------------------------------------------------------------------------------- kernels
# The parameters have shape (dim x F) by contract and are stored column-major (Fortran order), so that a feature
# column W[:, j] (all a sparse input touches) is contiguous: W.T is a C-contiguous (F x dim) array, read and
# written row by row by the kernels below. For a parameter someone replaced by a row-major array, the d-outer
# kernel reads one contiguous row W[d] at the non-zero positions (few non-zeros), or a transposed copy is made.
@njit(cache=True)
def _csr_times_wt(data, indices, indptr, W):  # pragma: no cover - compiled
    """``X @ W.T`` for CSR ``X`` (n x F) and dense ``W`` (dim x F), d-outer (few non-zeros)."""
    n = indptr.shape[0] - 1
    dim = W.shape[0]
    out = np.zeros((n, dim))
    for d in range(dim):
        Wd = W[d]
        for i in range(n):
            s = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                s += data[p] * Wd[indices[p]]
            out[i, d] = s
    return out


@njit(cache=True)
def _csr_times_w(data, indices, indptr, WT):  # pragma: no cover - compiled
    """``X @ WT`` for CSR ``X`` (n x F) and dense C-contiguous ``WT`` (F x dim): contiguous row reads."""
    n = indptr.shape[0] - 1
    dim = WT.shape[1]
    out = np.zeros((n, dim))
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = data[p]
            for d in range(dim):
                out[i, d] += v * WT[j, d]
    return out


@njit(cache=True)
def _csr_weight_grad_t(data, indices, indptr, Gz, outT):  # pragma: no cover - compiled
    """``outT += X.T @ Gz`` for CSR ``X`` (n x F), dense ``Gz`` (n x dim), C-contiguous ``outT`` (F x dim): a
    scatter of whole contiguous rows ``outT[j]`` (allocated by the caller with ``np.zeros``)."""
    n = indptr.shape[0] - 1
    dim = Gz.shape[1]
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            oj = outT[indices[p]]
            v = data[p]
            for d in range(dim):
                oj[d] += v * Gz[i, d]


# --------------------------------------------------------------------------------------- input scaling
_BIG, _SMALL = 2.0 ** 400, 2.0 ** -400


def _rescale_rows(X):
    """``X`` with every row whose max-abs ``s`` is outside ``[2^-400, 2^400]`` divided by ``s`` (a copy if any)."""
    a = np.abs(X.data if sp.issparse(X) else X)
    if a.size == 0:
        return X
    big = a.max()
    small = a[a > 0].min() if big > 0 else 1.0
    if big <= _BIG and small >= _SMALL:
        return X
    n = X.shape[0]
    s = np.zeros(n)
    if sp.issparse(X):
        nz = np.diff(X.indptr) > 0
        s[nz] = np.maximum.reduceat(a, X.indptr[:-1][nz])
    else:
        s = a.max(axis=1)
    bad = (s > 0) & ((s > _BIG) | (s < _SMALL))
    f = np.ones(n)
    f[bad] = s[bad]
    if sp.issparse(X):
        X = X.copy()
        X.data = X.data / np.repeat(f, np.diff(X.indptr))
        return X
    return X / f[:, None]


# ----------------------------------------------------------------------------------------- normalisation
def normalize_rows(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U, norms)`` with ``U[i] = Z[i] / ||Z[i]||`` and ``norms[i] = ||Z[i]||``; zero rows give ``U[i] = 0``.

    Max-abs scaling avoids underflow/overflow of the squared norm. ``norms`` may be ``inf`` for rows near the
    float64 limit (``U`` is still correct; the gradient of such a row is then 0).
    """
    n = Z.shape[0]
    scale = np.max(np.abs(Z), axis=1) if Z.shape[1] else np.zeros(n)
    nz = scale > 0
    U = np.zeros_like(Z)
    norms = np.zeros(n)
    if nz.any():
        Zs = Z[nz] / scale[nz, None]
        r = np.sqrt(np.einsum("ij,ij->i", Zs, Zs))  # in [1, sqrt(dim)]
        U[nz] = Zs / r[:, None]
        with np.errstate(over="ignore"):
            norms[nz] = scale[nz] * r
    return U, norms


def normalize_vjp(U: np.ndarray, norms: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Vector-Jacobian product of ``z -> z/||z||`` at ``z = norms * U``: ``(G - <G, U> U) / ||z||`` row-wise.

    Rows with zero (or infinite) norm get a zero gradient (see the module docstring).
    """
    ok = (norms > 0) & np.isfinite(norms)
    Gz = np.zeros_like(G)
    if ok.any():
        Gu, Uu = G[ok], U[ok]
        Gz[ok] = (Gu - np.einsum("ij,ij->i", Gu, Uu)[:, None] * Uu) / norms[ok, None]
    return Gz


# --------------------------------------------------------------------------------------------- encoder
class LinearDualEncoder:
    """Linear dual encoder ``q = n(A x)``, ``t = n(B y)`` with logits ``beta <q, t>`` (paper §2, Eq. 1).

    Parameters
    ----------
    n_query_features, n_target_features : input dimensions (>= 1).
    dim : embedding dimension D (>= 1).
    beta : inverse temperature (> 0, finite). Stored here, applied by the losses of :mod:`refimpl.softmax`.
    normalize : L2-normalise both encoders' outputs (the paper's setting; default ``True``).
    rng : Generator or int seed for the initialisation.
    init_scale : entries of ``A`` (``B``) are drawn i.i.d. ``N(0, init_scale^2 / n_query_features)``
        (``/ n_target_features``), so a raw encoding has squared norm about ``init_scale^2 dim ||x||^2 / F``.
    init : ``"independent"`` (``A`` and ``B`` drawn separately) or ``"shared"`` (``B`` starts as a copy of ``A``;
        needs ``n_query_features == n_target_features``).
    tied : one matrix for both towers (``B is A``; ``params == [A]``; needs equal feature counts).
    query_weights, target_weights : None or a (n_query_features,) / (n_target_features,) array of positive finite
        fixed input weights ``w`` (module docstring): ``f(x) = n(A (w * x))``, ``g(y) = n(B (w' * y))``.

    Attributes
    ----------
    A : (dim, n_query_features) float64, stored column-major (each feature's weights contiguous, the layout the
    sparse kernels and the lazy optimiser read). B : (dim, n_target_features) float64, likewise. Both may be
    updated in place
    (e.g. by :class:`refimpl.optim.Adam` through :attr:`params`); reassigning them is allowed if the shape and dtype
    stay the same.
    """

    def __init__(self, n_query_features: int, n_target_features: int, dim: int, *, beta: float = 20.0,
                 normalize: bool = True, rng=None, init_scale: float = 1.0, init: str = "independent",
                 tied: bool = False, query_weights=None, target_weights=None):
        nq = check_int("n_query_features", n_query_features, low=1, itemsize=8)
        nt = check_int("n_target_features", n_target_features, low=1, itemsize=8)
        self.dim = check_int("dim", dim, low=1, itemsize=8 * (nq + nt))  # A and B: dim x (nq + nt) float64
        self.beta = beta
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
        self.normalize = bool(normalize)
        init_scale = check_positive("init_scale", init_scale)
        if init not in ("independent", "shared"):
            raise ValueError(f"init: expected 'independent' or 'shared', got {init!r}")
        if not isinstance(tied, (bool, np.bool_)):
            raise TypeError(f"tied: expected a bool, got {type(tied).__name__}")
        if (init == "shared" or tied) and nq != nt:
            raise ValueError(f"{'tied' if tied else 'init'}: one matrix for both towers needs n_query_features == "
                             f"n_target_features, got {nq} and {nt}")
        self.query_weights = _check_weights("query_weights", query_weights, nq)
        self.target_weights = _check_weights("target_weights", target_weights, nt)
        gen = as_rng(rng)
        self.A = np.asfortranarray(gen.standard_normal((self.dim, nq)) * (init_scale / np.sqrt(nq)))
        if tied:
            self.B = self.A
        elif init == "shared":
            self.B = self.A.copy(order="F")
        else:
            self.B = np.asfortranarray(gen.standard_normal((self.dim, nt)) * (init_scale / np.sqrt(nt)))

    # ----------------------------------------------------------------------------------------- attributes
    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        self._beta = check_positive("beta", value)

    @property
    def n_query_features(self) -> int:
        return self.A.shape[1]

    @property
    def n_target_features(self) -> int:
        return self.B.shape[1]

    @property
    def tied(self) -> bool:
        """True when both towers are one matrix (``B is A``)."""
        return self.B is self.A

    @property
    def params(self) -> list[np.ndarray]:
        """``[A, B]`` (``[A]`` when tied): the live parameter arrays (updating them in place updates the encoder)."""
        return [self.A] if self.tied else [self.A, self.B]

    def copy(self) -> "LinearDualEncoder":
        """A deep copy (independent ``A`` and ``B``)."""
        new = object.__new__(LinearDualEncoder)
        new.dim = self.dim
        new._beta = self._beta
        new.normalize = self.normalize
        new.A = np.array(self.A, dtype=np.float64, copy=True)
        new.B = new.A if self.tied else np.array(self.B, dtype=np.float64, copy=True)
        new.query_weights, new.target_weights = self.query_weights, self.target_weights  # fixed, read-only
        return new

    def __repr__(self) -> str:
        return (f"LinearDualEncoder(n_query_features={self.n_query_features}, "
                f"n_target_features={self.n_target_features}, dim={self.dim}, beta={self.beta}, "
                f"normalize={self.normalize}{', tied=True' if self.tied else ''})")

    # -------------------------------------------------------------------------------------------- forward
    def _weights(self, name: str) -> np.ndarray:
        W = getattr(self, name)
        if not isinstance(W, np.ndarray) or W.dtype != np.float64 or W.ndim != 2 or W.shape[0] != self.dim:
            raise ValueError(f"{name}: encoder parameter must be a float64 array with {self.dim} rows, got "
                             f"{type(W).__name__} {getattr(W, 'dtype', '')} {getattr(W, 'shape', '')}")
        return W

    @staticmethod
    def _linear(W: np.ndarray, X) -> np.ndarray:
        if sp.issparse(X):
            data, indices, indptr = csr_arrays(X)
            if W.T.flags.c_contiguous or data.shape[0] >= W.shape[1]:
                return _csr_times_w(data, indices, indptr, np.ascontiguousarray(W.T))
            return _csr_times_wt(data, indices, indptr, np.ascontiguousarray(W))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by _forward, naming its cause
            return X @ W.T

    def _forward(self, name: str, X, arg: str):
        """``(X used, U or Z, norms or None)``; under normalisation ``X`` is row-rescaled (module docstring)."""
        W = self._weights(name)
        X = check_features(arg, X, n_cols=W.shape[1])
        w = self.query_weights if name == "A" else self.target_weights
        if w is not None:
            if sp.issparse(X):
                X = X.copy()
                X.data = X.data * w[X.indices]
            else:
                X = X * w
        if self.normalize:
            X = _rescale_rows(X)
        Z = self._linear(W, X)
        if not np.all(np.isfinite(Z)):
            if not np.all(np.isfinite(W)):
                raise ValueError(f"{name}: encoder parameter contains NaN or Inf")
            if self.normalize:
                raise ValueError(f"{name}: encoder parameter too large: the encoding overflows float64")
            raise ValueError(f"{arg}: features too large: the encoding {arg} {name}^T overflows float64 "
                             f"(rescale the features or use normalize=True)")
        if self.normalize:
            U, norms = normalize_rows(Z)
            return X, U, norms
        return X, Z, None

    def encode_queries(self, X) -> np.ndarray:
        """Query embeddings ``n(X A^T)``, shape (n, dim). ``X``: dense (n, n_query_features) or CSR."""
        return self._forward("A", X, "X")[1]

    def encode_targets(self, X) -> np.ndarray:
        """Target embeddings ``n(X B^T)``, shape (n, dim). ``X``: dense (n, n_target_features) or CSR."""
        return self._forward("B", X, "X")[1]

    def logits(self, Xq, Xt) -> np.ndarray:
        """``beta * Q T^T`` (Eq. 1's logits), shape (n_queries, n_targets)."""
        return self.beta * (self.encode_queries(Xq) @ self.encode_targets(Xt).T)

    # ------------------------------------------------------------------------------------------ gradients
    def _vjp(self, name: str, X, G, *, columns: bool = False):
        """Dense ``(dim, F)`` gradient, or ``(cols, values)`` over the touched columns when ``columns`` and CSR."""
        X, U, norms = self._forward(name, X, "X")
        G = check_matrix("G", G, n_rows=U.shape[0], n_cols=self.dim)
        Gz = normalize_vjp(U, norms, G) if self.normalize else G
        if sp.issparse(X):
            data, indices, indptr = csr_arrays(X)
            if columns:
                cols = np.unique(indices)
                outT = np.zeros((cols.size, self.dim))
                _csr_weight_grad_t(data, np.searchsorted(cols, indices), indptr, np.ascontiguousarray(Gz), outT)
                return cols, outT.T
            outT = np.zeros((X.shape[1], self.dim))
            _csr_weight_grad_t(data, indices, indptr, np.ascontiguousarray(Gz), outT)
            return outT.T
        return Gz.T @ X

    def query_vjp(self, X, G) -> np.ndarray:
        """``d/dA sum_i <G_i, f(x_i)>``, shape (dim, n_query_features), through the normalisation when on.

        For CSR ``X`` this is a Numba scatter ``G_z^T X`` (``X`` is never densified), with
        ``G_z = (G - <G, u> u)/||A x||`` under normalisation and ``G_z = G`` otherwise.
        """
        return self._vjp("A", X, G)

    def target_vjp(self, X, G) -> np.ndarray:
        """``d/dB sum_i <G_i, g(y_i)>``, shape (dim, n_target_features); see :meth:`query_vjp`."""
        return self._vjp("B", X, G)

    def gradients(self, Xq, Gq, Xt, Gt, *, sparse: bool = True) -> list:
        """Gradient of ``sum_i <Gq_i, f(xq_i)> + sum_j <Gt_j, g(xt_j)>`` per entry of :attr:`params`.

        Parameters
        ----------
        Xq : (n, n_query_features) dense or CSR; Gq : (n, dim). Xt : (m, n_target_features); Gt : (m, dim).
        sparse : for a CSR input return ``(cols, values)`` with ``cols`` the sorted distinct feature columns of the
            input and ``values`` (dim, len(cols)) the gradient's columns there (zero elsewhere); a dense input
            always gives a dense (dim, F) gradient.

        Returns ``[dA, dB]``, or ``[dA + dB]`` when tied (as a column pair over the union of the columns when both
        are column pairs).
        """
        gA = self._vjp("A", Xq, Gq, columns=sparse)
        gB = self._vjp("B", Xt, Gt, columns=sparse)
        if not self.tied:
            return [gA, gB]
        if isinstance(gA, tuple) and isinstance(gB, tuple):
            cols = np.union1d(gA[0], gB[0])
            vals = np.zeros((cols.size, self.dim))
            vals[np.searchsorted(cols, gA[0])] += gA[1].T
            vals[np.searchsorted(cols, gB[0])] += gB[1].T
            return [(cols, vals.T)]
        return [_densify(gA, self.A.shape) + _densify(gB, self.A.shape)]


def _check_weights(name: str, w, n: int):
    """None, or a read-only float64 copy of ``w`` checked to be (n,), finite and positive."""
    if w is None:
        return None
    w = check_vector(name, w, size=n).copy()
    if not np.all(w > 0):
        raise ValueError(f"{name}: input weights must be positive")
    w.flags.writeable = False
    return w


def _densify(g, shape) -> np.ndarray:
    """A dense array from a dense gradient or a ``(cols, values)`` pair."""
    if not isinstance(g, tuple):
        return g
    out = np.zeros(shape, order="F")
    out[:, g[0]] = g[1]
    return out
