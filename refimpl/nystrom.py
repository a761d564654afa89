"""Nyström representations and regression re-encoding (paper §4, App. B, Alg. 5-6).

Notation. ``T`` (N x D) are target embeddings, ``q`` a query embedding, the kernel is the linear one,
``k(a, b) = <a, b>``. ``S`` picks d' landmark targets; ``L = S^T T`` (d' x D) holds their embeddings, so
``S^T K S = W = L L^T`` and a target's column of ``S^T K`` is ``L t``; a query's row of ``K S`` is ``L q``.

Representations (``split``):

* ``"paper"`` (default, the paper's split): target ``z_t = W^+ L t`` (its column of ``(S^T K S)^+ S^T K``), query
  ``z_q = L q`` (its row of ``K S``). Then ``<z_q, z_t> = q^T L^T W^+ L t = <q, P t>`` with ``P`` the orthogonal
  projector onto the span of the landmark embeddings: the Nyström approximation of ``<q, t>``.
* ``"symmetric"``: ``z_t = W^{+1/2} L t`` and ``z_q = W^{+1/2} L q``. Same inner products, but the map
  ``W^{+1/2} L = U V^T`` is a partial isometry, so Euclidean distances between target representations equal the
  distances between the projected embeddings (``||z_a - z_b|| = ||P(a - b)|| <= ||a - b||``): the tree's distance
  bounds (Prop. 1, certified ``eps = beta ||q|| rho``) keep the scale of the original space instead of being
  stretched by the condition number of ``W``.

Pseudo-inverse. ``W``'s eigendecomposition is computed through the SVD ``L = U Sigma V^T`` (``W = U Sigma^2 U^T``,
so the eigenvalues are ``sigma_i^2`` and nothing is squared numerically). Relative cut-off: eigen-directions with
``sigma_i <= rcond * sigma_max`` (i.e. ``lambda_i <= rcond^2 lambda_max``) are dropped; ``rcond = 1e-10`` by default,
far above the ~1e-15 singular values that rounding creates in a rank-deficient ``L``.

Nyström kernel-ridge re-encoding (Alg. 5, :class:`RegressionReEncoder`): every target keeps its cached
representation ``z``. A re-encode samples s' targets uniformly, encodes them with the current target encoder, and
fits a ridge regression ``y ≈ R phi`` from the cached representation to the new embedding, where
``phi = W^{+1/2} L P t`` are the isometric coordinates of the cached representation (``phi = U Sigma U^T z`` in the
paper split). With the linear kernel, kernel ridge regression through the d' landmarks (subset of regressors,
penalty ``alpha^T K_SS alpha = ||R||_F^2``) is exactly this ridge regression. The landmark embeddings are refreshed
with ``R`` (``L' = Phi_S R^T``), ``W'^+`` is recomputed, and every target's new representation is
``z' = (M C) z`` with the d' x d' matrix ``M = W'^+ L' R`` (``W'^{+1/2} L' R`` in the symmetric split): one
d' x d' product per target instead of N encoder calls.

Finding (tested): in the paper's split ``z = W^+ L t`` are the coefficients of ``P t`` in the landmark embeddings
(``P t = L^T z``). Alg. 5 maps the landmarks and the targets through the same ``R``, so whenever the d' landmark
embeddings are linearly independent (rank d' <= D) the product ``M C`` is the identity and every target keeps its
representation: the whole update is in the landmark embeddings, i.e. the query map ``z_q = L' q``. The tree over
paper-split representations therefore never moves after a regression re-encode; in the symmetric split the
representations (and the tree) move. We still perform the product as Alg. 5 states (it matters when rank < d').

[unstated in the paper] The ridge penalty: we minimise
``(1/s') sum ||y_j - R phi_j||^2 + lam * mean_eig(G) * ||R||_F^2`` with ``G = Phi_J^T Phi_J / s'``, so ``ridge`` is
dimensionless; the default 1e-3 was chosen by measurement (``python -m refimpl bench nystrom``, section ``ridge``).

Cost accounting: every operation records encoder calls (rows passed to ``encode_targets``) and floating-point
work computed from the shapes actually used (encoder: ``2 * nnz * dim`` plus normalisation; products
``2mnk``; thin SVD of an m x n matrix, m >= n, ``4mn^2 + 22n^3`` (Golub & Van Loan's R-SVD count)).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from refimpl._validate import as_rng, check_features, check_int, check_matrix, check_positive, check_vector
from refimpl.index import SGTree, sqdist
from refimpl.sampling import bounds

__all__ = [
    "Nystrom",
    "RegressionReEncoder",
    "select_landmarks",
    "LANDMARK_METHODS",
    "SPLITS",
    "encoder_flops",
    "svd_flops",
    "softmax_gap",
    "build_tree",
    "update_tree",
    "cluster_assignment",
    "default_level",
    "query_report",
]

LANDMARK_METHODS = ("uniform", "kmeans++", "rpcholesky")
SPLITS = ("paper", "symmetric")


# ----------------------------------------------------------------------------------------------- flop counts
def svd_flops(m: int, n: int) -> int:
    """Flops of a thin SVD of an m x n matrix with both factors (Golub & Van Loan R-SVD: 4 m n^2 + 22 n^3, m >= n)."""
    m, n = max(m, n), min(m, n)
    return int(4 * m * n * n + 22 * n ** 3)


def encoder_flops(encoder, X) -> int | None:
    """Floating-point work of ``encoder.encode_targets(X)``, or None when it cannot be determined.

    Uses ``encoder.target_flops(X)`` when the encoder provides it; otherwise, for a linear encoder with a
    ``B`` (dim x n_features) matrix, ``2 * dim * nnz`` (CSR) or ``2 * dim * n * n_features`` (dense) plus ``3 * dim``
    per row for the normalisation (square, sum, divide).
    """
    if hasattr(encoder, "target_flops"):
        return int(encoder.target_flops(X))
    B = getattr(encoder, "B", None)
    if B is None:
        return None
    dim = int(np.shape(B)[0])
    n = int(X.shape[0])
    work = 2 * dim * (int(X.nnz) if sp.issparse(X) else n * int(X.shape[1]))
    if getattr(encoder, "normalize", False):
        work += 3 * dim * n
    return int(work)


def _take_rows(X, ids):
    return X[ids]


# ----------------------------------------------------------------------------------------------- landmarks
def select_landmarks(n_landmarks: int, n_targets: int, *, method: str = "uniform", embeddings=None, rng=None):
    """Indices (int64) of ``n_landmarks`` distinct landmark targets (sorted for uniform, else in selection order).

    * ``"uniform"``: uniformly without replacement (the paper, §4); needs no embeddings.
    * ``"kmeans++"``: D^2 seeding on the embeddings (first uniform, then each next landmark with probability
      proportional to its squared distance to the nearest landmark already chosen): spread-out landmarks.
    * ``"rpcholesky"``: randomised pivoted Cholesky on the linear kernel: each next landmark with probability
      proportional to the residual diagonal ``||t||^2 - ||P t||^2`` (squared distance to the span of the chosen
      landmarks), which targets the Nyström error directly.

    When every remaining weight is zero (e.g. the span already holds every embedding), the next landmark is drawn
    uniformly among the unchosen targets.
    """
    n_targets = check_int("n_targets", n_targets, low=1)
    n_landmarks = check_int("n_landmarks", n_landmarks, low=1, high=n_targets)
    if method not in LANDMARK_METHODS:
        raise ValueError(f"method: expected one of {LANDMARK_METHODS}, got {method!r}")
    gen = as_rng(rng)
    if method == "uniform":
        return np.sort(gen.choice(n_targets, size=n_landmarks, replace=False)).astype(np.int64)
    if embeddings is None:
        raise ValueError(f"embeddings: landmark method {method!r} needs the target embeddings")
    E = check_matrix("embeddings", embeddings, n_rows=n_targets)
    sq = np.einsum("ij,ij->i", E, E)
    scale = max(float(sq.max()), np.finfo(float).tiny)
    chosen = np.zeros(n_targets, dtype=bool)
    out = np.empty(n_landmarks, dtype=np.int64)
    if method == "kmeans++":
        weight = np.full(n_targets, np.inf)
    else:
        weight = sq.copy()
        basis = []
    for j in range(n_landmarks):
        w = np.where(chosen, 0.0, weight)
        if j == 0 and method == "kmeans++":
            w = np.where(chosen, 0.0, 1.0)
        w = np.where(w > 1e-14 * scale, w, 0.0)
        total = float(w.sum())
        if total > 0 and np.isfinite(total):
            i = int(gen.choice(n_targets, p=w / total))
        else:
            i = int(gen.choice(np.flatnonzero(~chosen)))
        out[j] = i
        chosen[i] = True
        if method == "kmeans++":
            d2 = np.einsum("ij,ij->i", E - E[i], E - E[i])
            weight = np.minimum(weight, d2)
        else:
            r = E[i] - sum((E[i] @ b) * b for b in basis) if basis else E[i].copy()
            for b in basis:  # second Gram-Schmidt pass for orthogonality
                r -= (r @ b) * b
            nr2 = float(r @ r)
            if nr2 > 1e-20 * scale:
                b = r / np.sqrt(nr2)
                basis.append(b)
                weight = np.maximum(weight - (E @ b) ** 2, 0.0)
    return out


# ----------------------------------------------------------------------------------------------- Nyström
class Nystrom:
    """Nyström approximation of the linear kernel through d' landmark targets (paper §4, App. B).

    Parameters
    ----------
    n_landmarks : d', the number of landmarks (64 or 128 in the paper).
    method : landmark selection, one of :data:`LANDMARK_METHODS` (``"uniform"`` is the paper's).
    split : ``"paper"`` (target ``W^+ L t``, query ``L q``) or ``"symmetric"`` (both ``W^{+1/2} L x``); see the
        module docstring. Inner products are identical.
    rcond : relative cut-off on sqrt(eigenvalues of W) (= singular values of L) for the pseudo-inverse.
    rng : Generator or int seed (landmark selection).

    After :meth:`fit`: ``landmark_ids`` (int64, d'), ``landmark_embeddings`` (d' x D), ``eigenvalues`` of W
    (descending, kept ones), ``rank``.
    """

    def __init__(self, n_landmarks: int, *, method: str = "uniform", split: str = "paper", rcond: float = 1e-10,
                 rng=None):
        self.n_landmarks = check_int("n_landmarks", n_landmarks, low=1)
        if method not in LANDMARK_METHODS:
            raise ValueError(f"method: expected one of {LANDMARK_METHODS}, got {method!r}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        self.method = method
        self.split = split
        self.rcond = check_positive("rcond", rcond)
        if self.rcond >= 1:
            raise ValueError(f"rcond: must be < 1, got {self.rcond}")
        self.rng = as_rng(rng)
        self.landmark_ids = None
        self.landmark_embeddings = None

    # -- fitting
    def fit(self, embeddings, landmark_ids=None) -> "Nystrom":
        """Choose landmarks among the rows of ``embeddings`` (N x D target embeddings) and fit (Alg. 6 line 1-3)."""
        E = check_matrix("embeddings", embeddings)
        if landmark_ids is None:
            if self.n_landmarks > E.shape[0]:
                raise ValueError(f"n_landmarks: {self.n_landmarks} landmarks requested but only {E.shape[0]} targets")
            ids = select_landmarks(self.n_landmarks, E.shape[0], method=self.method, embeddings=E, rng=self.rng)
        else:
            ids = _check_landmark_ids(landmark_ids, E.shape[0], self.n_landmarks)
        self.landmark_ids = ids
        return self.fit_landmarks(E[ids])

    def fit_landmarks(self, landmark_embeddings) -> "Nystrom":
        """Fit from the landmark embeddings ``L`` (d' x D) directly (landmark ids unchanged)."""
        L = check_matrix("landmark_embeddings", landmark_embeddings, n_rows=self.n_landmarks, copy=True)
        U, s, Vt = np.linalg.svd(L, full_matrices=False)
        keep = s > self.rcond * s[0] if s.size and s[0] > 0 else np.zeros(s.shape, dtype=bool)
        r = int(keep.sum())
        self.landmark_embeddings = L
        self._U, self._s, self._Vt = U[:, :r], s[:r], Vt[:r]
        self.rank = r
        self.eigenvalues = s[:r] ** 2
        # target map (d' x D): W^+ L = U S^-1 V^T (paper) or W^{+1/2} L = U V^T (symmetric)
        if self.split == "paper":
            self._target_map = (self._U / self._s) @ self._Vt
            self._query_map = L
        else:
            self._target_map = self._U @ self._Vt
            self._query_map = self._target_map
        self.fit_flops = svd_flops(*L.shape) + 2 * self.n_landmarks * max(r, 1) * L.shape[1]
        return self

    def _check_fitted(self):
        if self.landmark_embeddings is None:
            raise RuntimeError("Nystrom: call fit() or fit_landmarks() first")

    @property
    def dim(self) -> int:
        """D, the dimension of the embeddings the landmarks live in."""
        self._check_fitted()
        return int(self.landmark_embeddings.shape[1])

    # -- representations
    def transform_targets(self, T) -> np.ndarray:
        """Target representations (n x d'): ``W^+ L t`` (paper) or ``W^{+1/2} L t`` (symmetric)."""
        self._check_fitted()
        T = _as_rows("T", T, self.dim)
        return T @ self._target_map.T

    def transform_queries(self, Q) -> np.ndarray:
        """Query representations (n x d'): ``L q`` = the row of ``K S`` (paper) or ``W^{+1/2} L q`` (symmetric)."""
        self._check_fitted()
        Q = _as_rows("Q", Q, self.dim)
        return Q @ self._query_map.T

    def isometric_coordinates(self, Z) -> np.ndarray:
        """``phi = W^{+1/2} L P t`` of target representations ``Z`` (n x d'): ``Z`` itself in the symmetric split,
        ``Z U Sigma U^T`` in the paper split. ``||phi_a - phi_b|| = ||P(a - b)||``."""
        self._check_fitted()
        Z = check_matrix("Z", Z, n_cols=self.n_landmarks, allow_empty=True)
        return Z @ self.coordinate_map().T

    def coordinate_map(self) -> np.ndarray:
        """The d' x d' matrix ``C`` with ``phi = C z`` (identity in the symmetric split, ``U Sigma U^T`` otherwise)."""
        self._check_fitted()
        if self.split == "symmetric":
            return np.eye(self.n_landmarks)
        return (self._U * self._s) @ self._U.T

    def reconstruct(self, Z) -> np.ndarray:
        """The D-dimensional embeddings implied by target representations: ``P t`` (n x D)."""
        return self.isometric_coordinates(Z) @ (self._U @ self._Vt)

    def project(self, T) -> np.ndarray:
        """``P t``: the orthogonal projection of embeddings onto the span of the landmark embeddings."""
        self._check_fitted()
        T = _as_rows("T", T, self.dim)
        return (T @ self._Vt.T) @ self._Vt

    def inner(self, Q, T) -> np.ndarray:
        """Nyström approximation of ``Q T^T`` (``<z_q, z_t>``)."""
        return self.transform_queries(Q) @ self.transform_targets(T).T


def _as_rows(name, X, dim):
    X = np.asarray(X, dtype=np.float64) if not sp.issparse(X) else X
    if getattr(X, "ndim", 0) == 1:
        X = check_vector(name, X, size=dim)[None, :]
    return check_matrix(name, X, n_cols=dim, allow_empty=True)


def _check_landmark_ids(ids, n, d):
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != d:
        raise ValueError(f"landmark_ids: expected {d} ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"landmark_ids: ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"landmark_ids: ids must lie in [0, {n})")
    if np.unique(arr).size != d:
        raise ValueError("landmark_ids: ids must be distinct")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------- Alg. 5-6
class RegressionReEncoder:
    """Cheap re-encoding of all targets by Nyström kernel ridge regression (Alg. 5), initial encoding (Alg. 6).

    Parameters
    ----------
    n_landmarks : d'.
    n_samples : s', targets re-encoded per :meth:`reencode` (8192 for NQ/MSMARCO, 256 for Zeshel in the paper).
    ridge : dimensionless ridge penalty (module docstring); 0 gives least squares (pseudo-inverse, same cut-off).
    method, split, rcond : passed to :class:`Nystrom`.
    rng : Generator or int seed: landmark selection and the s' samples of every re-encode.

    State after :meth:`initial_encode`: ``nystrom`` (the current :class:`Nystrom`), ``representations``
    (N x d', the cached target representations), ``encoder_calls`` (total rows encoded), ``history`` (one cost
    record per operation), ``last_cost``.
    """

    def __init__(self, n_landmarks: int = 128, n_samples: int = 256, *, ridge: float = 1e-3, method: str = "uniform",
                 split: str = "paper", rcond: float = 1e-10, rng=None):
        self.n_landmarks = check_int("n_landmarks", n_landmarks, low=1)
        self.n_samples = check_int("n_samples", n_samples, low=1)
        self.ridge = check_positive("ridge", ridge, allow_zero=True)
        self.rng = as_rng(rng)
        self.nystrom = Nystrom(self.n_landmarks, method=method, split=split, rcond=rcond, rng=self.rng)
        self.representations = None
        self.encoder_calls = 0
        self.history = []
        self.last_cost = None

    # -- helpers
    def _encode(self, encoder, X):
        """Encode rows ``X`` of the kept target rows: ``encoder.encode_targets(X)``, or ``encoder(X)`` when the
        encoder is a plain ``encode(ids)`` callable (then ``X`` holds target ids). Returns (Y, flops or None)."""
        if hasattr(encoder, "encode_targets"):
            Y, flops = encoder.encode_targets(X), encoder_flops(encoder, X)
        elif callable(encoder):
            Y, flops = encoder(X), None
        else:
            raise TypeError(f"encoder: expected an object with encode_targets(X) or an encode(ids) callable, "
                            f"got {type(encoder).__name__}")
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
            raise ValueError(f"encoder: returned shape {Y.shape} for {X.shape[0]} rows")
        if not np.all(np.isfinite(Y)):
            raise ValueError("encoder: returned NaN or Inf")
        self.encoder_calls += int(X.shape[0])
        return Y, flops

    def _record(self, kind, calls, enc_flops, linalg_flops):
        cost = {"kind": kind, "encoder_calls": int(calls), "encoder_flops": enc_flops,
                "linalg_flops": int(linalg_flops),
                "total_flops": None if enc_flops is None else int(enc_flops + linalg_flops)}
        self.history.append(cost)
        self.last_cost = cost
        return cost

    @property
    def n_targets(self) -> int:
        return 0 if self.representations is None else int(self.representations.shape[0])

    # -- Alg. 6
    def initial_encode(self, encoder, X_targets) -> np.ndarray:
        """Alg. 6: encode every target once, choose the landmarks, fit Nyström, store every representation.

        ``encoder``: an object with ``encode_targets(X)`` and ``X_targets`` the feature rows (dense or CSR, one row
        per target), or an ``encode(ids)`` callable and ``X_targets`` the 1-D array of target ids. ``X_targets`` is
        kept for later re-encodes. Returns the N x d'
        representations. The landmarks are targets, so their embeddings come from the same N encoder calls.
        """
        if not hasattr(encoder, "encode_targets") and callable(encoder):
            X = np.asarray(X_targets)
            if X.ndim != 1 or not np.issubdtype(X.dtype, np.integer):
                raise TypeError("X_targets: with an encode(ids) callable, expected a 1-D array of target ids")
            X = X.astype(np.int64)
        else:
            X = check_features("X_targets", X_targets)
        if self.n_landmarks > X.shape[0]:
            raise ValueError(f"n_landmarks: {self.n_landmarks} landmarks requested but only {X.shape[0]} targets")
        self.X = X
        T, enc = self._encode(encoder, X)
        ny = self.nystrom.fit(T)
        self.representations = ny.transform_targets(T)
        lin = ny.fit_flops + 2 * T.shape[0] * self.n_landmarks * T.shape[1]
        self._record("initial", X.shape[0], enc, lin)
        return self.representations

    def exact_reencode(self, encoder) -> np.ndarray:
        """Full re-encode with the same landmarks (the reference Alg. 5 avoids): N encoder calls."""
        self._check_ready()
        T, enc = self._encode(encoder, self.X)
        ny = self.nystrom.fit_landmarks(T[self.nystrom.landmark_ids])
        self.representations = ny.transform_targets(T)
        lin = ny.fit_flops + 2 * T.shape[0] * self.n_landmarks * T.shape[1]
        self._record("exact", T.shape[0], enc, lin)
        return self.representations

    def full_reencode_cost(self, encoder) -> dict:
        """Cost of :meth:`exact_reencode` (encoder calls and flops) without running it."""
        self._check_ready()
        D = self.nystrom.dim
        n = self.n_targets
        enc = encoder_flops(encoder, self.X)
        lin = svd_flops(self.n_landmarks, D) + 2 * self.n_landmarks * self.n_landmarks * D + 2 * n * self.n_landmarks * D
        return {"kind": "exact", "encoder_calls": n, "encoder_flops": enc, "linalg_flops": int(lin),
                "total_flops": None if enc is None else int(enc + lin)}

    def _check_ready(self):
        if self.representations is None:
            raise RuntimeError("RegressionReEncoder: call initial_encode() first")

    # -- Alg. 5
    def fit_regression(self, Phi, Y):
        """Ridge regression ``Y ≈ Phi R^T``; returns ``R^T`` (d' x D) and its flops. Solved through the SVD of
        ``Phi`` (s' x d'): ``R^T = V diag(d / (d^2 + s' mu)) U^T Y`` with ``mu = ridge * tr(Phi^T Phi) / (s' d')``;
        with ``ridge = 0`` singular values ``<= rcond * max`` are dropped (least squares, pseudo-inverse)."""
        Phi = check_matrix("Phi", Phi)
        Y = check_matrix("Y", Y, n_rows=Phi.shape[0])
        s, d = Phi.shape
        Uf, sv, Vt = np.linalg.svd(Phi, full_matrices=False)
        mu = self.ridge * float(np.sum(sv ** 2)) / (s * d)
        if self.ridge > 0 and mu > 0:
            filt = sv / (sv ** 2 + s * mu)
        else:
            keep = sv > self.nystrom.rcond * (sv[0] if sv.size else 0.0)
            filt = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
        RT = (Vt.T * filt) @ (Uf.T @ Y)
        k = sv.size
        flops = svd_flops(s, d) + 2 * k * s * Y.shape[1] + 2 * d * k * Y.shape[1]
        return RT, flops

    def reencode(self, encoder) -> np.ndarray:
        """Alg. 5 ApproximateReEncode: s' encoder calls plus one d' x d' product per target.

        1. sample s' targets uniformly (without replacement) and encode them with the current encoder;
        2. fit the ridge regression ``R`` from their cached isometric coordinates ``phi`` to the new embeddings;
        3. refresh the landmark embeddings ``L' = Phi_S R^T`` and refit Nyström (``W'^+``);
        4. every target: ``z' = (M C) z`` with ``M = W'^+ L' R`` (paper) or ``W'^{+1/2} L' R`` (symmetric).
        """
        self._check_ready()
        n, d = self.representations.shape
        if self.n_samples > n:
            raise ValueError(f"n_samples: s' = {self.n_samples} exceeds the number of targets {n}")
        ids = np.sort(self.rng.choice(n, size=self.n_samples, replace=False))
        Y, enc = self._encode(encoder, _take_rows(self.X, ids))
        if Y.shape[1] != self.nystrom.dim:
            raise ValueError(f"encoder: embeddings have dimension {Y.shape[1]}, the Nyström fit has {self.nystrom.dim}")
        C = self.nystrom.coordinate_map()
        Phi_J = self.representations[ids] @ C.T
        RT, lin = self.fit_regression(Phi_J, Y)
        Phi_S = self.representations[self.nystrom.landmark_ids] @ C.T
        L_new = Phi_S @ RT
        D = Y.shape[1]
        lin += 2 * d * d * d + 2 * d * d * (self.n_samples + d) + 2 * d * d * D  # C, Phi_J, Phi_S, L'
        ny = self.nystrom.fit_landmarks(L_new)
        M = ny._target_map @ RT.T          # d' x d': new representation from phi
        MC = M @ C                          # d' x d': new representation from the cached z
        self.representations = self.representations @ MC.T
        lin += ny.fit_flops + 2 * d * D * d + 2 * d * d * d + 2 * n * d * d
        self.last_sample = ids
        self._record("regression", self.n_samples, enc, lin)
        return self.representations

    # -- conveniences
    def query_representations(self, Q) -> np.ndarray:
        """Representations of query embeddings under the current (possibly regressed) landmarks."""
        return self.nystrom.transform_queries(Q)

    def approximate_embeddings(self) -> np.ndarray:
        """The D-dimensional target embeddings implied by the cached representations (N x D)."""
        self._check_ready()
        return self.nystrom.reconstruct(self.representations)

    def approximate_logits(self, Q, *, beta: float = 1.0) -> np.ndarray:
        """``beta <z_q, z_t>`` for query embeddings ``Q`` against every target (n_q x N)."""
        beta = check_positive("beta", beta)
        self._check_ready()
        return beta * (self.query_representations(Q) @ self.representations.T)


# ----------------------------------------------------------------------------------------------- measurements
def softmax_gap(approx_logits, true_logits) -> dict:
    """Row-wise gap between the softmax of ``approx_logits`` and of ``true_logits`` (n x N each): mean and max
    over rows of TV and of ``max_i |log P~_i - log P_i|``; mean and max absolute logit error."""
    A = check_matrix("approx_logits", approx_logits)
    B = check_matrix("true_logits", true_logits, n_rows=A.shape[0], n_cols=A.shape[1])
    la = A - A.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = B - B.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    tv = 0.5 * np.abs(np.exp(la) - np.exp(lb)).sum(axis=1)
    lr = np.abs(la - lb).max(axis=1)
    err = np.abs(A - B)
    return {"tv_mean": float(tv.mean()), "tv_max": float(tv.max()), "log_ratio_mean": float(lr.mean()),
            "log_ratio_max": float(lr.max()), "logit_err_mean": float(err.mean()), "logit_err_max": float(err.max())}


# ----------------------------------------------------------------------------------------------- tree integration
def build_tree(reencoder, *, base: float | None = None, rng=None):
    """An :class:`~refimpl.index.sgtree.SGTree` over the target representations (App. B.1). The tree stays Euclidean in
    representation space, so the certified bounds of ``refimpl.sampling.bounds`` hold for the approximate logits
    ``beta <z_q, z_t>`` with ``eps = beta ||z_q|| rho`` (``rho`` measured between representations)."""
    if not isinstance(reencoder, RegressionReEncoder):
        raise TypeError(f"reencoder: expected a RegressionReEncoder, got {type(reencoder).__name__}")
    reencoder._check_ready()
    kw = {} if base is None else {"base": base}
    return SGTree.build(reencoder.representations, rng=rng, **kw)


REBUILD_FRACTION = 0.5  # update_tree rebuilds the tree when at least this share of the live targets moved


@njit(cache=True)
def _row_moves(old, new, out):
    """out[i] = ||new[i] - old[i]||^2 (float64 sums; NaN or Inf wherever a row is not finite)."""
    for i in range(old.shape[0]):
        out[i] = sqdist(old, i, new, i)


def _representation_matrix(name, a, n_rows, n_cols):
    """``a`` as a C-contiguous (n_rows, n_cols) real array, float32 kept as float32 (no float64 copy of N x d'
    representations). Finiteness is left to :func:`update_tree` (its row moves are NaN / Inf exactly where a row
    is not finite), so that the representations are scanned once."""
    if sp.issparse(a):
        raise TypeError(f"{name}: expected a dense 2-D array, got a scipy.sparse matrix")
    raw = np.asarray(a)
    if raw.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real numbers (float or int), got dtype {raw.dtype}")
    arr = np.ascontiguousarray(raw, dtype=np.float32 if raw.dtype == np.float32 else np.float64)
    if arr.ndim != 2 or arr.shape != (n_rows, n_cols):
        raise ValueError(f"{name}: expected shape ({n_rows}, {n_cols}) (one row per target id), got {arr.shape}")
    return arr


def update_tree(tree, old_representations, new_representations, *, U: float | None = None, rng=None,
                rebuild_fraction: float = REBUILD_FRACTION, copy: bool = True) -> dict:
    """After a re-encode (Alg. 4: ApproximateReEncode, then UpdateSGTree): make ``tree`` an exactly valid SG tree
    over ``new_representations`` again.

    Two ways, chosen by the number of moved rows (rows equal to the old ones are not moved):

    * fewer than ``rebuild_fraction`` of the live targets moved: ``update_points`` (statistics made valid for the
      new points) then Alg. 3 ``maintain(U)``, which cuts and reinserts exactly the subtrees that the drift broke
      and keeps the rest with a margin ``U`` for further drift (Eq. 10/11);
    * otherwise (a re-encode moves every target): :meth:`SGTree.rebuild` over the new rows, a fresh batch build.
      After a re-encode Alg. 3 would reinsert almost every target anyway (``U`` exceeds the radii of the lower
      levels, and the moves themselves break most of their covering), so the rebuild gives the same guarantee
      (every invariant of a built tree, all statistics exact) for less work.

    Parameters
    ----------
    tree : SGTree whose rows are the old representations.
    old_representations, new_representations : (n_targets, d') finite arrays (float32 kept as float32); old None:
        the tree's own rows (no second copy is held).
    U : drift bound for Alg. 3; default ``2 max_i ||z'_i - z_i||``, the measured bound on how much any pairwise
        distance changed (the role of Prop. 6's U).
    rng : Generator or int seed (Alg. 3's rebuild order, or the rebuild's root and scan order).
    rebuild_fraction : share of moved live targets from which the tree is rebuilt, in [0, 1] (0: always rebuild;
        above 1: never).
    copy : with False and a rebuild, ``new_representations`` (C-contiguous, of the tree's dtype) becomes the tree's
        storage without a copy (for data near the memory limit; the caller must not modify it afterwards).

    Returns
    -------
    dict with ``U``, ``max_move``, ``n_moved``, ``method`` ("maintain" or "rebuild") and the counts
    ``clusters_rebuilt``, ``subtrees_reinserted``, ``points_reinserted``.
    """
    if not isinstance(tree, SGTree):
        raise TypeError(f"tree: expected an SGTree, got {type(tree).__name__}")
    if old_representations is None:
        old = tree.points[: tree.n_targets]
    else:
        old = _representation_matrix("old_representations", old_representations, n_rows=tree.n_targets,
                                     n_cols=tree.dim)
    new = _representation_matrix("new_representations", new_representations, n_rows=old.shape[0],
                                 n_cols=old.shape[1])
    frac = check_positive("rebuild_fraction", rebuild_fraction, allow_zero=True)
    moves = np.empty(old.shape[0])
    if old.dtype == new.dtype:
        _row_moves(old, new, moves)
    else:
        _row_moves(old.astype(np.float64), new.astype(np.float64), moves)
    if not np.isfinite(moves).all():
        i = int(np.flatnonzero(~np.isfinite(moves))[0])
        for name, arr in (("old_representations", old), ("new_representations", new)):
            if not np.isfinite(arr[i]).all():
                raise ValueError(f"{name}: contains NaN or Inf (row {i})")
        raise ValueError(f"old_representations, new_representations: the move of row {i} overflows float64 "
                         "(magnitudes beyond the tree's domain)")
    move = float(np.sqrt(moves.max()))
    U = 2.0 * move if U is None else check_positive("U", U, allow_zero=True)
    moved = moves > 0  # unchanged rows need no update
    del moves, old  # a rebuild needs neither (with copy=False and old=None the old rows are freed before it)
    n_moved = int(np.count_nonzero(moved))
    live = len(tree)
    if n_moved and n_moved >= frac * live:
        del moved
        tree.rebuild(new, rng=rng, copy=copy)
        stats = {"method": "rebuild", "clusters_rebuilt": 1, "subtrees_reinserted": 0, "points_reinserted": live}
    else:
        ids = np.flatnonzero(moved).astype(np.int64)
        if ids.size:
            tree.update_points(ids, new[ids], repair=False)
        stats = {"method": "maintain", **tree.maintain(U, rng=rng)}
    return {"U": U, "max_move": move, "n_moved": n_moved, **stats}


def cluster_assignment(tree, clustering) -> np.ndarray:
    """For every target id, the index (into ``clustering.nodes``) of its cluster at ``clustering.level``: the first
    ancestor (self included) whose ``node_level >= level`` (the data model's cluster(v, L)); the root when none."""
    ids = np.arange(tree.points.shape[0], dtype=np.int64)
    cur = tree.point_node[ids]
    live = cur >= 0
    cur = cur[live]
    L = clustering.level
    while True:
        up = (tree.node_level[cur] < L) & (tree.node_parent[cur] >= 0)
        if not up.any():
            break
        cur = np.where(up, tree.node_parent[cur], cur)
    pos = np.full(max(tree.n_nodes, 1), -1, dtype=np.int64)
    pos[clustering.nodes] = np.arange(clustering.nodes.size)
    out = np.full(ids.size, -1, dtype=np.int64)
    out[live] = pos[cur]
    return out


def default_level(tree, n_clusters: int | None = None) -> int:
    """The highest level whose clustering has at least ``n_clusters`` clusters (default ``ceil(sqrt(N))``)."""
    n = len(tree)
    want = int(np.ceil(np.sqrt(n))) if n_clusters is None else check_int("n_clusters", n_clusters, low=1)
    live = tree.node_point[: tree.n_nodes] >= 0
    levels = np.sort(tree.node_level[: tree.n_nodes][live])[::-1]
    return int(levels[min(want, levels.size) - 1])


def _log_softmax(x):
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def query_report(tree, reencoder, q, true_targets, *, beta: float, level: int | None = None,
                 clustering=None, assignment=None) -> dict:
    """For one query embedding ``q`` (D): the cluster proposal Q of Eq. 7 at ``level`` built from the approximate
    logits ``s~ = beta <z_q, z_t>`` over the tree of the representations, with

    * certified (``refimpl.sampling.bounds``, w.r.t. the approximate softmax P~): ``cert_log_gamma`` (log max P~/Q) and
      the log Z~ interval;
    * measured against P~: ``log_max_ratio_approx`` (<= the certificate), ``tv_q_approx``;
    * measured against the true softmax P of ``beta <q, t>`` (``true_targets`` N x D, the exact embeddings):
      ``tv_approx_true`` and ``log_ratio_approx_true`` (max |log P~/P|, the Nyström + regression error alone),
      ``tv_q_true`` and ``log_max_ratio_true`` (max log P/Q: what the sampler actually faces);
    * the clustering: level, number of clusters, mean and max radius (representation space).

    ``clustering`` (``tree.clustering(level)``) and ``assignment`` (:func:`cluster_assignment`) may be passed to
    reuse them across queries.
    """
    beta = check_positive("beta", beta)
    q = check_vector("q", q, size=reencoder.nystrom.dim)
    T = check_matrix("true_targets", true_targets, n_rows=reencoder.n_targets, n_cols=reencoder.nystrom.dim)
    zq = reencoder.query_representations(q)[0]
    s_approx = beta * (reencoder.representations @ zq)
    s_true = beta * (T @ q)
    if clustering is None:
        level = default_level(tree) if level is None else check_int("level", level)
        clustering = tree.clustering(level)
    cl = clustering
    level = cl.level
    eps = np.asarray(bounds.cluster_eps(beta, float(np.linalg.norm(zq)), cl.radii), dtype=np.float64)
    rep_logits = s_approx[cl.reps]
    lo, hi = bounds.log_partition_bounds(rep_logits, cl.sizes, eps)
    cert = float(bounds.certified_log_max_ratio(rep_logits, cl.sizes, eps))
    assign = cluster_assignment(tree, cl) if assignment is None else assignment
    log_zhat = float(np.log(np.sum(cl.sizes * np.exp(rep_logits - rep_logits.max()))) + rep_logits.max())
    log_q = rep_logits[assign] - log_zhat
    lp_a, lp_t = _log_softmax(s_approx), _log_softmax(s_true)
    return {"level": int(level), "n_clusters": int(cl.nodes.size), "radius_mean": float(cl.radii.mean()),
            "radius_max": float(cl.radii.max()), "eps_mean": float(eps.mean()),
            "cert_log_gamma": cert, "log_z_lo": float(lo), "log_z_hi": float(hi),
            "log_z_approx": float(s_approx.max() + np.log(np.exp(s_approx - s_approx.max()).sum())),
            "log_max_ratio_approx": float((lp_a - log_q).max()),
            "tv_q_approx": float(0.5 * np.abs(np.exp(lp_a) - np.exp(log_q)).sum()),
            "tv_approx_true": float(0.5 * np.abs(np.exp(lp_a) - np.exp(lp_t)).sum()),
            "log_ratio_approx_true": float(np.abs(lp_a - lp_t).max()),
            "tv_q_true": float(0.5 * np.abs(np.exp(lp_t) - np.exp(log_q)).sum()),
            "log_max_ratio_true": float((lp_t - log_q).max())}
