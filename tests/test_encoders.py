"""LinearDualEncoder (refimpl/encoders.py): dense vs CSR forward and vjp, finite differences, normalisation edge
cases, seeding, validation."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.encoders import LinearDualEncoder, normalize_rows


def _random_csr(rng, n, f, density):
    X = sp.random(n, f, density=density, format="csr", random_state=rng, data_rvs=rng.standard_normal)
    return sp.csr_matrix(X)


def _fd_vjp(enc, name, X, G, h=1e-6):
    """Central differences of sum_i <G_i, f(x_i)> w.r.t. enc.<name>."""
    W = getattr(enc, name)
    fn = enc.encode_queries if name == "A" else enc.encode_targets
    out = np.zeros_like(W)
    for idx in np.ndindex(*W.shape):
        old = W[idx]
        W[idx] = old + h
        fp = np.sum(G * fn(X))
        W[idx] = old - h
        fm = np.sum(G * fn(X))
        W[idx] = old
        out[idx] = (fp - fm) / (2 * h)
    return out


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), fq=st.integers(1, 7), ft=st.integers(1, 7),
       dim=st.integers(1, 5), density=st.sampled_from([0.0, 0.2, 0.5, 1.0]), normalize=st.booleans())
def test_dense_and_csr_agree(seed, n, fq, ft, dim, density, normalize):
    rng = np.random.default_rng(seed)
    enc = LinearDualEncoder(fq, ft, dim, normalize=normalize, rng=seed)
    Xq, Xt = _random_csr(rng, n, fq, density), _random_csr(rng, n, ft, density)
    G = rng.standard_normal((n, dim))
    np.testing.assert_allclose(enc.encode_queries(Xq), enc.encode_queries(Xq.toarray()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(enc.encode_targets(Xt), enc.encode_targets(Xt.toarray()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(enc.query_vjp(Xq, G), enc.query_vjp(Xq.toarray(), G), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(enc.target_vjp(Xt, G), enc.target_vjp(Xt.toarray(), G), rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), f=st.integers(1, 5), dim=st.integers(1, 4),
       sparse=st.booleans(), normalize=st.booleans())
def test_vjp_matches_finite_differences(seed, n, f, dim, sparse, normalize):
    rng = np.random.default_rng(seed)
    enc = LinearDualEncoder(f, f + 1, dim, normalize=normalize, rng=seed)
    Xq = _random_csr(rng, n, f, 0.6) if sparse else rng.standard_normal((n, f))
    Xt = _random_csr(rng, n, f + 1, 0.6) if sparse else rng.standard_normal((n, f + 1))
    G = rng.standard_normal((n, dim))
    if normalize:   # z/||z|| is not differentiable at z = 0 (sign(z) when dim = 1): skip raw norms within ~h of 0
        for W, X in ((enc.A, Xq), (enc.B, Xt)):
            norms = np.linalg.norm(X @ W.T, axis=1)
            assume(not np.any((norms > 0) & (norms < 1e-2)))
    for name, X, vjp in (("A", Xq, enc.query_vjp), ("B", Xt, enc.target_vjp)):
        an = vjp(X, G)
        fd = _fd_vjp(enc, name, X, G)
        assert np.linalg.norm(fd - an) <= 1e-6 * np.linalg.norm(an) + 1e-9, (name, fd, an)


def test_vjp_fd_check_can_fail():
    """Negative control: dropping the normalisation's Jacobian (a plausible bug) fails the same FD check."""
    rng = np.random.default_rng(0)
    enc = LinearDualEncoder(4, 4, 3, rng=1)
    X, G = rng.standard_normal((3, 4)), rng.standard_normal((3, 3))
    wrong = G.T @ X                                     # gradient as if normalize were off
    fd = _fd_vjp(enc, "A", X, G)
    assert np.linalg.norm(fd - wrong) > 1e-2 * np.linalg.norm(fd)


def test_normalised_outputs_are_unit_and_zero_rows_are_zero():
    rng = np.random.default_rng(5)
    enc = LinearDualEncoder(6, 6, 4, rng=0)
    X = rng.standard_normal((5, 6))
    X[2] = 0.0
    X[3] *= 1e-200                                       # squared norm would underflow without scaling
    X[4] *= 1e200                                        # ... or overflow
    U = enc.encode_queries(X)
    norms = np.linalg.norm(U, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4]], 1.0, rtol=0, atol=1e-14)
    assert np.all(U[2] == 0.0)
    np.testing.assert_allclose(U[3], U[3] / np.linalg.norm(U[3]), atol=1e-15)
    dA = enc.query_vjp(X[2:3], rng.standard_normal((1, 4)))
    assert np.all(dA == 0.0)                             # zero row: zero gradient, no NaN
    Xs = sp.csr_matrix(np.vstack([np.zeros(6), X[0]]))
    assert np.all(np.isfinite(enc.encode_queries(Xs))) and np.all(enc.encode_queries(Xs)[0] == 0.0)


def test_normalize_rows_helper_matches_numpy():
    Z = np.random.default_rng(2).standard_normal((7, 3))
    U, n = normalize_rows(Z)
    np.testing.assert_allclose(n, np.linalg.norm(Z, axis=1), rtol=1e-15)
    np.testing.assert_allclose(U, Z / np.linalg.norm(Z, axis=1, keepdims=True), rtol=1e-15)


def test_unnormalised_is_linear():
    rng = np.random.default_rng(3)
    enc = LinearDualEncoder(5, 4, 3, normalize=False, rng=2)
    X = rng.standard_normal((4, 5))
    np.testing.assert_allclose(enc.encode_queries(X), X @ enc.A.T, rtol=1e-14)
    G = rng.standard_normal((4, 3))
    np.testing.assert_allclose(enc.query_vjp(X, G), G.T @ X, rtol=1e-14)


def test_csr_variants_accepted():
    """int32 / unsorted / duplicate-index CSR inputs give the same result as the dense matrix."""
    rng = np.random.default_rng(4)
    enc = LinearDualEncoder(6, 6, 3, rng=0)
    data = np.array([1.0, 2.0, -1.0, 0.5])
    indices = np.array([4, 1, 1, 4], dtype=np.int32)    # unsorted, with a duplicate in row 1
    indptr = np.array([0, 2, 4])
    X = sp.csr_matrix((data, indices, indptr), shape=(2, 6))
    D = X.toarray()
    np.testing.assert_allclose(enc.encode_targets(X), enc.encode_targets(D), atol=1e-15)
    G = rng.standard_normal((2, 3))
    np.testing.assert_allclose(enc.target_vjp(X, G), enc.target_vjp(D, G), atol=1e-15)
    Xa = sp.csr_array(D)
    np.testing.assert_allclose(enc.encode_targets(Xa), enc.encode_targets(D), atol=1e-15)


def test_seeded_init_and_copy():
    a = LinearDualEncoder(5, 6, 3, rng=7)
    b = LinearDualEncoder(5, 6, 3, rng=np.random.default_rng(7))
    c = LinearDualEncoder(5, 6, 3, rng=8)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B)
    assert not np.array_equal(a.A, c.A)
    assert a.A.shape == (3, 5) and a.B.shape == (3, 6) and a.A.dtype == np.float64
    d = a.copy()
    d.A[0, 0] += 1.0
    assert a.A[0, 0] != d.A[0, 0] and d.beta == a.beta and d.normalize == a.normalize
    assert a.params[0] is a.A and a.params[1] is a.B


def test_logits():
    rng = np.random.default_rng(0)
    enc = LinearDualEncoder(3, 4, 2, beta=3.0, rng=1)
    Xq, Xt = rng.standard_normal((2, 3)), rng.standard_normal((5, 4))
    np.testing.assert_allclose(enc.logits(Xq, Xt), 3.0 * enc.encode_queries(Xq) @ enc.encode_targets(Xt).T)


@pytest.mark.parametrize("bad, exc, match", [
    (np.ones((2, 4)), ValueError, "X: expected 5 columns"),
    (np.ones((0, 5)), ValueError, "X: is empty"),
    (np.array([[1.0, np.nan, 0, 0, 0]]), ValueError, "X: contains NaN"),
    (np.array([[1.0, np.inf, 0, 0, 0]]), ValueError, "X: contains NaN"),
    (sp.coo_matrix(np.ones((2, 5))), TypeError, "X: sparse input must be CSR"),
    (sp.csc_matrix(np.ones((2, 5))), TypeError, "X: sparse input must be CSR"),
    (sp.csr_matrix(np.ones((2, 4))), ValueError, "X: expected 5 columns"),
    (np.ones(5), ValueError, "X: expected a 2-D array"),
])
def test_bad_inputs(bad, exc, match):
    enc = LinearDualEncoder(5, 5, 3, rng=0)
    with pytest.raises(exc, match=match):
        enc.encode_queries(bad)
    with pytest.raises(exc, match=match):
        enc.target_vjp(bad, np.ones((2, 3)))


def test_bad_constructor_and_gradient_args():
    for kw, exc, match in [(dict(beta=0.0), ValueError, "beta"), (dict(beta=-1.0), ValueError, "beta"),
                           (dict(beta=float("nan")), ValueError, "beta"), (dict(beta="x"), TypeError, "beta"),
                           (dict(normalize=1), TypeError, "normalize"), (dict(rng=-1), ValueError, "rng")]:
        with pytest.raises(exc, match=match):
            LinearDualEncoder(3, 3, 2, **kw)
    with pytest.raises(ValueError, match="dim"):
        LinearDualEncoder(3, 3, 0)
    with pytest.raises(ValueError, match="n_query_features"):
        LinearDualEncoder(0, 3, 2)
    enc = LinearDualEncoder(3, 3, 2, rng=0)
    with pytest.raises(ValueError, match="G: expected 2 columns"):
        enc.query_vjp(np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="G: expected 4 rows"):
        enc.query_vjp(np.ones((4, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="G: contains NaN"):
        enc.query_vjp(np.ones((1, 3)), np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="beta"):
        enc.beta = 0
    enc.A = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="A: encoder parameter"):
        enc.encode_queries(np.ones((1, 3)))
    enc.A = np.full((2, 3), np.nan)
    with pytest.raises(ValueError, match="A: encoder parameter contains NaN"):
        enc.encode_queries(np.ones((1, 3)))


def test_both_sparse_forward_kernels():
    """Few non-zeros (nnz < F: d-outer kernel) and many (nnz >= F: transposed-copy kernel) agree with dense."""
    rng = np.random.default_rng(9)
    enc = LinearDualEncoder(40, 40, 3, rng=0)
    few = _random_csr(rng, 3, 40, 0.1)                   # 12 non-zeros
    many = _random_csr(rng, 30, 40, 0.5)                 # 600 non-zeros
    assert few.nnz < 40 <= many.nnz
    for X in (few, many):
        np.testing.assert_allclose(enc.encode_queries(X), enc.encode_queries(X.toarray()), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ extreme magnitudes (no wrong values, right blame)
@pytest.mark.parametrize("scale", [1e308, 1e-310, 1e250, 1e-250])
@pytest.mark.parametrize("sparse", [False, True])
def test_extreme_feature_magnitudes_encode_like_unit_scale(scale, sparse):
    """n(A (s x)) = n(A x): features near the float64 limits (huge or subnormal) give the unit-scale answer."""
    rng = np.random.default_rng(3)
    enc = LinearDualEncoder(6, 6, 4, rng=0)
    X = rng.uniform(-1, 1, size=(3, 6))
    X[:, 0] = 1.0                                        # exact max-abs 1, so s * X is representable
    Xs = X * scale
    if sparse:
        X, Xs = sp.csr_matrix(X), sp.csr_matrix(Xs)
    for fn in (enc.encode_queries, enc.encode_targets):
        np.testing.assert_allclose(fn(Xs), fn(X), rtol=0, atol=1e-12 if scale > 1e-300 else 1e-9)
    G = rng.standard_normal((3, 4))
    gs, g = enc.query_vjp(Xs, G), enc.query_vjp(X, G)   # gradient invariant under row scaling too
    np.testing.assert_allclose(gs, g, rtol=1e-9 if scale > 1e-300 else 1e-6, atol=1e-12)


def test_unnormalised_overflow_names_the_input_not_the_parameter():
    enc = LinearDualEncoder(3, 3, 2, normalize=False, rng=0)
    enc.A[...] = 1.0
    enc.B[...] = 1.0
    X = np.full((1, 3), 1e308)
    with pytest.raises(ValueError, match=r"^X: features too large"):
        enc.encode_queries(X)
    with pytest.raises(ValueError, match=r"^X: features too large"):
        enc.encode_targets(sp.csr_matrix(X))
    enc = LinearDualEncoder(3, 3, 2, rng=0)
    enc.B[...] = 1e308
    with pytest.raises(ValueError, match=r"^B: encoder parameter too large"):
        enc.encode_targets(np.ones((1, 3)))


# ------------------------------------------------------------------------------- tower initialisation and tying
def test_shared_and_tied_towers():
    a = LinearDualEncoder(5, 5, 3, rng=7)
    s = LinearDualEncoder(5, 5, 3, rng=7, init="shared")
    t = LinearDualEncoder(5, 5, 3, rng=7, tied=True)
    assert np.array_equal(s.A, a.A) and np.array_equal(s.B, s.A) and s.B is not s.A and not s.tied
    assert t.tied and t.B is t.A and len(t.params) == 1 and np.array_equal(t.A, a.A)
    c = t.copy()
    assert c.tied and c.A is not t.A and np.array_equal(c.A, t.A)
    assert not s.copy().tied and "tied=True" in repr(t)
    for kw, exc, match in [(dict(init="same"), ValueError, "init"), (dict(tied=1), TypeError, "tied")]:
        with pytest.raises(exc, match=match):
            LinearDualEncoder(5, 5, 3, **kw)
    with pytest.raises(ValueError, match="init: one matrix"):
        LinearDualEncoder(5, 6, 3, init="shared")
    with pytest.raises(ValueError, match="tied: one matrix"):
        LinearDualEncoder(5, 6, 3, tied=True)


@pytest.mark.parametrize("tied", [False, True])
def test_column_gradients_equal_the_dense_gradient(tied):
    """``gradients(sparse=True)`` lists exactly the touched columns, with the dense gradient's values there."""
    rng = np.random.default_rng(4)
    enc = LinearDualEncoder(30, 30, 4, rng=1, tied=tied)
    Xq, Xt = _random_csr(rng, 5, 30, 0.1), _random_csr(rng, 7, 30, 0.1)
    Gq, Gt = rng.standard_normal((5, 4)), rng.standard_normal((7, 4))
    dense = enc.gradients(Xq, Gq, Xt, Gt, sparse=False)
    cols = enc.gradients(Xq, Gq, Xt, Gt, sparse=True)
    full = [enc.query_vjp(Xq, Gq), enc.target_vjp(Xt, Gt)]
    if tied:
        full = [full[0] + full[1]]
    assert len(dense) == len(cols) == len(full) == len(enc.params)
    for d, c, f, X in zip(dense, cols, full, [Xq, Xt]):
        np.testing.assert_allclose(d, f, rtol=1e-13, atol=1e-15)
        touched = np.unique(np.concatenate([Xq.indices, Xt.indices])) if tied else np.unique(X.indices)
        assert np.array_equal(c[0], touched)
        np.testing.assert_allclose(c[1], f[:, c[0]], rtol=1e-13, atol=1e-15)
        rest = np.setdiff1d(np.arange(30), c[0])
        assert np.all(f[:, rest] == 0.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_input_weights_equal_reweighted_inputs(sparse):
    """``query_weights`` / ``target_weights`` w: encodings and gradients equal those of the unweighted encoder
    on the inputs ``x * w`` (the weights are a fixed diagonal first layer); validation of the weights."""
    rng = np.random.default_rng(5)
    wq, wt = rng.uniform(0.5, 3.0, 20), rng.uniform(0.5, 3.0, 20)
    enc = LinearDualEncoder(20, 20, 3, rng=2, query_weights=wq, target_weights=wt)
    ref = LinearDualEncoder(20, 20, 3, rng=2)
    Xq, Xt = _random_csr(rng, 6, 20, 0.2), _random_csr(rng, 5, 20, 0.2)
    Gq, Gt = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
    Wq, Wt = sp.csr_matrix(Xq @ sp.diags(wq)), sp.csr_matrix(Xt @ sp.diags(wt))
    if not sparse:
        Xq, Xt, Wq, Wt = Xq.toarray(), Xt.toarray(), Wq.toarray(), Wt.toarray()
    np.testing.assert_allclose(enc.encode_queries(Xq), ref.encode_queries(Wq), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(enc.encode_targets(Xt), ref.encode_targets(Wt), rtol=1e-13, atol=1e-15)
    assert not np.allclose(enc.encode_queries(Xq), ref.encode_queries(Xq))
    for g, r in zip(enc.gradients(Xq, Gq, Xt, Gt, sparse=False), ref.gradients(Wq, Gq, Wt, Gt, sparse=False)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15)
    c = enc.copy()
    assert np.array_equal(c.query_weights, wq) and np.array_equal(c.target_weights, wt)
    with pytest.raises(ValueError):
        c.query_weights[0] = 1.0  # read-only: a fixed part of the model
    for kw, match in [(dict(query_weights=np.ones(19)), "query_weights"),
                      (dict(target_weights=-np.ones(20)), "target_weights"),
                      (dict(query_weights=np.full(20, np.nan)), "query_weights")]:
        with pytest.raises(ValueError, match=match):
            LinearDualEncoder(20, 20, 3, **kw)
