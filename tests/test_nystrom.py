"""Tests for refimpl.nystrom: Nyström representations and regression re-encoding (PAPER.md §5, Alg. 5-6)."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, strategies as st

from refimpl.nystrom import (LANDMARK_METHODS, SPLITS, Nystrom, RegressionReEncoder, encoder_flops,
                             select_landmarks, softmax_gap)


class MatrixEncoder:
    """A linear target encoder ``X -> X G`` (no normalisation), so that a linear map of the cached representations
    is again such an encoder."""

    def __init__(self, G):
        self.G = np.asarray(G, dtype=np.float64)

    def encode_targets(self, X):
        return np.asarray(X @ self.G)


def low_rank(rng, n, dim, rank, basis=None):
    basis = rng.normal(size=(rank, dim)) if basis is None else basis
    return rng.normal(size=(n, rank)) @ basis, basis


def rel_err(A, B, Q, T):
    """max |A - B| / (||q|| ||t||) over the entries: the relative error of an inner product."""
    scale = np.linalg.norm(Q, axis=1)[:, None] * np.linalg.norm(T, axis=1)[None, :]
    return float((np.abs(A - B) / np.maximum(scale, 1e-300)).max())


sizes = st.tuples(st.integers(30, 120), st.integers(2, 24), st.integers(1, 12)).filter(lambda t: t[2] <= t[1])


# ------------------------------------------------------------------------------------------------ exactness
@given(seed=st.integers(0, 2 ** 31 - 1), shape=sizes, extra=st.integers(0, 10), method=st.sampled_from(LANDMARK_METHODS),
       split=st.sampled_from(SPLITS))
def test_exact_when_landmarks_cover_rank(seed, shape, extra, method, split):
    """Linear kernel, d' >= rank of the (target + query) embeddings: Nyström inner products are the true ones."""
    n, dim, rank = shape
    rng = np.random.default_rng(seed)
    T, basis = low_rank(rng, n, dim, rank)
    Q, _ = low_rank(rng, 15, dim, rank, basis)
    d = min(n, rank + extra)
    ny = Nystrom(d, method=method, split=split, rng=seed).fit(T)
    assert ny.rank == rank
    assert rel_err(ny.inner(Q, T), Q @ T.T, Q, T) <= 1e-9
    assert rel_err(ny.inner(T, T), T @ T.T, T, T) <= 1e-9


@given(seed=st.integers(0, 2 ** 31 - 1), shape=sizes)
def test_splits_agree_and_symmetric_is_isometric(seed, shape):
    """Both splits give the same inner products; the symmetric split maps target differences isometrically onto
    their projection: ||z_a - z_b|| = ||P(a - b)||; reconstruct(z) = P t in both splits."""
    n, dim, rank = shape
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, dim))
    Q = rng.normal(size=(10, dim))
    d = max(1, min(n, dim) // 2)
    ids = select_landmarks(d, n, rng=seed)
    a = Nystrom(d, split="paper").fit(T, landmark_ids=ids)
    b = Nystrom(d, split="symmetric").fit(T, landmark_ids=ids)
    assert rel_err(a.inner(Q, T), b.inner(Q, T), Q, T) <= 1e-9
    Zb = b.transform_targets(T)
    PT = b.project(T)
    i, j = rng.integers(0, n, size=(2, 20))
    np.testing.assert_allclose(np.linalg.norm(Zb[i] - Zb[j], axis=1), np.linalg.norm(PT[i] - PT[j], axis=1),
                               rtol=1e-9, atol=1e-9 * np.abs(T).max())
    for ny in (a, b):
        np.testing.assert_allclose(ny.reconstruct(ny.transform_targets(T)), PT, atol=1e-9 * np.abs(T).max())


# ------------------------------------------------------------------------------------------------ monotonicity
@given(seed=st.integers(0, 2 ** 31 - 1), shape=sizes, steps=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       split=st.sampled_from(SPLITS))
def test_error_never_grows_when_landmarks_are_added(seed, shape, steps, split):
    """K over targets + queries, K~ = K S (S^T K S)^+ S^T K. For nested landmark sets S1 ⊂ S2, (K - K~1) - (K - K~2)
    is PSD, so the trace, Frobenius and spectral norms of the error never grow. (A single off-diagonal entry CAN
    grow; the error matrix is what the Nyström approximation orders.)"""
    n, dim, _ = shape
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, dim)) * rng.uniform(0.1, 2.0, size=dim)
    Q = rng.normal(size=(8, dim))
    E = np.vstack([T, Q])
    K = E @ E.T
    order = rng.permutation(n)
    sizes_ = np.minimum(np.cumsum(steps), n)
    prev_err, prev = None, None
    for d in sizes_:
        ny = Nystrom(int(d), split=split).fit(T, landmark_ids=order[:d])
        err = K - ny.transform_queries(E) @ ny.transform_targets(E).T
        err = 0.5 * (err + err.T)
        tol = 1e-9 * np.abs(K).max()
        assert np.linalg.eigvalsh(err).min() >= -tol  # K~ <= K
        norms = (np.trace(err), np.linalg.norm(err), np.linalg.norm(err, 2))
        if prev_err is not None:
            assert np.linalg.eigvalsh(prev_err - err).min() >= -tol
            assert all(b <= a + tol for a, b in zip(prev, norms))
        prev_err, prev = err, norms


# ------------------------------------------------------------------------------------------------ regression
@given(seed=st.integers(0, 2 ** 31 - 1), d=st.integers(2, 16), extra=st.integers(0, 20),
       split=st.sampled_from(SPLITS), method=st.sampled_from(LANDMARK_METHODS))
def test_regression_exact_for_linear_maps(seed, d, extra, split, method):
    """Alg. 5 with ridge 0 and s' >= d': when the new target embeddings are a linear map of the cached
    representations, the regression re-encode equals the exact re-encode with the same landmarks (representations,
    landmark embeddings, approximate logits), and costs s' encoder calls instead of N."""
    rng = np.random.default_rng(seed)
    n, F, D = 80, 20, 18
    X = rng.normal(size=(n, F))
    G0 = rng.normal(size=(F, D))
    s = min(n, d + extra)
    a = RegressionReEncoder(d, s, ridge=0.0, split=split, method=method, rng=seed)
    Z0 = a.initial_encode(MatrixEncoder(G0), X)
    A = rng.normal(size=(D, d))                       # new embedding y = A z
    G1 = G0 @ a.nystrom._target_map.T @ A.T
    np.testing.assert_allclose(X @ G1, Z0 @ A.T, atol=1e-8 * np.abs(X @ G1).max())
    Zr = a.reencode(MatrixEncoder(G1))
    b = RegressionReEncoder(d, s, ridge=0.0, split=split, method=method, rng=seed)
    b.initial_encode(MatrixEncoder(G0), X)
    Ze = b.exact_reencode(MatrixEncoder(G1))
    scale = np.abs(Ze).max()
    np.testing.assert_allclose(Zr, Ze, atol=1e-9 * scale)
    Lscale = np.abs(b.nystrom.landmark_embeddings).max()
    np.testing.assert_allclose(a.nystrom.landmark_embeddings, b.nystrom.landmark_embeddings, atol=1e-9 * Lscale)
    Q = rng.normal(size=(5, D))
    T1 = X @ G1
    assert rel_err(a.approximate_logits(Q), b.approximate_logits(Q), Q, T1) <= 1e-9
    assert a.last_cost["encoder_calls"] == s and b.last_cost["encoder_calls"] == n
    assert a.encoder_calls == n + s


def test_regression_ridge_shrinks_and_is_consistent():
    """With ridge > 0 the fit is biased but converges to the least-squares fit as ridge -> 0; large ridge shrinks
    the representations toward 0 (norm decreases monotonically in ridge)."""
    rng = np.random.default_rng(5)
    n, F, D, d = 200, 30, 24, 12
    X = rng.normal(size=(n, F))
    G0, G1 = rng.normal(size=(F, D)), rng.normal(size=(F, D))
    norms, outs = [], []
    for ridge in (0.0, 1e-9, 1e-2, 1.0, 100.0):
        re = RegressionReEncoder(d, 60, ridge=ridge, rng=1)
        re.initial_encode(MatrixEncoder(G0), X)
        outs.append(re.reencode(MatrixEncoder(G1)))
        norms.append(np.linalg.norm(re.approximate_embeddings()))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6 * np.abs(outs[0]).max())
    assert all(b < a for a, b in zip(norms[1:], norms[2:]))


# ------------------------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("method", LANDMARK_METHODS)
@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_same_results(method, split):
    rng = np.random.default_rng(0)
    n, F, D = 150, 25, 20
    X = sp.random(n, F, density=0.3, format="csr", random_state=1) + sp.eye(n, F, format="csr")
    G = [rng.normal(size=(F, D)) for _ in range(3)]

    def run(seed):
        re = RegressionReEncoder(10, 40, method=method, split=split, rng=seed)
        re.initial_encode(MatrixEncoder(G[0]), X)
        re.reencode(MatrixEncoder(G[1]))
        re.reencode(MatrixEncoder(G[2]))
        return re.nystrom.landmark_ids, re.representations, re.last_sample

    a, b, c = run(7), run(7), run(8)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0]) or not np.array_equal(a[2], c[2])


# ------------------------------------------------------------------------------------------------ landmarks
@given(seed=st.integers(0, 2 ** 31 - 1), method=st.sampled_from(LANDMARK_METHODS), d=st.integers(1, 40))
def test_landmarks_distinct_and_in_range(seed, method, d):
    rng = np.random.default_rng(seed)
    E, _ = low_rank(rng, 40, 6, 3)   # rank 3 < d for most d: the fallback to uniform must keep ids distinct
    E[:5] = E[5]                    # duplicates: D^2 weight 0 after one of them is chosen
    ids = select_landmarks(d, 40, method=method, embeddings=E, rng=seed)
    assert ids.dtype == np.int64 and ids.shape == (d,)
    assert np.unique(ids).size == d and ids.min() >= 0 and ids.max() < 40


def test_rpcholesky_spans_with_exactly_rank_landmarks():
    """Randomised pivoted Cholesky only picks points with positive residual, so d' = rank landmarks always span."""
    rng = np.random.default_rng(3)
    T, basis = low_rank(rng, 500, 30, 7)
    T[:300] = 0.0                                              # zero rows: never picked
    T[300:490] = rng.uniform(1, 3, size=(190, 1)) * basis[0] * 5  # 190 heavy multiples of one direction
    for seed in range(10):
        ny = Nystrom(7, method="rpcholesky", rng=seed).fit(T)
        assert ny.rank == 7
        assert rel_err(ny.inner(T, T), T @ T.T, T, T) <= 1e-9


# ------------------------------------------------------------------------------------------------ cost, gaps
def test_cost_accounting_linear_encoder():
    """Encoder calls counted from the rows actually encoded; flops from encoder.B (dim x F, dense or CSR) and the
    linear algebra's shapes; a re-encode with s' << N is cheaper than a full one."""

    class Enc(MatrixEncoder):
        def __init__(self, G):
            super().__init__(G)
            self.B = self.G.T
            self.normalize = False

    rng = np.random.default_rng(0)
    n, F, D, d, s = 2000, 50, 32, 16, 100
    X = sp.random(n, F, density=0.1, format="csr", random_state=2)
    assert encoder_flops(Enc(rng.normal(size=(F, D))), X) == 2 * D * X.nnz
    assert encoder_flops(Enc(rng.normal(size=(F, D))), X.toarray()) == 2 * D * n * F
    assert encoder_flops(MatrixEncoder(np.eye(3)), X) is None
    re = RegressionReEncoder(d, s, rng=0)
    re.initial_encode(Enc(rng.normal(size=(F, D))), X)
    enc = Enc(rng.normal(size=(F, D)))
    full = re.full_reencode_cost(enc)
    re.reencode(enc)
    cost = re.last_cost
    assert cost["encoder_calls"] == s and full["encoder_calls"] == n
    assert cost["encoder_flops"] == 2 * D * X[re.last_sample].nnz
    assert cost["total_flops"] < full["total_flops"]
    assert [h["kind"] for h in re.history] == ["initial", "regression"]


def test_softmax_gap_against_direct_computation():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(4, 30)) * 5, rng.normal(size=(4, 30)) * 5
    P = np.exp(A) / np.exp(A).sum(1, keepdims=True)
    R = np.exp(B) / np.exp(B).sum(1, keepdims=True)
    g = softmax_gap(A, B)
    assert g["tv_mean"] == pytest.approx(np.mean(0.5 * np.abs(P - R).sum(1)), rel=1e-12)
    assert g["log_ratio_max"] == pytest.approx(np.abs(np.log(P / R)).max(), rel=1e-10)
    z = softmax_gap(A, A + 3.0)  # a constant shift does not change the softmax
    assert z["tv_max"] < 1e-12 and z["logit_err_max"] == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(20, 5))
    with pytest.raises(ValueError, match="n_landmarks"):
        Nystrom(30).fit(T)
    with pytest.raises(ValueError, match="n_landmarks"):
        Nystrom(0)
    with pytest.raises(TypeError, match="n_landmarks"):
        Nystrom(2.5)
    with pytest.raises(ValueError, match="method"):
        Nystrom(3, method="random")
    with pytest.raises(ValueError, match="split"):
        Nystrom(3, split="other")
    with pytest.raises(ValueError, match="rcond"):
        Nystrom(3, rcond=0.0)
    bad = T.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings"):
        Nystrom(3).fit(bad)
    with pytest.raises(ValueError, match="embeddings"):
        Nystrom(3).fit(T[0])
    with pytest.raises(RuntimeError, match="fit"):
        Nystrom(3).transform_targets(T)
    ny = Nystrom(3, rng=0).fit(T)
    with pytest.raises(ValueError, match="Q"):
        ny.transform_queries(rng.normal(size=(2, 6)))
    with pytest.raises(ValueError, match="T"):
        ny.transform_targets(np.full((2, 5), np.inf))
    for ids, exc in (([0, 0, 1], ValueError), ([0, 1, 20], ValueError), ([0, 1], ValueError), ([0.0, 1.0, 2.0], TypeError)):
        with pytest.raises(exc, match="landmark_ids"):
            Nystrom(3).fit(T, landmark_ids=ids)
    with pytest.raises(ValueError, match="embeddings"):
        select_landmarks(3, 20, method="kmeans++")
    X = rng.normal(size=(20, 4))
    G = rng.normal(size=(4, 5))
    with pytest.raises(ValueError, match="ridge"):
        RegressionReEncoder(3, 5, ridge=-1.0)
    with pytest.raises(RuntimeError, match="initial_encode"):
        RegressionReEncoder(3, 5).reencode(MatrixEncoder(G))
    with pytest.raises(TypeError, match="encoder"):
        RegressionReEncoder(3, 5).initial_encode(object(), X)
    with pytest.raises(ValueError, match="encoder"):
        RegressionReEncoder(3, 5).initial_encode(MatrixEncoder(np.full((4, 5), np.nan)), X)
    with pytest.raises(TypeError, match="X_targets"):
        RegressionReEncoder(3, 5).initial_encode(MatrixEncoder(G), sp.coo_matrix(X))
    re = RegressionReEncoder(3, 50, rng=0)
    re.initial_encode(MatrixEncoder(G), X)
    with pytest.raises(ValueError, match="n_samples"):
        re.reencode(MatrixEncoder(G))
    re = RegressionReEncoder(3, 5, rng=0)
    re.initial_encode(MatrixEncoder(G), X)
    with pytest.raises(ValueError, match="encoder"):
        re.reencode(MatrixEncoder(rng.normal(size=(4, 7))))
    with pytest.raises(ValueError, match="beta"):
        re.approximate_logits(rng.normal(size=(2, 5)), beta=0.0)


# ------------------------------------------------------------------------------------------------ tree integration
def _tree_setup(seed, split, n=300, d=12):
    pytest.importorskip("refimpl.index.sgtree")
    pytest.importorskip("refimpl.sampling.bounds")
    from refimpl.data import hierarchical_points

    rng = np.random.default_rng(seed)
    X = hierarchical_points(n, 16, branching=(4, 4), rng=seed)
    G0 = rng.normal(size=(16, 10)) / 4
    re = RegressionReEncoder(d, 80, split=split, rng=seed)
    re.initial_encode(MatrixEncoder(G0), X)
    return rng, X, G0, re


@pytest.mark.parametrize("split", SPLITS)
def test_tree_over_representations_certified(split):
    """SG tree over the Nyström representations: valid; the cluster assignment reproduces the clustering's sizes
    and radii; for every query the measured log max P~/Q never exceeds the certificate and log Z~ lies in the
    certified interval; with d' >= rank (exact Nyström) the approximate softmax equals the true one."""
    from refimpl.nystrom import build_tree, cluster_assignment, query_report

    rng, X, G0, re = _tree_setup(1, split)
    tree = build_tree(re, rng=0)
    assert tree.check_invariants() == []
    T = X @ G0
    lo_level, hi_level = tree.level_range()
    for level in range(lo_level, hi_level + 2, max(1, (hi_level - lo_level) // 4)):
        cl = tree.clustering(level)
        a = cluster_assignment(tree, cl)
        assert a.min() >= 0
        assert np.array_equal(np.bincount(a, minlength=cl.nodes.size), cl.sizes)
        dist = np.linalg.norm(re.representations - re.representations[cl.reps[a]], axis=1)
        assert np.all(dist <= cl.radii[a] * (1 + 1e-9) + 1e-12)
        for qi in range(5):
            q = rng.normal(size=10)
            r = query_report(tree, re, q, T, beta=5.0, level=level)
            assert r["log_max_ratio_approx"] <= r["cert_log_gamma"] + 1e-9
            assert r["log_z_lo"] - 1e-9 <= r["log_z_approx"] <= r["log_z_hi"] + 1e-9
            assert r["tv_approx_true"] < 1e-9  # rank(T) = 10 <= d' = 12: Nyström is exact


@pytest.mark.parametrize("split", SPLITS)
def test_update_tree_after_reencode(split):
    from refimpl.nystrom import build_tree, update_tree

    rng, X, G0, re = _tree_setup(2, split)
    tree = build_tree(re, rng=0)
    old = re.representations.copy()
    re.reencode(MatrixEncoder(G0 + rng.normal(size=G0.shape) * 0.05))
    stats = update_tree(tree, old, re.representations, rng=0)
    assert stats["U"] == pytest.approx(2 * np.linalg.norm(re.representations - old, axis=1).max())
    assert tree.check_invariants() == []
    np.testing.assert_array_equal(tree.points[: len(old)], re.representations)


@given(seed=st.integers(0, 2 ** 31 - 1), d=st.integers(2, 12), ridge=st.sampled_from([0.0, 1e-3, 1.0]))
def test_paper_split_target_representations_are_invariant(seed, d, ridge):
    """Finding documented in the module docstring: in the paper's split, z = W^+ L t are the coefficients of P t in
    the landmark embeddings; Alg. 5 maps landmarks and targets by the same R, so when the d' landmark embeddings
    are linearly independent (rank d' <= D) the targets' representations do not change (M C = I); the update lives
    entirely in the landmark embeddings, i.e. the query map. In the symmetric split they do change."""
    rng = np.random.default_rng(seed)
    n, F, D = 60, 20, 16
    X = rng.normal(size=(n, F))
    G0, G1 = rng.normal(size=(F, D)), rng.normal(size=(F, D))
    Q = rng.normal(size=(4, D))
    for split in SPLITS:
        re = RegressionReEncoder(d, 30, ridge=ridge, split=split, rng=seed)
        Z0 = re.initial_encode(MatrixEncoder(G0), X).copy()
        Zq0 = re.query_representations(Q)
        Z1 = re.reencode(MatrixEncoder(G1))
        assert re.nystrom.rank == d
        moved = np.abs(Z1 - Z0).max() / np.abs(Z0).max()
        assert (moved <= 1e-8) == (split == "paper")
        assert np.abs(re.query_representations(Q) - Zq0).max() > 1e-6


def test_bench_quick_smoke(tmp_path, capsys):
    """`python -m refimpl bench nystrom --quick` runs end to end and writes every section of the JSON."""
    pytest.importorskip("refimpl.index.sgtree")
    import json

    from refimpl.benchmarks.nystrom import main

    out = tmp_path / "ny.json"
    assert main(["--quick", "--blas-threads", "0", "--out", str(out), "--n-targets", "400", "--n-features", "48",
                 "--dim", "40", "--pretrain", "3", "--steps", "0,2", "--interval", "2", "--dprimes", "8,16",
                 "--sprimes", "16,64", "--ridges", "0,1e-3", "--d-default", "16", "--s-default", "64",
                 "--n-eval", "60"]) == 0
    d = json.loads(out.read_text())
    for key in ("steps", "dprime", "sprime", "ridge", "landmarks", "split", "tree", "cost"):
        assert d[key], key
    assert d["tree"]["status"] == "done"
    assert d["cost"]["regression"]["encoder_calls"] < d["cost"]["full"]["encoder_calls"]
    w0 = d["steps"][0]
    assert w0["stale"] == w0["exact_nystrom"]  # w = 0: the cache is the exact Nyström encoding
    assert "JSON written to" in capsys.readouterr().out
