"""``python -m refimpl bench text``: per-step time of the text training path against the number of hashed features.

For each ``n_features`` in ``--sizes`` (default 2^16, 2^18, 2^20) the text task (``--data DIR``, e.g. the GCIDE
task of ``python -m refimpl data gcide DIR``; without it a seeded synthetic Zipf-vocabulary task) is featurised
and :func:`refimpl.training.train` runs with uniform negatives and the ``train`` command's text model
(:data:`refimpl.training.TEXT_DEFAULTS`: towers, input weights, in-batch negatives, log-Q correction, learning
rate) at ``--dim`` 64 and ``--batch-size`` 128 (the configuration of the dense reference; at the ``train``
default dimension, 2^20 columns would not fit in memory: 6 matrices of dim x 2^20 float64), once with the lazy
(sparse) Adam of
:mod:`refimpl.optim` and, at the sizes in ``--dense-at``, with dense Adam as the reference. The per-step time is
CPU time (``time.process_time``) of the difference between a run of ``--steps`` steps and a run of
``--steps // 4`` steps with the same arguments, so that the set-up and the final evaluation (8 test queries) cancel
(median of ``--repeats`` such pairs).
Reported: ms per step, the dense/lazy ratio at each size, and the lazy 2^20 / 2^16 ratio (independence of
``n_features``). Numbers come from one run on a shared machine: compare the ratios.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from refimpl.benchmarks import write_json
from refimpl.cliargs import ArgumentParser, in_dir, integer, out_file, size_list
from refimpl.mining import Uniform
from refimpl.text import load_text_pairs
from refimpl.training import TEXT_DEFAULTS, train


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


_MODEL = {k: TEXT_DEFAULTS[k] for k in ("lr", "init", "tied", "init_scale", "in_batch", "input_weights",
                                        "log_q_correction")}


def _per_step(ds, steps: int, sparse: bool, a) -> float:
    """CPU seconds per step: the median over ``a.repeats`` pairs of (run of ``steps`` - run of ``steps // 4``) /
    (difference in steps), after one unmeasured run that compiles and warms the caches."""
    short = max(2, steps // 4)

    def cpu(s):
        t = time.process_time()
        train(ds, Uniform(a.k), steps=s, batch_size=a.batch_size, dim=a.dim, lr_warmup=1, seed=a.seed,
              sparse_updates=sparse, **_MODEL)
        return time.process_time() - t

    cpu(2)
    return float(np.median([(cpu(steps) - cpu(short)) / (steps - short) for _ in range(a.repeats)]))


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m refimpl bench text", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=in_dir, default=None,
                   help="directory with targets.tsv and queries.tsv (default: a synthetic task)")
    p.add_argument("--sizes", type=size_list, default=[2 ** 16, 2 ** 18, 2 ** 20], help="comma-separated n_features")
    p.add_argument("--dense-at", type=size_list, default=[2 ** 16, 2 ** 18],
                   help="sizes at which dense Adam is measured too")
    p.add_argument("--steps", type=integer(8), default=40, help="steps of the long run (lazy)")
    p.add_argument("--dense-steps", type=integer(8), default=8, help="steps of the long run (dense)")
    p.add_argument("--repeats", type=integer(1), default=3, help="pairs of runs per estimate (median)")
    p.add_argument("--synthetic-targets", type=integer(100), default=50_000)
    p.add_argument("--dim", type=integer(1, 1024), default=64)
    p.add_argument("--batch-size", type=integer(1), default=128)
    p.add_argument("--k", type=integer(1), default=TEXT_DEFAULTS["k"])
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=0)
    p.add_argument("--json", type=out_file, default="bench_text.json")
    a = p.parse_args(argv)
    if max(a.sizes) > 2 ** 24:
        p.error(f"argument --sizes: at most 2^24 columns, got {max(a.sizes)}")
    if a.data is not None and not all(os.path.isfile(os.path.join(a.data, f)) for f in ("targets.tsv", "queries.tsv")):
        p.error(f"argument --data: {a.data} does not hold targets.tsv and queries.tsv")
    sizes, dense_at = a.sizes, set(a.dense_at)
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
           "batch_size": a.batch_size, "k": a.k, "model": _MODEL, "rows": rows,
           "lazy_max_over_min": max(lazy.values()) / min(lazy.values())}
    print("\n| n_features | lazy Adam (ms/step, CPU) | dense Adam (ms/step, CPU) | dense / lazy |\n|---|---|---|---|")
    for r in rows:
        dense = f"{r['dense_ms_per_step']:.0f}" if "dense_ms_per_step" in r else "-"
        ratio = f"{r['dense_over_lazy']:.1f}x" if "dense_over_lazy" in r else "-"
        print(f"| 2^{int(np.log2(r['n_features']))} | {r['lazy_ms_per_step']:.1f} | {dense} | {ratio} |")
    print(f"lazy per-step time, largest / smallest n_features: {out['lazy_max_over_min']:.2f}x")
    write_json(a.json, out)
    print(f"wrote {a.json}")
    return 0
