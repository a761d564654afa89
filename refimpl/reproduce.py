"""Tables 1 and 2 of the paper in miniature, with error bars over seeds (paper §5, App. C): ``python -m refimpl
reproduce``.

The paper's recipe (App. C, Table 3), scaled down: batches of B queries; per training example ``k`` sampled
negatives shared across the batch (B k per step) plus ``k`` uniform ones; in-batch negatives for every model; a
uniform-only warm-up before mining starts; Adam with learning-rate warm-up and linear decay; beta = 20 and unit-norm
D-dimensional embeddings; DyNNIBAL with the experiments' procedure (``sampler="paper"``) and d' < D landmarks
(D >= 2 d'), one exact refresh half-way through mining (the paper re-encoded everything once on NQ). Rows marked
"(ours)" are not in the paper: DyNNIBAL with ``"mh"`` and ``"rejection"``, SNM keeping the top-scoring pool members
(Reddi et al.'s variant), Negative Cache (the authors copied its numbers; we run it) and the full softmax (Eq. 2).

Negative counts: a miner with shared slots gets ``B k`` of them, dealt ``k`` to each query of the batch (the
paper's "k per example, shared across the batch"); DyNNIBAL its ``per_example`` knob. The ``n_uniform`` uniform
negatives are dealt per example as well (``train(uniform_per_example=True)``); brute force re-encodes its table of
all N targets every ``bf_refresh_every`` steps (``BruteForceTopK(refresh_every=)``; the paper does not say how often).

Two tasks: ``planted`` (:func:`refimpl.data.planted_dataset` at N >= 5e5 targets, fine clusters of ~25
near-duplicates) and ``text`` (any directory in the format of :func:`refimpl.text.load_text_pairs`, e.g. the GCIDE
reverse dictionary of ``python -m refimpl data gcide DIR``). A run of some tasks x rows x seeds is a *part*; every
part is written as JSON (schema :data:`SCHEMA`: commit, configuration, machine, one record per run with its CPU
profile) and parts are merged into one set of tables, claims and a figure. ``--plan`` turns calibration parts (every
row once at reduced steps) into the list of part commands of the whole table with their estimated CPU minutes.

Statistics, merging and the reports (tables, verdicts, figure) are in :mod:`refimpl.reproduce_report`.

Contents: :data:`ROWS` (and the row groups of each table), :class:`Scale` with :data:`FULL` and :data:`QUICK`,
:func:`run_part`, :func:`run_one`, :func:`estimate_run`, :func:`plan`, :func:`largest_steps`, :func:`parser` and
:func:`configure` (the command line).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import os
import platform
import subprocess
import time

import numpy as np

from refimpl import mining as M
from refimpl.cliargs import ArgumentParser, choice_list, in_dir, integer, out_dir
from refimpl.data import RetrievalDataset, planted_dataset
from refimpl.index.sgtree import SGTree
from refimpl.text import load_text_pairs
from refimpl.training import TEXT_DEFAULTS, lexical_baseline, train

__all__ = ["SCHEMA", "Scale", "FULL", "QUICK", "ROWS", "TASKS", "NC_TABLE2", "METRICS", "TABLE1", "TABLE2",
           "ABLATION", "DEFAULT_ROWS", "run_part", "run_one", "task_scale", "estimate_run", "plan", "largest_steps",
           "with_steps", "task_key", "machine", "part_stem", "parser", "configure"]

SCHEMA = "refimpl.reproduce/1"
TASKS = ("planted", "text")
NC_TABLE2 = (0.06, 0.24, 0.96, 3.8, 15.15)  # the paper's Table 2 Negative Cache memories (%)
METRICS = ("R@1", "R@5", "R@10", "R@20", "R@100", "MRR@1", "MRR@10", "MRR@100")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes and knobs of one reproduction (both tasks). Every field is recorded in each part's JSON.

    planted_*: the planted task (N targets, queries, test queries, feature dimension, the planted teacher's
    embedding dimension). text_max_test: test queries kept (a seeded subset of the file's test split; 0 keeps all);
    the other ``text_*`` fields: the text model and its optimiser, by default the train CLI's
    (:data:`refimpl.training.TEXT_DEFAULTS`: hashed features, batch, dimension, learning rate, tower start and
    tying, fixed input weights), and the text task's ``k``, ``n_uniform`` and ``steps`` (:func:`task_scale`).
    steps, batch_size, dim (D), lr, lr_warmup: the planted task's optimiser (lr_warmup shared by both tasks;
    ``--steps`` sets both tasks' steps).
    k: sampled negatives per example (B k shared per step); n_uniform: uniform negatives per example;
    warmup_fraction: the uniform-only phase. n_landmarks (d'), n_samples (s'), reencode_every (w): DyNNIBAL; the
    landmark ablation uses d'/2 and 2 d'. snm_refresh_every, bf_refresh_every: SNM's pool refresh and brute force's
    full re-encode periods. eval_points: evaluations during training besides step 0 (the R@1 curves).

    Why :data:`FULL` is what it is. N = 5e5 planted targets: the smallest the issue allows, since every row's cost
    grows with N. B = 32 rather than the paper's 128: the sampled loss gathers a (B, B k + k + B, D) array, so its
    cost grows with B^2. D = 256 and d' = 128 keep D = 2 d' (the paper: 768 and 128) and leave room for the 2 d' =
    256 ablation point (d' = D: no reduction). The planted task has 512 features and a teacher of dimension 256, so
    that the student's embeddings can have rank D and d' = 128 landmarks are a real reduction (with 64 features the
    embeddings had rank <= 64); and so that the task is not saturated: with 64 features and a teacher of dimension
    32, uniform negatives reached R@1 0.99 (seeds 0-2), against 0.75 here (in-batch 0.56; seed 0, the only rows
    looked at for this choice). s' = 4 d'; one exact refresh half-way through mining (the paper re-encoded
    everything once on NQ). SNM refreshes its pool every 10 steps: the paper's 100-500 steps were a small fraction
    of a long run, and staleness is set by how far the encoder moves between refreshes. Brute force re-encodes its
    table every 10 steps too (the paper does not say how often): re-encoding all N targets costs several times a
    step, and at the same period as SNM's refresh both mine from equally stale embeddings, brute force from all N of
    them. The text task's model and learning rate are the train CLI's defaults, chosen there on a validation split
    with uniform and in-batch negatives, not here (with the planted task's B = 32 and 400 steps the text model
    learned almost nothing in calibration: R@1 0.000-0.003); its log-Q correction is not: the recipe (Alg. 4) has
    none, for every row. Its batch and per-example counts are not the CLI's either: a text target row costs about
    0.1 ms of CPU per step (hashed 2^18 features into dimension 384, forward, backward and lazy Adam), so the
    recipe's 64 sampled + 64 uniform per example at the CLI's B = 256 (33,000 target rows a step) cost 1.8 s a
    uniform step, and the text half of the budget would have bought about 60 steps. B = 128 with 4 + 4 per example
    (the B k = 512 sampled ones shared by the batch, + 4 uniform per example + in-batch: about 1,200 target rows)
    costs 0.13 s; the planted task keeps the paper's 64 + 64. Steps, per task: the largest multiple of 50 for which
    ``reproduce --plan CALIBRATION --total-budget 120`` (per-step CPU of every row measured by a calibration part at
    80 steps, seed 0, extrapolated by :func:`estimate_run`) keeps the task's half of a four-hour table within two
    hours of CPU and every part within one: 700 for the planted task (``steps``), 500 for the text task
    (``text_steps``). Apart from the uniform and in-batch rows named above, no result was looked at to choose any
    of these.
    """

    planted_n_targets: int = 500_000
    planted_n_queries: int = 20_000
    planted_n_test: int = 1_000
    planted_n_features: int = 512
    planted_teacher_dim: int = 256
    text_max_test: int = 1_000
    text_n_features: int = TEXT_DEFAULTS["n_features"]
    text_batch_size: int = 128
    text_dim: int = TEXT_DEFAULTS["dim"]
    text_lr: float = TEXT_DEFAULTS["lr"]
    text_k: int = 4
    text_n_uniform: int = 4
    text_init: str = TEXT_DEFAULTS["init"]
    text_tied: bool = TEXT_DEFAULTS["tied"]
    text_init_scale: float = TEXT_DEFAULTS["init_scale"]
    text_input_weights: str | None = TEXT_DEFAULTS["input_weights"]
    text_steps: int = 500
    steps: int = 700
    batch_size: int = 32
    dim: int = 256
    lr: float = 0.01
    lr_warmup: int = 50
    k: int = 64
    n_uniform: int = 64
    warmup_fraction: float = 0.25
    n_landmarks: int = 128
    n_samples: int = 512
    reencode_every: int = 25
    snm_refresh_every: int = 10
    bf_refresh_every: int = 10
    eval_points: int = 4

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Scale()
QUICK = Scale(planted_n_targets=3000, planted_n_queries=1500, planted_n_test=300, planted_n_features=32,
              planted_teacher_dim=32,
              text_max_test=300, text_n_features=2 ** 12, text_batch_size=32, text_dim=32, text_k=4, text_n_uniform=4,
              text_steps=40, steps=40, batch_size=32, dim=32, lr_warmup=4, k=4, n_uniform=4, n_landmarks=8,
              n_samples=32,
              reencode_every=5, snm_refresh_every=10, bf_refresh_every=5, eval_points=2)


# ------------------------------------------------------------------------------------------------ rows
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
                           reencode_every=scale.reencode_every, refresh_every=max(1, (mining_steps + 1) // 2),
                           tree_update="maintain")  # Alg. 4 as printed: Alg. 3 after every re-encode
        if sampler == "paper":
            notes.append(f"DyNNIBAL 'paper': temperature {miner.temperature:g} and {miner.n_trees} tree(s), top "
                         f"{miner.n_top_clusters} clusters (the paper: a lower temperature and the top-k, both "
                         "unstated; a forest of 100 trees)")
        return miner, notes
    return build


def _snm(pct, top=False):
    return lambda scale, n, B, mining_steps: (M.StochasticNegativeMining(
        B * scale.k, mem_percent=pct, refresh_every=scale.snm_refresh_every, select="top" if top else "sample"), [])


def _nc(pct):
    return lambda scale, n, B, mining_steps: (M.NegativeCache(B * scale.k, mem_percent=pct), [])


def _brute_force(scale, n, B, mining_steps):
    return M.BruteForceTopK(B * scale.k, refresh_every=scale.bf_refresh_every), []


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: ``label``, ``paper`` (a row of the paper's tables, else ours), ``build(scale, N, B,
    mining_steps) -> (miner, notes)`` (notes: deviations from the recipe), ``mined`` (the recipe's uniform
    negatives are added on top; False for in-batch and the full softmax)."""

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
# Rows run by default on each task: the planted task carries Table 1 (the paper's NQ table) with our extra rows; the
# text task Table 1's and Table 2's rows (the paper's MSMARCO table: Negative Cache at five memories) and the landmark
# ablation, where the 2^18-dimensional features make d' matter. Our extra DyNNIBAL samplers and SNM top are left to
# the planted task: the text task's steps cost many times the planted task's, and its share of the four-hour budget
# would otherwise buy too few steps to learn (Scale's docstring). The full softmax (all N targets encoded and scored
# every step) is run on request only (--rows full-softmax).
DEFAULT_ROWS = {"planted": tuple(r for r in TABLE1 if r != "full-softmax"),
                "text": tuple(r for r in ROWS if r not in ("full-softmax", "dynnibal-mh", "dynnibal-rejection",
                                                             "snm-top-3"))}


# ------------------------------------------------------------------------------------------------ tasks
def task_key(task: str, data_dir: str | None = None) -> str:
    """``"planted"`` or ``"text:<directory name>"`` (each text dataset is its own task in the tables)."""
    return "planted" if task == "planted" else "text:" + os.path.basename(os.path.normpath(data_dir))


def _planted(scale: Scale, seed: int) -> RetrievalDataset:
    n = scale.planted_n_targets
    n_fine = max(1, n // 25)  # fine clusters of ~25 near-duplicates, as the demo's task
    coarse = min(50, n_fine)
    return planted_dataset(n, scale.planted_n_queries, n_features=scale.planted_n_features,
                           dim=scale.planted_teacher_dim,
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
def task_scale(scale: Scale, kind: str) -> Scale:
    """``scale`` as one task reads it: for ``"text"`` the batch, dimension, learning rate, negative counts and steps
    are the ``text_*`` fields (so every row and the recipe read ``batch_size``, ``dim``, ``lr``, ``k``,
    ``n_uniform``, ``steps``)."""
    if kind != "text":
        return scale
    return dataclasses.replace(scale, batch_size=scale.text_batch_size, dim=scale.text_dim, lr=scale.text_lr,
                               k=scale.text_k, n_uniform=scale.text_n_uniform, steps=scale.text_steps)


def _recipe(scale: Scale, kind: str, B: int) -> tuple[dict, list]:
    """Training arguments of the recipe (uniform negatives per example when the loop offers it) and deviations;
    ``scale`` as :func:`task_scale` gives it."""
    kw = {"steps": scale.steps, "batch_size": B, "dim": scale.dim, "lr": scale.lr,
          "lr_warmup": min(scale.lr_warmup, scale.steps - 1),
          "uniform_warmup": int(round(scale.warmup_fraction * scale.steps)), "in_batch": True,
          "eval_every": _eval_every(scale), "beta": 20.0}
    if kind == "text":
        kw.update(init=scale.text_init, tied=scale.text_tied, init_scale=scale.text_init_scale,
                  input_weights=scale.text_input_weights)
    kw.update(n_uniform=scale.n_uniform, uniform_per_example=True)
    return kw, []


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


def _cpu_profile(res, miner, run_cpu: float) -> dict:
    """CPU seconds of a run by kind of step (what :func:`plan` extrapolates from).

    warm_step: mean over the uniform-only warm-up steps; first_mining_step: the first mining step (it includes
    ``miner.start``: the initial encoding, pool or tree build); events: the CPU of every later mining step at which
    the miner refreshed (SNM pool, brute-force table, DyNNIBAL exact refresh) or re-encoded (DyNNIBAL Alg. 5 + Alg.
    3); steady_step: median over the other mining steps; mining_step_mean: mean over every mining step but the
    first (periodic work amortised); eval_each: (run CPU - step CPU) / evaluations (setup included)."""
    cpu = np.array([h["cpu_mine"] + h["cpu_loss"] + h["cpu_optimizer"] for h in res.history])
    mining = np.array([h["mining"] for h in res.history])
    m_steps = np.flatnonzero(mining)
    later = set(m_steps[1:].tolist())
    events = {kind: sorted(later & set(getattr(miner, attr, []) or []))
              for kind, attr in (("refresh", "refreshed_at"), ("reencode", "reencoded_at"))}
    plain = sorted(later - set(events["refresh"]) - set(events["reencode"]))
    mean = lambda x: float(np.mean(x)) if len(x) else None
    return {"warm_steps": int((~mining).sum()), "warm_step": mean(cpu[~mining]), "mining_steps": int(m_steps.size),
            "first_mining_step": float(cpu[m_steps[0]]) if m_steps.size else None,
            "steady_step": float(np.median(cpu[plain])) if plain else None,
            "mining_step_mean": mean(cpu[m_steps[1:]]),
            "events": {k: [float(cpu[t]) for t in v] for k, v in events.items()},
            "steps_total": float(cpu.sum()), "eval_each": (run_cpu - float(cpu.sum())) / max(1, len(res.evals))}


def run_one(ds, kind: str, row: str, seed: int, scale: Scale, *, progress: bool = False) -> dict:
    """Train one row on one dataset with one seed; the run's record (final metrics, evaluations over training,
    configuration, deviations from the recipe, CPU profile :func:`_cpu_profile`, DyNNIBAL's timings)."""
    spec = ROWS[row]
    scale = task_scale(scale, kind)
    B = min(scale.batch_size, int(ds.train_ids.size))
    kw, notes = _recipe(scale, kind, B)
    miner, more = spec.build(scale, ds.n_targets, B, scale.steps - kw["uniform_warmup"])
    notes += more
    if not spec.mined:
        kw["n_uniform"] = 0
        kw.pop("uniform_per_example", None)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(ds, miner, seed=seed, progress=progress, desc=f"{spec.label} seed {seed}", **kw)
    run_cpu = time.process_time() - c0
    prof = _cpu_profile(res, miner, run_cpu)
    res.final.update(train_cpu=prof["steps_total"], cpu_per_mining_step=prof["mining_step_mean"])
    rec = {"row": row, "seed": seed, "final": res.final, "evals": res.evals, "config": res.config, "notes": notes,
           "teacher_test_r1": ds.metadata.get("teacher_test_r1"), "run_seconds": time.perf_counter() - t0,
           "run_cpu_seconds": run_cpu, "cpu": prof}
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
             log=None, command: str = "", checkpoint=None) -> dict:
    """Run ``rows`` x ``seeds`` on every task of ``tasks`` and return the part (a :data:`SCHEMA` dict).

    Parameters
    ----------
    tasks : subset of :data:`TASKS`; ``"text"`` needs ``data_dir`` (targets.tsv, queries.tsv).
    rows : names in :data:`ROWS` (None: :data:`DEFAULT_ROWS` of each task).
    seeds : distinct non-negative ints (planted: the seed also draws the task).
    scale : a :class:`Scale`. log : ``print``-like callable for one line per run (None: silent).
    checkpoint : called with the part after every run (``part["complete"]`` False until the last one), e.g. to
        save it, so that the finished runs of a part that is killed are kept (a partial part merges like any).
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
            "tasks": {}, "runs": [], "data_cpu_seconds": {}, "complete": False}
    for task in tasks:
        key = task_key(task, data_dir)
        c0 = time.process_time()
        text_ds = _text(scale, data_dir) if task == "text" else None
        cpu_data = time.process_time() - c0
        for dseed in (seeds if task == "planted" else [None]):
            c0 = time.process_time()
            ds = text_ds if task == "text" else _planted(scale, dseed)
            cpu_data += time.process_time() - c0
            part["data_cpu_seconds"][key] = cpu_data
            if key not in part["tasks"]:
                part["tasks"][key] = _task_info(task, ds, scale, data_dir)
            for row in (DEFAULT_ROWS[task] if rows is None else rows):
                for seed in (seeds if task == "text" else [dseed]):
                    rec = run_one(ds, task, row, seed, scale, progress=progress)
                    rec["task"] = key
                    part["runs"].append(rec)
                    if checkpoint is not None:
                        checkpoint(part)
                    f = rec["final"]
                    log(f"{key} | {ROWS[row].label} | seed {seed}: R@1 {f['R@1']:.3f} R@100 {f['R@100']:.3f} "
                        f"Mem {f['mem_percent']:.3g}% train {f['wall_time']:.1f} s; run {rec['run_seconds']:.1f} s "
                        f"wall, {rec['run_cpu_seconds']:.1f} s CPU")
    part["wall_seconds"] = time.perf_counter() - t_start
    part["complete"] = True
    return part


# ------------------------------------------------------------------------------------------------ plan
# free in a calibration
_COST_FREE = ("steps", "text_steps", "lr_warmup", "eval_points", "warmup_fraction", "lr", "text_lr")
# Fields that one task kind does not read (a calibration of the planted task stays valid when a text field changes)
_OTHER_TASK_FIELDS = {"planted": {f for f in Scale.__dataclass_fields__ if f.startswith("text_")},
                      "text": {f for f in Scale.__dataclass_fields__ if f.startswith("planted_")}
                      | {"batch_size", "dim", "lr", "k", "n_uniform", "steps"}}


def _eval_every(scale: Scale) -> int:
    """Steps between evaluations: ``eval_points`` spread over the run (0 or 1: only at the end)."""
    return max(1, scale.steps // max(1, scale.eval_points))


def _n_evals(scale: Scale) -> int:
    e = _eval_every(scale)
    return 2 + sum(1 for t in range(scale.steps) if (t + 1) % e == 0 and t + 1 < scale.steps)


def estimate_run(rec: dict, scale: Scale) -> float:
    """CPU seconds of ``rec``'s row at ``scale``, extrapolated from its calibration run's profile
    (:func:`_cpu_profile`).

    ``W warm + M steady + (first - steady) + sum_events count_e (cost_e - steady) + n_eval eval_each``, with W, M
    the warm-up and mining steps at ``scale``; event counts from the miners' schedules at ``scale``: DyNNIBAL's one
    exact refresh half-way and its re-encodes every ``reencode_every`` mining steps since the last of either, SNM's
    and brute force's refreshes every ``refresh_every``; an event kind the calibration did not see costs as much
    as the first mining step's start (an upper bound for a re-encode).
    """
    p, cfg = rec["cpu"], rec["config"]["miner"]
    W = int(round(scale.warmup_fraction * scale.steps)) if p["warm_steps"] else 0
    M = scale.steps - W
    steady = p["steady_step"] if p["steady_step"] is not None else p["mining_step_mean"] or 0.0
    start = max(0.0, (p["first_mining_step"] or 0.0) - steady)
    est = W * (p["warm_step"] or 0.0) + M * steady + start + _n_evals(scale) * p["eval_each"]
    counts = {}
    if cfg["name"] == "dynnibal":  # the schedule of DyNNIBAL._periodic: refresh first, else re-encode
        R_, w = max(1, (M + 1) // 2), cfg["reencode_every"]  # the recipe: one exact refresh half-way (_dynnibal)
        last = last_refresh = 0
        counts = {"refresh": 0, "reencode": 0}
        for t in range(1, M):
            if t - last_refresh >= R_:
                counts["refresh"] += 1
                last = last_refresh = t
            elif t - last >= w:
                counts["reencode"] += 1
                last = t
    elif "refresh_every" in cfg:  # SNM's pool, brute force's table
        counts = {"refresh": (M - 1) // cfg["refresh_every"]}
    for kind, count in counts.items():
        seen = p["events"].get(kind) or []
        extra = float(np.mean(seen)) - steady if seen else start
        est += count * max(0.0, extra)
    return est


def plan(parts, scale: Scale, seeds, *, budget_minutes: float = 60.0, out_dir: str = "results/parts",
         data_dir: str | None = None, tasks=None) -> list[dict]:
    """The part commands that together run every default row of every calibrated task (or of the task keys in
    ``tasks``) for ``seeds`` at ``scale``, each estimated at most ``budget_minutes`` of CPU when possible (a single
    run over budget gets a part of its own, flagged).

    ``parts``: calibration parts (JSON dicts of :func:`run_part` at ``scale`` except for :data:`_COST_FREE` fields,
    e.g. ``--steps 80``), each row of a task run once. Per part the estimate is the dataset's CPU (planted: one
    task per seed; text: one load) plus :func:`estimate_run` of each row. Returns ``[{"task", "rows", "seed",
    "steps", "minutes", "over_budget", "command"}]`` in run order.
    """
    cal, data_cpu, data_dirs = {}, {}, {}
    for part in parts:
        kinds = {"planted" if k == "planted" else "text" for k in part["tasks"]}
        for f in Scale.__dataclass_fields__:
            if f in _COST_FREE or all(f in _OTHER_TASK_FIELDS[k] for k in kinds):
                continue
            if part["scale"].get(f) != getattr(scale, f):
                raise ValueError(f"plan: calibration {part.get('_file', '<part>')} has {f} = {part['scale'].get(f)}, "
                                 f"the plan's scale {getattr(scale, f)} (only {', '.join(_COST_FREE)} may differ)")
        n_sets = {k: len({r["seed"] for r in part["runs"] if r["task"] == k}) if k == "planted" else 1
                  for k in part["tasks"]}
        for key, info in part["tasks"].items():
            per_set = part.get("data_cpu_seconds", {}).get(key, 0.0) / max(1, n_sets[key])
            data_cpu[key] = max(data_cpu.get(key, 0.0), per_set)
            data_dirs[key] = info.get("data_dir")
        for r in part["runs"]:
            cal.setdefault((r["task"], r["row"]), r)
    if not cal:
        raise ValueError("plan: the calibration parts hold no runs")
    out = []
    for key in data_cpu:
        if tasks is not None and key not in tasks:
            continue
        kind = "planted" if key == "planted" else "text"
        rows = [r for r in DEFAULT_ROWS[kind] if (key, r) in cal]
        missing = [r for r in DEFAULT_ROWS[kind] if (key, r) not in cal]
        if missing:
            raise ValueError(f"plan: task {key} has no calibration run of {', '.join(missing)}")
        ts = task_scale(scale, kind)
        cost = {r: estimate_run(cal[(key, r)], ts) for r in rows}
        for seed in seeds:
            groups, cur = [], []
            for r in rows:
                if cur and data_cpu[key] + sum(cost[x] for x in cur + [r]) > 60 * budget_minutes:
                    groups.append(cur)
                    cur = []
                cur.append(r)
            groups.append(cur)
            for g in groups:
                minutes = (data_cpu[key] + sum(cost[x] for x in g)) / 60
                cmd = (f"python -m refimpl reproduce --tasks {kind} --rows {','.join(g)} --seeds {seed} "
                       + (f"--data {data_dir or data_dirs[key]} " if kind == "text" else "")
                       + f"--steps {ts.steps} "
                       + f"--out-dir {out_dir} --no-progress")
                out.append({"task": key, "rows": g, "seed": seed, "steps": ts.steps, "minutes": minutes,
                            "over_budget": minutes > budget_minutes, "command": cmd})
    return out


def with_steps(scale: Scale, steps: int) -> Scale:
    """``scale`` with ``steps`` training steps on every task (the learning-rate warm-up capped at a quarter of
    them)."""
    return dataclasses.replace(scale, steps=steps, text_steps=steps, lr_warmup=min(scale.lr_warmup, steps // 4))


def largest_steps(parts, scale: Scale, seeds, *, total_minutes: float, budget_minutes: float = 60.0,
                  grid=range(50, 5001, 50), out_dir: str = "results/parts", data_dir: str | None = None) -> dict:
    """Per calibrated task, the largest step count in ``grid`` whose :func:`plan` fits an equal share of
    ``total_minutes`` of CPU (``total_minutes`` / number of tasks), no part over ``budget_minutes``: ``{task key:
    (steps, plan items)}``, ``(None, [])`` for a task where none fits. The cost grows with the steps, so this is the
    choice "as many steps as the budget allows" (no result is looked at); each task's parts run at their own step
    count (a part holds one task). ``out_dir``, ``data_dir``: as in :func:`plan`."""
    keys = list(dict.fromkeys(r["task"] for p in parts for r in p["runs"]))
    if not keys:
        raise ValueError("plan: the calibration parts hold no runs")
    share = total_minutes / len(keys)
    out = {}
    for key in keys:
        best = (None, [])
        for steps in grid:
            items = plan(parts, with_steps(scale, steps), seeds, budget_minutes=budget_minutes, tasks=[key],
                         out_dir=out_dir, data_dir=data_dir)
            if sum(i["minutes"] for i in items) > share or any(i["over_budget"] for i in items):
                break
            best = (steps, items)
        out[key] = best
    return out


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
                                   "(--tasks/--rows/--seeds), merge parts (--merge PATH...), or print the part "
                                   "commands of the whole table with their CPU estimates (--plan CALIBRATION...).")
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
    p.add_argument("--eval-points", type=integer(1), default=None,
                   help="evaluations during training besides step 0 (default: the scale's; fewer make a cheaper "
                        "calibration part)")
    p.add_argument("--out-dir", type=out_dir, default="reproduce_out", help="where parts and merges are written")
    p.add_argument("--merge", nargs="+", type=str, default=None, metavar="PATH",
                   help="merge the part files (or directories of them) into one table, JSON and figure")
    p.add_argument("--plan", nargs="+", type=str, default=None, metavar="PATH",
                   help="print the part commands that make the whole table (default rows, --seeds, --steps), each "
                        "with its estimated CPU minutes, extrapolated from calibration parts (files or directories; "
                        "e.g. every default row of each task run once with --steps 80)")
    p.add_argument("--budget", type=integer(1), default=60, help="--plan: CPU minutes per part (default 60)")
    p.add_argument("--total-budget", type=integer(1), default=None,
                   help="--plan: choose the largest number of steps (a multiple of 50) whose parts fit this many CPU "
                        "minutes in all")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def configure(a) -> tuple[list, Scale]:
    """Tasks and scale from parsed arguments (rows and seeds filled in); ValueError naming the flag when they
    cannot work together. With ``--merge`` only ``--out-dir`` and ``--no-figure`` apply: returns (None, None). With
    ``--plan``: (None, the scale of the planned parts); ``--seeds``, ``--steps`` or ``--total-budget``, ``--data``,
    ``--out-dir`` and ``--budget`` apply."""
    if a.plan is not None:
        mixed = [f for f, v in (("--tasks", a.tasks), ("--rows", a.rows), ("--n-targets", a.n_targets),
                                ("--merge", a.merge), ("--eval-points", a.eval_points)) if v is not None]
        if a.quick or mixed:
            raise ValueError(f"--plan: plans the default rows of the calibrated tasks; it takes no "
                             f"{(mixed or ['--quick'])[0]}")
        for m in a.plan:
            if not os.path.exists(m):
                raise ValueError(f"--plan: {m}: no such file or directory")
        a.seeds = [0, 1, 2] if a.seeds is None else a.seeds
        if a.steps is not None and a.total_budget is not None:
            raise ValueError("--total-budget: chooses the steps itself; give it or --steps, not both")
        return None, FULL if a.steps is None else with_steps(FULL, a.steps)
    if a.merge is not None:
        mixed = [f for f, v in (("--tasks", a.tasks), ("--rows", a.rows), ("--seeds", a.seeds), ("--data", a.data),
                                ("--n-targets", a.n_targets), ("--steps", a.steps),
                                ("--eval-points", a.eval_points)) if v is not None]
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
    if a.total_budget is not None:
        raise ValueError("--total-budget: applies to --plan only")
    if a.steps is not None:
        scale = with_steps(scale, a.steps)
    if a.eval_points is not None:
        scale = dataclasses.replace(scale, eval_points=a.eval_points)
    return tasks, scale
