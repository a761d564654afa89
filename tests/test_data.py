"""Tests of refimpl.data: the planted task (the text loader is tested in test_text.py)."""
import numpy as np
import pytest
import scipy.sparse as sp

from refimpl.data import RetrievalDataset, planted_dataset

SMALL = dict(n_targets=300, n_queries=400, branching=(5, 4), n_features=16, dim=8)


def _same(a, b):
    if sp.issparse(a):
        return sp.issparse(b) and a.shape == b.shape and (a != b).nnz == 0
    return np.array_equal(a, b)


@pytest.mark.parametrize("sparse", [False, True])
def test_planted_reproducible_and_seed_sensitive(sparse):
    kw = dict(SMALL, sparse=sparse, n_features=64 if sparse else 16)
    d1, d2, d3 = planted_dataset(**kw, rng=3), planted_dataset(**kw, rng=3), planted_dataset(**kw, rng=4)
    assert _same(d1.query_features, d2.query_features) and _same(d1.target_features, d2.target_features)
    assert all(np.array_equal(p, q) for p, q in zip(d1.positives, d2.positives))
    assert np.array_equal(d1.train_ids, d2.train_ids) and np.array_equal(d1.teacher_B, d2.teacher_B)
    assert not _same(d1.target_features, d3.target_features)
    assert sp.issparse(d1.target_features) == sparse and sp.issparse(d1.query_features) == sparse


def test_planted_structure_and_argmax_positives_are_the_teachers():
    d = planted_dataset(**SMALL, positives="argmax", n_positives=2, rng=1)
    assert isinstance(d, RetrievalDataset)
    assert d.target_features.shape == (300, 16) and d.query_features.shape == (400, 16)
    assert np.intersect1d(d.train_ids, d.test_ids).size == 0
    assert d.train_ids.size + d.test_ids.size == 400 and d.test_ids.size == 80
    assert np.allclose(np.linalg.norm(d.target_features, axis=1), 1.0)
    teacher = d.teacher
    S = teacher.encode_queries(d.query_features) @ teacher.encode_targets(d.target_features).T
    top2 = np.argsort(-S, axis=1)[:, :2]
    assert all(np.array_equal(p, t) for p, t in zip(d.positives, top2))
    assert d.metadata["teacher_test_r1"] == 1.0
    fine = d.metadata["fine_labels"]
    assert fine.shape == (300,) and fine.max() < 20
    # near-duplicates: targets of one fine cluster are closer than targets of different fine clusters
    Y = d.target_features
    same = fine[:, None] == fine[None, :]
    D = np.linalg.norm(Y[:, None] - Y[None], axis=2)
    assert D[same & ~np.eye(300, dtype=bool)].mean() < 0.5 * D[~same].mean()


def test_planted_sampled_positives_follow_the_teacher_softmax():
    """Positives drawn from the teacher softmax: the rate at which the positive is the teacher's argmax must match
    E_q[max_i P(i|q)]. 3000 queries: sd <= 0.0092; we allow 4 sd, so a sampler with the wrong temperature (e.g.
    beta 20 instead of 40 shifts this rate by > 0.1 here) fails with probability ~1, and a correct one passes with
    probability > 0.9999."""
    d = planted_dataset(n_targets=200, n_queries=3000, branching=(4, 5), n_features=16, dim=8, positives="sample",
                        teacher_beta=40.0, query_noise=0.15, rng=7)
    t = d.teacher
    S = 40.0 * t.encode_queries(d.query_features) @ t.encode_targets(d.target_features).T
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    expected = P.max(1).mean()
    observed = np.mean([p[0] == a for p, a in zip(d.positives, S.argmax(1))])
    assert 0.05 < expected < 0.95
    assert abs(observed - expected) < 4 * np.sqrt(0.25 / 3000)


@pytest.mark.parametrize("kw, match", [
    (dict(positives="soft"), "positives"), (dict(test_fraction=1.5), "test_fraction"),
    (dict(scales=(1.0, 0.5)), "scales"), (dict(n_targets=1), "n_targets"), (dict(teacher_beta=0.0), "teacher_beta"),
    (dict(n_positives=0), "n_positives"), (dict(sparse=True, query_noise=1.0), "query_noise"),
])
def test_planted_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        planted_dataset(**{**SMALL, **kw})


def test_planted_argmax_positives_equal_a_full_scan():
    """The branch-and-bound teacher top-k (argmax positives) equals the brute-force ranking of every query over all
    targets (dense and sparse tasks, several positives)."""
    from refimpl.data import _embed

    for kw in (dict(n_targets=1500, n_queries=400, n_positives=3, branching=(6, 10)),
               dict(n_targets=800, n_queries=300, n_positives=2, sparse=True, n_features=200, branching=(4, 5))):
        ds = planted_dataset(**kw, rng=5)
        S = _embed(ds.query_features, ds.teacher_A) @ _embed(ds.target_features, ds.teacher_B).T
        ref = np.argsort(-S, axis=1, kind="stable")[:, :kw["n_positives"]]
        assert np.array_equal(np.stack(ds.positives), ref)
