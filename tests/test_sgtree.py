"""SGTree: invariants, dynamics, clustering, certified bounds and persistence (issue 3 acceptance).

The property tests draw point sets with duplicates, collinear and 1-D data, huge (1e100) and tiny (1e-100) scales,
D in [1, 128], then a random sequence of insert / remove / update_points / rebuild_level / maintain / save+load; after
every step the tree must be valid (``check_invariants()`` empty, an independent NumPy oracle), hold exactly the
expected targets with their current coordinates, answer top-k exactly, and give true certified bounds.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.sampling.bounds import certified_log_max_ratio, cluster_eps, log_partition_bounds, log_proposal_normalizer
from refimpl.index.search import brute_force_topk, topk
from refimpl.index.sgtree import MIN_ABS, SGTree

KINDS = ("gauss", "dups", "collinear", "grid", "clusters")
SCALES = (1e-100, 1e-6, 1.0, 1e7, 1e100)


def make_points(rng, n, d, kind, scale):
    if kind == "gauss":
        X = rng.normal(size=(n, d))
    elif kind == "dups":  # few distinct rows, many exact copies
        base = rng.normal(size=(max(1, n // 4), d))
        X = base[rng.integers(0, base.shape[0], n)]
    elif kind == "collinear":
        X = rng.normal(size=(n, 1)) * rng.normal(size=(1, d))
    elif kind == "grid":  # integer coordinates: many equal distances and ties
        X = rng.integers(-2, 3, size=(n, d)).astype(float)
    else:
        centres = rng.normal(size=(3, d))
        X = centres[rng.integers(0, 3, n)] + 1e-3 * rng.normal(size=(n, d))
    return X * scale


def logsumexp(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def check_tree(tree, model, rng, *, bounds=True, geometry=True):
    """Full validation of ``tree`` against ``model`` (dict id -> point)."""
    errs = tree.check_invariants(geometry=geometry)
    assert errs == [], errs[:5]
    ids = np.array(sorted(model), dtype=np.int64)
    assert len(tree) == ids.size
    assert np.array_equal(tree.live_ids(), ids)
    if ids.size == 0:
        return
    P = np.array([model[i] for i in ids])
    assert np.array_equal(tree.points[ids], P)
    # exact top-k against brute force (same inner-product routine) and NumPy (to rounding)
    scale = np.abs(P).max() or 1.0
    q = rng.normal(size=tree.dim) * (rng.choice([0.0, 1e-3, 1.0, 10.0]) or 1.0) / scale
    k = int(rng.integers(1, ids.size + 1))
    res = topk(tree, q, k)
    ref = brute_force_topk(tree.points, q, k, ids=ids)
    assert np.array_equal(res.ids, ref.ids) and np.array_equal(res.scores, ref.scores)
    assert np.allclose(res.scores, tree.points[res.ids] @ q, rtol=1e-9, atol=1e-12 * np.abs(q).max() * scale)
    if not bounds:
        return
    # clustering at a random level: partition, sizes, radii, certified bounds vs brute force
    lo, hi = tree.level_range()
    level = int(rng.integers(lo - 1, hi + 3))
    C = tree.clustering(level)
    members = [tree.cluster_members(C, i) for i in range(len(C))]
    allm = np.concatenate(members)
    assert np.array_equal(np.sort(allm), ids), "clusters must partition the live targets"
    assert np.array_equal(C.sizes, [m.size for m in members])
    for i, m in enumerate(members):
        true_r = np.linalg.norm(tree.points[m] - tree.points[C.reps[i]], axis=1).max()
        assert true_r <= C.radii[i] * (1 + 1e-9) + 1e-300
        assert C.radii[i] <= tree.node_maxd[C.nodes[i]]
    beta = float(rng.choice([0.5, 20.0]))
    s_all = beta * (tree.points[ids] @ q)
    log_z = logsumexp(s_all)
    s_rep = beta * (tree.points[C.reps] @ q)
    eps = cluster_eps(beta, float(np.linalg.norm(q)), C.radii)
    zlo, zhi = log_partition_bounds(s_rep, C.sizes, eps)
    tol = 1e-9 * max(1.0, abs(log_z))
    assert zlo <= log_z + tol and log_z <= zhi + tol
    # true max P/Q of the Eq. 7 proposal
    log_zhat = log_proposal_normalizer(s_rep, C.sizes)
    true = max(beta * (tree.points[t] @ q) - log_z - (s_rep[i] - log_zhat) for i, m in enumerate(members)
               for t in m)
    assert true <= certified_log_max_ratio(s_rep, C.sizes, eps) + tol


@st.composite
def scenario(draw):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        n=draw(st.integers(1, 40)),
        d=draw(st.sampled_from([1, 2, 3, 8, 33, 128])),
        kind=draw(st.sampled_from(KINDS)),
        scale=draw(st.sampled_from(SCALES)),
        base=draw(st.sampled_from([1.05, 1.3, 2.0, 3.7])),
        method=draw(st.sampled_from(["batch", "insert"])),
        ops=draw(st.lists(st.sampled_from(["insert", "remove", "update", "update_stale", "rebuild", "maintain",
                                            "saveload"]), max_size=6)),
    )


@given(scenario())
def test_random_operation_sequences(tmp_path_factory, sc):
    rng = np.random.default_rng(sc["seed"])
    d, scale = sc["d"], sc["scale"]
    X = make_points(rng, sc["n"], d, sc["kind"], scale)
    tree = SGTree.build(X, base=sc["base"], rng=rng, method=sc["method"])
    model = {i: X[i].copy() for i in range(X.shape[0])}
    check_tree(tree, model, rng)
    for op in sc["ops"]:
        live = np.array(sorted(model), dtype=np.int64)
        if op == "insert":
            m = int(rng.integers(1, 8))
            new = make_points(rng, m, d, sc["kind"], scale)
            if live.size and rng.random() < 0.5:  # exact copies of live targets
                new[: m // 2 + 1] = tree.points[rng.choice(live, m // 2 + 1)]
            ids = tree.insert(new)
            model.update({int(i): p for i, p in zip(ids, new)})
        elif op == "remove" and live.size:
            rem = rng.choice(live, int(rng.integers(1, live.size + 1)), replace=False)
            tree.remove(rem)
            for i in rem:
                del model[int(i)]
        elif op in ("update", "update_stale") and live.size:
            sel = rng.choice(live, int(rng.integers(1, live.size + 1)), replace=False)
            new = tree.points[sel] + rng.normal(size=(sel.size, d)) * scale * rng.choice([1e-3, 0.3, 3.0])
            if rng.random() < 0.3:  # collapse onto another target: new duplicates
                new[0] = tree.points[rng.choice(live)]
            if op == "update":
                tree.update_points(sel, new)
            else:  # paper workflow: stale geometry, valid statistics, then Alg. 3
                tree.update_points(sel, new, repair=False)
                assert tree.check_invariants(geometry=False) == []
                tree.maintain(float(rng.choice([0.0, 1e-3, 0.5])) * scale,
                              granularity=str(rng.choice(["cluster", "child"])))
            for i, p in zip(sel, new):
                model[int(i)] = p
        elif op == "rebuild" and live.size:
            lo, hi = tree.level_range()
            tree.rebuild_level(int(rng.integers(lo, hi + 2)), rng=rng if rng.random() < 0.5 else None)
        elif op == "maintain":
            tree.maintain(float(rng.choice([0.0, 1e-3, 1.0])) * scale, granularity=str(rng.choice(["cluster",
                                                                                                  "child"])))
        elif op == "saveload":
            path = tmp_path_factory.mktemp("t") / "tree.npz"
            tree.save(path)
            tree = SGTree.load(path)
        check_tree(tree, model, rng)


@given(st.integers(0, 10**6), st.sampled_from(KINDS), st.sampled_from([1, 5, 64]))
def test_stale_tree_keeps_certified_statistics(seed, kind, d):
    """After update_points(repair=False) the geometry may be broken but MAXD/MIND/PDIST/counts are valid at once,
    so top-k stays exact and the certified bounds stay true."""
    rng = np.random.default_rng(seed)
    X = make_points(rng, 50, d, kind, 1.0)
    tree = SGTree.build(X, rng=seed)
    sel = rng.choice(50, 20, replace=False)
    new = X[sel] + rng.normal(size=(20, d)) * 0.5
    tree.update_points(sel, new, repair=False)
    assert tree.check_invariants(geometry=False) == []
    model = {i: X[i] for i in range(50)}
    model.update({int(i): p for i, p in zip(sel, new)})
    errs = tree.check_invariants()
    assert all(e.startswith(("covering", "separation")) for e in errs)
    check_tree(tree, model, rng, geometry=False)  # bounds and top-k do not need the geometry
    tree.maintain(0.0)
    check_tree(tree, model, rng)


def test_fresh_tree_needs_no_maintenance_and_small_moves_rebuild_little():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 5))
    tree = SGTree.build(X, rng=1)
    for g in ("cluster", "child"):
        assert tree.maintain(0.0, granularity=g) == {"clusters_rebuilt": 0, "subtrees_reinserted": 0,
                                                     "points_reinserted": 0}
    tree.update_points([7], X[7:8] + 1e-6, repair=False)
    st_ = tree.maintain(0.0)
    assert st_["points_reinserted"] < 400 // 4
    assert tree.check_invariants() == []
    # a large move: the child granularity reinserts no more than Alg. 3's cluster rebuild
    t1, t2 = SGTree.build(X, rng=1), SGTree.build(X, rng=1)
    sel = np.arange(0, 400, 10)
    for t, g in ((t1, "cluster"), (t2, "child")):
        t.update_points(sel, X[sel] + 0.3, repair=False)
        st_ = t.maintain(0.0, granularity=g)
        assert t.check_invariants() == []
        if g == "cluster":
            n_cluster = st_["points_reinserted"]
        else:
            assert st_["points_reinserted"] <= n_cluster
    # a drift bound larger than the root scale rebuilds everything below the root
    st_ = tree.maintain(1e6)
    assert st_["points_reinserted"] == 399 and tree.check_invariants() == []


def test_maintain_margin_is_eq10_eq11():
    """After maintain(U) on an untouched valid tree, every kept parent-child distance satisfies d + U <= b^(l+1)
    (Eq. 10) unless its cluster was rebuilt; checked through the returned counts: U = 0 keeps all."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    tree = SGTree.build(X, rng=0)
    lv = tree.node_level[: tree.n_nodes]
    pd = tree.node_pdist[: tree.n_nodes]
    live = tree.node_point[: tree.n_nodes] >= 0
    U = 0.05
    tight = live & (tree.node_parent[: tree.n_nodes] >= 0) & (pd + U > tree.base ** (lv + 1.0))
    out = tree.maintain(U, granularity="cluster")  # Alg. 3 as printed
    assert (out["clusters_rebuilt"] > 0) == bool(tight.any() or tree.base ** lv[live].min() <= U)
    assert tree.check_invariants() == []


def test_duplicates_and_single_point():
    X = np.zeros((30, 4))
    tree = SGTree.build(X, rng=0)
    assert tree.check_invariants() == [] and len(tree) == 30
    assert np.array_equal(topk(tree, np.ones(4), 5).ids, np.arange(5))  # ties by smaller id
    one = SGTree.build(np.ones((1, 3)))
    assert len(one) == 1 and one.check_invariants() == []
    assert topk(one, np.ones(3), 1).ids.tolist() == [0]
    one.remove([0])
    assert len(one) == 0 and one.check_invariants() == []
    ids = one.insert(np.ones((2, 3)))
    assert ids.tolist() == [1, 2] and len(one) == 2 and one.check_invariants() == []


def test_tiny_differences_are_not_duplicates():
    """Distances below sqrt(float min) must not underflow to 0 (which would waive separation wrongly); at the
    bottom of the numerical domain (MIN_ABS) differences of one ulp are still kept apart."""
    m = MIN_ABS
    X = np.array([[0.0, m], [m, m], [2 * m, np.nextafter(m, 1)], [3e-140, m], [np.nextafter(m, 1), m]])
    tree = SGTree.build(X, rng=0)
    assert tree.check_invariants() == []
    assert (tree.node_mind[: tree.n_nodes] > 0).all()


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-160])
def test_subnormal_scales_are_refused(scale):
    """Data of scale ~1e-300 (subnormal gaps) used to break separation: refused with a ValueError naming the
    argument, at build, insert and update_points."""
    X = np.random.default_rng(0).normal(size=(40, 3)) * scale
    with pytest.raises(ValueError, match="^points: non-zero values must have magnitude >= 1e-150"):
        SGTree.build(X)
    tree = SGTree.build(np.eye(3))
    with pytest.raises(ValueError, match="^points:"):
        tree.insert(X[:2])
    with pytest.raises(ValueError, match="^points:"):
        tree.update_points([0], X[:1])


def test_save_load_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    tree = SGTree.build(rng.normal(size=(100, 6)), rng=2)
    tree.remove([3, 50, 99])
    tree.insert(rng.normal(size=(5, 6)))
    p = tmp_path / "t.npz"
    tree.save(p)
    t2 = SGTree.load(p)
    for name in ("node_point", "node_level", "node_parent", "node_first_child", "node_next_sibling", "node_maxd",
                 "node_mind", "node_count", "node_pdist", "node_maxnorm"):
        assert np.array_equal(getattr(tree, name)[: tree.n_nodes], getattr(t2, name)[: t2.n_nodes]), name
    assert np.array_equal(tree.points[: tree.n_targets], t2.points[: t2.n_targets])
    assert t2.base == tree.base and t2.root == tree.root and len(t2) == len(tree)
    assert t2.check_invariants() == []
    t2.insert(rng.normal(size=(3, 6)))  # a loaded tree stays dynamic
    assert t2.check_invariants() == []
    raw = p.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="path"):
        SGTree.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not an SGTree"):
        SGTree.load(tmp_path / "foreign.npz")
    # consistent shapes but corrupted links: rejected before any kernel can index out of bounds or loop
    with np.load(p, allow_pickle=False) as z:
        good = {k: z[k] for k in z.files}
    for name, value in (("node_first_child", 10**6), ("node_next_sibling", None), ("version", 99)):
        bad = dict(good)
        if name == "version":
            bad[name] = np.array(99)
        elif value is None:  # a sibling cycle through the root's first child
            ns = bad[name].copy()
            head = int(good["node_first_child"][good["state"][0]])
            ns[head] = head
            bad[name] = ns
        else:
            arr = bad[name].copy()
            arr[0] = value
            bad[name] = arr
        with open(tmp_path / "bad.npz", "wb") as fh:
            np.savez(fh, **bad)
        with pytest.raises(ValueError, match="path"):
            SGTree.load(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="path"):
        SGTree.load(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="path"):
        SGTree.load(tmp_path / "missing.npz")


def test_bad_input():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="base"):
        SGTree.build(X, base=1.0)
    with pytest.raises(ValueError, match="base"):
        SGTree.build(X, base=-2)
    with pytest.raises(ValueError, match="points"):
        SGTree.build(np.array([[np.nan, 0, 0]]))
    with pytest.raises(ValueError, match="points"):
        SGTree.build(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="points"):
        SGTree.build(np.ones((2, 2)) * 1e200)
    with pytest.raises(ValueError, match="order"):
        SGTree.build(X, order="sorted")
    tree = SGTree.build(X)
    with pytest.raises(ValueError, match="points"):
        tree.insert(np.ones((2, 4)))
    with pytest.raises(ValueError, match="ids"):
        tree.remove([10])
    tree.remove([4])
    with pytest.raises(ValueError, match="ids"):
        tree.remove([4])
    with pytest.raises(ValueError, match="ids"):
        tree.update_points([1, 1], np.ones((2, 3)))
    with pytest.raises(ValueError, match="points"):
        tree.update_points([1, 2], np.ones((1, 3)))
    with pytest.raises(ValueError, match="U"):
        tree.maintain(-1.0)
    with pytest.raises(ValueError, match="granularity"):
        tree.maintain(0.0, granularity="node")
    with pytest.raises(TypeError, match="level"):
        tree.clustering(0.5)
    with pytest.raises(ValueError, match="k"):
        topk(tree, np.ones(3), 10)
    with pytest.raises(ValueError, match="q"):
        topk(tree, np.ones(4), 1)


def test_clustering_extremes():
    rng = np.random.default_rng(5)
    tree = SGTree.build(rng.normal(size=(200, 4)), rng=0)
    lo, hi = tree.level_range()
    top = tree.clustering(hi + 5)
    assert len(top) == 1 and top.sizes[0] == 200 and top.reps[0] == tree.node_point[tree.root]
    bottom = tree.clustering(lo)
    assert len(bottom) == 200 and (bottom.sizes == 1).all() and (bottom.radii == 0).all()
