"""Bad input to every public entry point gets a clear ValueError/TypeError that names the argument (DESIGN.md,
principle 5): never a silent NaN, a crash inside Numba, a MemoryError/OverflowError, or a hang.

The corpus crosses each entry point's array and scalar arguments with classes of bad values (complex, bool and
object arrays; NaN/Inf; wrong rank and width; out-of-range, huge and non-integer integers; wrong object types),
so that a fix must hold for the class, not one case.
"""
from __future__ import annotations

import numpy as np
import pytest

import refimpl as R

RNG = np.random.default_rng(0)
P = RNG.normal(size=(60, 4))
P /= np.linalg.norm(P, axis=1, keepdims=True)
Q = P[:3] * 0.9
TREE = R.SGTree.build(P, rng=0)


def _tree():
    return TREE.copy()


def _clustering():
    return R.find_clustering(TREE, Q[0], beta=5.0, gamma=10.0)


# (name, call(**overrides), {argument: valid value}) -- each call site takes its arguments by keyword here.
ENTRY_POINTS = {
    "SGTree.build": (lambda points: R.SGTree.build(points, rng=0), {"points": P}),
    "SGTree.insert": (lambda points: _tree().insert(points), {"points": P[:2]}),
    "SGTree.update_points": (lambda ids, points: _tree().update_points(ids, points),
                             {"ids": np.array([0, 1]), "points": P[2:4]}),
    "SGTree.remove": (lambda ids: _tree().remove(ids), {"ids": np.array([0, 1])}),
    "SGTree.rebuild_level": (lambda level: _tree().rebuild_level(level), {"level": 0}),
    "SGTree.maintain": (lambda U: _tree().maintain(U), {"U": 0.1}),
    "SGTree.clustering": (lambda level: TREE.clustering(level), {"level": 0}),
    "topk": (lambda tree, q, k: R.topk(tree, q, k), {"tree": TREE, "q": Q, "k": 3}),
    "find_clustering": (lambda tree, q, beta, gamma: R.find_clustering(tree, q, beta=beta, gamma=gamma),
                        {"tree": TREE, "q": Q[0], "beta": 5.0, "gamma": 10.0}),
    "certify": (lambda tree, q, clustering, beta: R.certify(tree, q, clustering, beta=beta),
                {"tree": TREE, "q": Q[0], "clustering": "valid", "beta": 5.0}),
    "sample_exact": (lambda points, q, k, beta: R.sample_exact(points, q, k, beta=beta, rng=0),
                     {"points": P, "q": Q, "k": 4, "beta": 5.0}),
    "sample_rejection": (lambda tree, q, k, beta: R.sample_rejection(tree, q, k, beta=beta, rng=0),
                         {"tree": TREE, "q": Q, "k": 4, "beta": 5.0}),
    "sample_mh": (lambda tree, q, k, beta: R.sample_mh(tree, q, k, beta=beta, rng=0),
                  {"tree": TREE, "q": Q, "k": 4, "beta": 5.0}),
    "LinearDualEncoder": (lambda n_query_features, dim, beta: R.LinearDualEncoder(n_query_features, 5, dim,
                                                                                   beta=beta, rng=0),
                          {"n_query_features": 5, "dim": 3, "beta": 20.0}),
    "encode_queries": (lambda X: R.LinearDualEncoder(5, 5, 3, rng=0).encode_queries(X), {"X": RNG.normal(size=(4, 5))}),
    "encode_targets": (lambda X: R.LinearDualEncoder(5, 5, 3, rng=0).encode_targets(X), {"X": RNG.normal(size=(4, 5))}),
    "Nystrom": (lambda n_landmarks: R.Nystrom(n_landmarks, rng=0), {"n_landmarks": 8}),
    "Uniform": (lambda k: R.Uniform(k), {"k": 8}),
    "StochasticNegativeMining": (lambda k, mem_percent: R.StochasticNegativeMining(k, mem_percent=mem_percent),
                                 {"k": 8, "mem_percent": 3.0}),
    "planted_dataset": (lambda n_targets: R.planted_dataset(n_targets, 100, branching=(2, 3), rng=0),
                        {"n_targets": 120}),
}

ARRAY_BAD = {
    "complex": (lambda a: a.astype(complex), TypeError),
    "bool": (lambda a: a > 0, TypeError),
    "object": (lambda a: a.astype(object), TypeError),
    "nan": (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a), ValueError),
    "inf": (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.inf, a), ValueError),
    "rank3": (lambda a: a[None, None], ValueError),
    "empty_width": (lambda a: a.reshape(a.shape[0], -1)[:, :0] if a.ndim > 1 else a[:0], ValueError),
}
ID_BAD = {
    "float_ids": (lambda a: a + 0.5, TypeError),
    "negative_id": (lambda a: a - 10, ValueError),
    "huge_id": (lambda a: a + 10**15, ValueError),
    "complex_ids": (lambda a: a.astype(complex), TypeError),
}
SCALAR_BAD = {
    "nan": (float("nan"), ValueError),
    "inf": (float("inf"), ValueError),
    "negative": (-1, ValueError),
    "complex": (1 + 1j, TypeError),
    "string": ("3", TypeError),
    "none": (None, TypeError),
}
INT_BAD = {
    "huge": (10**13, ValueError),
    "2**63": (2**63, ValueError),
    "float": (2.5, TypeError),
    "negative": (-3, ValueError),
    "string": ("3", TypeError),
}
OBJECT_BAD = {"ndarray": (np.zeros((3, 3)), TypeError), "none": (None, TypeError), "string": ("tree", TypeError)}

INT_ARGS = {"k", "n_query_features", "dim", "n_landmarks", "n_targets"}
# constructors that cannot know N yet accept any large size; they must still refuse what no int64 holds
UNSIZED = {"Uniform", "StochasticNegativeMining", "Nystrom"}
LEVEL_ARGS = {"level"}
FLOAT_ARGS = {"beta", "gamma", "U", "mem_percent"}
ID_ARGS = {"ids"}
OBJECT_ARGS = {"tree", "clustering"}


def _cases():
    for ep, (fn, valid) in ENTRY_POINTS.items():
        for arg, value in valid.items():
            if arg in INT_ARGS:
                table = {k: v for k, v in INT_BAD.items() if not (ep in UNSIZED and k == "huge")}
            elif arg in LEVEL_ARGS:
                table = {"2**63": (2**63, ValueError), "-(2**63)": (-(2**63) - 1, ValueError),
                         "float": (0.5, TypeError), "string": ("0", TypeError)}
            elif arg in FLOAT_ARGS:
                table = {k: v for k, v in SCALAR_BAD.items() if not (arg == "U" and k == "negative")}
                if arg == "U":
                    table["negative"] = (-0.5, ValueError)
            elif arg in ID_ARGS:
                table = {k: (f(value), e) for k, (f, e) in ID_BAD.items()}
            elif arg in OBJECT_ARGS:
                table = OBJECT_BAD
            else:
                table = {k: (f(np.asarray(value, dtype=float)), e) for k, (f, e) in ARRAY_BAD.items()}
            for kind, (bad, exc) in table.items():
                yield pytest.param(ep, arg, bad, exc, id=f"{ep}-{arg}-{kind}")


@pytest.mark.parametrize("entry, arg, bad, exc", list(_cases()))
def test_bad_argument_is_named(entry, arg, bad, exc):
    fn, valid = ENTRY_POINTS[entry]
    kwargs = {k: (_clustering() if isinstance(v, str) and v == "valid" else v) for k, v in valid.items()}
    kwargs[arg] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**kwargs)
    assert isinstance(info.value, exc), f"{entry}({arg}=...) raised {type(info.value).__name__}: {info.value}"
    assert arg.split("_")[0] in str(info.value).lower() or arg in str(info.value), (
        f"{entry}({arg}=...): message does not name the argument: {info.value}")


def test_valid_calls_succeed():
    """Control: every entry point accepts its valid arguments (so a failure above is the bad value's doing)."""
    for entry, (fn, valid) in ENTRY_POINTS.items():
        fn(**{k: (_clustering() if isinstance(v, str) and v == "valid" else v) for k, v in valid.items()})


def test_excluding_every_target_is_refused_up_front():
    every = np.arange(P.shape[0])
    with pytest.raises(ValueError, match="exclude"):
        R.sample_exact(P, Q[0], 3, beta=5.0, rng=0, exclude=every)
    with pytest.raises(ValueError, match="exclude"):
        R.sample_rejection(TREE, Q[0], 3, beta=5.0, rng=0, exclude=every)
    with pytest.raises(ValueError, match="exclude"):
        R.sample_mh(TREE, Q[0], 3, beta=5.0, rng=0, exclude=every)


def test_clustering_of_another_tree_or_a_stale_one_is_refused():
    t = _tree()
    c = R.find_clustering(t, Q[0], beta=5.0, gamma=10.0)
    other = R.SGTree.build(P[::-1].copy(), rng=1)
    with pytest.raises((ValueError, TypeError), match="clustering"):
        R.certify(other, Q[0], c, beta=5.0)
    t.remove([0])
    with pytest.raises(ValueError, match="clustering"):
        R.certify(t, Q[0], c, beta=5.0)


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_extreme_scales_are_refused_or_exact(scale):
    """Data whose scale would overflow or underflow the level arithmetic: a clear ValueError, or a valid tree."""
    try:
        t = R.SGTree.build(P * scale, rng=0)
    except ValueError as exc:
        assert "points" in str(exc)
        return
    assert t.check_invariants() == []


def test_overflowing_loss_is_an_error_not_nan():
    from refimpl.softmax import full_softmax_loss

    big = np.full((2, 3), 1e308)
    with pytest.raises(ValueError):
        full_softmax_loss(big, big, [np.array([0]), np.array([1])], beta=20.0)


def test_save_takes_a_path_only(tmp_path):
    with pytest.raises(TypeError, match="path"):
        TREE.save(3)
