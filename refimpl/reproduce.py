"""Tables 1 and 2 of the paper in miniature, with error bars over seeds (PAPER.md §6-7): ``python -m refimpl reproduce``.

The paper's recipe (App. C, Table 3), scaled down: batches of B queries; per training example ``k`` sampled
negatives shared across the batch (B k per step) plus ``k`` uniform ones; in-batch negatives for every model; a
uniform-only warm-up before mining starts; Adam with learning-rate warm-up and linear decay; beta = 20 and unit-norm
D-dimensional embeddings; DyNNIBAL with the experiments' procedure (``sampler="paper"``) and d' < D landmarks
(D >= 2 d'), one exact refresh half-way through mining (the paper re-encoded everything once on NQ). Rows marked
"(ours)" are not in the paper: DyNNIBAL with ``"mh"`` and ``"rejection"``, SNM keeping the top-scoring pool members
(Reddi et al.'s variant, when the miner offers it), Negative Cache (the authors copied its numbers; we run it) and
the full softmax (Eq. 2).

Negative counts: a miner with shared slots gets ``B k`` of them, dealt ``k`` to each query of the batch (the
paper's "k per example, shared across the batch"); DyNNIBAL its ``per_example`` knob. Knobs used when the code
offers them, otherwise recorded as a deviation in the run's notes and the Markdown: ``train(uniform_per_example=)``,
``BruteForceTopK(refresh_every=)``, ``StochasticNegativeMining(select="top")``.

Two tasks: ``planted`` (:func:`refimpl.data.planted_dataset` at N >= 5e5 targets, fine clusters of ~25
near-duplicates) and ``text`` (any directory in the format of :func:`refimpl.text.load_text_pairs`, e.g. the GCIDE
reverse dictionary of ``python -m refimpl data gcide DIR``). A run of some tasks x rows x seeds is a *part*; every
part is written as JSON (schema :data:`SCHEMA`: commit, configuration, machine, one record per run) and parts are
merged into one set of tables, claims and a figure (:func:`merge_parts`).

Statistics: every cell is the mean over seeds ± its standard error ``sd / sqrt(n)``; a claim is judged on its
per-seed paired difference ``h_s`` (same seed = same planted task and same training stream for every row), by the
two-sided Student-t interval at 95%: "holds" if the interval lies above 0, "does not hold" if below, otherwise
"cannot tell at n seeds" (:func:`verdict`).

Contents: :data:`ROWS`, :class:`Scale` with :data:`FULL` and :data:`QUICK`, :func:`run_part`, :func:`merge_parts`,
:func:`summarize`, :func:`claims`, :func:`verdict`, :func:`mean_se`, :func:`markdown_report`, :func:`figure`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import subprocess
import time

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import stats

from refimpl import mining as M
from refimpl.cliargs import ArgumentParser, choice_list, in_dir, integer, out_dir
from refimpl.data import RetrievalDataset, planted_dataset
from refimpl.index.sgtree import SGTree
from refimpl.text import load_text_pairs
from refimpl.training import lexical_baseline, train

__all__ = ["SCHEMA", "Scale", "FULL", "QUICK", "ROWS", "TASKS", "NC_TABLE2", "run_part", "merge_parts",
           "load_parts", "summarize", "claims", "verdict", "mean_se", "markdown_report", "figure", "write_result",
           "task_key", "parser", "configure", "run_one", "machine", "part_stem", "TABLE1", "TABLE2", "ABLATION", "DEFAULT_ROWS"]

SCHEMA = "refimpl.reproduce/1"
TASKS = ("planted", "text")
NC_TABLE2 = (0.06, 0.24, 0.96, 3.8, 15.15)  # the paper's Table 2 Negative Cache memories (%)
METRICS = ("R@1", "R@5", "R@10", "R@20", "R@100", "MRR@10", "MRR@100")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes and knobs of one reproduction (both tasks). Every field is recorded in each part's JSON.

    planted_*: the planted task (N targets, queries, test queries, feature dimension). text_max_test: test queries
    kept (a seeded subset of the file's test split; 0 keeps all). steps, batch_size, dim (D), lr, lr_warmup: the
    optimiser (per task: ``text_dim``, ``text_lr``, ``text_n_features``, shared tower initialisation for text).
    k: sampled negatives per example (B k shared per step); n_uniform: uniform negatives per example (shared across
    the batch when the training loop cannot draw them per example); warmup_fraction: the uniform-only phase.
    n_landmarks (d'), n_samples (s'), reencode_every (w): DyNNIBAL; the landmark ablation uses d'/2 and 2 d'.
    snm_refresh_every, bf_refresh_every: SNM pool refresh and the brute-force full re-encode period (the latter used
    only when the miner offers the knob; otherwise brute force re-encodes every step). eval_points: evaluations
    during training besides step 0 (the R@1 curves).

    Why :data:`FULL` is what it is (the estimates behind it are in the README, with the command that measured
    them): B = 32 rather than the paper's 128 because the sampled loss gathers a (B, B k, D) array, so its cost
    grows with B^2; D = 256 and d' = 128 keep D = 2 d' (the paper: 768 and 128) and leave room for the 2 d' = 256
    ablation point (d' = D: no reduction); s' = 4 d'; one exact refresh half-way through mining. SNM refreshes its
    pool every 10 steps: the paper's 100-500 steps were a small fraction of a long run, and staleness is set by how
    far the encoder moves between refreshes. Steps and N were chosen so that a part (one task, its default rows,
    one seed) fits in an hour of CPU here and all six parts in about four.
    """

    planted_n_targets: int = 500_000
    planted_n_queries: int = 20_000
    planted_n_test: int = 1_000
    planted_n_features: int = 64
    text_max_test: int = 1_000
    text_n_features: int = 2 ** 18
    steps: int = 200
    batch_size: int = 32
    dim: int = 256
    text_dim: int = 256
    lr: float = 0.01
    text_lr: float = 0.01
    lr_warmup: int = 50
    k: int = 64
    n_uniform: int = 64
    warmup_fraction: float = 0.25
    n_landmarks: int = 128
    n_samples: int = 512
    reencode_every: int = 25
    snm_refresh_every: int = 10
    bf_refresh_every: int = 25
    eval_points: int = 2

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Scale()
QUICK = Scale(planted_n_targets=3000, planted_n_queries=1500, planted_n_test=300, planted_n_features=32,
              text_max_test=300, text_n_features=2 ** 12, steps=40, batch_size=32, dim=32, text_dim=32, lr_warmup=4,
              k=4, n_uniform=4, n_landmarks=8, n_samples=32, reencode_every=5, snm_refresh_every=10,
              bf_refresh_every=5, eval_points=2)


# ------------------------------------------------------------------------------------------------ rows
def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _dynnibal(sampler, landmark_factor=1.0):
    def build(scale, n, B, mining_steps):
        d = max(1, int(round(scale.n_landmarks * landmark_factor)))
        notes = []
        if d > n:
            notes.append(f"d' = {d} clamped to N = {n}")
            d = n
        s = min(scale.n_samples, n)
        if s < scale.n_samples:
            notes.append(f"s' = {scale.n_samples} clamped to N = {n}")
        miner = M.DyNNIBAL(scale.k, per_example=True, sampler=sampler, n_landmarks=d, n_samples=s,
                           reencode_every=scale.reencode_every, refresh_every=max(1, (mining_steps + 1) // 2))
        if sampler == "paper":
            notes.append(f"DyNNIBAL 'paper': temperature {miner.temperature:g} and {miner.n_trees} tree(s), top "
                         f"{miner.n_top_clusters} clusters (the paper: a lower temperature and the top-k, both "
                         "unstated; a forest of 100 trees)")
        return miner, notes
    return build


def _snm(pct, top=False):
    def build(scale, n, B, mining_steps):
        kw = {"mem_percent": pct, "refresh_every": scale.snm_refresh_every}
        if top:
            if not _accepts(M.StochasticNegativeMining.__init__, "select"):
                return None, ["StochasticNegativeMining has no select='top' knob (Reddi et al.'s top-scoring "
                              "variant); row not run"]
            kw["select"] = "top"
        return M.StochasticNegativeMining(B * scale.k, **kw), []
    return build


def _nc(pct):
    return lambda scale, n, B, mining_steps: (M.NegativeCache(B * scale.k, mem_percent=pct), [])


def _brute_force(scale, n, B, mining_steps):
    if _accepts(M.BruteForceTopK.__init__, "refresh_every"):
        return M.BruteForceTopK(B * scale.k, refresh_every=scale.bf_refresh_every), []
    return M.BruteForceTopK(B * scale.k), ["BruteForceTopK has no refresh_every knob: all N re-encoded every step"]


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: ``label``, ``paper`` (a row of the paper's tables, else ours), ``build(scale, N, B,
    mining_steps) -> (miner or None, notes)`` (None: the code lacks what the row needs, said in the notes), ``mined``
    (the recipe's uniform negatives are added on top; False for in-batch and the full softmax)."""

    label: str
    paper: bool
    build: object
    mined: bool = True


ROWS = {
    "in-batch": Row("in-batch", True, lambda s, n, B, m: (M.InBatch(), []), mined=False),
    "uniform": Row("uniform", True, lambda s, n, B, m: (M.Uniform(B * s.k), [])),
    "dynnibal": Row("DyNNIBAL", True, _dynnibal("paper")),
    "snm-1": Row("SNM 1%", True, _snm(1.0)),
    "snm-3": Row("SNM 3%", True, _snm(3.0)),
    "snm-10": Row("SNM 10%", True, _snm(10.0)),
    "brute-force": Row("brute force", True, _brute_force),
    "dynnibal-mh": Row("DyNNIBAL mh (ours)", False, _dynnibal("mh")),
    "dynnibal-rejection": Row("DyNNIBAL rejection (ours)", False, _dynnibal("rejection")),
    "snm-top-3": Row("SNM top 3% (ours)", False, _snm(3.0, top=True)),
    "nc-6.3": Row("Negative Cache 6.3% (ours)", False, _nc(6.3)),
    **{f"nc-{p:g}": Row(f"Negative Cache {p:g}% (ours)", False, _nc(p)) for p in NC_TABLE2},
    "full-softmax": Row("full softmax (ours)", False, lambda s, n, B, m: (M.FullSoftmax(), []), mined=False),
    "dynnibal-half-landmarks": Row("DyNNIBAL d'/2", True, _dynnibal("paper", 0.5)),
    "dynnibal-double-landmarks": Row("DyNNIBAL 2d'", True, _dynnibal("paper", 2.0)),
}
TABLE1 = ("in-batch", "uniform", "dynnibal", "snm-1", "snm-3", "nc-6.3", "snm-10", "brute-force", "dynnibal-mh",
          "dynnibal-rejection", "snm-top-3", "full-softmax")
TABLE2 = ("in-batch", "uniform", "dynnibal", "snm-1", "snm-3") + tuple(f"nc-{p:g}" for p in NC_TABLE2) + (
    "brute-force",)
ABLATION = ("dynnibal-half-landmarks", "dynnibal", "dynnibal-double-landmarks")
# Rows run by default on each task: the planted task carries Table 1 (the paper's NQ table); the text task every row
# but one, so also Table 2 (the paper's MSMARCO table: Negative Cache at five memories) and the landmark ablation, where
# the 2^18-dimensional features make d' matter (the planted task's 64 features bound the embeddings' rank by 64).
# Negative Cache (its draws score every cached embedding for every one of the B k slots) costs work linear in N per
# step: text only (N ~ 1e5). The full softmax (all N targets encoded and scored every step) is run on request only
# (--rows full-softmax), on the text task.
DEFAULT_ROWS = {"planted": tuple(r for r in TABLE1 if r not in ("full-softmax", "nc-6.3")),
                "text": tuple(r for r in ROWS if r != "full-softmax")}


# ------------------------------------------------------------------------------------------------ tasks
def task_key(task: str, data_dir: str | None = None) -> str:
    """``"planted"`` or ``"text:<directory name>"`` (each text dataset is its own task in the tables)."""
    return "planted" if task == "planted" else "text:" + os.path.basename(os.path.normpath(data_dir))


def _planted(scale: Scale, seed: int) -> RetrievalDataset:
    n = scale.planted_n_targets
    n_fine = max(1, n // 25)  # fine clusters of ~25 near-duplicates, as the demo's task
    coarse = min(50, n_fine)
    return planted_dataset(n, scale.planted_n_queries, n_features=scale.planted_n_features,
                           branching=(coarse, max(1, n_fine // coarse)),
                           test_fraction=scale.planted_n_test / scale.planted_n_queries, rng=seed)


def _text(scale: Scale, data_dir: str) -> RetrievalDataset:
    ds = load_text_pairs(os.path.join(data_dir, "targets.tsv"), os.path.join(data_dir, "queries.tsv"),
                         n_features=scale.text_n_features)
    if scale.text_max_test and ds.test_ids.size > scale.text_max_test:
        keep = np.random.default_rng(0).choice(ds.test_ids, size=scale.text_max_test, replace=False)
        ds = dataclasses.replace(ds, test_ids=np.sort(keep).astype(np.int64))
    return ds


def _task_info(kind, ds, scale, data_dir):
    info = {"kind": kind, "n_targets": ds.n_targets, "n_queries": ds.n_queries, "n_train": int(ds.train_ids.size),
            "n_test": int(ds.test_ids.size), "n_features": int(ds.target_features.shape[1])}
    if kind == "planted":
        info["seeds_are_datasets"] = True
    else:
        info.update(data_dir=os.path.abspath(data_dir), tfidf=lexical_baseline(ds))
    return info


# ------------------------------------------------------------------------------------------------ running
def _recipe(scale: Scale, kind: str, B: int) -> tuple[dict, list]:
    """Training arguments of the recipe (uniform negatives per example when the loop offers it) and deviations."""
    kw = {"steps": scale.steps, "batch_size": B, "dim": scale.text_dim if kind == "text" else scale.dim,
          "lr": scale.text_lr if kind == "text" else scale.lr, "lr_warmup": min(scale.lr_warmup, scale.steps - 1),
          "uniform_warmup": int(round(scale.warmup_fraction * scale.steps)), "in_batch": True,
          "eval_every": max(1, scale.steps // scale.eval_points), "beta": 20.0}
    notes = []
    if kind == "text":
        kw["init"] = "shared"
    if _accepts(train, "uniform_per_example"):
        kw.update(n_uniform=scale.n_uniform, uniform_per_example=True)
    else:
        kw["n_uniform"] = scale.n_uniform
        notes.append(f"train has no uniform_per_example: {scale.n_uniform} uniform negatives shared by the batch "
                     "(the paper: per example)")
    return kw, notes


def _dynnibal_timings(miner, encoder, ds) -> dict:
    """CPU seconds of the work the paper's speed-up claims compare (measured after training, not in wall time):
    an Alg. 5 re-encode vs encoding every target; an Alg. 3 tree update vs building the tree again."""
    ups = miner.tree_updates
    c0 = time.process_time()
    encoder.encode_targets(ds.target_features)
    c1 = time.process_time()
    SGTree.build(miner.reencoder.representations, rng=0)
    c2 = time.process_time()
    mean = lambda key: float(np.mean([u[key] for u in ups])) if ups else None
    return {"reencode_seconds": mean("reencode_seconds"), "tree_update_seconds": mean("tree_seconds"),
            "full_encode_seconds": c1 - c0, "tree_build_seconds": c2 - c1, "n_reencodes": len(miner.reencoded_at),
            "n_refreshes": len(miner.refreshed_at), "n_landmarks": miner.n_landmarks, "n_samples": miner.n_samples}


def run_one(ds, kind: str, row: str, seed: int, scale: Scale, *, progress: bool = False) -> dict | None:
    """Train one row on one dataset with one seed; the run's record (None if the row cannot run here)."""
    spec = ROWS[row]
    B = min(scale.batch_size, int(ds.train_ids.size))
    kw, notes = _recipe(scale, kind, B)
    miner, more = spec.build(scale, ds.n_targets, B, scale.steps - kw["uniform_warmup"])
    if miner is None:
        return {"row": row, "seed": seed, "unavailable": True, "notes": more}
    notes += more
    if not spec.mined:
        kw["n_uniform"] = 0
        kw.pop("uniform_per_example", None)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(ds, miner, seed=seed, progress=progress, desc=f"{spec.label} seed {seed}", **kw)
    rec = {"row": row, "seed": seed, "final": res.final, "evals": res.evals, "config": res.config, "notes": notes,
           "teacher_test_r1": ds.metadata.get("teacher_test_r1"), "run_seconds": time.perf_counter() - t0,
           "run_cpu_seconds": time.process_time() - c0}
    if isinstance(miner, M.DyNNIBAL):
        rec["dynnibal"] = _dynnibal_timings(miner, res.encoder, ds)
    return rec


def _git_commit() -> dict | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine() -> dict:
    """Platform, Python / NumPy versions, CPU count and physical memory of this machine."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "memory_bytes": mem}


def run_part(tasks, rows, seeds, scale: Scale = FULL, *, data_dir: str | None = None, progress: bool = False,
             log=None, command: str = "") -> dict:
    """Run ``rows`` x ``seeds`` on every task of ``tasks`` and return the part (a :data:`SCHEMA` dict).

    Parameters
    ----------
    tasks : subset of :data:`TASKS`; ``"text"`` needs ``data_dir`` (targets.tsv, queries.tsv).
    rows : names in :data:`ROWS` (None: :data:`DEFAULT_ROWS` of each task). seeds : distinct non-negative ints (planted: the seed also draws the task).
    scale : a :class:`Scale`. log : ``print``-like callable for one line per run (None: silent).
    """
    tasks, seeds = list(tasks), [int(s) for s in seeds]
    rows = None if rows is None else list(rows)
    bad = [t for t in tasks if t not in TASKS] or [r for r in rows or () if r not in ROWS]
    if bad:
        raise ValueError(f"tasks/rows: unknown {bad[0]!r}")
    if not tasks or rows == [] or not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError("tasks, rows, seeds: need at least one of each; seeds distinct and >= 0")
    if "text" in tasks and data_dir is None:
        raise ValueError("data_dir: the text task needs a directory with targets.tsv and queries.tsv")
    log = log or (lambda *a, **k: None)
    t_start = time.perf_counter()
    part = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "commit": _git_commit(), "machine": machine(), "scale": scale.as_dict(),
            "tasks": {}, "runs": [], "unavailable": []}
    for task in tasks:
        key = task_key(task, data_dir)
        datasets = ({s: None for s in seeds} if task == "planted" else {None: _text(scale, data_dir)})
        for dseed in datasets:
            ds = datasets[dseed] if task == "text" else _planted(scale, dseed)
            if key not in part["tasks"]:
                part["tasks"][key] = _task_info(task, ds, scale, data_dir)
            for row in (DEFAULT_ROWS[task] if rows is None else rows):
                for seed in (seeds if task == "text" else [dseed]):
                    rec = run_one(ds, task, row, seed, scale, progress=progress)
                    if rec.get("unavailable"):
                        if not any(u["row"] == row and u["task"] == key for u in part["unavailable"]):
                            part["unavailable"].append({"task": key, "row": row, "notes": rec["notes"]})
                        continue
                    rec["task"] = key
                    part["runs"].append(rec)
                    f = rec["final"]
                    log(f"{key} | {ROWS[row].label} | seed {seed}: R@1 {f['R@1']:.3f} R@100 {f['R@100']:.3f} "
                        f"Mem {f['mem_percent']:.3g}% train {f['wall_time']:.1f} s; run {rec['run_seconds']:.1f} s wall, "
                        f"{rec['run_cpu_seconds']:.1f} s CPU")
    part["wall_seconds"] = time.perf_counter() - t_start
    return part


# ------------------------------------------------------------------------------------------------ statistics
def mean_se(values) -> tuple[float, float]:
    """``(mean, sd / sqrt(n))`` of the finite values (sd with n - 1 degrees of freedom); se NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def verdict(diffs, *, level: float = 0.95) -> dict:
    """Judge "E[h] > 0" from per-seed paired values ``h_s`` by the two-sided Student-t interval at ``level``.

    ``mean ± t_{n-1, (1+level)/2} se``: entirely above 0 -> "holds", entirely below -> "does not hold", else (or
    n < 2) -> "cannot tell at n seeds". Returns verdict, mean, se, n, lo, hi.
    """
    mean, se = mean_se(diffs)
    n = sum(1 for x in diffs if x is not None and np.isfinite(x))
    if n < 2 or not np.isfinite(se):
        lo = hi = float("nan")
        word = f"cannot tell at {n} seed{'s' if n != 1 else ''}"
    else:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
        lo, hi = mean - half, mean + half
        word = "holds" if lo > 0 else "does not hold" if hi < 0 else f"cannot tell at {n} seeds"
    return {"verdict": word, "mean": mean, "se": se, "n": n, "lo": lo, "hi": hi}


def _finals(runs, task):
    """``{row: {seed: final (+ dynnibal timings)}}`` of one task."""
    out: dict = {}
    for r in runs:
        if r["task"] == task:
            out.setdefault(r["row"], {})[r["seed"]] = {**r["final"], **{f"dyn_{k}": v for k, v in
                                                                       r.get("dynnibal", {}).items()}}
    return out


def summarize(runs, task) -> dict:
    """Per row of ``task``: the seeds, and (mean, se) of every metric, Mem %, encoder calls, times, and
    ``gap_to_bf`` = 100 (R@1 of brute force - R@1 of the row), paired by seed (seeds without brute force skipped);
    MRR@1 = R@1 (the first positive at rank 1)."""
    fin = _finals(runs, task)
    bf = fin.get("brute-force", {})
    out = {}
    for row in [r for r in ROWS if r in fin]:
        by_seed = fin[row]
        s = {"seeds": sorted(by_seed), "label": ROWS[row].label}
        for key in METRICS + ("mem_percent", "encoder_calls", "wall_time", "time_per_step"):
            vals = [f.get(key) for f in by_seed.values()]
            if any(v is not None for v in vals):
                s[key] = mean_se(vals)
        s["MRR@1"] = s["R@1"]
        if bf:
            s["gap_to_bf"] = mean_se([100 * (bf[k]["R@1"] - f["R@1"]) for k, f in by_seed.items() if k in bf])
        out[row] = s
    return out


def _paired(fin, rows, fn):
    seeds = sorted(set.intersection(*[set(fin.get(r, {})) for r in rows])) if rows else []
    return [fn(*[fin[r][s] for r in rows]) for s in seeds]


def claims(runs, task) -> list[dict]:
    """The paper's claims (PAPER.md §7) on ``task``, each with its per-seed paired values and :func:`verdict`.

    - "R@1 gap to brute force halved vs X" (X = in-batch, uniform, SNM 1/3/10%): ``h = gap_X / 2 - gap_DyNNIBAL``
      (points), gap = R@1(brute force) - R@1(row).
    - memory vs Negative Cache: ``h = MRR@10(DyNNIBAL) - MRR@10(Negative Cache 15.15%)`` (the paper: DyNNIBAL at
      0.76% memory matches it at ~20x less memory); the memory ratio is reported beside it.
    - steps at most 4x slower than SNM 3%: ``h = 4 t(SNM 3%) - t(DyNNIBAL)``, t = training seconds per step.
    - re-encoding >= 8x faster than the encoder: ``h = t(encode all N) / t(Alg. 5) - 8``.
    - tree update >= 4x faster than a rebuild: ``h = t(build) / t(Alg. 3 update) - 4``.
    Claims whose rows are missing are left out.
    """
    fin = _finals(runs, task)
    gap = lambda b, x: 100 * (b["R@1"] - x["R@1"])
    out = []

    def add(cid, text, rows, fn, **extra):
        if all(r in fin for r in rows):
            h = _paired(fin, rows, fn)
            if h:
                out.append({"id": cid, "claim": text, "rows": list(rows), "values": h, **verdict(h), **extra})

    for x in ("in-batch", "uniform", "snm-1", "snm-3", "snm-10"):
        add(f"gap-halved-vs-{x}", f"DyNNIBAL's R@1 gap to brute force is at most half of {ROWS[x].label}'s",
            ("brute-force", "dynnibal", x), lambda b, d, o: gap(b, o) / 2 - gap(b, d))
    if "dynnibal" in fin and "nc-15.15" in fin:
        ratio = mean_se([fin["nc-15.15"][s]["mem_percent"] / fin["dynnibal"][s]["mem_percent"]
                         for s in fin["dynnibal"] if s in fin["nc-15.15"]])[0]
        add("memory-vs-nc", "DyNNIBAL's MRR@10 is at least Negative Cache 15.15%'s", ("dynnibal", "nc-15.15"),
            lambda d, c: d["MRR@10"] - c["MRR@10"], memory_ratio=ratio)
    add("steps-4x-snm", "a DyNNIBAL training step costs at most 4x an SNM 3% step", ("dynnibal", "snm-3"),
        lambda d, s: 4 * s["time_per_step"] - d["time_per_step"])
    if "dynnibal" in fin and all(f.get("dyn_reencode_seconds") for f in fin["dynnibal"].values()):
        add("reencode-8x", "an Alg. 5 re-encode is at least 8x faster than encoding every target", ("dynnibal",),
            lambda d: d["dyn_full_encode_seconds"] / d["dyn_reencode_seconds"] - 8)
    if "dynnibal" in fin and all(f.get("dyn_tree_update_seconds") for f in fin["dynnibal"].values()):
        add("tree-update-4x", "an Alg. 3 tree update is at least 4x faster than rebuilding the tree", ("dynnibal",),
            lambda d: d["dyn_tree_build_seconds"] / d["dyn_tree_update_seconds"] - 4)
    return out


# ------------------------------------------------------------------------------------------------ parts I/O
def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def load_parts(paths) -> list[dict]:
    """Read part files (or every ``*.json`` of a directory); ValueError naming a file that is not a part."""
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    parts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f}: not readable as JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            continue  # merged results and other JSON files beside the parts
        if "parts" in d:
            continue
        d["_file"] = f
        parts.append(d)
    if not parts:
        raise ValueError(f"merge: no part file (schema {SCHEMA}) in {', '.join(map(str, paths))}")
    return parts


def merge_parts(parts) -> dict:
    """One result from several parts: runs concatenated; the same (task, row, seed) twice, or one task under two
    different configurations (scale or task description), is a ValueError naming both files."""
    merged = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "parts": [], "tasks": {}, "runs": [], "unavailable": [], "scales": {}}
    seen: dict = {}
    for p in parts:
        name = p.get("_file", "<part>")
        merged["parts"].append({k: p.get(k) for k in ("_file", "created", "command", "commit", "machine",
                                                      "wall_seconds")})
        for key, info in p["tasks"].items():
            cfg = _jsonable((info, p["scale"]))
            if key in merged["tasks"] and _jsonable(merged["scales"][key][:2]) != cfg:
                raise ValueError(f"merge: task {key!r} has a different configuration in {name} than in "
                                 f"{merged['scales'][key][2]}")
            merged["tasks"].setdefault(key, info)
            merged["scales"].setdefault(key, (info, p["scale"], name))
        for r in p["runs"]:
            k = (r["task"], r["row"], r["seed"])
            if k in seen:
                raise ValueError(f"merge: {k[0]} / {k[1]} / seed {k[2]} is in both {seen[k]} and {name}")
            seen[k] = name
            merged["runs"].append(r)
        merged["unavailable"] += [u for u in p.get("unavailable", []) if u not in merged["unavailable"]]
    merged["scales"] = {k: v[1] for k, v in merged["scales"].items()}
    return merged


# ------------------------------------------------------------------------------------------------ reports
def _cells(summary, rows):
    return [(summary[r]["label"] + (f" (d' {int(summary[r]['dyn'])})" if "dyn" in summary[r] else ""),
             summary[r]) for r in rows if r in summary]


def markdown_report(result: dict, table) -> str:
    """Tables 1 and 2, the landmark ablation, the timing columns and the claims' verdicts of every task of
    ``result`` (a part or a merge), formatted with ``table`` (the project's table formatter,
    :func:`refimpl.experiments.table_markdown`, which renders (mean, se) cells as "mean ± se")."""
    out = []
    parts = result.get("parts") or [result]
    commits = sorted({(p.get("commit") or {}).get("sha", "unknown") + ("+dirty" if (p.get("commit") or {}).get(
        "dirty") else "") for p in parts})
    out.append(f"Commits: {', '.join(commits)}. Machines: " + "; ".join(sorted({
        f"{p['machine']['platform']}, {p['machine']['cpu_count']} CPUs, "
        f"{(p['machine']['memory_bytes'] or 0) / 2 ** 30:.0f} GiB" for p in parts})) + ".")
    out.append("Cells: mean ± standard error over seeds. R@1 gap to BF: brute force's R@1 minus the row's, in "
               "points, paired by seed. Rows marked (ours) are not the paper's runs. Verdicts: 95% Student-t "
               "interval of the per-seed paired difference.")
    for key, info in result["tasks"].items():
        summ = summarize(result["runs"], key)
        for r, s in summ.items():
            d = [x["dynnibal"]["n_landmarks"] for x in result["runs"] if x["task"] == key and x["row"] == r
                 and "dynnibal" in x]
            if d:
                s["dyn"] = d[0]
        seeds = sorted({x["seed"] for x in result["runs"] if x["task"] == key})
        out.append(f"\n## {key}: N = {info['n_targets']:,} targets, {info['n_train']:,} train / {info['n_test']:,} "
                   f"test queries; seeds {', '.join(map(str, seeds))}")
        out.append("\n### Table 1 (R@k)\n")
        out.append(table(_cells(summ, TABLE1), probes=False))
        if info.get("tfidf"):
            tf = info["tfidf"]
            out.append("\nTF-IDF cosine, no training: " + ", ".join(f"{k} {tf[k]:.3f}" for k in ("R@1", "R@10",
                                                                                                  "R@100")))
        out.append("\n### Table 2 (MRR@k; Negative Cache at the paper's memories)\n")
        out.append(table(_cells(summ, TABLE2), ks=(), gap=False, probes=False, mrr=(1, 10, 100)))
        out.append("\n### Landmark ablation (DyNNIBAL, sampler 'paper')\n")
        out.append(table(_cells(summ, ABLATION), ks=(1, 100), gap=True, probes=False))
        cl = claims(result["runs"], key)
        if cl:
            out.append("\n### The paper's claims on this task\n")
            for c in cl:
                extra = f"; memory ratio {c['memory_ratio']:.1f}x" if "memory_ratio" in c else ""
                out.append(f"- {c['claim']}: **{c['verdict']}** (h = {c['mean']:+.3g} ± {c['se']:.2g}, 95% "
                           f"interval [{c['lo']:+.3g}, {c['hi']:+.3g}], n = {c['n']}{extra})")
        notes = sorted({n for x in result["runs"] if x["task"] == key for n in x.get("notes", [])})
        notes += [f"{u['row']}: " + "; ".join(u["notes"]) for u in result.get("unavailable", []) if u["task"] == key]
        if notes:
            out.append("\nDeviations from the recipe / rows not run:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(out) + "\n"


def figure(result: dict, path: str) -> str:
    """Test R@1 over training per row (mean over seeds, band ± one standard error): per task, one panel with the
    Table 1 rows and one with the Negative Cache memories and the landmark ablation (PNG)."""
    keys = list(result["tasks"])
    groups = [("Table 1 rows", TABLE1), ("Negative Cache memories, landmark ablation",
                                         tuple(r for r in ROWS if r.startswith("nc-")) + ABLATION)]
    fig = Figure(figsize=(13, 4.5 * len(keys)))
    axes = fig.subplots(len(keys), 2, squeeze=False)
    colours = colormaps["tab20"].colors
    for (a1, a2), key in zip(axes, keys):
        for ax, (title, rows) in zip((a1, a2), groups):
            for i, row in enumerate(rows):
                runs = [r for r in result["runs"] if r["task"] == key and r["row"] == row]
                if not runs:
                    continue
                steps = sorted(set.intersection(*[{e["step"] for e in r["evals"]} for r in runs]))
                ms = np.array([mean_se([next(e["R@1"] for e in r["evals"] if e["step"] == s) for r in runs])
                               for s in steps])
                c = colours[i % len(colours)]
                ax.plot(steps, ms[:, 0], marker="o", ms=3, color=c, label=ROWS[row].label,
                        ls="-" if ROWS[row].paper else "--")
                se = np.nan_to_num(ms[:, 1])
                ax.fill_between(steps, ms[:, 0] - se, ms[:, 0] + se, color=c, alpha=0.18, lw=0)
            ax.set_xlabel("training step")
            ax.set_ylabel("test R@1 (exact re-encoding)")
            ax.set_title(f"{key}: {title} (band: ± 1 s.e. over seeds)", fontsize=9)
            if ax.lines:
                ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_result(result: dict, out_dir: str, stem: str, table, *, with_figure: bool = True) -> list[str]:
    """Write ``stem.json``, ``stem.md`` (and ``stem.png``) in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ext) for ext in (".json", ".md")]
    body = {k: v for k, v in result.items() if k != "_file"}
    if "parts" in result:
        body["summary"] = {k: summarize(result["runs"], k) for k in result["tasks"]}
        body["claims"] = {k: claims(result["runs"], k) for k in result["tasks"]}
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(_jsonable(body), fh, indent=1)
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(f"# Tables 1-2 in miniature ({stem})\n\n" + markdown_report(result, table))
    if with_figure and result["runs"]:
        paths.append(figure(result, os.path.join(out_dir, stem + ".png")))
    return paths


def part_stem(tasks, rows, seeds) -> str:
    """File stem of a part, from what it ran (``part-planted-dynnibal+snm-3-s0-1-2``; rows None: ``default``)."""
    r = "default" if rows is None else "all" if set(rows) == set(ROWS) else "+".join(rows)
    if len(r) > 80:
        r = f"{len(rows)}rows-{hashlib.sha1(r.encode()).hexdigest()[:8]}"
    return f"part-{'+'.join(tasks)}-{r}-s{'-'.join(map(str, seeds))}"


# ------------------------------------------------------------------------------------------------ command line
def _seed_list(text) -> list[int]:
    """Comma-separated distinct seeds in [0, 2^32)."""
    one = integer(0, 2 ** 32 - 1)
    items = str(text).split(",")
    if any(not x.strip() for x in items):
        raise argparse.ArgumentTypeError(f"must be comma-separated seeds, got {text!r}")
    seeds = [one(x) for x in items]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct seeds, got {text!r}")
    return seeds


def parser() -> ArgumentParser:
    """The arguments of ``python -m refimpl reproduce``, each checked by its type before any work."""
    p = ArgumentParser(prog="python -m refimpl reproduce",
                       description="Tables 1-2 of the paper in miniature with error bars over seeds: run a part "
                                   "(--tasks/--rows/--seeds) or merge parts (--merge DIR...).")
    p.add_argument("--tasks", type=choice_list(TASKS), default=None,
                   help="planted and/or text (default: both, or planted only with --quick and no --data)")
    p.add_argument("--rows", type=choice_list(list(ROWS)), default=None,
                   help="comma-separated row names (default: each task's rows, refimpl.reproduce.DEFAULT_ROWS): "
                        + ", ".join(ROWS))
    p.add_argument("--seeds", type=_seed_list, default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--data", type=in_dir, default=None, help="text task: a directory with targets.tsv and queries.tsv "
                   "(e.g. from python -m refimpl data gcide DIR)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke run)")
    p.add_argument("--n-targets", type=integer(100), default=None, help="planted task size (default: the scale's)")
    p.add_argument("--steps", type=integer(10), default=None, help="training steps (default: the scale's)")
    p.add_argument("--out-dir", type=out_dir, default="reproduce_out", help="where parts and merges are written")
    p.add_argument("--merge", nargs="+", type=str, default=None, metavar="PATH",
                   help="merge the part files (or directories of them) into one table, JSON and figure")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def configure(a) -> tuple[list, Scale]:
    """Tasks and scale from parsed arguments (rows and seeds filled in); ValueError naming the flag when they
    cannot work together. With ``--merge`` only ``--out-dir`` and ``--no-figure`` apply: returns (None, None)."""
    if a.merge is not None:
        mixed = [f for f, v in (("--tasks", a.tasks), ("--rows", a.rows), ("--seeds", a.seeds), ("--data", a.data),
                                ("--n-targets", a.n_targets), ("--steps", a.steps)) if v is not None]
        if a.quick or mixed:
            raise ValueError(f"--merge: merges finished parts; it takes no {(mixed or ['--quick'])[0]}")
        for m in a.merge:
            if not os.path.exists(m):
                raise ValueError(f"--merge: {m}: no such file or directory")
        return None, None
    a.seeds = [0, 1, 2] if a.seeds is None else a.seeds
    tasks = a.tasks or (["planted", "text"] if (a.data or not a.quick) else ["planted"])
    if "text" in tasks:
        if a.data is None:
            raise ValueError("--data: the text task needs a directory with targets.tsv and queries.tsv (build "
                             "GCIDE with: python -m refimpl data gcide DIR)")
        for f in ("targets.tsv", "queries.tsv"):
            if not os.path.isfile(os.path.join(a.data, f)):
                raise ValueError(f"--data: {os.path.join(a.data, f)}: no such file")
    scale = QUICK if a.quick else FULL
    if a.n_targets is not None:
        scale = dataclasses.replace(scale, planted_n_targets=a.n_targets,
                                    planted_n_queries=max(scale.planted_n_queries, 2 * scale.planted_n_test))
    if a.steps is not None:
        scale = dataclasses.replace(scale, steps=a.steps, lr_warmup=min(scale.lr_warmup, a.steps // 4))
    return tasks, scale
