"""``python -m refimpl bench text``: per-step time of the text training path against the number of hashed features.

For each ``n_features`` in ``--sizes`` (default 2^16, 2^18, 2^20) the text task (``--data DIR``, e.g. the GCIDE
task of ``python -m refimpl data gcide DIR``; without it a seeded synthetic Zipf-vocabulary task) is featurised
and :func:`refimpl.training.train` runs with uniform negatives, once with the lazy (sparse) Adam of
:mod:`refimpl.optim` and, at the sizes in ``--dense-at``, with dense Adam as the reference. The per-step time is
CPU time (``time.process_time``) of the difference between a run of ``--steps`` steps and a run of
``--steps // 4`` steps with the same arguments, so that the set-up and the final evaluation (8 test queries) cancel.
Reported: ms per step, the dense/lazy ratio at each size, and the lazy 2^20 / 2^16 ratio (independence of
``n_features``). Numbers come from one run on a shared machine: compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from refimpl.mining import Uniform
from refimpl.text import load_text_pairs
from refimpl.training import train


def _synthetic(dirname: str, n_targets: int, seed: int) -> None:
    """A Zipf-vocabulary text task: targets of 30-90 words, queries of 8-20 words drawn from their target."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    p = 1.0 / np.arange(1, vocab.size + 1)
    p /= p.sum()
    with open(os.path.join(dirname, "targets.tsv"), "w", encoding="utf-8") as ft, \
            open(os.path.join(dirname, "queries.tsv"), "w", encoding="utf-8") as fq:
        for i in range(n_targets):
            words = vocab[rng.choice(vocab.size, size=rng.integers(30, 91), p=p)]
            ft.write(f"t{i}\t{' '.join(words)}\n")
            for s in range(2):
                q = rng.choice(words, size=rng.integers(8, 21))
                fq.write(f"{'test' if s and i % 20 == 0 else 'train'}\tt{i}\t{' '.join(q)}\n")


def _per_step(ds, steps: int, sparse: bool, a) -> float:
    """CPU seconds per step: (run of ``steps`` - run of ``steps // 4``) / (difference in steps)."""
    short = max(2, steps // 4)
    cpu = []
    for s in (2, short, steps):  # the first run only compiles / warms the caches (not measured)
        t = time.process_time()
        train(ds, Uniform(a.k), steps=s, batch_size=a.batch_size, dim=a.dim, lr_warmup=1, seed=a.seed,
              init="shared", sparse_updates=sparse)
        cpu.append(time.process_time() - t)
    return (cpu[2] - cpu[1]) / (steps - short)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refimpl bench text", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="directory with targets.tsv and queries.tsv (default: synthetic)")
    p.add_argument("--sizes", default="65536,262144,1048576", help="comma-separated n_features")
    p.add_argument("--dense-at", default="65536,262144", help="sizes at which dense Adam is measured too")
    p.add_argument("--steps", type=int, default=40, help="steps of the long run (lazy)")
    p.add_argument("--dense-steps", type=int, default=8, help="steps of the long run (dense)")
    p.add_argument("--synthetic-targets", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_text.json")
    try:
        a = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
        dense_at = {int(s) for s in a.dense_at.split(",") if s.strip()}
    except ValueError:
        print("error: --sizes/--dense-at: expected comma-separated integers", file=sys.stderr)
        return 2
    checks = [("--sizes", bool(sizes) and all(1 <= s <= 2 ** 24 for s in sizes), "integers in [1, 2^24]"),
              ("--steps", a.steps >= 8, ">= 8"), ("--dense-steps", a.dense_steps >= 8, ">= 8"),
              ("--dim", 1 <= a.dim <= 1024, "in [1, 1024]"), ("--batch-size", a.batch_size >= 1, ">= 1"),
              ("--k", a.k >= 1, ">= 1"), ("--seed", a.seed >= 0, ">= 0"),
              ("--synthetic-targets", a.synthetic_targets >= 100, ">= 100")]
    for flag, ok, what in checks:
        if not ok:
            print(f"error: {flag}: must be {what}", file=sys.stderr)
            return 2
    if a.data is not None and not all(os.path.isfile(os.path.join(a.data, f)) for f in ("targets.tsv", "queries.tsv")):
        print(f"error: --data: {a.data} does not hold targets.tsv and queries.tsv", file=sys.stderr)
        return 2
    parent = os.path.dirname(os.path.abspath(a.json))
    if not os.path.isdir(parent) or os.path.isdir(a.json):
        print(f"error: --json: cannot write {a.json}", file=sys.stderr)
        return 2
    data = a.data
    if data is None:
        data = tempfile.mkdtemp(prefix="refimpl-bench-text-")
        _synthetic(data, a.synthetic_targets, a.seed)
    rows = []
    for n_features in sizes:
        ds = load_text_pairs(os.path.join(data, "targets.tsv"), os.path.join(data, "queries.tsv"),
                             n_features=n_features)
        ds.test_ids = ds.test_ids[:8]
        row = {"n_features": n_features, "n_targets": ds.n_targets,
               "lazy_ms_per_step": 1e3 * _per_step(ds, a.steps, True, a)}
        if n_features in dense_at:
            row["dense_ms_per_step"] = 1e3 * _per_step(ds, a.dense_steps, False, a)
            row["dense_over_lazy"] = row["dense_ms_per_step"] / row["lazy_ms_per_step"]
        rows.append(row)
        print(f"n_features={n_features}: {row}", flush=True)
    lazy = {r["n_features"]: r["lazy_ms_per_step"] for r in rows}
    out = {"data": a.data or f"synthetic ({a.synthetic_targets} targets)", "dim": a.dim,
           "batch_size": a.batch_size, "k": a.k, "rows": rows,
           "lazy_max_over_min": max(lazy.values()) / min(lazy.values())}
    print("\n| n_features | lazy Adam (ms/step, CPU) | dense Adam (ms/step, CPU) | dense / lazy |\n|---|---|---|---|")
    for r in rows:
        dense = f"{r['dense_ms_per_step']:.0f}" if "dense_ms_per_step" in r else "-"
        ratio = f"{r['dense_over_lazy']:.1f}x" if "dense_over_lazy" in r else "-"
        print(f"| 2^{int(np.log2(r['n_features']))} | {r['lazy_ms_per_step']:.1f} | {dense} | {ratio} |")
    print(f"lazy per-step time, largest / smallest n_features: {out['lazy_max_over_min']:.2f}x")
    with open(a.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {a.json}")
    return 0
