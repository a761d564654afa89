"""search.topk: exact MIPS by branch and bound equals brute force (ties by smaller id), for any data and query."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.data import hierarchical_points
from refimpl.index.search import brute_force_topk, topk
from refimpl.index.sgtree import SGTree

from test_sgtree import KINDS, make_points


@given(st.integers(0, 10**6), st.sampled_from(KINDS), st.sampled_from([1, 2, 7, 64, 128]),
       st.sampled_from([1e-80, 1.0, 1e100]), st.sampled_from(["ball", "linear"]))
def test_topk_equals_brute_force(seed, kind, d, scale, bound):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    X = make_points(rng, n, d, kind, scale)
    tree = SGTree.build(X, base=float(rng.choice([1.1, 1.3, 2.0])), rng=rng)
    Q = rng.normal(size=(4, d)) * rng.choice([1e-3, 1.0, 1e3], size=(4, 1)) / scale
    Q[0] = 0.0  # all scores tie: ids 0..k-1
    Q[1] = X[rng.integers(n)] / scale**2  # a query aligned with a target
    k = int(rng.integers(1, n + 1))
    res = topk(tree, Q, k, bound=bound)
    ref = brute_force_topk(X, Q, k)
    assert np.array_equal(res.ids, ref.ids)
    assert np.array_equal(res.scores, ref.scores)
    assert np.array_equal(res.ids[0], np.arange(k))
    # agrees with NumPy up to rounding, and each row is sorted best first
    assert np.allclose(res.scores, np.einsum("qkd,qd->qk", X[res.ids], Q), rtol=1e-9,
                       atol=1e-9 * np.abs(Q).max() * np.abs(X).max())
    assert (np.diff(res.scores, axis=1) <= 0).all()
    single = topk(tree, Q[2], k, bound=bound)
    assert np.array_equal(single.ids, res.ids[2]) and single.ids.ndim == 1
    assert (res.stats["inner_products"] <= n).all()


def test_topk_prunes_on_hierarchical_data():
    """Branch and bound must visit a small part of a clustered unit-norm set (not a timing: a count)."""
    P = hierarchical_points(3000, 32, rng=0)
    Q = hierarchical_points(20, 32, rng=1)
    tree = SGTree.build(P, rng=0)
    res = topk(tree, Q, 10, scan=0)  # pure branch and bound: no pre-order range scans
    assert np.array_equal(res.ids, brute_force_topk(P, Q, 10).ids)
    assert res.stats["inner_products"].mean() < 0.5 * 3000
    lin = topk(tree, Q, 10, bound="linear", scan=0)
    assert np.array_equal(lin.ids, res.ids)
    assert (lin.stats["inner_products"] >= res.stats["inner_products"]).all()  # the ball bound is never looser


@pytest.mark.parametrize("scan", [1, 7, 64, 10**9])
def test_range_scans_give_the_exact_topk_after_mutations(scan):
    """Scanning subtrees of <= scan targets as pre-order ranges returns exactly brute force's top-k (same scores,
    ties by id), on a float32 tree after inserts and removals (the cached pre-order follows the tree's version);
    scan = 10**9 scores every target once."""
    P = hierarchical_points(2000, 16, rng=3, dtype=np.float32)
    tree = SGTree.build(P[:1500], rng=4, dtype=np.float32)
    Q = hierarchical_points(30, 16, rng=5)
    topk(tree, Q, 5, scan=scan)
    tree.insert(P[1500:])
    gone = np.arange(0, 2000, 7)
    tree.remove(gone)
    live = np.setdiff1d(np.arange(2000), gone)
    res = topk(tree, Q, 17, scan=scan)
    ref = brute_force_topk(P, Q, 17, ids=live)
    assert np.array_equal(res.ids, ref.ids) and np.array_equal(res.scores, ref.scores)
    if scan == 10**9:
        assert (res.stats["inner_products"] == live.size).all()
    with pytest.raises(ValueError, match="scan"):
        topk(tree, Q, 3, scan=-1)


def test_ties_broken_by_smaller_id_with_duplicates():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(5, 3))
    X = np.repeat(base, 7, axis=0)[rng.permutation(35)]
    tree = SGTree.build(X, rng=3)
    q = rng.normal(size=3)
    res = topk(tree, q, 12)
    s = X @ q
    order = np.lexsort((np.arange(35), -s))[:12]
    assert np.array_equal(res.ids, order)


def test_topk_after_updates_and_removal():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 8))
    tree = SGTree.build(X, rng=0)
    tree.update_points(np.arange(0, 300, 3), X[::3] + rng.normal(size=(100, 8)), repair=False)
    tree.remove(np.arange(1, 300, 7))
    live = tree.live_ids()
    Q = rng.normal(size=(5, 8))
    res = topk(tree, Q, 9)  # stale geometry, valid MAXD: still exact
    assert np.array_equal(res.ids, brute_force_topk(tree.points, Q, 9, ids=live).ids)


def test_bad_arguments():
    tree = SGTree.build(np.eye(3))
    with pytest.raises(ValueError, match="bound"):
        topk(tree, np.ones(3), 1, bound="cone")
    with pytest.raises(ValueError, match="k"):
        topk(tree, np.ones(3), 0)
    with pytest.raises(ValueError, match="q"):
        topk(tree, np.array([np.nan, 0, 0]), 1)
    with pytest.raises(ValueError, match="q"):
        topk(tree, np.ones((2, 2, 3)), 1)
    tree.remove([0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        topk(tree, np.ones(3), 1)


def test_bench_tree_smoke(tmp_path):
    """``python -m refimpl bench tree`` runs end to end on small sizes (in a subprocess: it pins BLAS threads),
    reports exact answers, a tree overhead <= 150 bytes per target beyond the points and valid trees after
    maintain; bad arguments are one line on stderr with exit status 2, before any work."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "refimpl", "bench", "tree", "--sizes", "100,3000", "--queries", "10",
                           "--check", "5", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["sizes"]
    assert [r["N"] for r in rows] == [100, 3000]
    for r in rows:
        assert r["exact_equal_brute_force"] and r["same_sets_as_numpy"] >= 0.9
        assert r["topk_inner_products"] <= r["N"] and r["bytes_per_target_beyond_points"] <= 150
        assert r["update1pct_cluster"]["tree_valid"] and r["update1pct_child"]["tree_valid"]
    for bad in (["--sizes", "0"], ["--sizes", "1e5,x"], ["--k", "0"], ["--base", "1.000001"], ["--dim", "-1"],
                ["--out", str(tmp_path / "missing" / "x.json")], ["--sizes", "5", "--k", "10"], ["--nonsense"]):
        proc = subprocess.run([sys.executable, "-m", "refimpl", "bench", "tree", *bad], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 2 and proc.stdout == "", bad
        assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr, (bad, proc.stderr)
