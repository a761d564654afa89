"""The batch build's speed paths, SGTree.rebuild and update_tree's choice between Alg. 3 and a rebuild.

The build's two speed paths (rows of small segments gathered into a buffer; the assignment step filtered by a
matrix product with a proven rounding bound) must not change the tree at all: the tree built with them is compared
array by array with the tree built without them, on data with many exact copies, ties (integer grid) and both
storage types. SGTree.rebuild and update_tree's rebuild path must leave a valid tree (the independent checker
``check_invariants``) holding exactly the new rows, with a new version.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.data import hierarchical_points
from refimpl.index import N_DIST, SGTree
from refimpl.index import _build as KB
from refimpl.index.sgtree import MAX_TARGETS, _NODE_FLOAT, _NODE_INT
from refimpl.nystrom import update_tree


def _points(kind, n, d, seed, dtype):
    rng = np.random.default_rng(seed)
    if kind == "hier":
        X = hierarchical_points(n, d, rng=seed)
    elif kind == "dups":
        base = rng.normal(size=(max(1, n // 5), d))
        X = base[rng.integers(0, base.shape[0], n)]
    else:  # integer grid: many equal distances
        X = rng.integers(-2, 3, size=(n, d)).astype(float)
    return X.astype(dtype)


def _raw_build(X, gather, max_kids, seed=0):
    tree = SGTree(X.shape[1], capacity=0, dtype=X.dtype)
    tree.points = X.copy()
    tree.point_node = np.full(X.shape[0], -1, dtype=np.int64)
    tree._reserve(0, X.shape[0])
    tree.n_targets = X.shape[0]
    KB.batch_build(tree.arrays(), np.random.default_rng(seed).permutation(X.shape[0]), gather, max_kids)
    return tree


def _same_tree(a, b):
    assert a.n_nodes == b.n_nodes and a.root == b.root
    for name in _NODE_INT + _NODE_FLOAT:
        np.testing.assert_array_equal(getattr(a, name)[: a.n_nodes], getattr(b, name)[: b.n_nodes], err_msg=name)
    np.testing.assert_array_equal(a.point_node[: a.n_targets], b.point_node[: b.n_targets])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["hier", "dups", "grid"])
def test_speed_paths_build_the_same_tree(kind, dtype):
    X = _points(kind, 4000, 32 if kind == "hier" else 8, 3, dtype)  # hier in 32-d: groups of > 8 children
    plain = _raw_build(X, 0, 0)
    assert plain.check_invariants() == []
    for gather, max_kids in [(64, 0), (0, 1 << 14), (300, 1 << 14), (KB.gather_rows(X), KB.GEMM_MAX_KIDS)]:
        fast = _raw_build(X, gather, max_kids)
        _same_tree(plain, fast)
        if max_kids and kind == "hier":  # the filtered assignment ran: it computes fewer exact distances
            assert fast.arrays().state[N_DIST] < plain.arrays().state[N_DIST]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 400), d=st.integers(1, 24),
       scale=st.sampled_from([1e-60, 1.0, 1e90]))
def test_speed_paths_property(seed, n, d, scale):
    """Random small sets at extreme scales (the rounding bound of the filter is relative): same tree."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * scale
    X[rng.integers(0, n, n // 4)] = X[0]  # exact copies
    _same_tree(_raw_build(X, 0, 0, seed), _raw_build(X, 16, 64, seed))


def test_rebuild_equals_build_and_bumps_version():
    X = hierarchical_points(3000, 8, rng=1)
    Y = hierarchical_points(3000, 8, rng=2)
    tree = SGTree.build(X, rng=0)
    v = tree.version
    tree.rebuild(Y, rng=5)
    assert tree.version > v
    assert tree.check_invariants() == []
    np.testing.assert_array_equal(tree.points[:3000], Y)
    _same_tree(tree, SGTree.build(Y, rng=5))
    v = tree.version
    tree.rebuild(rng=5)  # over the current rows
    assert tree.version > v
    _same_tree(tree, SGTree.build(Y, rng=5))


@pytest.mark.parametrize("copy", [True, False])
def test_rebuild_after_removals_and_inserts(copy):
    X = hierarchical_points(2000, 6, rng=3)
    tree = SGTree.build(X[:1500], rng=0, dtype=np.float32)
    tree.remove(np.arange(0, 1500, 7))
    ids = tree.insert(X[1500:])
    live = tree.live_ids()
    Y = (tree.points[: tree.n_targets] * 1.1 + 0.01).astype(np.float32)
    tree.rebuild(Y, rng=4, copy=copy)
    assert tree.check_invariants() == []
    assert np.array_equal(tree.live_ids(), live) and len(tree) == live.size
    np.testing.assert_array_equal(tree.points[live], Y[live])
    assert (tree.point_node[np.setdiff1d(np.arange(tree.n_targets), live)] == -1).all()
    assert tree.dtype == np.float32 and ids[-1] == tree.n_targets - 1
    tree.insert(X[:10])  # still growable after adopting storage
    assert tree.check_invariants() == []


def test_rebuild_bad_input():
    tree = SGTree.build(np.eye(5), rng=0)
    with pytest.raises(ValueError, match="points"):
        tree.rebuild(np.eye(4, 5))
    with pytest.raises(ValueError, match="points"):
        tree.rebuild(np.full((5, 5), np.nan))
    with pytest.raises(ValueError, match="points"):
        tree.rebuild(np.eye(5, 4))
    with pytest.raises(ValueError, match="at most"):
        tree._reserve(MAX_TARGETS, 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_tree_chooses_rebuild_or_maintain(dtype):
    rng = np.random.default_rng(0)
    Z = hierarchical_points(3000, 8, rng=5).astype(dtype)
    M = (np.eye(8) + 0.1 * rng.normal(size=(8, 8)) / np.sqrt(8))
    new = (Z @ M.T).astype(dtype)  # a re-encode: every row moves
    tree = SGTree.build(Z, rng=0, dtype=dtype)
    v = tree.version
    st_ = update_tree(tree, Z, new, rng=1)
    assert st_["method"] == "rebuild" and st_["n_moved"] == 3000 and tree.version > v
    assert st_["max_move"] == pytest.approx(np.linalg.norm(new.astype(float) - Z, axis=1).max())
    assert tree.check_invariants() == []
    np.testing.assert_array_equal(tree.points[:3000], new)
    # few rows moved: Alg. 3 (update_points + maintain), the rest of the tree kept
    part = new.copy()
    part[:100] += dtype(0.01)
    st_ = update_tree(tree, None, part, rng=1)  # old = the tree's own rows
    assert st_["method"] == "maintain" and st_["n_moved"] == 100
    assert tree.check_invariants() == []
    np.testing.assert_array_equal(tree.points[:3000], part)
    # forced either way
    st_ = update_tree(tree, None, new, rng=1, rebuild_fraction=2.0)
    assert st_["method"] == "maintain" and tree.check_invariants() == []
    st_ = update_tree(tree, None, new, rng=1, rebuild_fraction=0.0)
    assert st_["method"] == "maintain" and st_["n_moved"] == 0  # nothing moved: nothing to do
    part[5, 3] += 1
    st_ = update_tree(tree, None, part, rng=1, rebuild_fraction=0.0)
    assert st_["method"] == "rebuild" and tree.check_invariants() == []


def test_update_tree_bad_input():
    Z = hierarchical_points(200, 4, rng=5)
    tree = SGTree.build(Z, rng=0)
    bad = Z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="new_representations"):
        update_tree(tree, Z, bad)
    with pytest.raises(ValueError, match="old_representations"):
        update_tree(tree, bad, Z)
    with pytest.raises(ValueError, match="new_representations"):
        update_tree(tree, None, Z[:10])
    with pytest.raises(ValueError, match="rebuild_fraction"):
        update_tree(tree, None, Z, rebuild_fraction=-1)
    with pytest.raises(TypeError, match="tree"):
        update_tree(Z, None, Z)
    with pytest.raises(TypeError, match="new_representations"):
        update_tree(tree, None, Z > 0)
    bad = Z.copy()
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match="old_representations: contains NaN or Inf"):
        update_tree(tree, bad, Z)
    with pytest.raises(ValueError, match="overflows"):
        update_tree(tree, Z * 1e160, -Z * 1e160)
    assert tree.check_invariants() == [] and np.array_equal(tree.points[:200], Z)  # untouched by the refusals


def test_bench_scale_smoke(tmp_path, capsys):
    """``python -m refimpl bench scale`` runs end to end on a small N and writes its record; bad arguments exit 2."""
    import json

    from refimpl.benchmarks.scale import main

    out = tmp_path / "scale.json"
    assert main(["--n", "5000", "--batch", "8", "--k", "4", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["N"] == 5000 and rec["update_method"] == "rebuild" and rec["n_moved"] == 5000
    assert rec["tree_bytes_per_target"] <= 150 and rec["peak_rss_gib"] > 0
    assert [m["draws_per_query"] for m in rec["mining"]] == [1, 4, 1]
    assert "| N | d' |" in capsys.readouterr().out
    assert main(["--n", "5000", "--batch", "8", "--k", "4", "--update", "inplace", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["update_method"] == "update_points + rebuild" and rec["n_moved"] == 5000
    for bad in (["--n", "10"], ["--scales", "1,2"], ["--n", "2000", "--batch", "3000"], ["--move", "-1"],
                ["--update", "x"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
