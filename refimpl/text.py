"""Text retrieval data: the text-pair loader, the hashing featuriser and TF-IDF weights.

- :func:`load_text_pairs` reads a text retrieval task (``targets.tsv``, ``queries.tsv``; formats below) into a
  :class:`refimpl.data.RetrievalDataset`, for any vocabulary, any number of positives per query, and lines of any
  length; bad lines are an error naming file and line, or are skipped and reported (``on_bad_lines``).
- :func:`hash_features`: word unigrams and bigrams hashed into ``n_features`` columns (CSR), deterministic on
  every machine; :func:`tokenize` is its tokeniser.
- :func:`idf_weights`: smoothed inverse document frequencies of the hashed columns, for the lexical (TF-IDF)
  baseline that every training run is compared with.
- :func:`describe_skipped`: the one-line report of what the loader skipped.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import scipy.sparse as sp

from refimpl._validate import check_features, check_int
from refimpl.data import RetrievalDataset

__all__ = ["tokenize", "hash_features", "idf_weights", "load_text_pairs", "describe_skipped"]

_TOKEN = re.compile(r"\w+", re.UNICODE)
_BOM = b"\xef\xbb\xbf"
_SHOW = 5  # line numbers shown in a report


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (``\\w+`` runs, Unicode-aware)."""
    return _TOKEN.findall(text.lower())


def _stable_hash(token: str) -> int:
    """64-bit BLAKE2b of the UTF-8 token: the same on every machine and run (unlike Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def hash_features(texts, n_features: int = 2 ** 18, *, bigrams: bool = True, normalize: bool = True):
    """Hashing featuriser: word unigrams (and bigrams ``"w1 w2"``) hashed into ``n_features`` columns (CSR).

    Row ``i`` has ``x_ij = 1 + log c_ij`` where ``c_ij`` counts the n-grams ``g`` of text ``i`` with
    ``blake2b64(g) mod n_features = j`` (deterministic across runs and machines); with ``normalize`` each row is
    scaled to unit L2 norm. A text without any token gives an all-zero row.

    Parameters
    ----------
    texts : iterable of str (n texts). n_features : number of columns F (>= 1). bigrams : add word bigrams.

    Returns a (n, F) float64 CSR matrix with sorted indices.
    """
    n_features = check_int("n_features", n_features, low=1)
    cache: dict[str, int] = {}
    indptr, indices, data = [0], [], []
    for text in texts:
        toks = tokenize(text)
        grams = toks + ([f"{a} {b}" for a, b in zip(toks, toks[1:])] if bigrams else [])
        row: dict[int, int] = {}
        for g in grams:
            h = cache.get(g)
            if h is None:
                h = cache[g] = _stable_hash(g) % n_features
            row[h] = row.get(h, 0) + 1
        cols = sorted(row)
        vals = np.array([1.0 + np.log(row[c]) for c in cols], dtype=np.float64)
        if normalize and vals.size:
            vals /= np.linalg.norm(vals)
        indices.extend(cols)
        data.extend(vals.tolist())
        indptr.append(len(indices))
    return sp.csr_matrix((np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64),
                          np.asarray(indptr, dtype=np.int64)), shape=(len(indptr) - 1, n_features))


def idf_weights(X) -> np.ndarray:
    """Smoothed inverse document frequency of every column of a (n, F) CSR matrix ``X`` (the documents).

    ``idf_j = log((1 + n) / (1 + df_j)) + 1`` with ``df_j`` the number of rows where column ``j`` is non-zero
    (the weighting of the TF-IDF baseline; a column absent from every row gets the largest weight).
    Returns a (F,) float64 array.
    """
    X = check_features("X", X)
    if not sp.issparse(X):
        raise TypeError("X: expected a CSR matrix of hashed text features")
    df = np.bincount(X.indices, minlength=X.shape[1]).astype(np.float64)
    return np.log((1.0 + X.shape[0]) / (1.0 + df)) + 1.0


# ------------------------------------------------------------------------------------------------------- loader
class _Lines:
    """Reads one TSV file: decoded data lines ``(lineno, fields)``; bad lines raise or are recorded."""

    def __init__(self, path: str, on_bad_lines: str):
        self.path, self.mode, self.bad = path, on_bad_lines, []

    def fail(self, lineno: int, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever the data held
        if self.mode == "error":
            raise ValueError(f"{self.path}:{lineno}: {reason}")
        self.bad.append((lineno, reason))

    def read(self, n_fields: int):
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path}: no such file")
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.fail(lineno, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                    continue
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                parts = line.split("\t", n_fields - 1)
                if len(parts) != n_fields:
                    self.fail(lineno, f"expected {n_fields} tab-separated fields, got {len(parts)}")
                    continue
                yield lineno, parts


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def load_text_pairs(targets_tsv, queries_tsv, *, n_features: int = 2 ** 18, bigrams: bool = True,
                    normalize: bool = True, on_bad_lines: str = "error") -> RetrievalDataset:
    """Read a text retrieval task and featurise it with :func:`hash_features`.

    Formats (UTF-8, a leading byte-order mark accepted, one record per line, blank lines ignored, ``\\r\\n``
    accepted, lines of any length):

    - ``targets.tsv``: ``target_id<TAB>text``; ids are arbitrary unique strings (no tab), numbered in file order;
      the text may contain further tabs, and may be empty (an all-zero feature row).
    - ``queries.tsv``: ``split<TAB>target_ids<TAB>text`` with ``split`` in {train, test} and ``target_ids`` a
      comma-separated list of target ids (several positives allowed; repeats ignored).

    Queries and targets use the same featuriser (``n_features`` hashed unigram/bigram columns). A query whose text
    has no word (e.g. ``"; "``) carries nothing to rank with: it is left out and counted in
    ``metadata["no_word_queries"]`` (line numbers), in either mode.

    Parameters
    ----------
    targets_tsv, queries_tsv : paths. n_features, bigrams, normalize : the featuriser (:func:`hash_features`).
    on_bad_lines : ``"error"``: the first bad line raises ``ValueError("<file>:<line>: <reason>")`` (one line);
        ``"skip"``: bad lines are left out and listed in ``metadata["bad_lines"]`` as ``(file, line, reason)``.
        Bad lines: invalid UTF-8, wrong number of fields, empty or duplicate target id, unknown split, empty or
        unknown target id in a query.

    Returns a :class:`~refimpl.data.RetrievalDataset` with ``target_names`` and the metadata above; it needs at
    least one target and one train and one test query (ValueError otherwise).
    """
    n_features = check_int("n_features", n_features, low=1)
    if on_bad_lines not in ("error", "skip"):
        raise ValueError(f"on_bad_lines: expected 'error' or 'skip', got {on_bad_lines!r}")
    targets_tsv, queries_tsv = os.fspath(targets_tsv), os.fspath(queries_tsv)
    tfile, qfile = _Lines(targets_tsv, on_bad_lines), _Lines(queries_tsv, on_bad_lines)
    names, texts, index = [], [], {}
    for lineno, (tid, text) in tfile.read(2):
        tid = tid.strip()
        if not tid:
            tfile.fail(lineno, "empty target id")
        elif tid in index:
            tfile.fail(lineno, f"duplicate target id {_short(tid)} (first on line {index[tid][1]})")
        else:
            index[tid] = (len(names), lineno)
            names.append(tid)
            texts.append(text)
    if not names:
        raise ValueError(f"{targets_tsv}: contains no valid target lines")
    qtexts, positives, split, no_words = [], [], [], []
    for lineno, (sp_name, ids, text) in qfile.read(3):
        sp_name = sp_name.strip().lower()
        raw = [t.strip() for t in ids.split(",")]
        missing = [t for t in raw if t and t not in index]
        if sp_name not in ("train", "test"):
            qfile.fail(lineno, f"split must be 'train' or 'test', got {_short(sp_name)}")
        elif any(not t for t in raw):
            qfile.fail(lineno, f"empty target id in {_short(ids)}")
        elif missing:
            qfile.fail(lineno, f"unknown target id {_short(missing[0])}")
        elif not tokenize(text):
            no_words.append(lineno)
        else:
            positives.append(np.unique(np.array([index[t][0] for t in raw], dtype=np.int64)))
            split.append(sp_name)
            qtexts.append(text)
    split = np.array(split)
    train_ids = np.flatnonzero(split == "train").astype(np.int64)
    test_ids = np.flatnonzero(split == "test").astype(np.int64)
    if train_ids.size == 0 or test_ids.size == 0:
        raise ValueError(f"{queries_tsv}: needs at least one valid 'train' and one 'test' query with words "
                         f"(got {train_ids.size} and {test_ids.size})")
    Xt = hash_features(texts, n_features, bigrams=bigrams, normalize=normalize)
    Xq = hash_features(qtexts, n_features, bigrams=bigrams, normalize=normalize)
    meta = {"kind": "text", "targets_tsv": targets_tsv, "queries_tsv": queries_tsv, "n_features": n_features,
            "bigrams": bigrams, "n_targets": len(names), "n_queries": len(qtexts), "on_bad_lines": on_bad_lines,
            "bad_lines": [(targets_tsv, ln, r) for ln, r in tfile.bad] + [(queries_tsv, ln, r) for ln, r in qfile.bad],
            "no_word_queries": no_words}
    return RetrievalDataset(query_features=Xq, target_features=Xt, positives=positives, train_ids=train_ids,
                            test_ids=test_ids, metadata=meta, target_names=names).validate()


def describe_skipped(metadata: dict) -> str | None:
    """One line saying what :func:`load_text_pairs` left out (bad lines per file, queries without words), or None."""
    parts = []
    by_file: dict[str, list] = {}
    for path, ln, reason in metadata.get("bad_lines", []):
        by_file.setdefault(path, []).append((ln, reason))
    for path, rows in by_file.items():
        lines = ", ".join(str(ln) for ln, _ in rows[:_SHOW]) + (", ..." if len(rows) > _SHOW else "")
        parts.append(f"{len(rows)} bad line(s) of {path} (lines {lines}; first: {rows[0][1]})")
    nw = metadata.get("no_word_queries", [])
    if nw:
        lines = ", ".join(str(ln) for ln in nw[:_SHOW]) + (", ..." if len(nw) > _SHOW else "")
        parts.append(f"{len(nw)} query line(s) without any word (lines {lines})")
    return ("skipped " + "; ".join(parts)) if parts else None
