"""Losses and gradients (refimpl/softmax.py): brute-force semantics, finite differences through the encoder,
numerical stability at logits of 1e4, validation, and the statistical "wired right" tests (Monte Carlo
unbiasedness with exact-softmax negatives; log-Q-corrected vs uncorrected bias as k grows), each with a negative
control showing that a plausible bug fails the same check."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.encoders import LinearDualEncoder
from refimpl.softmax import (flatten_positives, full_softmax_grad, full_softmax_loss, gradient_relative_error,
                             in_batch_softmax_grad, in_batch_softmax_loss, log_softmax, logsumexp,
                             monte_carlo_softmax_grad, monte_carlo_softmax_loss, pair_log_probs,
                             sampled_softmax_grad, sampled_softmax_loss)


# ------------------------------------------------------------------------------------------ log-softmax
def test_logsumexp_matches_naive_and_is_stable():
    x = np.random.default_rng(0).standard_normal((4, 7)) * 3
    np.testing.assert_allclose(logsumexp(x), np.log(np.exp(x).sum(1)), rtol=1e-14)
    np.testing.assert_allclose(logsumexp(x, axis=0), np.log(np.exp(x).sum(0)), rtol=1e-14)
    np.testing.assert_allclose(log_softmax(x), x - np.log(np.exp(x).sum(1, keepdims=True)), atol=1e-14)
    big = np.array([1e4, -1e4, 1e4, 0.0])
    assert logsumexp(big) == pytest.approx(1e4 + np.log(2), rel=1e-15)
    ls = log_softmax(big)
    assert np.all(np.isfinite(ls))
    np.testing.assert_allclose(ls, [-np.log(2), -2e4 - np.log(2), -np.log(2), -1e4 - np.log(2)], rtol=1e-15)
    assert logsumexp(np.array([-1e4, -1e4])) == pytest.approx(-1e4 + np.log(2), rel=1e-15)
    assert logsumexp(np.array([-np.inf, 0.0])) == 0.0
    assert logsumexp(np.array([-np.inf, -np.inf])) == -np.inf
    assert logsumexp(np.array([[1.0, 2.0]]), keepdims=True).shape == (1, 1)


def test_logsumexp_bad_inputs():
    with pytest.raises(ValueError, match="x: contains NaN"):
        logsumexp(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"x: contains NaN or \+Inf"):
        log_softmax(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="x: axis"):
        logsumexp(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="entirely -inf"):
        log_softmax(np.array([-np.inf, -np.inf]))


# ------------------------------------------------------------------------------ brute-force semantics
def _brute_full(Q, T, positives, beta):
    """Loop form of the project's multi-positive Eq. 2 (no shared code with the implementation)."""
    losses = []
    for i, pos in enumerate(positives):
        s = beta * (T @ Q[i])
        for p in pos:
            keep = [j for j in range(T.shape[0]) if j == p or j not in set(pos)]
            losses.append(-s[p] + np.log(np.sum(np.exp(s[keep]))))
    return float(np.mean(losses))


def _brute_sampled(Q, T, positives, negatives, beta, log_q=None, remove=True):
    losses = []
    for i, pos in enumerate(positives):
        neg = negatives if negatives.ndim == 1 else negatives[i]
        lq = None if log_q is None else (log_q if log_q.ndim == 1 else log_q[i])
        for p in pos:
            terms = [beta * Q[i] @ T[p]]
            for j, n in enumerate(neg):
                if remove and n in set(pos):
                    continue
                terms.append(beta * Q[i] @ T[n] - (0.0 if lq is None else np.log(len(neg)) + lq[j]))
            terms = np.array(terms)
            losses.append(-terms[0] + np.log(np.sum(np.exp(terms))))
    return float(np.mean(losses))


def test_losses_match_brute_force():
    rng = np.random.default_rng(1)
    Q, T = rng.standard_normal((3, 4)), rng.standard_normal((7, 4))
    pos = [np.array([0]), np.array([2, 5, 3]), np.array([6])]
    assert full_softmax_loss(Q, T, pos, beta=1.7)[0] == pytest.approx(_brute_full(Q, T, pos, 1.7), rel=1e-13)
    # one positive per query: exactly Eq. 2, -log softmax
    single = np.array([1, 4, 6])
    ref = -np.mean(log_softmax(1.7 * Q @ T.T)[np.arange(3), single])
    assert full_softmax_loss(Q, T, single, beta=1.7)[0] == pytest.approx(ref, rel=1e-13)
    for neg, lq in [(np.array([5, 1, 1, 4]), None), (rng.integers(0, 7, (3, 5)), None),
                    (np.array([2, 0, 6]), np.log([0.2, 0.1, 0.5])),
                    (rng.integers(0, 7, (3, 4)), np.log(rng.uniform(0.05, 1, (3, 4))))]:
        for remove in (True, False):
            got = sampled_softmax_loss(Q, T, pos, neg, beta=0.9, log_q=lq, remove_accidental_hits=remove)[0]
            assert got == pytest.approx(_brute_sampled(Q, T, pos, neg, 0.9, lq, remove), rel=1e-13)
    # all rows as shared negatives, no correction, hits removed == the full softmax
    s = sampled_softmax_loss(Q, T, pos, np.arange(7), beta=1.3)
    f = full_softmax_loss(Q, T, pos, beta=1.3)
    assert s[0] == pytest.approx(f[0], rel=1e-13)
    np.testing.assert_allclose(s[1], f[1], atol=1e-13)
    np.testing.assert_allclose(s[2], f[2], atol=1e-13)
    # log_expected_count = log(k q) is the log-Q correction
    lq = np.log(rng.uniform(0.05, 1, (3, 4)))
    neg = rng.integers(0, 7, (3, 4))
    a = sampled_softmax_loss(Q, T, pos, neg, beta=0.9, log_q=lq)
    b = sampled_softmax_loss(Q, T, pos, neg, beta=0.9, log_expected_count=lq + np.log(4))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-14)
    # shared negatives == the same negatives tiled per query
    neg = np.array([4, 1, 6, 6])
    a = sampled_softmax_loss(Q, T, pos, neg, beta=1.1, log_q=np.log([.1, .2, .3, .3]))
    b = sampled_softmax_loss(Q, T, pos, np.tile(neg, (3, 1)), beta=1.1, log_q=np.tile(np.log([.1, .2, .3, .3]), (3, 1)))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_dense_score_path_equals_gather_path(seed, monkeypatch):
    """The shared-negatives fast path (one B x n_rows score matrix, gradients as GEMMs) and the per-candidate
    gather path give the same loss and gradients (to rounding) on the paper's layout: negatives shared by the
    batch, tiled next to per-example ones, with log-Q offsets, repeats, accidental hits and several positives."""
    import refimpl.softmax as S
    rng = np.random.default_rng(seed)
    B, n, D = 5, 40, 6
    Q, T = rng.standard_normal((B, D)), rng.standard_normal((n, D))
    pos = [rng.choice(n, size=1 + (i % 3 == 1) * 2, replace=False) for i in range(B)]
    shared = rng.integers(0, n, 12)
    shared[:3] = pos[0][0]                                          # accidental hits, repeated
    per_ex = rng.integers(0, n, (B, 4))
    tiled = np.concatenate([np.tile(shared, (B, 1)), per_ex, np.tile(np.concatenate(pos), (B, 1))], axis=1)
    calls = []
    for neg in (shared, tiled):
        lc = rng.normal(size=neg.shape) - 3
        for kw in ({}, {"log_expected_count": lc}, {"remove_accidental_hits": False}):
            calls.append(lambda neg=neg, kw=kw: sampled_softmax_loss(Q, T, pos, neg, beta=2.3, **kw))
    calls.append(lambda: in_batch_softmax_loss(Q, T[:B], beta=1.7, target_ids=np.array([3, 1, 3, 0, 2]),
                                               positives=[[3], [1, 0], [3], [0], [2]]))
    for call in calls:
        monkeypatch.setattr(S, "_dense_scores", lambda *a: True)
        dense = call()
        monkeypatch.setattr(S, "_dense_scores", lambda *a: False)
        gather = call()
        assert dense[0] == pytest.approx(gather[0], rel=1e-13)
        for x, y in zip(dense[1:], gather[1:]):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14 * np.abs(y).max())


def test_in_batch_semantics():
    rng = np.random.default_rng(2)
    Q, T = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    ref = -np.mean(np.diag(log_softmax(2.0 * Q @ T.T)))
    assert in_batch_softmax_loss(Q, T, beta=2.0)[0] == pytest.approx(ref, rel=1e-13)
    # rows 0 and 2 are the same target: each is dropped from the other's negatives
    tid = np.array([10, 11, 10, 12])
    S = 2.0 * Q @ T.T
    losses = [-S[i, i] + logsumexp(S[i, [j for j in range(4) if j == i or tid[j] != tid[i]]]) for i in range(4)]
    assert in_batch_softmax_loss(Q, T, beta=2.0, target_ids=tid)[0] == pytest.approx(np.mean(losses), rel=1e-13)
    # query 1 also has target 12 as a positive: row 3 leaves its negatives
    posi = [[10], [11, 12], [10], [12]]
    losses[1] = -S[1, 1] + logsumexp(S[1, [0, 1, 2]])
    got = in_batch_softmax_loss(Q, T, beta=2.0, target_ids=tid, positives=posi)[0]
    assert got == pytest.approx(np.mean(losses), rel=1e-13)


def test_monte_carlo_and_pair_log_probs_semantics():
    rng = np.random.default_rng(3)
    Q, T = rng.standard_normal((2, 3)), rng.standard_normal((5, 3))
    pos = [np.array([0, 1]), np.array([4])]
    lp = pair_log_probs(Q, T, pos, beta=1.5)
    assert lp.shape == (3, 5)
    assert lp[0, 1] == -np.inf and lp[1, 0] == -np.inf and np.isfinite(lp[0, 0]) and np.isfinite(lp[1, 1])
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-14)
    S = 1.5 * Q @ T.T
    np.testing.assert_allclose(lp[2], log_softmax(S[1]), atol=1e-14)
    # drawing every row once per example, weighted by P_e, gives exactly the full gradient (expectation identity)
    samples = np.tile(np.arange(5), (3, 1))
    f = full_softmax_loss(Q, T, pos, beta=1.5)
    pq, pp = flatten_positives(pos, 2, 5)
    assert list(pq) == [0, 0, 1] and list(pp) == [0, 1, 4]
    # weighted check via the linearity of the MC gradient in the samples: draw row j with multiplicity ~ P_e(j)
    reps = 20000
    counts = np.round(np.exp(lp) * reps).astype(int)
    smp = np.stack([np.repeat(np.arange(5), counts[e])[:reps - 5] for e in range(3)])
    _, dQ, dT = monte_carlo_softmax_loss(Q, T, pos, smp, beta=1.5)
    assert gradient_relative_error((dQ, dT), f[1:]) < 1e-3
    with pytest.raises(ValueError, match="samples: example 0 sampled another positive of query 0"):
        monte_carlo_softmax_loss(Q, T, pos, samples, beta=1.5)


# ------------------------------------------------------------------------------------ finite differences
def _fd(enc, loss_of, h=1e-4):
    """Central differences with one Richardson step, ``(4 D(h/2) - D(h)) / 3`` (error O(h^4)), w.r.t. A and B."""
    out = []
    for W in (enc.A, enc.B):
        g = np.zeros_like(W)
        for idx in np.ndindex(*W.shape):
            old = W[idx]
            d = []
            for step in (h, h / 2):
                W[idx] = old + step
                fp = loss_of()
                W[idx] = old - step
                fm = loss_of()
                d.append((fp - fm) / (2 * step))
            W[idx] = old
            g[idx] = (4 * d[1] - d[0]) / 3
        out.append(g)
    return tuple(out)


def _check_fd(enc, fn, h=1e-4):
    """fn() -> (loss, dA, dB); asserts ||FD - analytic|| <= 1e-6 ||analytic|| + floor.

    The floor is the rounding noise of the difference quotient itself, ~ eps |loss| / h per entry (x 50, summed
    over entries): it only matters when the gradient is ~1e-5 times smaller than the loss (saturated softmax).
    """
    loss, dA, dB = fn()
    fd = _fd(enc, lambda: fn()[0], h)
    num = np.sqrt(np.sum((fd[0] - dA) ** 2) + np.sum((fd[1] - dB) ** 2))
    den = np.sqrt(np.sum(dA ** 2) + np.sum(dB ** 2))
    floor = 50 * np.finfo(float).eps * (1.0 + abs(loss)) / h * np.sqrt(dA.size + dB.size)
    assert num <= 1e-6 * den + floor, (num, den, floor)
    return num, den


def _features(rng, n, f, sparse):
    if sparse:
        X = sp.random(n, f, density=0.6, format="csr", random_state=rng, data_rvs=rng.standard_normal)
        return sp.csr_matrix(X)
    return rng.standard_normal((n, f))


def _positives(rng, n_queries, n_rows, max_pos):
    return [rng.choice(n_rows, size=rng.integers(1, min(max_pos, n_rows) + 1), replace=False)
            for _ in range(n_queries)]


problem = dict(seed=st.integers(0, 2**31 - 1), nq=st.integers(1, 4), fq=st.integers(1, 4), ft=st.integers(1, 4),
               dim=st.integers(1, 4), n_rows=st.integers(2, 7), beta=st.floats(0.1, 8.0),
               sparse=st.booleans(), normalize=st.booleans())


def _well_conditioned(enc, *Xs):
    """Normalisation is not differentiable at a zero raw encoding (with dim = 1 it is sign(z)); finite differences
    are meaningless within ~h of it. Rows that are exactly zero are fine (constant); near-zero ones are skipped."""
    for W, X in zip((enc.A, enc.B, enc.B), Xs):
        norms = np.linalg.norm(X @ W.T, axis=1)
        if np.any((norms > 0) & (norms < 1e-2)):
            return False
    return True


def _setup(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize):
    rng = np.random.default_rng(seed)
    enc = LinearDualEncoder(fq, ft, dim, beta=beta, normalize=normalize, rng=seed)
    Xq = _features(rng, nq, fq, sparse)
    Xt = _features(rng, n_rows, ft, sparse)
    Xp = _features(rng, nq, ft, sparse)           # in-batch positives
    assume(not normalize or _well_conditioned(enc, Xq, Xt, Xp))
    return rng, enc, Xq, Xt, Xp


@given(**problem)
def test_full_softmax_gradient_fd(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize):
    rng, enc, Xq, Xt, _ = _setup(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize)
    pos = _positives(rng, nq, n_rows, 3)
    _check_fd(enc, lambda: full_softmax_grad(enc, Xq, Xt, pos))


@given(**problem, k=st.integers(1, 5), shared=st.booleans(), use_log_q=st.booleans(), remove=st.booleans())
def test_sampled_softmax_gradient_fd(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize, k, shared, use_log_q,
                                     remove):
    rng, enc, Xq, Xt, _ = _setup(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize)
    pos = _positives(rng, nq, n_rows, 3)
    neg = rng.integers(0, n_rows, size=k if shared else (nq, k))
    if shared:
        neg[0] = pos[0][0]                               # at least one accidental hit
    else:
        neg[:, 0] = [p[-1] for p in pos]
    log_q = np.log(rng.uniform(0.02, 1.0, size=neg.shape)) if use_log_q else None
    _check_fd(enc, lambda: sampled_softmax_grad(enc, Xq, Xt, pos, neg, log_q=log_q, remove_accidental_hits=remove))


@given(**problem, dup=st.booleans())
def test_in_batch_gradient_fd(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize, dup):
    rng, enc, Xq, _, Xt = _setup(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize)
    tid = rng.integers(0, 3, size=nq) if dup else None
    posi = [np.array([t, (t + 1) % 3]) for t in tid] if dup else None
    _check_fd(enc, lambda: in_batch_softmax_grad(enc, Xq, Xt, target_ids=tid, positives=posi))


@given(**problem, k=st.integers(1, 4))
def test_monte_carlo_gradient_fd(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize, k):
    rng, enc, Xq, Xt, _ = _setup(seed, nq, fq, ft, dim, n_rows, beta, sparse, normalize)
    pos = _positives(rng, nq, n_rows, 3)
    P = np.exp(pair_log_probs(enc.encode_queries(Xq), enc.encode_targets(Xt), pos, beta=beta))
    smp = np.stack([rng.choice(n_rows, size=k, p=p / p.sum()) for p in P])
    _check_fd(enc, lambda: monte_carlo_softmax_grad(enc, Xq, Xt, pos, smp))


def test_fd_check_can_fail():
    """Negative control: the FD check rejects a gradient that ignores the excluded positives (a plausible bug)."""
    rng = np.random.default_rng(0)
    enc = LinearDualEncoder(3, 3, 3, beta=2.0, rng=0)
    Xq, Xt = rng.standard_normal((2, 3)), rng.standard_normal((5, 3))
    pos = [np.array([0, 1]), np.array([2])]
    right = full_softmax_grad(enc, Xq, Xt, pos)
    wrong = sampled_softmax_grad(enc, Xq, Xt, pos, np.arange(5), remove_accidental_hits=False)
    with pytest.raises(AssertionError):
        _check_fd(enc, lambda: (right[0], wrong[1], wrong[2]))


# -------------------------------------------------------------------------------------------- stability
def test_losses_finite_and_correct_at_logits_1e4():
    Q = np.array([[1.0, 0.0], [0.0, 1.0]])
    T = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])   # logits in {+-1e4, 0} at beta = 1e4
    beta = 1e4
    loss, dQ, dT = full_softmax_loss(Q, T, [np.array([0]), np.array([1])], beta=beta)
    # query 0: positive logit 1e4, others -1e4, 0 -> loss 0; query 1: positive logit 0, another at 1e4 -> 1e4
    assert np.isfinite(loss) and loss == pytest.approx(0.5 * (0.0 + 1e4), rel=1e-15)
    assert np.all(np.isfinite(dQ)) and np.all(np.isfinite(dT))
    # query 1's softmax is a point mass on row 2: dS = [0, -1, 1] / 2 -> dQ[1] = beta/2 (T[2] - T[1])
    np.testing.assert_allclose(dQ[1], beta / 2 * (T[2] - T[1]), rtol=1e-15)
    np.testing.assert_allclose(dQ[0], 0.0, atol=0)
    for fn in (lambda: sampled_softmax_loss(Q, T, [[0], [1]], np.array([1, 2, 2]), beta=beta,
                                            log_q=np.log([0.1, 0.2, 0.2])),
               lambda: sampled_softmax_loss(Q, T, [[1], [0]], np.array([[0, 2], [1, 1]]), beta=beta),
               lambda: in_batch_softmax_loss(Q, T[:2], beta=beta),
               lambda: monte_carlo_softmax_loss(Q, T, [[1], [0]], np.array([[0], [2]]), beta=beta)):
        out = fn()
        assert np.isfinite(out[0]) and all(np.all(np.isfinite(a)) for a in out[1:])
    loss = sampled_softmax_loss(Q, T, [[1], [0]], np.array([[0, 2], [1, 1]]), beta=beta)[0]
    # query 0: positive logit -1e4 against 1e4 and 0 -> 2e4; query 1: logit 0 against 0, 0 -> log 3
    assert loss == pytest.approx(0.5 * (2e4 + np.log(3.0)), rel=1e-15)
    # through the encoder, normalised: logits are in [-1e4, 1e4]
    rng = np.random.default_rng(0)
    enc = LinearDualEncoder(4, 4, 3, beta=1e4, rng=0)
    Xq, Xt = rng.standard_normal((3, 4)), rng.standard_normal((6, 4))
    out = full_softmax_grad(enc, Xq, Xt, [[0], [1, 2], [5]])
    assert np.isfinite(out[0]) and all(np.all(np.isfinite(a)) for a in out[1:])


# ------------------------------------------------------------------------------------------- validation
def test_gradient_relative_error():
    a, b = np.array([[3.0, 4.0]]), np.array([[0.0, 0.0]])
    assert gradient_relative_error(a, a) == 0.0
    assert gradient_relative_error(b, a) == pytest.approx(1.0)
    assert gradient_relative_error((a, np.ones(3)), (a, np.zeros(3) + 1)) == 0.0
    assert gradient_relative_error((a + 1, np.ones(1)), (a, np.ones(1))) == pytest.approx(np.sqrt(2 / 26))
    assert gradient_relative_error(b, b) == 0.0 and gradient_relative_error(a, b) == np.inf
    with pytest.raises(ValueError, match="est"):
        gradient_relative_error((a,), (a, a))
    with pytest.raises(ValueError, match=r"est\[0\]"):
        gradient_relative_error(np.ones(3), np.ones(4))


@pytest.mark.parametrize("call, exc, match", [
    (lambda Q, T: full_softmax_loss(Q, T, [0, 1], beta=0.0), ValueError, "beta"),
    (lambda Q, T: full_softmax_loss(Q, T, [0, 1], beta=-2.0), ValueError, "beta"),
    (lambda Q, T: full_softmax_loss(Q, T, [0, 1], beta=np.inf), ValueError, "beta"),
    (lambda Q, T: full_softmax_loss(Q, T, [0, 7], beta=1.0), ValueError, r"positives\[1\]: id 7 out of range"),
    (lambda Q, T: full_softmax_loss(Q, T, [0, -1], beta=1.0), ValueError, r"positives\[1\]: id -1"),
    (lambda Q, T: full_softmax_loss(Q, T, [0], beta=1.0), ValueError, "positives: expected one entry per query"),
    (lambda Q, T: full_softmax_loss(Q, T, [[0], []], beta=1.0), ValueError, r"positives\[1\]: is empty"),
    (lambda Q, T: full_softmax_loss(Q, T, [[0], [0.5]], beta=1.0), TypeError, r"positives\[1\]"),
    (lambda Q, T: full_softmax_loss(Q, T, "ab", beta=1.0), TypeError, "positives"),
    (lambda Q, T: full_softmax_loss(Q[:0], T, [], beta=1.0), ValueError, "Q: is empty"),
    (lambda Q, T: full_softmax_loss(Q, T[:, :2], [0, 1], beta=1.0), ValueError, "T: expected 3 columns"),
    (lambda Q, T: full_softmax_loss(np.where(Q > 0, np.nan, Q), T, [0, 1], beta=1.0), ValueError, "Q: contains NaN"),
    (lambda Q, T: full_softmax_loss(Q, T * np.inf, [0, 1], beta=1.0), ValueError, "T: contains NaN or Inf"),
    (lambda Q, T: full_softmax_loss(sp.csr_matrix(Q), T, [0, 1], beta=1.0), TypeError, "Q"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 9]), beta=1.0), ValueError,
     "negatives: id 9 out of range"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.ones((3, 2), int), beta=1.0), ValueError,
     "negatives: a 2-D array needs one row per query"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.ones((2, 2, 2), int), beta=1.0), ValueError, "negatives"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1.0, 2.0]), beta=1.0), TypeError, "negatives"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_q=[-1.0]), ValueError,
     "log_q: expected the shape"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_q=[-1.0, np.nan]),
     ValueError, "log_q: contains NaN"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_q=[-1.0, 0.5]),
     ValueError, "log_q: log-probabilities must be <= 0"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_q=[-1.0, -np.inf]),
     ValueError, "log_q"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_q=[-1.0, -1.0],
                                       log_expected_count=[0.0, 0.0]), ValueError, "log_expected_count"),
    (lambda Q, T: sampled_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0, log_expected_count=[0.0]),
     ValueError, "log_expected_count: expected the shape"),
    (lambda Q, T: in_batch_softmax_loss(Q, T, beta=1.0), ValueError, "T_pos: expected one row per query"),
    (lambda Q, T: in_batch_softmax_loss(Q, T[:2], beta=1.0, target_ids=[1]), ValueError, "target_ids"),
    (lambda Q, T: in_batch_softmax_loss(Q, T[:2], beta=1.0, positives=[[0], [1]]), ValueError, "positives"),
    (lambda Q, T: monte_carlo_softmax_loss(Q, T, [0, 1], np.array([[1], [9]]), beta=1.0), ValueError,
     "samples: id 9"),
    (lambda Q, T: monte_carlo_softmax_loss(Q, T, [0, 1], np.array([1, 2]), beta=1.0), ValueError, "samples"),
])
def test_bad_inputs(call, exc, match):
    rng = np.random.default_rng(0)
    Q, T = rng.standard_normal((2, 3)), rng.standard_normal((5, 3))
    with pytest.raises(exc, match=match):
        call(Q, T)


# ------------------------------------------------------------------------------- estimators wired right
def _estimator_problem(N, B, nf, D, beta, seed):
    """Encoder + data where each query's positives are its top-scoring targets (as after training: the positive
    carries real probability mass, so the weight given to it matters); query 1 has two positives."""
    rng = np.random.default_rng(seed)
    enc = LinearDualEncoder(nf, nf, D, beta=beta, rng=seed + 1)
    Xq, Xt = rng.standard_normal((B, nf)), rng.standard_normal((N, nf))
    order = np.argsort(-enc.logits(Xq, Xt), axis=1)
    pos = [order[i, :2] if i == 1 else order[i, :1] for i in range(B)]
    return rng, enc, Xq, Xt, pos


def _flat(grads):
    return np.concatenate([np.ravel(g) for g in grads])


def _brute_pair_probs(enc, Xq, Xt, pos):
    """P_e by brute force, independently of refimpl.softmax: softmax of beta <q_i, t_j> over {p} and the rows that
    are not positives of query i."""
    S = enc.beta * enc.encode_queries(Xq) @ enc.encode_targets(Xt).T
    probs = []
    for i, p_i in enumerate(pos):
        for p in p_i:
            s = S[i].copy()
            s[[j for j in p_i if j != p]] = -np.inf
            w = np.exp(s - s.max())
            probs.append(w / w.sum())
    return np.array(probs)


def _mc_groups(enc, Xq, Xt, pos, probs, rng, k, groups, per):
    """``groups`` independent means of ``per`` Monte Carlo gradients, each from k exact draws per example.

    The queries are tiled ``per`` times in one call; since every tile has the same examples, the mean over the
    tiled examples is the mean of the ``per`` single-draw gradients."""
    E, N = probs.shape
    out = []
    for _ in range(groups):
        draws = np.stack([rng.choice(N, size=(per, k), p=probs[e]) for e in range(E)], axis=1)  # per, E, k
        out.append(_flat(monte_carlo_softmax_grad(enc, np.tile(Xq, (per, 1)), Xt, pos * per,
                                                  draws.reshape(per * E, k))[1:]))
    return np.array(out)


def _mc_check(groups, ref, tol):
    mean = groups.mean(axis=0)
    se = groups.std(axis=0, ddof=1) / np.sqrt(groups.shape[0])
    rel = np.linalg.norm(mean - ref) / np.linalg.norm(ref)
    max_t = np.max(np.abs(mean - ref) / se)
    return rel, max_t, rel < tol and max_t < 6.0


def test_monte_carlo_gradient_with_exact_softmax_negatives_is_unbiased():
    """(a) ``-grad s_p + (1/k) sum_j grad s_{n_j}``, ``n_j ~ P_e`` exact (drawn here with numpy from brute-force
    probabilities), averages to the full-softmax gradient (Eq. 2) w.r.t. (A, B).

    N = 50 targets, 4 queries / 5 examples (one query with two positives), beta = 5, normalised; k = 4 negatives per
    draw, 20 groups x 200 draws = 4000 draws (16000 negatives) per example. Checks: relative error of the mean
    < 0.04, and every one of the 80 coordinates within 6 standard errors (Student t, 19 dof: family-wise false
    alarm ~1e-3). Power: the measured relative standard error of the mean is ~0.01, so any bias of relative size
    >= 0.07 fails with probability > 0.99. Negative controls (asserted to fail the same check): negatives drawn at
    a 20% wrong temperature (measured: relative error 0.083, max |t| 18) and negatives that never include the
    positive itself (0.22, max |t| 89); the correct sampler measures 0.0075, max |t| 2.1.
    """
    rng, enc, Xq, Xt, pos = _estimator_problem(50, 4, 8, 5, 5.0, seed=3)
    ref = _flat(full_softmax_grad(enc, Xq, Xt, pos)[1:])
    probs = _brute_pair_probs(enc, Xq, Xt, pos)
    assert np.all(probs[np.arange(5), np.concatenate(pos)] > 0.05)   # the positive carries real mass
    rel, max_t, ok = _mc_check(_mc_groups(enc, Xq, Xt, pos, probs, rng, 4, 20, 200), ref, 0.04)
    assert ok, (rel, max_t)
    # negative control 1: wrong temperature (softmax at 0.8 beta)
    hot = enc.copy()
    hot.beta = 0.8 * enc.beta
    rel1, t1, ok1 = _mc_check(_mc_groups(enc, Xq, Xt, pos, _brute_pair_probs(hot, Xq, Xt, pos), rng, 4, 20, 200),
                              ref, 0.04)
    assert not ok1 and rel1 > 0.06 and t1 > 10, (rel1, t1)
    # negative control 2: the positive excluded from its own example's negatives
    probs2 = probs.copy()
    probs2[np.arange(5), np.concatenate(pos)] = 0.0
    probs2 /= probs2.sum(axis=1, keepdims=True)
    rel2, t2, ok2 = _mc_check(_mc_groups(enc, Xq, Xt, pos, probs2, rng, 4, 20, 200), ref, 0.04)
    assert not ok2 and rel2 > 0.1 and t2 > 10, (rel2, t2)


def test_log_q_corrected_sampled_softmax_bias_shrinks_with_k_uncorrected_does_not():
    """(b) Uniform proposal q = 1/N over all N = 10000 targets (with replacement, accidental hits removed),
    beta = 15, 4 queries / 5 examples whose positives are their top targets. For k in (4, 32, 256) the sampled-
    softmax gradient (Alg. 4 lines 9-10) is averaged over 1000 independent draws (two halves of 500, to measure
    the Monte Carlo noise left in the average) and compared with the full-softmax gradient: what remains is the bias.

    Measured (this seed): log-Q corrected 0.45, 0.19, 0.043; uncorrected 0.98, 0.85, 0.41; noise of the
    corrected averages 0.058, 0.055, 0.023. Seeds 2-5 give the same picture.
    Asserted: corrected error strictly decreasing in k, each decrease larger than twice the Monte Carlo noise of
    the two averages (noise ~0.06, 0.06, 0.02: so the trend is bias, not noise), < 0.1 at k = 256 and < 1/4 of its
    k = 4 value; uncorrected error > 0.3 at every k and more than 3x the corrected one at k = 32 and 256. The uncorrected estimator is the negative
    control: it is the same computation with the correction left out, and it fails the corrected one's checks.
    """
    rng, enc, Xq, Xt, pos = _estimator_problem(10000, 4, 10, 6, 15.0, seed=1)
    N, B = Xt.shape[0], Xq.shape[0]
    ref = _flat(full_softmax_grad(enc, Xq, Xt, pos)[1:])
    nref = np.linalg.norm(ref)
    R = 500
    XqR, posR = np.tile(Xq, (R, 1)), pos * R
    err = {True: {}, False: {}}
    noise = {}
    for k in (4, 32, 256):
        for corrected in (True, False):
            halves = []
            for _ in range(2):
                neg = rng.integers(0, N, size=(R * B, k))
                log_q = np.full(neg.shape, -np.log(N)) if corrected else None
                halves.append(_flat(sampled_softmax_grad(enc, XqR, Xt, posR, neg, log_q=log_q)[1:]))
            err[corrected][k] = np.linalg.norm(0.5 * (halves[0] + halves[1]) - ref) / nref
            if corrected:
                noise[k] = 0.5 * np.linalg.norm(halves[0] - halves[1]) / nref
    c, u = err[True], err[False]
    assert c[4] > c[32] > c[256], c
    assert c[256] < 0.1 and c[256] < c[4] / 4, c
    assert c[4] - c[32] > 2 * np.hypot(noise[4], noise[32]), (noise, c)
    assert c[32] - c[256] > 2 * np.hypot(noise[32], noise[256]), (noise, c)
    assert all(u[k] > 0.3 for k in u), u
    assert u[32] > 3 * c[32] and u[256] > 3 * c[256], (u, c)
