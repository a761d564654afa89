"""SGTree persistence and numerical domain: atomic save (fault injection, killed writer), load verifying every
number (a corpus of corrupted files, each one clear ValueError), the scale / base / level guards, float32 storage."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from refimpl.index import FREE_TOP, SGTree, brute_force_topk, topk
from refimpl.index import _io
from refimpl.index.sgtree import LEVEL_LIMIT, MAX_BASE, MIN_BASE

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(n=120, d=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    t = SGTree.build(rng.normal(size=(n, d)), rng=seed, dtype=dtype)
    t.remove([3, 7])
    t.insert(rng.normal(size=(4, d)))
    return t


def _same(a, b):
    assert len(a) == len(b) and a.root == b.root and a.base == b.base and a.dtype == b.dtype
    for name in _io.NODE_INT + _io.NODE_FLOAT:
        assert np.array_equal(getattr(a, name)[: a.n_nodes], getattr(b, name)[: b.n_nodes]), name
    assert np.array_equal(a.points[: a.n_targets], b.points[: b.n_targets])


# ---------------------------------------------------------------- atomic save
@pytest.mark.parametrize("bad", [3, 3.5, None, object(), ["a.npz"]])
def test_save_and_load_take_a_path_only(bad):
    t = _tree()
    with pytest.raises(TypeError, match="^path:"):
        t.save(bad)
    with pytest.raises(TypeError, match="^path:"):
        SGTree.load(bad)


def test_save_to_fd_number_does_not_touch_the_descriptor(tmp_path):
    r, w = os.pipe()
    try:
        with pytest.raises(TypeError, match="^path:"):
            _tree().save(w)
        os.write(w, b"ok")  # still open
        assert os.read(r, 2) == b"ok"
    finally:
        os.close(r)
        os.close(w)


def test_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """An exception raised inside the write (as a full disk would) leaves the previous file loadable and no
    temporary file behind."""
    p = tmp_path / "t.npz"
    old = _tree(seed=1)
    old.save(p)
    new = _tree(n=300, seed=2)
    calls = {"n": 0}
    real_write = _io.np.savez

    def failing_savez(fh, **arrays):
        fh.write(b"PK\x03\x04partial")
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space"):
        new.save(p)
    monkeypatch.setattr(_io.np, "savez", real_write)
    assert calls["n"] == 1
    _same(SGTree.load(p), old)
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]


def test_failure_in_fsync_or_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "t.npz"
    old = _tree(seed=1)
    old.save(p)
    for target in ("fsync", "replace"):
        def boom(*a, **k):
            raise OSError(5, f"injected {target} failure")

        with monkeypatch.context() as m:
            m.setattr(_io.os, target, boom)
            with pytest.raises(OSError, match="injected"):
                _tree(n=200, seed=3).save(p)
        _same(SGTree.load(p), old)
        assert sorted(os.listdir(tmp_path)) == ["t.npz"]


def test_killed_writer_keeps_the_previous_file(tmp_path):
    """A process killed (SIGKILL) at several moments during a large save: every time the previous file loads
    (either the old or, if the rename happened, the complete new tree)."""
    p = tmp_path / "t.npz"
    old = _tree(seed=1)
    old.save(p)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {ROOT_DIR!r})
        from refimpl.index import SGTree
        t = SGTree.build(np.random.default_rng(5).normal(size=(30000, 64)), rng=0)
        print("ready", flush=True)
        while True:
            t.save({str(p)!r})
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for delay in (0.0, 0.04, 0.11):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = SGTree.load(p)  # verified on load: a torn file would raise
        assert len(loaded) in (len(old), 30000)
        if len(loaded) == len(old):
            _same(loaded, old)
    # a killed writer can leave only its own temporary files (hidden, next to the target)
    assert all(f == "t.npz" or (f.startswith(".t.npz.") and f.endswith(".tmp")) for f in os.listdir(tmp_path))


def test_round_trip_float32_and_permissions(tmp_path):
    t = _tree(dtype=np.float32)
    p = tmp_path / "f.npz"
    t.save(str(p))
    assert (os.stat(p).st_mode & 0o777) == (0o666 & ~_io._umask())
    t2 = SGTree.load(p)
    _same(t, t2)
    assert t2.dtype == np.float32 and t2.version != t.version


# ---------------------------------------------------------------- load verifies the numbers
def _corrupt(path, out, fn):
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k].copy() for k in z.files}
    fn(d)
    np.savez(out, **d)


def _set(name, idx, value):
    def f(d):
        d[name][idx] = value
    return f


def _live_child(d):
    """A live node with a parent and children (so that its statistics matter)."""
    par, fc, npt = d["node_parent"], d["node_first_child"], d["node_point"]
    cand = np.flatnonzero((npt >= 0) & (par >= 0) & (fc >= 0))
    return int(cand[0])


def _root(d):
    return int(d["state"][0])


CORRUPTIONS = {
    "nan point": lambda d: d["points"].__setitem__((4, 1), np.nan),
    "inf point": lambda d: d["points"].__setitem__((4, 1), np.inf),
    "huge point": lambda d: d["points"].__setitem__((4, 1), 1e200),
    "subnormal point": lambda d: d["points"].__setitem__((4, 1), 1e-310),
    "moved point": lambda d: d["points"].__setitem__((int(d["node_point"][_live_child(d)]), 0), 50.0),
    "maxd * 0.01": lambda d: d["node_maxd"].__setitem__(_root(d), d["node_maxd"][_root(d)] * 0.01),
    "child maxd * 0.01": lambda d: d["node_maxd"].__setitem__(_live_child(d), d["node_maxd"][_live_child(d)] * .01),
    "nan maxd": lambda d: d["node_maxd"].__setitem__(_root(d), np.nan),
    "inf maxd": lambda d: d["node_maxd"].__setitem__(_root(d), np.inf),
    "nan pdist": lambda d: d["node_pdist"].__setitem__(_live_child(d), np.nan),
    "wrong pdist": lambda d: d["node_pdist"].__setitem__(_live_child(d), d["node_pdist"][_live_child(d)] * 1.5),
    "maxnorm / 2": lambda d: d["node_maxnorm"].__setitem__(_root(d), d["node_maxnorm"][_root(d)] / 2),
    "nan mind": lambda d: d["node_mind"].__setitem__(_root(d), np.nan),
    "mind too high": lambda d: d["node_mind"].__setitem__(_root(d), 1e9),
    "sepslack too high": lambda d: d["node_sepslack"].__setitem__(_root(d), 1e9),
    "negative count": lambda d: d["node_count"].__setitem__(_root(d), -5),
    "count off by one": lambda d: d["node_count"].__setitem__(_live_child(d), d["node_count"][_live_child(d)] + 1),
    "two nodes for one target": lambda d: d["node_point"].__setitem__(_live_child(d), d["node_point"][_root(d)]),
    "target without node": lambda d: d["point_node"].__setitem__(int(d["node_point"][_live_child(d)]), -1),
    "root level 2**62": lambda d: d["node_level"].__setitem__(_root(d), 2**62),
    "level -2**62": lambda d: d["node_level"].__setitem__(_live_child(d), -(2**62)),
    "child level above parent": lambda d: d["node_level"].__setitem__(_live_child(d), 10**4),
    "changed base": lambda d: d.__setitem__("base", np.array(3.0)),
    "base lowered slightly": lambda d: d.__setitem__("base", np.array(float(d["base"]) - 0.1)),
    "one coordinate nudged": lambda d: d["points"].__setitem__((0, 0), np.nextafter(d["points"][0, 0], np.inf)),
    "digest removed": lambda d: d.pop("digest"),
    "base 1+1e-9": lambda d: d.__setitem__("base", np.array(1 + 1e-9)),
    "nan base": lambda d: d.__setitem__("base", np.array(np.nan)),
    "float32 points": lambda d: d.__setitem__("points", d["points"].astype(np.float32)),
    "int points": lambda d: d.__setitem__("points", d["points"].astype(np.int64)),
    "float32 maxd": lambda d: d.__setitem__("node_maxd", d["node_maxd"].astype(np.float32)),
    "float levels": lambda d: d.__setitem__("node_level", d["node_level"].astype(np.float64)),
    "dim mismatch": lambda d: d.__setitem__("dim", np.array(7)),
    "declared dtype": lambda d: d.__setitem__("dtype", np.array("float16")),
    "missing maxd": lambda d: d.pop("node_maxd"),
    "state shape": lambda d: d.__setitem__("state", d["state"][:3]),
    "root out of range": lambda d: d["state"].__setitem__(0, 10**6),
    "n_nodes too large": lambda d: d["state"].__setitem__(1, d["state"][1] + 1),
    "free list holds live node": lambda d: d["free_stack"].__setitem__(0, _root(d)),
    "free list duplicate": lambda d: d["free_stack"].__setitem__(1, d["free_stack"][0]),
    "cycle of siblings": lambda d: d["node_next_sibling"].__setitem__(_live_child(d), _live_child(d)),
    "parent link": lambda d: d["node_parent"].__setitem__(_live_child(d), _live_child(d)),
    "orphan (no parent)": lambda d: d["node_parent"].__setitem__(_live_child(d), -1),
    "version": lambda d: d.__setitem__("version", np.array(99)),
    "object format": lambda d: d.__setitem__("format", np.array(b"refimpl.SGTree")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = tmp_path_factory.mktemp("io") / "good.npz"
    t = SGTree.build(np.random.default_rng(4).normal(size=(150, 4)), rng=4)
    t.remove([3, 7, 11])
    assert t.arrays().state[FREE_TOP] == 3 and t.check_invariants() == []  # three freed nodes on the free list
    t.save(p)
    return p


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_files_get_one_clear_value_error(saved, tmp_path, name):
    out = tmp_path / "bad.npz"
    _corrupt(saved, out, CORRUPTIONS[name])
    with pytest.raises(ValueError, match="^path: .*bad.npz"):
        SGTree.load(out)


def test_the_good_file_loads_and_answers_like_the_original(saved):
    t = SGTree.load(saved)
    assert t.check_invariants() == []
    Q = np.random.default_rng(9).normal(size=(7, 4))
    ids = t.live_ids()
    ref = brute_force_topk(t.points, Q, 5, ids=ids)
    assert np.array_equal(topk(t, Q, 5).ids, ref.ids)


def test_a_tree_saved_with_stale_geometry_still_loads(tmp_path):
    """update_points(repair=False) leaves covering / separation open but every statistic valid: such a tree is a
    legitimate state and must round-trip."""
    t = _tree(seed=6)
    rng = np.random.default_rng(6)
    ids = t.live_ids()[:10]
    t.update_points(ids, t.points[ids] + rng.normal(size=(10, 5)), repair=False)
    t.save(tmp_path / "s.npz")
    t2 = SGTree.load(tmp_path / "s.npz")
    _same(t, t2)
    t2.maintain(0.0)
    assert t2.check_invariants() == []


# ---------------------------------------------------------------- numerical domain
@pytest.mark.parametrize("base", [1 + 1e-9, 1.001, 0.5, 1.0, MAX_BASE * 2, float("inf"), float("nan")])
def test_degenerate_bases_are_refused(base):
    with pytest.raises(ValueError, match="^base:"):
        SGTree.build(np.eye(3), base=base)


def test_domain_edges_build_valid_trees():
    X = np.random.default_rng(1).normal(size=(300, 3))
    for b in (MIN_BASE, MAX_BASE):
        assert SGTree.build(X, base=b, rng=0).check_invariants() == []
    assert SGTree.build(X * 1e-90, rng=0).check_invariants() == []
    assert SGTree.build(X * 1e139, rng=0).check_invariants() == []


@pytest.mark.parametrize("level", [2**63, -(2**63), 2**62, LEVEL_LIMIT + 1])
def test_huge_levels_are_a_value_error_naming_the_argument(level):
    t = _tree()
    with pytest.raises(ValueError, match="^level:"):
        t.clustering(level)
    with pytest.raises(ValueError, match="^level:"):
        t.rebuild_level(level)


@pytest.mark.parametrize("call", ["dim", "capacity"])
def test_huge_sizes_are_a_value_error(call):
    kw = {"dim": 10**13} if call == "dim" else {"dim": 4, "capacity": 10**13}
    with pytest.raises(ValueError, match=f"^{call}:"):
        SGTree(**kw)


@pytest.mark.parametrize("bad", [np.array([[1 + 1j, 0.0]]), np.array([[True, False]]),
                                 np.array([[1.0, "x"]], dtype=object)])
def test_non_real_points_and_queries_are_a_type_error(bad):
    with pytest.raises(TypeError, match="^points:"):
        SGTree.build(bad)
    t = SGTree.build(np.eye(2))
    with pytest.raises(TypeError, match="^points:"):
        t.insert(bad)
    with pytest.raises(TypeError, match="^q:"):
        topk(t, bad, 1)


def test_wrong_object_types_are_a_type_error():
    t = _tree()
    with pytest.raises(TypeError, match="^tree:"):
        topk(np.eye(3), np.ones(3), 1)
    with pytest.raises(TypeError, match="^k:"):
        topk(t, np.ones(5), 2.0)
    with pytest.raises(ValueError, match="^k:"):
        topk(t, np.ones(5), 10**12)
    with pytest.raises(TypeError, match="^dtype:"):
        SGTree.build(np.eye(3), dtype=np.int32)
    with pytest.raises(TypeError, match="^dtype:"):
        SGTree.build(np.eye(3), dtype="nonsense")


# ---------------------------------------------------------------- float32 storage
def test_float32_tree_is_exact_on_its_stored_points():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    t = SGTree.build(X, dtype=np.float32, rng=0)
    assert t.points.dtype == np.float32 and t.check_invariants() == []
    assert SGTree.build(X, rng=0).memory_bytes() - t.memory_bytes() == X.size * 4  # only the points shrink
    Q = rng.normal(size=(25, 16))
    res = topk(t, Q, 10)
    ref = brute_force_topk(t.points, Q, 10)
    assert np.array_equal(res.ids, ref.ids) and np.array_equal(res.scores, ref.scores)
    exact = Q @ t.points.astype(np.float64).T  # float64 scores of the stored float32 rows
    np.testing.assert_allclose(res.scores, np.take_along_axis(exact, res.ids, 1), rtol=1e-12, atol=1e-12)
    ids = t.live_ids()[:200]
    t.update_points(ids, X[ids] + 0.05 * rng.normal(size=(200, 16)))
    t.remove(ids[:50])
    t.insert(X[:20])
    assert t.check_invariants() == [] and t.points.dtype == np.float32
    assert np.array_equal(topk(t, Q, 10).ids, brute_force_topk(t.points, Q, 10, ids=t.live_ids()).ids)
