"""Synthetic data with known structure, and the dataset type shared with the text loader.

- :func:`hierarchical_points` is the point cloud every benchmark and sampler test uses for "the planted
  hierarchical data": a Gaussian mixture of clusters of clusters, optionally projected onto the unit sphere (the
  paper's regime, A3 of paper §2).
- :func:`planted_dataset` is the planted retrieval task of the demo (paper §5 in miniature): hierarchical
  targets with near-duplicates inside fine clusters, a planted teacher dual encoder, and queries whose positives
  are drawn from the teacher's softmax (Eq. 1).

:func:`planted_dataset` and the text loader (:func:`refimpl.text.load_text_pairs`) both return a
:class:`RetrievalDataset`, the one input type of :func:`refimpl.training.train`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from numba import njit

from refimpl._validate import as_rng, check_features, check_int, check_positive
from refimpl.encoders import LinearDualEncoder

__all__ = ["hierarchical_points", "RetrievalDataset", "planted_dataset"]


def hierarchical_points(n: int, dim: int, *, branching=(16, 16), scales=(1.0, 0.35, 0.12), unit_norm: bool = True,
                        rng=None, dtype=np.float64) -> np.ndarray:
    """``n`` points in ``R^dim`` drawn from a hierarchical Gaussian mixture (clusters of clusters).

    Level 0 draws ``branching[0]`` centres ~ N(0, scales[0]^2 I / dim); each centre at level j spawns
    ``branching[j]`` children ~ N(parent, scales[j]^2 I / dim); every point is a leaf centre plus
    N(0, scales[-1]^2 I / dim) noise. The per-coordinate ``1/dim`` keeps the expected squared offset at ``scale^2``
    whatever the dimension. With ``unit_norm`` each point is scaled to norm 1 (A3).

    Parameters
    ----------
    n, dim : number of points (>= 1) and dimension (>= 1).
    branching : children per centre at each level of the mixture (len(scales) == len(branching) + 1).
    scales : standard deviation (total, across all coordinates) of each level's offsets and of the leaf noise.
    rng : Generator or int seed.
    dtype : float64 (default) or float32 output (computed in float64 in chunks, so 1e7 points need no float64
        copy of the whole matrix).
    """
    n = check_int("n", n, low=1)
    dim = check_int("dim", dim, low=1)
    branching = tuple(check_int("branching", b, low=1) for b in branching)
    scales = tuple(check_positive("scales", s, allow_zero=True) for s in scales)
    if len(scales) != len(branching) + 1:
        raise ValueError(f"scales: expected {len(branching) + 1} values (one per level plus the leaf noise), "
                         f"got {len(scales)}")
    gen = as_rng(rng)
    centres, sd = _mixture_centres(dim, branching, scales, gen)
    leaf = gen.integers(0, centres.shape[0], size=n)
    out = np.empty((n, dim), dtype=dtype)
    step = max(1, 2**22 // dim)  # rows per chunk: the same random stream (and values) as one draw, bounded memory
    for s in range(0, n, step):
        pts = centres[leaf[s:s + step]] + gen.normal(0.0, scales[-1] * sd, size=(min(step, n - s), dim))
        if unit_norm:
            norms = np.linalg.norm(pts, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            pts /= norms
        out[s:s + step] = pts
    return out


# ----------------------------------------------------------------------------------------------------------------
# The dataset type shared by the planted task and the text loader
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalDataset:
    """A retrieval task: queries, targets, the positive targets of every query, and a train/test split.

    Attributes
    ----------
    query_features : (n_queries, n_query_features) float64 array or CSR matrix.
    target_features : (n_targets, n_target_features) float64 array or CSR matrix.
    positives : list of 1-D int64 arrays, one per query (row ids of ``target_features``; several allowed).
    train_ids, test_ids : disjoint int64 arrays of query ids.
    teacher_A, teacher_B, teacher_beta : the planted teacher dual encoder (None for real data); see
        :attr:`teacher`.
    metadata : generator parameters and diagnostics (cluster labels, teacher statistics, file paths ...).
    target_names : the external target ids of a text dataset (None for planted data).
    """

    query_features: object
    target_features: object
    positives: list
    train_ids: np.ndarray
    test_ids: np.ndarray
    teacher_A: np.ndarray | None = None
    teacher_B: np.ndarray | None = None
    teacher_beta: float | None = None
    metadata: dict = field(default_factory=dict)
    target_names: list | None = None

    @property
    def n_targets(self) -> int:
        return int(self.target_features.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.query_features.shape[0])

    @property
    def teacher(self):
        """The planted teacher as a :class:`refimpl.encoders.LinearDualEncoder` (unit-norm outputs), or None."""
        if self.teacher_A is None:
            return None
        dim, fq = self.teacher_A.shape
        enc = LinearDualEncoder(fq, self.teacher_B.shape[1], dim, beta=self.teacher_beta, normalize=True, rng=0)
        enc.A[...] = self.teacher_A
        enc.B[...] = self.teacher_B
        return enc

    def validate(self) -> "RetrievalDataset":
        """Check shapes, id ranges and the split; raise ValueError naming the offending field."""
        self.query_features = check_features("query_features", self.query_features)
        self.target_features = check_features("target_features", self.target_features)
        n, nq = self.n_targets, self.n_queries
        if len(self.positives) != nq:
            raise ValueError(f"positives: expected one array per query ({nq}), got {len(self.positives)}")
        for i, p in enumerate(self.positives):
            p = np.asarray(p)
            if p.ndim != 1 or p.size == 0:
                raise ValueError(f"positives[{i}]: expected a non-empty 1-D array of target ids")
            if not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= n:
                raise ValueError(f"positives[{i}]: target ids must be integers in [0, {n})")
        for name in ("train_ids", "test_ids"):
            ids = np.asarray(getattr(self, name))
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"{name}: expected a non-empty 1-D array of query ids")
            if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= nq:
                raise ValueError(f"{name}: query ids must be integers in [0, {nq})")
        if np.intersect1d(self.train_ids, self.test_ids).size:
            raise ValueError("train_ids, test_ids: the split overlaps")
        return self


def _normalize_rows(M: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return M / norms


def _embed(F, W: np.ndarray) -> np.ndarray:
    """Unit-norm rows of ``F @ W.T`` for a dense or CSR feature matrix (the teacher's forward pass)."""
    return _normalize_rows(np.asarray(F @ W.T))


# ----------------------------------------------------------------------------------------------------------------
# The planted task
# ----------------------------------------------------------------------------------------------------------------
def _mixture_centres(dim, branching, scales, gen):
    """Leaf centres of the hierarchical Gaussian mixture (level j adds N(0, scales[j]^2 I / dim) offsets) and the
    leaf noise's standard deviation scale 1/sqrt(dim)."""
    sd = 1.0 / np.sqrt(dim)
    centres = gen.normal(0.0, scales[0] * sd, size=(branching[0], dim))
    for j in range(1, len(branching)):
        offsets = gen.normal(0.0, scales[j] * sd, size=(centres.shape[0], branching[j], dim))
        centres = (centres[:, None, :] + offsets).reshape(-1, dim)
    return centres, sd


def _mixture(n, dim, branching, scales, gen):
    """The hierarchical Gaussian mixture of :func:`hierarchical_points` (not normalised) and each point's leaf."""
    centres, sd = _mixture_centres(dim, branching, scales, gen)
    leaf = gen.integers(0, centres.shape[0], size=n)
    return centres[leaf] + gen.normal(0.0, scales[-1] * sd, size=(n, dim)), leaf.astype(np.int64)


def _mixture_labels(n, dim, branching, scales, gen):
    """Unit-norm rows of :func:`_mixture` with their (coarse, fine) labels."""
    pts, leaf = _mixture(n, dim, branching, scales, gen)
    coarse = leaf // int(np.prod(branching[1:], dtype=np.int64))
    return _normalize_rows(pts), coarse.astype(np.int64), leaf


@njit(cache=True)
def _dot(a, b):
    s = 0.0
    for d in range(a.shape[0]):
        s += a[d] * b[d]
    return s


@njit(cache=True)
def _insert(best_s, best_i, s, t):
    """Insert (s, t) into the descending top list (ties: smaller id first) if it belongs there."""
    k = best_s.shape[0]
    if not (s > best_s[k - 1] or (s == best_s[k - 1] and t < best_i[k - 1])):
        return
    p = k - 1
    while p > 0 and (best_s[p - 1] < s or (best_s[p - 1] == s and best_i[p - 1] > t)):
        best_s[p] = best_s[p - 1]
        best_i[p] = best_i[p - 1]
        p -= 1
    best_s[p] = s
    best_i[p] = t


@njit(cache=True)
def _exact_top_kernel(Qt, T, UB, members, ptr, k, out):
    """Exact top-k of <q, t> over all targets for every query, by branch and bound over the planted clusters.

    Cluster f holds the targets ``members[ptr[f]:ptr[f+1]]``; ``UB[b, f]`` = <q_b, c_f> + ||q_b|| r_f bounds every
    score in it (Cauchy-Schwarz, r_f >= max ||t - c_f||). Clusters are scanned by decreasing bound until k scores
    are known, then every cluster whose bound reaches the k-th best score (up to a rounding slack) is scanned: the
    result is the brute-force top k in decreasing score order (ties: smaller id first), written to ``out``."""
    nq, nf = UB.shape
    best_s = np.empty(k, np.float64)
    best_i = np.empty(k, np.int64)
    done = np.zeros(nf, np.bool_)
    for b in range(nq):
        q = Qt[b]
        best_s[:] = -np.inf
        best_i[:] = -1
        done[:] = False
        filled = 0
        while filled < k:  # the clusters of largest bound first, until k scores are known
            f = -1
            m = -np.inf
            for g in range(nf):
                if not done[g] and UB[b, g] > m:
                    m = UB[b, g]
                    f = g
            if f < 0:
                break
            done[f] = True
            for x in range(ptr[f], ptr[f + 1]):
                t = members[x]
                _insert(best_s, best_i, _dot(q, T[t]), t)
                filled += 1
        for f in range(nf):
            u = UB[b, f]
            if done[f] or u + 1e-9 * (abs(u) + 1.0) < best_s[k - 1]:
                continue
            for x in range(ptr[f], ptr[f + 1]):
                t = members[x]
                _insert(best_s, best_i, _dot(q, T[t]), t)
        out[b] = best_i


def _cluster_stats(T, labels, n_groups):
    """Per group: ptr into ``members`` (targets sorted by label), centre (mean) and radius (max distance)."""
    members = np.argsort(labels, kind="stable").astype(np.int64)
    counts = np.bincount(labels, minlength=n_groups)
    ptr = np.zeros(n_groups + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    sums = np.zeros((n_groups, T.shape[1]))
    np.add.at(sums, labels, T)
    centres = sums / np.maximum(counts, 1)[:, None]
    d = np.linalg.norm(T - centres[labels], axis=1)
    radii = np.zeros(n_groups)
    np.maximum.at(radii, labels, d)
    return members, ptr, centres, radii * (1.0 + 1e-12) + 1e-12


def _teacher_top(Qt, T, fine, n_fine, k):
    """Exact top-k targets of every teacher query embedding (rows of ``Qt``) by <q, t>: :func:`_exact_top_kernel`
    over the planted fine clusters, bounds by BLAS in chunks of queries. Same answer as a full scan."""
    members, ptr, centres, radii = _cluster_stats(T, fine, n_fine)
    Qt = np.ascontiguousarray(Qt, dtype=np.float64)
    T = np.ascontiguousarray(T, dtype=np.float64)
    out = np.empty((Qt.shape[0], k), np.int64)
    chunk = max(1, 4_000_000 // max(n_fine, 1))
    for lo in range(0, Qt.shape[0], chunk):
        q = Qt[lo:lo + chunk]
        UB = q @ centres.T + np.linalg.norm(q, axis=1)[:, None] * radii[None, :]
        _exact_top_kernel(q, T, UB, members, ptr, k, out[lo:lo + chunk])
    return out


def _sparse_tokens(n, vocab, branching, gen, *, coarse_words=4, fine_words=4, own_words=2, vocab_per_cluster=8):
    """Bag-of-words targets with hierarchical vocabularies: rows of counts over ``vocab`` token ids.

    Each coarse cluster owns ``vocab_per_cluster`` tokens, each fine cluster (a child of a coarse cluster) owns
    ``vocab_per_cluster`` tokens; a target draws ``coarse_words`` tokens from its coarse vocabulary,
    ``fine_words`` from its fine vocabulary and ``own_words`` uniformly from the whole vocabulary. Targets of one
    fine cluster are near-duplicates that differ only by their own words and by the draws.
    """
    n_fine = int(np.prod(branching))
    coarse_vocab = gen.integers(0, vocab, size=(branching[0], vocab_per_cluster))
    fine_vocab = gen.integers(0, vocab, size=(n_fine, vocab_per_cluster))
    leaf = gen.integers(0, n_fine, size=n)
    coarse = leaf // int(np.prod(branching[1:], dtype=np.int64))
    cols = np.concatenate([
        coarse_vocab[coarse[:, None], gen.integers(0, vocab_per_cluster, size=(n, coarse_words))],
        fine_vocab[leaf[:, None], gen.integers(0, vocab_per_cluster, size=(n, fine_words))],
        gen.integers(0, vocab, size=(n, own_words)),
    ], axis=1)
    rows = np.repeat(np.arange(n), cols.shape[1])
    X = sp.csr_matrix((np.ones(rows.size), (rows, cols.ravel())), shape=(n, vocab))
    X.sum_duplicates()
    X.sort_indices()
    return X, coarse.astype(np.int64), leaf.astype(np.int64)


def _csr_normalize(X):
    X = sp.csr_matrix(X, dtype=np.float64)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ X)


def planted_dataset(n_targets: int = 6000, n_queries: int = 6000, *, n_features: int = 64, dim: int = 32,
                    branching=(15, 16), scales=(1.0, 0.5, 0.1), query_noise: float = 0.05,
                    teacher_beta: float = 20.0, positives: str = "argmax", n_positives: int = 1,
                    test_fraction: float = 0.2, sparse: bool = False, rng=0) -> RetrievalDataset:
    """A seeded synthetic retrieval task with a known answer (the planted task of the demo, paper §5).

    Construction
    ------------
    1. Targets: ``n_targets`` points with hierarchical cluster structure in feature space (clusters of clusters:
       ``branching[0]`` coarse clusters, each with ``branching[1]`` fine clusters, ...).
       Dense (default): the Gaussian mixture of :func:`hierarchical_points` with ``scales`` (offset of each level
       and leaf noise), unit-norm rows of ``n_features`` features. The leaf noise ``scales[-1]`` is small, so the
       targets of a fine cluster are near-duplicates: hard negatives that uniform sampling almost never draws.
       Sparse (``sparse=True``): bag-of-words rows over a vocabulary of ``n_features`` tokens with hierarchical
       vocabularies (see ``_sparse_tokens``), L2-normalised, as scipy CSR.
    2. Teacher: a planted linear dual encoder (the student's model family, so the task is realisable by a linear
       student) with unit-norm outputs of dimension ``dim``: target map ``B*`` (Gaussian); query map
       ``A* = B* P^T`` where ``P`` is the (orthogonal) map from target to query features below.
    3. Queries: each picks an anchor target ``a`` uniformly; its features are ``P y_a + noise`` (dense: ``P`` a
       random orthogonal matrix, Gaussian noise of total scale ``query_noise``; sparse: ``P = I``, each anchor
       word kept with probability ``1 - query_noise`` and ``max(1, round(2*query_noise*words))`` random words
       added). So ``A* x ≈ B* y_a``: the teacher's query embedding lies near the anchor's fine cluster.
    4. Positives: ``positives="sample"`` draws ``n_positives`` distinct targets from the teacher's softmax
       ``P(i|x) ∝ exp(teacher_beta <q*, t*_i>)`` (Eq. 1) over ALL targets (Gumbel top-k, i.e. sequential sampling
       without replacement); ``"argmax"`` takes the teacher's top ``n_positives``. The anchor itself is not
       forced to be a positive: the known answer is the teacher's softmax.
    5. Split: a uniformly random ``test_fraction`` of the queries is the test set.

    Defaults (the demo's task): 6000 targets in 15 x 16 = 240 fine clusters of ~25 near-duplicates (leaf noise
    0.1 against fine-cluster offsets 0.5), query noise 0.05, argmax positives. With these, a linear student trained
    with uniform negatives ranks the right near-duplicate first far less often than one trained with hard negatives
    (measured by ``python -m refimpl demo``); the scales were chosen for that contrast, not for a given outcome.

    The metadata records coarse / fine cluster labels of every target, the anchors, and diagnostics: the fraction
    of positives equal to the anchor, and the teacher's own test R@1 (the ceiling a perfect student reaches when
    positives are sampled).

    Parameters are validated (ValueError naming the argument). ``rng``: Generator or int seed; the same seed gives
    the same dataset bit for bit.
    """
    n_targets = check_int("n_targets", n_targets, low=2, itemsize=8 * 2)
    n_queries = check_int("n_queries", n_queries, low=2, itemsize=8 * 2)
    n_features = check_int("n_features", n_features, low=2, itemsize=8)
    dim = check_int("dim", dim, low=1)
    branching = tuple(check_int("branching", b, low=1) for b in branching)
    if len(branching) < 1:
        raise ValueError("branching: needs at least one level")
    scales = tuple(check_positive("scales", s, allow_zero=True) for s in scales)
    if len(scales) != len(branching) + 1:
        raise ValueError(f"scales: expected {len(branching) + 1} values, got {len(scales)}")
    query_noise = check_positive("query_noise", query_noise, allow_zero=True)
    teacher_beta = check_positive("teacher_beta", teacher_beta)
    if positives not in ("sample", "argmax"):
        raise ValueError(f"positives: expected 'sample' or 'argmax', got {positives!r}")
    n_positives = check_int("n_positives", n_positives, low=1, high=n_targets)
    test_fraction = check_positive("test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * n_queries))
    if not 1 <= n_test <= n_queries - 1:
        raise ValueError(f"test_fraction: gives {n_test} test queries out of {n_queries}; need at least 1 of each")
    if sparse and query_noise >= 1.0:
        raise ValueError("query_noise: with sparse=True it is a word-drop probability and must be < 1")
    gen = as_rng(rng)

    if sparse:
        counts, coarse, fine = _sparse_tokens(n_targets, n_features, branching, gen)
        Y = _csr_normalize(counts)
        anchors = gen.integers(0, n_targets, size=n_queries)
        Qc = sp.csr_matrix(counts[anchors])
        keep = gen.random(Qc.data.size) >= query_noise
        Qc.data = Qc.data * keep
        words = int(counts[0].sum())
        n_extra = max(1, int(round(2 * query_noise * words)))
        extra = sp.csr_matrix((np.ones(n_queries * n_extra), (np.repeat(np.arange(n_queries), n_extra),
                                                              gen.integers(0, n_features, size=n_queries * n_extra))),
                              shape=(n_queries, n_features))
        Xc = Qc + extra
        Xc.eliminate_zeros()
        X = _csr_normalize(Xc)
        X.sort_indices()
        P = None
        B_t = gen.normal(0.0, 1.0 / np.sqrt(n_features), size=(dim, n_features))
        A_t = B_t.copy()
    else:
        Y, coarse, fine = _mixture_labels(n_targets, n_features, branching, scales, gen)
        P, _ = np.linalg.qr(gen.normal(size=(n_features, n_features)))
        anchors = gen.integers(0, n_targets, size=n_queries)
        X = Y[anchors] @ P.T + gen.normal(0.0, query_noise / np.sqrt(n_features), size=(n_queries, n_features))
        B_t = gen.normal(0.0, 1.0 / np.sqrt(n_features), size=(dim, n_features))
        A_t = B_t @ P.T

    T = _embed(Y, B_t)
    Qt_all = _embed(X, A_t)
    if positives == "argmax":  # exact top-k by branch and bound over the planted clusters (no full scan)
        pos = _teacher_top(Qt_all, T, fine, int(np.prod(branching, dtype=np.int64)), n_positives)
        top1 = pos[:, 0].copy()
    else:  # Gumbel top-k needs every perturbed logit: a full scan in chunks
        pos = np.empty((n_queries, n_positives), dtype=np.int64)
        chunk = max(1, 2_000_000 // n_targets)
        top1 = np.empty(n_queries, dtype=np.int64)
        for lo in range(0, n_queries, chunk):
            hi = min(n_queries, lo + chunk)
            logits = teacher_beta * (Qt_all[lo:hi] @ T.T)
            top1[lo:hi] = np.argmax(logits, axis=1)
            logits = logits + gen.gumbel(size=logits.shape)
            idx = np.argpartition(-logits, n_positives - 1, axis=1)[:, :n_positives] if n_positives < n_targets \
                else np.tile(np.arange(n_targets), (hi - lo, 1))
            order = np.argsort(-np.take_along_axis(logits, idx, axis=1), axis=1, kind="stable")
            pos[lo:hi] = np.take_along_axis(idx, order, axis=1)
    perm = gen.permutation(n_queries)
    test_ids = np.sort(perm[:n_test]).astype(np.int64)
    train_ids = np.sort(perm[n_test:]).astype(np.int64)
    positives_list = [np.ascontiguousarray(p) for p in pos]
    teacher_hit = np.array([top1[i] in positives_list[i] for i in test_ids])
    metadata = {
        "kind": "planted", "sparse": sparse, "n_targets": n_targets, "n_queries": n_queries,
        "n_features": n_features, "dim": dim, "branching": branching, "scales": scales,
        "query_noise": query_noise, "teacher_beta": teacher_beta, "positives": positives,
        "n_positives": n_positives, "test_fraction": test_fraction,
        "coarse_labels": coarse, "fine_labels": fine, "anchors": anchors.astype(np.int64),
        "query_map": P,
        "positive_is_anchor": float(np.mean(pos[:, 0] == anchors)),
        "positive_in_anchor_fine_cluster": float(np.mean(fine[pos[:, 0]] == fine[anchors])),
        "teacher_test_r1": float(np.mean(teacher_hit)),
    }
    return RetrievalDataset(query_features=X, target_features=Y, positives=positives_list, train_ids=train_ids,
                            test_ids=test_ids, teacher_A=A_t, teacher_B=B_t, teacher_beta=teacher_beta,
                            metadata=metadata).validate()
