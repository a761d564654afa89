"""bounds.py: certified bounds vs brute force, Prop. 1 as printed vs corrected, Props 2 and 6."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.sampling.bounds import (certified_log_max_ratio, cluster_eps, log_partition_bounds, log_proposal_normalizer,
                            prop1_corrected_radius, prop1_ratio_bound, prop2_level, prop6_drift)
from refimpl.index.sgtree import SGTree


def _lse(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


@given(st.integers(0, 10**6), st.integers(1, 6), st.sampled_from([0.1, 1.0, 20.0]),
       st.sampled_from([1e-3, 1.0, 30.0]))
def test_certified_bounds_random_partitions(seed, n_clusters, beta, qscale):
    """Arbitrary partition, arbitrary representative per cluster, radius = the true max distance, any query norm:
    Z_lo <= Z <= Z_hi, certified max P/Q >= the true max, and <= 2 max eps (Prop. 2's mechanism)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(n_clusters, 40))
    T = rng.normal(size=(n, 5)) * rng.choice([0.01, 1.0, 5.0], size=(n, 1))
    q = rng.normal(size=5) * qscale
    lab = np.r_[np.arange(n_clusters), rng.integers(0, n_clusters, n - n_clusters)]
    reps = np.array([rng.choice(np.flatnonzero(lab == c)) for c in range(n_clusters)])
    sizes = np.bincount(lab, minlength=n_clusters)
    radii = np.array([np.linalg.norm(T[lab == c] - T[reps[c]], axis=1).max() for c in range(n_clusters)])
    s = beta * (T @ q)
    eps = cluster_eps(beta, np.linalg.norm(q), radii)
    lo, hi = log_partition_bounds(s[reps], sizes, eps)
    log_z = _lse(s)
    assert lo <= log_z + 1e-12 and log_z <= hi + 1e-12
    log_zhat = log_proposal_normalizer(s[reps], sizes)
    true = np.max(s - log_z - (s[reps[lab]] - log_zhat))
    cert = certified_log_max_ratio(s[reps], sizes, eps)
    assert true <= cert + 1e-12
    assert cert <= 2 * eps.max() + 1e-12


def test_bounds_tight_for_singletons():
    s = np.array([0.3, -1.0, 2.0])
    lo, hi = log_partition_bounds(s, np.ones(3), np.zeros(3))
    assert lo == pytest.approx(_lse(s)) and hi == pytest.approx(_lse(s))
    assert certified_log_max_ratio(s, np.ones(3), np.zeros(3)) == pytest.approx(0.0, abs=1e-12)


def _violating_cluster(tree):
    """(rep, member, level) with d(rep, member) > b^level for some cluster of C_(level), or None."""
    lo, hi = tree.level_range()
    for level in range(hi, lo - 1, -1):
        C = tree.clustering(level)
        for i in range(len(C)):
            m = tree.cluster_members(C, i)
            d = np.linalg.norm(tree.points[m] - tree.points[C.reps[i]], axis=1)
            j = int(np.argmax(d))
            if d[j] > tree.base ** level * (1 + 1e-12):
                return C, i, int(m[j]), level
    return None


def test_prop1_as_printed_fails_while_maxd_form_holds():
    """The erratum to Prop. 1, on a constructed tree. Unit-norm points on the circle, base 1.3: root r (angle 0),
    a (angle 1.0, level -1), g (angle 0.6, inserted under a at level -4). Then g moves to angle 1.44, on the far
    side of a: the parent-child covering d(a, g) = 0.437 <= 1.3^-3 and the separation still hold, so the tree is a
    valid SG tree (check_invariants empty, Alg. 3 with U = 0 rebuilds nothing), but g is 1.32 > b^0 from the root:
    the level-0 cluster is wider than b^0. With the unit query along (t_r - t_g), exp(s_r)/exp(s_g) exceeds
    Prop. 1's printed e^(beta b^l); the corrected r = beta ||q|| rho (MAXD-based) holds."""
    ang = np.array([0.0, 1.0, 0.6])
    X = np.c_[np.cos(ang), np.sin(ang)]
    tree = SGTree.build(X, base=1.3, order="given", method="insert")
    assert tree.node_level[tree.point_node[[0, 1, 2]]].tolist() == [0, -1, -4]
    assert _violating_cluster(tree) is None  # freshly built: strong covering holds
    tree.update_points([2], [[np.cos(1.44), np.sin(1.44)]], repair=False)
    assert tree.maintain(0.0)["clusters_rebuilt"] == 0
    assert tree.check_invariants() == []
    found = _violating_cluster(tree)
    assert found is not None
    C, i, member, level = found
    beta = 20.0
    tr, ti = tree.points[C.reps[i]], tree.points[member]
    q = (tr - ti) / np.linalg.norm(tr - ti)  # unit query, unit targets: Prop. 1's assumptions
    log_ratio = beta * (q @ tr - q @ ti)
    printed = prop1_ratio_bound(beta, tree.base, level)
    corrected = prop1_ratio_bound(beta, tree.base, level, radius=C.radii[i], q_norm=1.0)
    assert log_ratio > printed  # Prop. 1 as printed is violated
    assert log_ratio <= corrected + 1e-12  # the MAXD form holds
    assert C.radii[i] <= prop1_corrected_radius(tree.base, level) + 1e-12


@given(st.integers(0, 10**6), st.sampled_from(["batch", "insert"]), st.sampled_from([1.1, 1.3, 2.0]))
def test_fresh_trees_have_strong_covering_and_corrected_prop1_always_holds(seed, method, base):
    """Our greedy insertion (and the batch build) only enter a child group of level l when d(x, p_v) <= b^(l+1),
    so a freshly built tree has every member of a level-l cluster within b^l (Prop. 1 as printed holds there);
    only moved points break it (test above). The corrected MAXD form holds for every cluster and unit query."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 3))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tree = SGTree.build(X, base=base, rng=rng, method=method)
    assert _violating_cluster(tree) is None
    beta = 20.0
    lo, hi = tree.level_range()
    for level in range(lo, hi + 1):
        C = tree.clustering(level)
        for k in range(len(C)):
            m = tree.cluster_members(C, k)
            qq = rng.normal(size=(5, 3))
            qq /= np.linalg.norm(qq, axis=1, keepdims=True)
            lr = np.abs(beta * (tree.points[m] @ qq.T - tree.points[C.reps[k]] @ qq.T)).max()
            assert lr <= prop1_ratio_bound(beta, base, level, radius=C.radii[k]) + 1e-12


@given(st.floats(1.0001, 1e6), st.floats(0.01, 100.0), st.sampled_from([1.05, 1.3, 2.0, 10.0]))
def test_prop2_level(gamma, beta, base):
    lv = prop2_level(gamma, beta, base)
    x = math.log(gamma) / (2 * beta)
    assert base ** lv <= x * (1 + 1e-12) and base ** (lv + 1) > x * (1 - 1e-12)
    # Prop. 2's mechanism: clusters of radius b^l (strong covering, unit query) give max P/Q <= e^(2 beta b^l)
    assert 2 * beta * base ** lv <= math.log(gamma) * (1 + 1e-12)


def test_prop6_and_validation():
    assert prop6_drift(10, 0.01, 20.0, 2.0, 3.0) == pytest.approx(4 * 10 * 0.01 * 20 * 2 * 3)
    assert prop6_drift(0, 0.01, 20.0, 2.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="eta"):
        prop6_drift(1, -0.1, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        prop2_level(1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="base"):
        prop2_level(2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="radii"):
        cluster_eps(1.0, 1.0, [-1.0])
    with pytest.raises(ValueError, match="sizes"):
        log_partition_bounds([0.0, 1.0], [1], [0.0, 0.0])
    with pytest.raises(ValueError, match="sizes"):
        log_partition_bounds([0.0], [0], [0.0])
    with pytest.raises(ValueError, match="rep_logits"):
        log_partition_bounds([np.nan], [1], [0.0])
    with pytest.raises(ValueError, match="beta"):
        prop1_ratio_bound(0.0, 1.3, 0)
