"""The adaptive sampler's per-query pass and draws (refimpl.sampling._adaptive): the vectorisable exponential
against extended-precision exp, the branch-free certified bounds against the three bounds they take the least of,
the lumping and the weights of the start clusters, the two-level proposal search (never an entry of weight 0, and
the law of the weights), the inline generator (uniform and exactly uniform integers, chi-square), the start
frontier's owner map (a partition of the pre-order, which the tail's proposals rely on), the child table the
refinement reads, and the sampler's law
with lumped start clusters (chi-square at alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02, as in
tests/test_samplers_float32.py). Seeds are fixed.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from refimpl.index import N_NODES
from refimpl.index.search import preorder
from refimpl.sampling import samplers as S
from refimpl.sampling._adaptive import (EXP_REL, FENCE, REFINE_SHARE, _cumulative, _exp, _propose, _start_bounds,
                                        _start_masses, below, rng_state, uniform)
from refimpl.testing import ALPHA, TV, chi2_gof, required_sample_size
from tests.test_samplers_stats import _instance

N_DRAWS = required_sample_size(TV)  # 64,143: power >= 0.99 at TV 0.02


@njit(cache=True, fastmath={"contract"})
def _exp_loop(x, out):
    for j in range(x.shape[0]):
        out[j] = _exp(x[j])


def _exp_array(x):
    """_exp over an array, in a loop compiled as the kernel's (contraction only: the loop vectorises)."""
    out = np.empty_like(x)
    _exp_loop(x, out)
    return out


def test_exp_relative_error_underflow_and_special_values():
    """_exp against exp in extended precision (long double where it has a 64-bit mantissa, else libm with a
    looser bound) on 2.2e6 points of [-700, 709] (uniform, and the edges of the range reduction, r = +-ln2/2):
    relative error <= EXP_REL / 2 (the polynomial's bound, 4e-10). Below -700 (and at -inf) exactly 0, off by at
    most e^-700 from exp; NaN stays NaN and never arises from any other input."""
    rng = np.random.default_rng(7)
    edges = (np.arange(-2020, 2046) + 0.5) * np.log(2.0)
    x = np.concatenate([-rng.uniform(0.0, 700.0, 2_000_000), rng.uniform(0.0, 709.0, 200_000),
                        np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [0.0, -700.0, 709.0, -1e-300]])
    x = x[(x >= -700.0) & (x <= 709.0)]
    got = _exp_array(x)
    assert not np.isnan(got).any() and np.all(got > 0.0)
    if np.finfo(np.longdouble).nmant >= 63:
        ref = np.exp(x.astype(np.longdouble))
        rel = np.abs((got.astype(np.longdouble) - ref) / ref).astype(np.float64)
        assert rel.max() <= EXP_REL / 2, rel.max()
    else:  # pragma: no cover - platforms whose long double is a double
        assert np.max(np.abs(got / np.exp(x) - 1.0)) <= EXP_REL
    assert _exp_array(np.array([0.0]))[0] == 1.0
    under = np.concatenate([-rng.uniform(700.0, 800.0, 10_000), np.nextafter([-700.0], -np.inf),
                            [-745.2, -1e300, -np.inf]])
    got = _exp_array(under)
    assert np.all(got == 0.0) and np.all(np.exp(under) <= np.exp(-700.0))
    assert np.isnan(_exp_array(np.array([np.nan])))[0]


def _reference_bounds(s, bq, qn2, beta, rho, rn2, M, tau):
    """The three bounds of Prop. 1 and the expansion, with the branches written out."""
    e = np.minimum(s + bq * rho, bq * M)
    d2 = qn2 + rn2 - 2.0 * s / beta
    dl = np.where(d2 > 0.0, np.sqrt(np.maximum(d2, 0.0)) - rho, -rho)
    b3 = 0.5 * beta * (qn2 + M * M - dl * dl) + 16.0 * 2.0 ** -53 * beta * (qn2 + rn2 + M * M)
    return np.where(dl > 0.0, np.minimum(e, b3), e) + tau


def test_start_bounds_are_certified_and_the_least_of_three():
    """_start_bounds on 3,000 random clusters (D = 8, beta = 20, a non-unit query, radii from 0 to 2, members on
    the radius sphere and towards the query, where <q, t> is largest): every member's logit beta <q, t> <= E, E
    equals the least of the three bounds (within 1e-12 of the size of their terms: an FMA may round s + beta ||q||
    rho differently), singletons get E = s, the negative control
    (sl = 0) E = s, and the clusters with E <= Etail get E = s = -inf, the others s unchanged."""
    rng = np.random.default_rng(8)
    C, D, beta = 3000, 8, 20.0
    q = rng.normal(size=D)
    q *= 1.3 / np.linalg.norm(q)
    qn2 = float(q @ q)
    bq = beta * np.sqrt(qn2)
    tau = 1e-12 * bq
    R = rng.normal(size=(C, D)) * rng.uniform(0.2, 1.5, size=(C, 1))
    rho = rng.uniform(0.0, 2.0, C)
    rho[:50] = 0.0
    U = rng.normal(size=(C, 6, D))
    U[:, 0] = q  # the member towards the query
    U /= np.linalg.norm(U, axis=2, keepdims=True)
    T = R[:, None, :] + rho[:, None, None] * U
    M = np.maximum(np.linalg.norm(T, axis=2).max(axis=1), np.linalg.norm(R, axis=1)) * (1.0 + 2.0 ** -50)
    s = beta * (R @ q)
    rn2 = np.einsum("ij,ij->i", R, R)
    sizes = np.full(C, 7, np.int64)
    sizes[50:80] = 1
    fE, fs = np.empty(C), np.empty(C)
    _start_bounds(s, sizes, rho, rn2, M, bq, qn2, beta, tau, 1.0, fE, fs)
    assert np.all(beta * np.einsum("cmd,d->cm", T, q)[sizes > 1].max(axis=1) <= fE[sizes > 1])
    ref = np.where(sizes > 1, _reference_bounds(s, bq, qn2, beta, rho, rn2, M, tau), s)
    tol = 1e-12 * (np.abs(s) + bq * (rho + M))
    assert np.all(np.abs(fE - ref) <= tol) and np.array_equal(fs, s)
    assert np.array_equal(fE[sizes == 1], s[sizes == 1])
    _start_bounds(s, sizes, rho, rn2, M, bq, qn2, beta, tau, 0.0, fE, fs)
    assert np.array_equal(fE, s)


def test_start_masses_lump_and_weigh_the_start_clusters():
    """_start_masses on 3,000 clusters (sizes 1 to 500, bounds spread over 60 nats): the clusters with E <= Etail
    are lumped (E = -inf, every term 0) and counted; the others get W >= n e^{E - Eref} within 4 EXP_REL, the
    lower term <= n e^{s - beta ||q|| rho - tau - Eref} (a singleton: e^{s - Eref}) within 2 EXP_REL, the Eq. 7
    term n e^{s - Eref}, and W - that term for clusters of more than one target (0 for singletons). Each side of
    an inequality is allowed the rounding of its exponent's argument, 4 u |x| relative (u = 2^-53: an FMA rounds
    s - beta ||q|| rho once, NumPy twice)."""
    rng = np.random.default_rng(11)
    C = 3000
    n = rng.integers(1, 500, C)
    n[:300] = 1
    s = rng.uniform(-50.0, 10.0, C)
    r = rng.uniform(0.0, 0.5, C)
    bq, tau, Eref = 20.0, 1e-12, 12.0
    E = np.where(n > 1, s + bq * r, s)
    Etail = -20.0
    fE, W, zt, lt, dt = E.copy(), np.empty(C), np.empty(C), np.empty(C), np.empty(C)
    nt, nl = _start_masses(n, fE, s, r, C, bq, tau, Eref, Etail, W, zt, lt, dt)
    lump = E <= Etail
    assert lump.any() and not lump.all()
    assert nt == n[lump].sum() and nl == lump.sum()
    assert np.all(fE[lump] == -np.inf) and np.array_equal(fE[~lump], E[~lump])
    for a in (W, zt, lt, dt):
        assert np.all(a[lump] == 0.0)
    k = ~lump
    x = E[k] - Eref
    w_ref = n[k] * np.exp(x)
    arg = 4.0 * 2.0 ** -53 * np.abs(x)
    assert np.all(W[k] >= w_ref * (1.0 - arg)) and np.all(W[k] <= w_ref * (1.0 + 4.0 * EXP_REL + arg))
    x = np.where(n[k] > 1, s[k] - bq * r[k] - tau, s[k]) - Eref
    lo_ref = n[k] * np.exp(x)
    arg = 4.0 * 2.0 ** -53 * np.abs(x)
    assert np.all(lt[k] <= lo_ref * (1.0 + arg)) and np.all(lt[k] >= lo_ref * (1.0 - 2.0 * EXP_REL - arg))
    assert np.allclose(zt[k], n[k] * np.exp(s[k] - Eref), rtol=2.0 * EXP_REL, atol=0.0)
    assert np.array_equal(dt[k], np.where(n[k] > 1, W[k] - zt[k], 0.0))


def _zero_heavy_weights(rng, n):
    """n weights over 30 orders of magnitude, about half of them exactly 0 (lumped clusters), the first two and the
    second last included; the last (the kernel's tail) positive."""
    w = np.exp(rng.uniform(-70.0, 0.0, n))
    w[rng.random(n) < 0.5] = 0.0
    w[[0, 1, n - 2]] = 0.0
    w[-1] = 0.5
    return w


@njit(cache=True)
def _propose_all(w, us):
    """The kernel's proposal (_cumulative, then _propose) at every point of ``us``."""
    n = w.shape[0]
    cw = np.empty(n + FENCE)
    fence = np.empty(n // FENCE + 2)
    nb = _cumulative(w, n, cw, fence)
    jmax = n - 1
    while w[jmax] == 0.0:
        jmax -= 1
    out = np.empty(us.shape[0], np.int64)
    for x in range(us.shape[0]):
        out[x] = _propose(cw, fence, nb, us[x] * cw[n - 1], jmax)
    return out


def test_proposal_never_lands_on_a_zero_weight_and_follows_the_weights():
    """The two-level search over weights with many exact zeros (n from 3 to 4,000, across the block size 32):
    at 200,000 uniform points, at every cumulative boundary and at the total itself (u rounded up), the entry
    found always has a positive weight; on a grid of 2^20 evenly spaced points of [0, 1) each entry's share is
    its weight's within 2 grid steps (the search is the inverse CDF of the weights)."""
    for seed, n in zip(range(5), (3, 31, 33, 1000, 4000)):
        rng = np.random.default_rng(seed)
        w = _zero_heavy_weights(rng, n)
        w[n // 2] = 1.0
        cw = np.cumsum(w)
        us = np.concatenate([rng.random(200_000), cw[:-1] / cw[-1], [0.0, 1.0, np.nextafter(1.0, 0.0)]])
        picked = _propose_all(w, us)
        assert np.all(w[picked] > 0.0), seed
        m = 1 << 20
        share = np.bincount(_propose_all(w, (np.arange(m) + 0.5) / m), minlength=n) / m
        assert np.all(np.abs(share - w / w.sum()) <= 2.0 / m), seed


@njit(cache=True)
def _draw_uniforms(seed, m):
    st = rng_state(seed)
    out = np.empty(m)
    for x in range(m):
        out[x] = uniform(st)
    return out


@njit(cache=True)
def _draw_below(seed, n, m):
    st = rng_state(seed)
    out = np.empty(m, np.int64)
    for x in range(m):
        out[x] = below(st, n)
    return out


def test_generator_uniforms_and_integers_are_uniform():
    """The inline xoshiro256** generator: 10^6 uniforms lie in [0, 1) and pass a chi-square test over 1,000 equal
    bins; integers below n for n = 1, 3, 1,000, 2^31 + 1 (Lemire's rejection path matters most near 2^32),
    3 x 2^32 + 5 (the 64-bit path) lie in [0, n) and pass a chi-square test over 1,000 bins of their exact
    probabilities (alpha 0.001 each; with 10^6 draws a bias of 1 % in a tenth of the bins is found with power
    > 0.99); the same seed gives the same stream, another seed another."""
    u = _draw_uniforms(5, 1_000_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert chi2_gof(np.floor(u * 1000).astype(np.int64), np.full(1000, 1e-3))[0] > ALPHA
    assert np.array_equal(u[:100], _draw_uniforms(5, 100)) and not np.array_equal(u[:100], _draw_uniforms(6, 100))
    assert np.all(_draw_below(1, 1, 1000) == 0)
    for n in (3, 1000, 2**31 + 1, 3 * 2**32 + 5):
        x = _draw_below(7, n, 1_000_000)
        assert x.min() >= 0 and x.max() < n, n
        nb = min(n, 1000)
        bins = x * nb // n  # bin b holds the integers i with i nb // n = b
        edges = -(-np.arange(nb + 1, dtype=object) * n // nb)  # the first integer of each bin, exactly
        p = np.array([(edges[b + 1] - edges[b]) / n for b in range(nb)], np.float64)
        assert chi2_gof(bins, p)[0] > ALPHA, n


@pytest.mark.usefixtures("rejection_path")
@pytest.mark.parametrize("k", [2, 64])
def test_adaptive_with_lumped_start_clusters_is_exact(k):
    """sample_adaptive from a start level of up to 300 clusters, more than half of them lumped into the tail (mass 0
    in the envelope, their members proposed through the tail), with k = 2 and k = 64 draws per query row: the
    softmax (chi-square, alpha 0.001, n = 64,143, power >= 0.99 at TV 0.02; beta = 20, D = 8), certified and finite
    log Z bounds, and no brute-force draw."""
    X, tree, q = _instance("unit", 8)
    rows = -(-N_DRAWS // k)
    r = S.sample_adaptive(tree, np.repeat(q[None], rows, axis=0), k, beta=20.0, rng=60, start_clusters=300)
    assert np.all(r.stats["lumped_clusters"] > 0) and np.sum(r.stats["exact_fallbacks"]) == 0
    p = np.exp(20.0 * X @ q - np.max(20.0 * X @ q))
    assert chi2_gof(r.ids.ravel()[:N_DRAWS], p / p.sum())[0] > ALPHA, k
    lz = np.logaddexp.reduce(20.0 * X @ q)
    lo, hi = r.stats["log_z_lo"], r.stats["log_z_hi"]
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    assert np.all(lo - 1e-9 <= lz) and np.all(lz <= hi + 1e-9)


@pytest.mark.parametrize("kind", ["unit", "dynamic"])
def test_start_frontier_owner_partitions_the_preorder(kind):
    """The start frontier's ``owner`` (the tail's proposals rely on it): at start levels of about 30, 300 and 3,000
    clusters, every pre-order position has an owner, each start cluster owns exactly its size, and the targets it
    owns are its representative and the members of its pre-order range."""
    X, tree, q = _instance(kind, 8)
    order, pos = preorder(tree)
    for start in (30, 300, 3000):
        F0, R, _, _ = S.adaptive_start(tree, start)
        nodes, fc, fa, fn, owner = F0[0], F0[1], F0[2], F0[3], F0[7]
        assert owner.shape == order.shape and owner.min() >= 0, start
        assert np.array_equal(np.bincount(owner, minlength=nodes.size), fn), start
        pts = tree.arrays().node_point
        for j in np.random.default_rng(start).choice(nodes.size, size=min(nodes.size, 50), replace=False):
            mine = np.sort(order[owner == j])
            expect = np.sort(np.concatenate([[pts[nodes[j]]], order[fa[j]:fa[j] + fn[j] - 1]]))
            assert np.array_equal(mine, expect), (start, j)


@pytest.mark.parametrize("kind", ["unit", "dynamic"])
def test_child_table_lists_each_nodes_children_in_order(kind):
    """The child table the refinement reads (on a static and on a mutated tree, whose free and reused node slots
    it must skip): for every live node its slots hold exactly its child list, in list order, with each child's
    level, row, subtree size, pre-order position, first child's slot, the certified radius of its whole subtree
    and its members' norm bound (each checked against the targets of its subtree); the start frontier's first
    child slots point at the first child below the start level."""
    X, tree, q = _instance(kind, 8)
    ta = tree.arrays()
    order, pos = preorder(tree)
    cptr, cnode, clev, cpt, ccount, cpos, cfirst, crad, csubn, sufn = S.child_table(tree)
    n_nodes = int(ta.state[N_NODES])
    pts = np.asarray(tree.points, np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", pts, pts))
    assert cptr[0] == 0 and np.all(np.diff(cptr) >= 0)
    seen = 0
    for v in range(n_nodes):
        kids = []
        c = ta.node_first_child[v]
        while c != -1:
            kids.append(c)
            c = ta.node_next_sibling[c]
        if ta.node_point[v] < 0:
            assert not kids and cptr[v + 1] == cptr[v], v
            continue
        assert list(cnode[cptr[v]:cptr[v + 1]]) == kids, v
        seen += len(kids)
        for y in range(cptr[v], cptr[v + 1]):
            c = kids[y - cptr[v]]
            members = order[pos[c]:pos[c] + ta.node_count[c]]
            assert (clev[y], cpt[y], ccount[y], cpos[y]) == (ta.node_level[c], ta.node_point[c],
                                                             ta.node_count[c], pos[c]), (v, c)
            assert order[cpos[y]] == cpt[y]
            first = ta.node_first_child[c]
            assert cfirst[y] == (cptr[c] if first != -1 else -1) and (first == -1) == (ccount[y] == 1)
            d = np.sqrt(((pts[members] - pts[cpt[y]]) ** 2).sum(axis=1))
            assert crad[y] >= d.max() - 1e-12 and (crad[y] == 0.0) == (first == -1), (v, c)
            assert csubn[y] >= norms[members].max() * (1 - 1e-15), (v, c)
    assert seen == cptr[n_nodes] == len(tree) - 1  # every live node but the root is somebody's child
    for start in (30, 300):
        F0 = S.adaptive_start(tree, start)[0]
        nodes, fc, L = F0[0], F0[1], int(F0[8])
        for j, v in enumerate(nodes):
            below = [y for y in range(cptr[v], cptr[v + 1]) if clev[y] < L]
            assert fc[j] == (below[0] if below else -1), (start, v)


def test_start_level_choice_follows_its_cost_rule():
    """adaptive_envelope_start on the test tree (2,000 targets: its 2 sqrt(N) and 32 sqrt(N) levels differ): for k from
    10^-3 to 10^6 draws per query (the engine passes a batch's mean, a fraction) the level chosen is the coarse one
    exactly when |C_coarse| + k r ATTEMPT_CLUSTERS <= |C_fine| + k ATTEMPT_CLUSTERS, r the mean Z_hi / Z_hat of the
    coarse envelope on the probe queries (computed here through sample_adaptive's own log Z bounds at k = 0 from the
    coarse level); both choices occur; S0 is beta Q R^T of the chosen level, and the GEMM inner products reported by
    sample_adaptive include the coarse level's when the fine one is chosen."""
    X, tree, q = _instance("unit", 8)
    n = len(tree)
    Q = np.repeat(q[None], 6, axis=0) + 0.05 * np.random.default_rng(3).normal(size=(6, q.size))
    coarse = S.adaptive_start(tree, S.START_SQRT[0] * np.sqrt(n))
    fine = S.adaptive_start(tree, S.START_SQRT[-1] * np.sqrt(n))
    cc, cf = coarse[1].shape[0], fine[1].shape[0]
    assert cc < cf
    rows = np.unique(np.linspace(0, Q.shape[0] - 1, min(Q.shape[0], S.START_PROBE)).astype(np.int64))
    r0 = S.sample_adaptive(tree, Q[rows], 0, beta=20.0, rng=0, start_clusters=S.START_SQRT[0] * np.sqrt(n))
    # k = 0: log Z estimate is Eq. 7's Z_hat (clipped to the certified interval), as in the rule
    ratio = np.mean(np.exp(r0.stats["log_z_hi"] - r0.stats["log_z"]))
    chosen = set()
    for k in (1e-3, 1e-2, 0.1, 1, 10, 100, 10 ** 6):
        F0, S0, margin, CT, g = S.adaptive_envelope_start(tree, Q, k, 20.0)
        want_coarse = cc + k * ratio * S.ATTEMPT_CLUSTERS <= cf + k * S.ATTEMPT_CLUSTERS
        R = (coarse if want_coarse else fine)[1]
        assert S0.shape == (Q.shape[0], R.shape[0]), k
        assert np.allclose(S0, 20.0 * Q @ R.T), k
        assert g == (cc if want_coarse else cc + cf), k
        chosen.add(want_coarse)
    for k in (1, 3):
        res = S.sample_adaptive(tree, Q, k, beta=20.0, rng=1)
        gb = S.adaptive_envelope_start(tree, Q, k, 20.0)[4]
        assert np.all(res.stats["gemm_inner_products"] == gb), k
    assert chosen == {True, False}


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_adaptive_switches_to_brute_force_at_its_budget(monkeypatch, share):
    """The brute-force switch of sample_adaptive at G = BRUTE_SHARE x N (the cost alone; the law of the switched
    draws is tested with ``_brute_rest``): per query, with the refinement's inner products r (selection minus the
    start level) and the attempts a, a query that kept rejection sampling has r + a <= G; one that switched after
    attempts has G <= r + a < G + 1 (the check before each attempt); the refinement stays within REFINE_SHARE x G.
    64 distinct queries on 1,000 targets, k = 16, beta = 20; a quarter of N makes some queries switch after
    attempts and leaves others, so each branch is checked."""
    monkeypatch.setattr(S, "BRUTE_SHARE", share)
    X, tree, _ = _instance("unit", 8)
    rng = np.random.default_rng(61)
    Q = X[rng.choice(X.shape[0], 64, replace=False)] + 0.3 * rng.normal(size=(64, 8)) / np.sqrt(8)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    r = S.sample_adaptive(tree, Q, 16, beta=20.0, rng=62, start_clusters=30)
    n = len(tree)
    G = share * n
    switched = r.stats["exact_fallbacks"] > 0
    start = r.stats["gemm_inner_products"] - n * switched
    refined = r.stats["selection_inner_products"] - start
    work = refined + r.stats["attempts"]
    assert np.all(refined <= REFINE_SHARE * G)
    assert np.all(work[~switched] <= G)
    after = switched & (r.stats["attempts"] > 0)
    assert np.all(work[after] >= G) and np.all(work[after] < G + 1)
    assert np.all(r.stats["exact_fallbacks"][switched] >= 1)
    if share < 1.0:
        assert after.any() and (~switched).any()
