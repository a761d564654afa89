"""Clusterings (level, Alg. 2, certified refinement) and their certificates, against brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from refimpl.sampling import clustering as C
from refimpl.sampling import samplers as S
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree


def _tree(n=400, dim=8, seed=0, unit=True, dup=False):
    X = hierarchical_points(n, dim, rng=seed, unit_norm=unit)
    if dup:
        X[n // 2:] = X[: n - n // 2]
    return X, SGTree.build(X, rng=seed + 1)


def _labels(tree, cl, n):
    """Cluster of each target, by enumerating every cluster's members (independent of cluster_labels)."""
    lab = np.full(n, -1)
    for j in range(len(cl)):
        m = C.cluster_members(tree, cl, j)
        assert (lab[m] == -1).all(), "a target is in two clusters"
        lab[m] = j
    return lab


def _check_partition_and_radii(X, cl, tree):
    lab = _labels(tree, cl, X.shape[0])
    np.testing.assert_array_equal(C.cluster_labels(tree, cl)[: X.shape[0]], lab)
    assert (lab >= 0).all(), "a target is in no cluster"
    np.testing.assert_array_equal(np.bincount(lab, minlength=len(cl)), cl.sizes)
    d = np.linalg.norm(X - X[cl.reps[lab]], axis=1)
    assert np.all(d <= cl.radii[lab] * (1 + 1e-12) + 1e-12), "radius is not an upper bound"
    assert np.all(lab[cl.reps] == np.arange(len(cl))), "a representative is outside its cluster"
    return lab


@pytest.mark.parametrize("dup", [False, True])
def test_level_clustering_partitions_with_valid_radii(dup):
    X, tree = _tree(dup=dup)
    lo, hi = tree.level_range()
    for L in range(lo - 1, hi + 3):
        cl = C.level_clustering(tree, L)
        _check_partition_and_radii(X, cl, tree)
        ref = tree.clustering(L)  # the tree's own C_(L)
        assert sorted(ref.nodes.tolist()) == sorted(cl.nodes.tolist())
        assert np.all(cl.radii <= np.asarray(ref.radii)[np.argsort(ref.nodes)][np.argsort(np.argsort(cl.nodes))]
                      * (1 + 1e-12) + 1e-12)


def _alg2_reference(tree, q, start, m, base):
    """Alg. 2 written directly from the paper (frontier of (node, level) pairs, union fix), in plain Python."""
    lv = tree.node_level
    root = tree.root
    frontier = [(int(v), start) for v in C.level_clustering(tree, start).nodes]
    out = []
    k = start
    if k > lv[root] + 1 and lv[root] + 1 > m:
        k = int(lv[root]) + 1
        frontier = [(root, k)]
    while k > m and frontier:
        thr = base ** k + base ** m
        new = []
        for v, _ in frontier:
            kids = [v] + [int(c) for c in tree.children(v) if lv[c] == k - 1]
            for c in kids:
                d = np.linalg.norm(q - tree.points[tree.node_point[c]])
                (out if d > thr else new).append((c, k - 1))
        frontier = new
        k -= 1
    return sorted(out + frontier)


@pytest.mark.parametrize("gamma,beta", [(4.0, 5.0), (50.0, 5.0), (1e4, 20.0), (2.0, 1.0)])
def test_find_clustering_is_alg2(gamma, beta):
    """find_clustering equals a direct transcription of Alg. 2 (union fix) and is a partition with valid radii."""
    from refimpl.sampling import bounds

    X, tree = _tree()
    q = X[5] + 0.05
    q /= np.linalg.norm(q)
    cl = C.find_clustering(tree, q, beta=beta, gamma=gamma)
    start = bounds.prop2_level(gamma, beta, tree.base)
    m = C.default_m(start, tree.base)
    assert cl.stats["start_level"] == start and cl.stats["m"] == m
    got = sorted(zip(cl.nodes.tolist(), cl.levels.tolist()))
    assert got == _alg2_reference(tree, q, start, m, tree.base)
    _check_partition_and_radii(X, cl, tree)


def test_find_clustering_cap_keeps_a_partition():
    X, tree = _tree()
    cl = C.find_clustering(tree, X[3], beta=5.0, gamma=1e3, max_clusters=5)
    _check_partition_and_radii(X, cl, tree)


def _truth(tree, X, q, beta, cl, proposal="eq7"):
    s = beta * (X @ q)
    lab = _labels(tree, cl, X.shape[0])
    lz = s.max() + math.log(np.exp(s - s.max()).sum())
    sr = beta * (X[cl.reps] @ q)
    lw = sr[lab] + (beta * np.linalg.norm(q) * cl.radii[lab] if proposal == "upper" else 0)
    lq = lw - (lw.max() + math.log(np.exp(lw - lw.max()).sum()))
    lp = s - lz
    return lz, float(np.max(lp - lq)), 0.5 * float(np.abs(np.exp(lp) - np.exp(lq)).sum())


@given(seed=hs.integers(0, 10**6), beta=hs.sampled_from([1.0, 5.0, 20.0]), dim=hs.sampled_from([2, 8, 32]),
       unit=hs.booleans(), level_shift=hs.integers(-3, 6))
def test_certificate_holds_against_brute_force(seed, beta, dim, unit, level_shift):
    """certify: log_z_lo <= log Z <= log_z_hi, log_gamma >= log max P/Q (Eq. 7), log_gamma_upper >= log max P/Q+,
    tv_bound >= TV(P, Q), on random instances, query norms and levels (unit and non-unit norms)."""
    rng = np.random.default_rng(seed)
    X = hierarchical_points(150, dim, rng=seed, unit_norm=unit)
    tree = SGTree.build(X, rng=seed)
    q = rng.normal(size=dim) * rng.uniform(0.2, 2.0)
    L = S.default_level(tree, beta) + level_shift
    cl = C.level_clustering(tree, L)
    cert = C.certify(tree, q, cl, beta=beta)
    lz, lg, tv = _truth(tree, X, q, beta, cl)
    _, lg_up, tv_up = _truth(tree, X, q, beta, cl, "upper")
    tol = 1e-9 * max(1.0, abs(lz))
    assert cert.log_z_lo - tol <= lz <= cert.log_z_hi + tol
    assert lg <= cert.log_gamma + 1e-9
    assert lg_up <= cert.log_gamma_upper + 1e-9
    assert tv <= cert.tv_bound + 1e-12 and tv_up <= cert.tv_bound_upper + 1e-12


@pytest.mark.parametrize("proposal", ["eq7", "upper"])
@pytest.mark.parametrize("beta", [5.0, 20.0])
def test_refinement_reaches_certified_gamma(proposal, beta):
    """refine_clustering splits until the certified log max P/Q <= log gamma; the true ratio is below it."""
    X, tree = _tree(n=500, dim=8, seed=3)
    q = X[9]
    start = C.level_clustering(tree, tree.level_range()[1])
    cl = C.refine_clustering(tree, q, start, beta=beta, gamma=3.0, proposal=proposal)
    cert = cl.stats["certificate"]
    assert cl.stats["certified"]
    lg_cert = cert.log_gamma if proposal == "eq7" else cert.log_gamma_upper
    assert lg_cert <= math.log(3.0) + 1e-9
    _check_partition_and_radii(X, cl, tree)
    _, lg, _ = _truth(tree, X, q, beta, cl, proposal)
    assert lg <= lg_cert + 1e-9
    # the certificate carried by the result is the one certify() computes
    again = C.certify(tree, q, cl, beta=beta)
    assert abs(again.log_gamma - cert.log_gamma) < 1e-9 and abs(again.log_z_lo - cert.log_z_lo) < 1e-9


def test_refinement_upper_is_cheaper_than_eq7():
    """The upper proposal's certificate ignores low-mass clusters: it needs far fewer clusters for the same gamma."""
    X, tree = _tree(n=500, dim=8, seed=3)
    q = X[9]
    start = C.level_clustering(tree, tree.level_range()[1])
    a = C.refine_clustering(tree, q, start, beta=20.0, gamma=3.0, proposal="eq7")
    b = C.refine_clustering(tree, q, start, beta=20.0, gamma=3.0, proposal="upper")
    assert len(b) < len(a)


def test_refinement_budget_is_respected_and_reported():
    X, tree = _tree(n=500, dim=8, seed=3)
    q = X[9]
    start = C.level_clustering(tree, tree.level_range()[1])
    cl = C.refine_clustering(tree, q, start, beta=20.0, gamma=1.5, max_clusters=20)
    assert len(cl) <= 20 + 64  # one split may overshoot by its number of children
    assert not cl.stats["certified"]
    _check_partition_and_radii(X, cl, tree)


def test_certificates_after_dynamic_updates():
    """After update_points (without repair) the radii stay valid upper bounds, so certificates still hold."""
    X, tree = _tree(n=300, dim=8, seed=4)
    rng = np.random.default_rng(0)
    ids = rng.choice(300, 100, replace=False)
    Y = X[ids] + 0.1 * rng.normal(size=(100, 8))
    tree.update_points(ids, Y, repair=False)
    X = X.copy()
    X[ids] = Y
    for L in range(*tree.level_range()):
        cl = C.level_clustering(tree, L)
        _check_partition_and_radii(X, cl, tree)
        cert = C.certify(tree, X[0], cl, beta=5.0)
        lz, lg, _ = _truth(tree, X, X[0], 5.0, cl)
        assert cert.log_z_lo - 1e-9 <= lz <= cert.log_z_hi + 1e-9 and lg <= cert.log_gamma + 1e-9


def test_array_clustering_and_certify():
    X, _ = _tree(n=200)
    labels = np.random.default_rng(1).integers(0, 7, size=200)
    cl = C.partition_clustering(X, labels)
    assert cl.sizes.sum() == 200
    np.testing.assert_array_equal(C.cluster_labels(X, cl), np.unique(labels, return_inverse=True)[1])
    for j in range(len(cl)):
        m = C.cluster_members(None, cl, j)
        assert np.max(np.linalg.norm(X[m] - X[cl.reps[j]], axis=1)) == pytest.approx(cl.radii[j])
    cert = C.certify(X, X[0], cl, beta=3.0)
    s = 3.0 * X @ X[0]
    lz = s.max() + math.log(np.exp(s - s.max()).sum())
    assert cert.log_z_lo <= lz <= cert.log_z_hi
    with pytest.raises(ValueError, match="labels"):
        C.partition_clustering(X, labels[:5])
    with pytest.raises(ValueError, match="reps"):
        C.partition_clustering(X, labels, reps=np.zeros(7, int))


def test_eq6_chain_length_and_bound():
    cert = C.Certificate(0, 1, 0, math.log(4.0), 0.5, 0.75, 0.4, 3, 3)
    s = cert.chain_length(0.01)
    assert s == 1 + math.ceil(4 * math.log(100))
    assert cert.mh_tv_bound(s) <= 0.01 < cert.mh_tv_bound(s - 1)


def test_bad_input():
    X, tree = _tree(n=100)
    with pytest.raises(ValueError, match="gamma"):
        C.find_clustering(tree, X[0], beta=5.0, gamma=1.0)
    with pytest.raises(ValueError, match="beta"):
        C.find_clustering(tree, X[0], beta=-1.0, gamma=4.0)
    with pytest.raises(ValueError, match="q"):
        C.find_clustering(tree, X[0][:3], beta=5.0, gamma=4.0)
    with pytest.raises(ValueError, match="proposal"):
        C.refine_clustering(tree, X[0], C.level_clustering(tree, 0), beta=5.0, gamma=4.0, proposal="x")
    with pytest.raises(TypeError, match="level"):
        C.level_clustering(tree, 1.5)


@pytest.mark.parametrize("dim", [2, 8])
@pytest.mark.parametrize("beta,gamma", [(5.0, 4.0), (20.0, 4.0), (20.0, 20.0), (1.0, 2.0)])
def test_alg2_prop4_holds_numerically(dim, beta, gamma):
    """Prop. 4 (max P/Q <= gamma for Alg. 2's clustering) checked against brute force on planted data (a numerical
    check of the paper's claim, not a certificate: the certified bound is certify()'s log_gamma)."""
    X = hierarchical_points(1000, dim, rng=dim)
    tree = SGTree.build(X, rng=1)
    q = X[7]
    cl = C.find_clustering(tree, q, beta=beta, gamma=gamma)
    _, lg, _ = _truth(tree, X, q, beta, cl)
    assert lg <= math.log(gamma) + 1e-12
