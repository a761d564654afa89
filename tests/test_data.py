"""Tests of refimpl.data: the planted task and the text-pair loader (formats, hashing featuriser, errors)."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from refimpl.data import RetrievalDataset, hash_features, load_text_pairs, planted_dataset, tokenize

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "text_pairs")
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


def test_hash_features_deterministic_unigrams_bigrams():
    X = hash_features(["Hello world", "hello, WORLD hello"], 1 << 20, normalize=False)
    assert X.format == "csr" and X.shape == (2, 1 << 20)
    col = lambda g: int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") % (1 << 20)
    row0 = dict(zip(X[0].indices, X[0].data))
    assert row0 == {col("hello"): 1.0, col("world"): 1.0, col("hello world"): 1.0}
    row1 = dict(zip(X[1].indices, X[1].data))
    assert row1[col("hello")] == pytest.approx(1 + np.log(2)) and col("world hello") in row1
    Xu = hash_features(["Hello world"], 1 << 20, bigrams=False)
    assert Xu.nnz == 2 and np.isclose(np.linalg.norm(Xu.data), 1.0)
    assert tokenize("Ça va? OK_1 ") == ["ça", "va", "ok_1"]
    # the same columns in a fresh interpreter with a different string-hash salt
    code = ("from refimpl.data import hash_features; "
            "print(list(hash_features(['Hello world'], 1 << 20).indices))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(list(hash_features(["Hello world"], 1 << 20).indices))


def test_load_text_pairs_fixture():
    d = load_text_pairs(os.path.join(FIX, "targets.tsv"), os.path.join(FIX, "queries.tsv"), n_features=4096)
    assert d.n_targets == 12 and d.n_queries == 14
    assert d.train_ids.tolist() == list(range(10)) and d.test_ids.tolist() == [10, 11, 12, 13]
    assert d.target_names[0] == "t01" and d.target_names[-1] == "t12"
    assert d.positives[4].tolist() == [4, 8] and d.positives[11].tolist() == [0, 6]
    assert d.query_features.format == "csr" and d.query_features.shape == (14, 4096)
    assert np.allclose(np.sqrt(np.asarray(d.target_features.multiply(d.target_features).sum(1)).ravel()), 1.0)
    assert d.teacher is None


def _write(tmp_path, targets, queries):
    t, q = tmp_path / "targets.tsv", tmp_path / "queries.tsv"
    t.write_text(targets, encoding="utf-8")
    q.write_text(queries, encoding="utf-8")
    return str(t), str(q)


GOOD_T = "a\talpha beta\nb\tgamma delta\n"
GOOD_Q = "train\ta\talpha\ntest\tb\tgamma\n"


@pytest.mark.parametrize("targets, queries, match", [
    ("a\talpha\nb no tab here\n", GOOD_Q, r"targets\.tsv:2: expected 2 tab-separated fields"),
    ("a\talpha\na\tbeta\n", GOOD_Q, r"targets\.tsv:2: duplicate target id 'a'"),
    ("a\talpha\n\tbeta\n", GOOD_Q, r"targets\.tsv:2: empty target id"),
    ("a\talpha\nb\t ... \n", GOOD_Q, r"targets\.tsv:2: target 'b' has no words"),
    (GOOD_T, "train\ta\talpha\ndev\tb\tgamma\n", r"queries\.tsv:2: split must be 'train' or 'test'"),
    (GOOD_T, "train\ta\talpha\ntest\tb,zz\tgamma\n", r"queries\.tsv:2: unknown target id 'zz'"),
    (GOOD_T, "train\ta\talpha\ntest\tb,\tgamma\n", r"queries\.tsv:2: empty target id"),
    (GOOD_T, "train\ta\talpha\ntest\tb\n", r"queries\.tsv:2: expected 3 tab-separated fields"),
    (GOOD_T, "train\ta\talpha\ntrain\tb\tgamma\n", r"at least one 'train' and one 'test'"),
    (GOOD_T, "\n\n", r"queries\.tsv: contains no data lines"),
])
def test_load_text_pairs_errors_name_file_and_line(tmp_path, targets, queries, match):
    t, q = _write(tmp_path, targets, queries)
    with pytest.raises(ValueError, match=match):
        load_text_pairs(t, q, n_features=64)


def test_load_text_pairs_missing_file_and_blank_lines(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_text_pairs(str(tmp_path / "nope.tsv"), str(tmp_path / "nope2.tsv"))
    t, q = _write(tmp_path, "\n" + GOOD_T + "\n", GOOD_Q.replace("\n", "\r\n"))
    d = load_text_pairs(t, q, n_features=64)
    assert d.n_targets == 2 and d.n_queries == 2


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
