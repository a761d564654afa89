"""The training loop (Alg. 4 in mini-batch form, paper App. C), evaluation, and the accounting of every run.

:func:`train` trains a :class:`~refimpl.encoders.LinearDualEncoder` on a :class:`~refimpl.data.RetrievalDataset`
with one miner (:mod:`refimpl.mining`): Adam with learning-rate warm-up and linear decay (:mod:`refimpl.optim`),
negatives shared across the batch, optional in-batch negatives, optional uniform negatives alongside the mined ones
(the paper: 64 uniform + 64 mined), optional log-Q correction, and a uniform-only warm-up before mining starts.

Per step (``ctx.step = t``):
1. next batch of training queries (epoch-wise shuffled), ``Q`` = their embeddings under the current encoder;
2. negatives: ``Uniform(k)`` during the uniform warm-up, ``miner.mine`` afterwards (``miner.start`` is called at the
   first mining step), plus ``n_uniform`` uniform negatives, plus the batch's positives when ``in_batch``;
3. the loss: the exact full softmax (Eq. 2) for :class:`~refimpl.mining.FullSoftmax`, otherwise the sampled
   softmax (Alg. 4 lines 9-10; accidental hits removed) over the targets involved, encoded fresh;
4. at probe steps (before the update, not timed, no randomness consumed): the relative error of this gradient
   against the full-softmax gradient at the same parameters, and the total-variation distance between the miner's
   per-query negative distribution and the exact softmax P(.|x) (Eq. 1) over all N targets, averaged over the batch
   (a staleness measure);
5. Adam update of (A, B); ``miner.observe`` with the targets encoded for the loss.

Accounting: target-encoder calls are rows passed through the target encoder, counted by the code (``mining``:
miner-side work such as refreshes, caches, exhaustive scans; ``loss``: the targets encoded for the loss; evaluation
and probes are not counted). Mem % = 100 * (the miner's accelerator-resident target state, in full-dimensional
embeddings) / N, as the paper defines it (§7); see each miner's docstring for what it counts. Wall time excludes
probes and evaluation.

Evaluation (:func:`evaluate`) always re-encodes all targets exactly with the final encoder. Recall@k is the fraction
of test queries with AT LEAST ONE of their positives among the top k targets (queries may have several positives);
MRR@k (k = 1, 10, 100) is the mean of 1/rank of the first positive within the top k (0 if none); scores are
computed in bounded blocks. :func:`lexical_baseline` ranks the same data by TF-IDF cosine with no training (the
row to beat).

Repeatability: every random stream derives from ``seed`` (``numpy.random.SeedSequence(seed).spawn``); the same
seed and arguments give the same history and final encoder bit for bit.
"""
from __future__ import annotations

import sys
import time

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from numba import njit
from tqdm import tqdm

from refimpl._validate import check_ids, check_int, check_positive, csr_arrays
from refimpl.encoders import LinearDualEncoder
from refimpl.mining import Batch, Miner, MinerContext, Negatives, Uniform
from refimpl.optim import Adam
from refimpl.softmax import full_softmax_grad, full_softmax_loss, gradient_relative_error, sampled_softmax_loss
from refimpl.text import idf_weights

__all__ = ["TrainResult", "train", "evaluate", "lexical_baseline", "RECALL_KS", "MRR_KS", "TEXT_DEFAULTS"]

RECALL_KS = (1, 5, 10, 20, 100)
MRR_KS = (1, 10, 100)  # the paper's Table 2 (MSMARCO): MRR@1/10/100

# The defaults for text (the train CLI's; the reproduction's text task takes its model from them), chosen on the
# GCIDE VALIDATION task (convert_gcide(validation=True): training queries split again, the test split never used;
# 8,022 held-out validation queries; TF-IDF there .050/.168/.372 R@1/10/100). Uniform miner, all else equal unless
# said:
# - log-Q correction on (for miners with a proposal): .051/.156/.313 -> .059/.187/.356. Without it, in-batch
#   negatives (drawn in proportion to a target's training positives) push frequent targets down, and the targets
#   of held-out queries are frequent ones (size-biased: 3.6 training queries each on GCIDE against 1.4 overall).
# - dim 384 untied: .059/.187/.356 at 256 -> .060/.196/.374; tied towers at 512 (the same memory as 256 untied)
#   .056/.153/.268 (without log-Q); 384 untied = 6 matrices of 384 x 2^18 float64 with Adam's moments (4.8 GB).
# - k = 64 uniform negatives: 256 gave .061/.192/.356 (no gain on R@100) for 50% more time.
# - in-batch negatives on: free (the positives are encoded anyway); R@10 .131 -> .159, R@100 .256 -> .304 (an
#   earlier session, dim 256 without log-Q, as the three lines below).
# - IDF input weights: R@1 .033 -> .043 (tied towers, 3,000 steps), none of R@10 / R@100 lower.
# - init_scale 1 (learned weights dominate): 50 (a random-projection channel that learning corrects) traded
#   R@10 / R@100 (.141 / .288) for R@1 (.054 vs .051). A shared start alone is weak at these dimensions (no
#   training: R@100 .10 / .17 / .25 at dim 256 / 512 / 1024, against TF-IDF's .372).
# - batch 256 x 3,000 steps; lr 0.03 and beta 20 (the paper's) were kept, not searched.
# - training pairs whose query is quoted in the target text (every GCIDE training definition is part of its
#   headword's entry; TF-IDF ranks 92% of them first) are kept: training against the entry with the quote cut out
#   gave .045/.140/.266 against .051/.156/.313 (without log-Q; the quoted pairs teach lexical matching).
TEXT_DEFAULTS = {"steps": 3000, "batch_size": 256, "dim": 384, "lr": 0.03, "k": 64, "n_features": 2 ** 18,
                 "init": "shared", "tied": False, "init_scale": 1.0, "in_batch": True, "input_weights": "idf",
                 "log_q_correction": True}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    history : one dict per step (step, loss, lr, mining (bool), n_negatives, and the CPU seconds of the step's
        phases: cpu_mine (the miner, periodic work included), cpu_loss (encoding + loss + gradients),
        cpu_optimizer (the update and ``miner.observe``)).
    probes : one dict per probe step (step, grad_rel_error, tv).
    evals : one dict per evaluation (step + :func:`evaluate` metrics); the last one is the final evaluation.
    final : final test metrics (R@1..R@100, MRR@1/10/100) and accounting: encoder_calls_mining, encoder_calls_loss,
        encoder_calls (their sum), mem_percent, wall_time (training only), time_per_step, final_loss (mean over
        the last 10% of steps), grad_rel_error / tv (means over probes, NaN if none).
    encoder : the trained encoder. config : the arguments of the run.
    """

    history: list = field(default_factory=list)
    probes: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    encoder: object = None
    config: dict = field(default_factory=dict)


def _ranked_top_k(scorer, query_ids, n: int, K: int, chunk: int, max_scores: int) -> np.ndarray:
    """(len(query_ids), K) ids of the K best targets of every query, best first (ties: lower id first), holding at
    most ``max(max_scores, chunk * K)`` scores at once: ``scorer(qids)`` returns ``block(lo, hi)``, the
    (len(qids), hi - lo) scores of targets ``lo..hi-1``; a running top-K is merged block by block."""
    b = max(1, min(chunk, query_ids.size))
    width = max(K, max_scores // b)
    out = np.empty((query_ids.size, K), dtype=np.int64)
    for qlo in range(0, query_ids.size, b):
        sel = query_ids[qlo:qlo + b]
        score_block = scorer(sel)
        best_s = np.empty((sel.size, 0))
        best_i = np.empty((sel.size, 0), dtype=np.int64)
        for lo in range(0, n, width):
            hi = min(n, lo + width)
            S = score_block(lo, hi)
            if hi - lo > K:
                idx = np.argpartition(-S, K - 1, axis=1)[:, :K]
                S = np.take_along_axis(S, idx, axis=1)
            else:
                idx = np.broadcast_to(np.arange(hi - lo), S.shape)
            cand_s = np.concatenate([best_s, S], axis=1)
            cand_i = np.concatenate([best_i, idx + lo], axis=1)
            order = np.lexsort((cand_i, -cand_s), axis=1)[:, :K]
            best_s = np.take_along_axis(cand_s, order, axis=1)
            best_i = np.take_along_axis(cand_i, order, axis=1)
        out[qlo:qlo + sel.size] = best_i
    return out


def _metrics(top: np.ndarray, query_ids, positives, ks) -> dict:
    """R@k (any positive in the top k) and MRR@k for k in :data:`MRR_KS` from the ranked ids ``top`` (n_queries,
    K); K must be at least min(100, N) so that the rank of a first positive within the top 100 is known."""
    K = top.shape[1]
    first = np.empty(query_ids.size, dtype=np.int64)  # 1-based rank of the first positive within top K, K+1 if none
    for r, qid in enumerate(query_ids):
        hit = np.flatnonzero(np.isin(top[r], positives[qid]))
        first[r] = hit[0] + 1 if hit.size else K + 1
    out = {f"R@{k}": float(np.mean(first <= k)) for k in ks}
    for k in MRR_KS:
        out[f"MRR@{k}"] = float(np.mean(np.where(first <= k, 1.0 / first, 0.0)))
    return out


def _eval_args(dataset, query_ids, ks, chunk, max_scores):
    ids = dataset.test_ids if query_ids is None else check_ids("query_ids", query_ids, dataset.n_queries,
                                                               allow_empty=False)
    if not isinstance(ks, (tuple, list)) or not ks:
        raise ValueError(f"ks: expected a non-empty tuple of cut-offs, got {ks!r}")
    ks = tuple(check_int("ks", k, low=1) for k in ks)
    chunk = check_int("chunk", chunk, low=1)
    max_scores = check_int("max_scores", max_scores, low=1)
    return ids, ks, chunk, max_scores, min(max(max(ks), max(MRR_KS)), dataset.n_targets)


def evaluate(encoder, dataset, query_ids=None, *, ks=RECALL_KS, chunk: int = 256, max_scores: int = 2 ** 22) -> dict:
    """Exact retrieval metrics: every target re-encoded with ``encoder``; R@k and MRR@1/10/100 over ``query_ids``.

    Score ``s(q, i) = <f(x_q), g(y_i)>``; a query counts as a hit at k if ANY of its positives is among its k
    highest-scoring targets (equal scores ordered by target id; at the K-th place of a block a tie may keep either
    target); ``MRR@k = mean_q [r_q <= k] / r_q`` with r_q the rank of q's first positive, for k = 1, 10, 100 (the
    paper's Table 2; MRR@1 = R@1). ``query_ids`` defaults to the test split.

    Memory: queries are scored ``chunk`` at a time against blocks of targets, with at most
    ``max(max_scores, chunk * K)`` scores held at once (K = max(ks, 100)); the (N, dim) target embeddings are the
    only N-sized array (never N x chunk scores).
    """
    ids, ks, chunk, max_scores, K = _eval_args(dataset, query_ids, ks, chunk, max_scores)
    T = encoder.encode_targets(dataset.target_features)
    Xq = dataset.query_features

    def scorer(sel):
        Q = encoder.encode_queries(Xq[sel])
        return lambda lo, hi: Q @ T[lo:hi].T

    return _metrics(_ranked_top_k(scorer, ids, T.shape[0], K, chunk, max_scores), ids, dataset.positives, ks)


@njit(cache=True)
def _sparse_block_scores(qdata, qind, qptr, tdata, tind, tptr, lo, hi):  # pragma: no cover - compiled
    """Dense (n_q, hi - lo) block of ``Q T^T`` for CSR ``Q`` and the transposed targets ``T^T`` in CSR (F x N,
    each column's target ids sorted): for every query term, the term's postings restricted to ``[lo, hi)``."""
    nq = qptr.shape[0] - 1
    out = np.zeros((nq, hi - lo))
    for i in range(nq):
        for p in range(qptr[i], qptr[i + 1]):
            j = qind[p]
            w = qdata[p]
            a, b = tptr[j], tptr[j + 1]
            r = a + np.searchsorted(tind[a:b], lo)
            while r < b and tind[r] < hi:
                out[i, tind[r] - lo] += w * tdata[r]
                r += 1
    return out


def _tfidf(X, idf):
    """Rows of ``X`` with column weights ``idf``, L2-normalised (zero rows stay zero)."""
    Y = sp.csr_matrix(X @ sp.diags(idf))
    norms = np.sqrt(np.asarray(Y.multiply(Y).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ Y)


def _shared_csr(dataset, what: str):
    """``(query_features, target_features)`` when both are CSR over the same columns (one featuriser), else a
    ValueError starting with ``what``."""
    Xq, Xt = dataset.query_features, dataset.target_features
    if not (sp.issparse(Xq) and sp.issparse(Xt)) or Xq.shape[1] != Xt.shape[1]:
        raise ValueError(f"{what} needs CSR query and target features over the same columns")
    return Xq, Xt


def lexical_baseline(dataset, query_ids=None, *, ks=RECALL_KS, chunk: int = 256, max_scores: int = 2 ** 22) -> dict:
    """The TF-IDF cosine ranking of the same hashed features, no training: the row a trained model must beat.

    With ``idf`` = :func:`refimpl.text.idf_weights` of the target features, query and target rows are reweighted
    ``x_j idf_j`` and L2-normalised; score ``s(q, i) = <x~_q, y~_i>``; metrics, ties and memory as
    :func:`evaluate`. Needs CSR features with the same columns on both sides (one featuriser).
    """
    Xq, Xt = _shared_csr(dataset, "dataset: the lexical baseline")
    ids, ks, chunk, max_scores, K = _eval_args(dataset, query_ids, ks, chunk, max_scores)
    idf = idf_weights(Xt)
    Tt = sp.csr_matrix(_tfidf(Xt, idf).T)
    Tt.sort_indices()
    tdata, tind, tptr = csr_arrays(Tt)

    def scorer(sel):
        qd, qi, qp = csr_arrays(_tfidf(Xq[sel], idf))
        return lambda lo, hi: _sparse_block_scores(qd, qi, qp, tdata, tind, tptr, lo, hi)

    return _metrics(_ranked_top_k(scorer, ids, Xt.shape[0], K, chunk, max_scores), ids, dataset.positives, ks)


def _input_weights(kind, dataset):
    """The fixed input weights of ``train(input_weights=kind)``: None or the targets' IDF (ValueError otherwise)."""
    if kind is None:
        return None
    if kind != "idf":
        raise ValueError(f"input_weights: expected None or 'idf', got {kind!r}")
    return idf_weights(_shared_csr(dataset, "input_weights: 'idf'")[1])


def _in_batch_log_q(dataset) -> np.ndarray:
    counts = np.zeros(dataset.n_targets)
    for q in dataset.train_ids:
        np.add.at(counts, dataset.positives[q], 1.0)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


class _Batches:
    """Epoch-wise shuffled batches of training query ids (a new permutation when the current one runs out)."""

    def __init__(self, ids, batch_size, rng):
        self.ids, self.bs, self.rng = np.asarray(ids, dtype=np.int64), batch_size, rng
        self.buf = np.zeros(0, dtype=np.int64)

    def next(self):
        while self.buf.size < self.bs:
            self.buf = np.concatenate([self.buf, self.rng.permutation(self.ids)])
        out, self.buf = self.buf[:self.bs], self.buf[self.bs:]
        return out


def _tile(a, B):
    return None if a is None else np.tile(a, (B, 1))


def _combine(parts, B):
    """Concatenate negative groups ``[(ids, log_q)]`` from independent sources.

    Returns ``(ids, log_c)``: ids 1-D if every group is shared, else (B, .) with shared groups tiled; ``log_c`` the
    log-Q offset of each negative for :func:`refimpl.softmax.sampled_softmax_loss`'s ``log_expected_count``, or
    None when some group has no ``log_q``. A negative j drawn from source s (of size k_s, proposal q_s; sources
    are mined, uniform, in-batch) gets ``log_c_j = log(K q_s(j))`` with K = sum_s k_s. Then
    ``E[sum_{j in s} exp(s_j - log_c_j)] = (k_s / K) Z``, so the total is an unbiased estimate of the partition
    function Z: the sample-size-weighted average of the per-source importance-sampling estimates. (The balance
    heuristic ``log sum_s k_s q_s(j)`` is also unbiased and can have lower variance, but needs every source's q at
    every draw, which a miner does not provide.)
    """
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    has_q = all(p[1] is not None for p in parts)
    total = sum(p[0].shape[-1] for p in parts)
    offs = [p[1] + np.log(total) if has_q else None for p in parts]
    if all(p[0].ndim == 1 for p in parts):
        return np.concatenate([p[0] for p in parts]), np.concatenate(offs) if has_q else None
    ids = [p[0] if p[0].ndim == 2 else _tile(p[0], B) for p in parts]
    offs = [o if o is None or o.ndim == 2 else _tile(o, B) for o in offs]
    return np.concatenate(ids, axis=1), np.concatenate(offs, axis=1) if has_q else None


def train(dataset, miner: Miner, *, steps: int = 500, batch_size: int = 128, dim: int = 32, beta: float = 20.0,
          lr: float = 0.01, lr_warmup: int | None = None, lr_decay: bool = True, uniform_warmup: int = 0,
          n_uniform: int = 0, uniform_per_example: bool = False, in_batch: bool = False,
          log_q_correction: bool = False, probe_every: int = 0, eval_every: int = 0, seed: int = 0,
          init_scale: float = 1.0, init: str = "independent", tied: bool = False, sparse_updates: bool = True,
          input_weights: str | None = None, encoder=None, progress: bool = False,
          desc: str | None = None) -> TrainResult:
    """Train a linear dual encoder with ``miner`` (Alg. 4, mini-batch form; see the module docstring).

    Parameters
    ----------
    dataset : :class:`~refimpl.data.RetrievalDataset`.
    miner : a :class:`~refimpl.mining.Miner` (fresh instance; it keeps state).
    steps, batch_size : optimiser steps and queries per batch.
    dim, beta, init_scale, init, tied : the student encoder (unit-norm outputs; the paper's beta = 20; tower
        initialisation ``"independent"`` or ``"shared"`` and tying as in
        :class:`~refimpl.encoders.LinearDualEncoder`). Ignored when ``encoder`` (a LinearDualEncoder, copied) is
        given.
    input_weights : None, or ``"idf"``: the encoder's fixed input weights (both towers) are the inverse document
        frequencies of the target features (:func:`refimpl.text.idf_weights`, the weights of
        :func:`lexical_baseline`), ``f(x) = n(A (idf * x))``; needs CSR features with the same columns on both
        sides. Ignored when ``encoder`` is given.
    sparse_updates : with CSR features, Adam updates only the feature columns the step touches (lazy Adam,
        :mod:`refimpl.optim`; cost independent of the number of features); False: dense Adam on every column.
    lr, lr_warmup, lr_decay : Adam learning rate, its linear warm-up steps (default ``min(50, steps // 10)``), and
        linear decay to 0 at ``steps``.
    uniform_warmup : the first steps use ``Uniform(miner.k)`` negatives only (the paper's warm-up before mining);
        not applied to miners with ``warmup = False`` (Uniform, InBatch, FullSoftmax).
    n_uniform : uniform negatives added to the mined ones every step (log_q = -log N): shared by the batch, or
        ``n_uniform`` per example with ``uniform_per_example`` (the paper: 64 uniform per example).
    in_batch : add the batch's positives as shared negatives (always on for :class:`InBatch`).
    log_q_correction : subtract ``log(K q_s(j))`` from the logit of each negative j, K the total number of
        negatives and q_s the proposal of its source (mined, uniform, in-batch): an unbiased estimate of Z (see
        ``_combine``); refused for miners without a proposal.
    probe_every : measure gradient relative error and TV every this many steps (0: never).
    eval_every : evaluate on the test split every this many steps (0: only at the end).
    seed : int seed of every random stream (encoder init, batches, negatives, miner), spawned with
        ``numpy.random.SeedSequence(seed)``; a ``numpy.random.Generator`` is accepted (one integer drawn from it).
    progress : show a tqdm progress bar.
    """
    if not hasattr(dataset, "validate") or not hasattr(dataset, "positives"):
        raise TypeError(f"dataset: expected a refimpl.data.RetrievalDataset, got {type(dataset).__name__}")
    if not isinstance(miner, Miner):
        raise TypeError(f"miner: expected a refimpl.mining.Miner, got {type(miner).__name__}")
    steps = check_int("steps", steps, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    uniform_warmup = check_int("uniform_warmup", uniform_warmup, low=0)
    n_uniform = check_int("n_uniform", n_uniform, low=0)
    probe_every = check_int("probe_every", probe_every, low=0)
    eval_every = check_int("eval_every", eval_every, low=0)
    lr_warmup = min(50, steps // 10) if lr_warmup is None else check_int("lr_warmup", lr_warmup, low=0)
    if isinstance(seed, np.random.Generator):  # the project's rng convention: a Generator is consumed once
        seed = int(seed.integers(0, 2 ** 63 - 1))
    seed = check_int("seed", seed, low=0)
    check_positive("lr", lr)
    if log_q_correction and not miner.has_log_q:
        raise ValueError(f"log_q_correction: miner {miner.name!r} has no sampling distribution (log_q undefined)")
    if lr_decay and steps <= lr_warmup:
        raise ValueError(f"lr_warmup: must be < steps ({steps}) when lr_decay is on, got {lr_warmup}")
    dataset.validate()
    n = dataset.n_targets
    ss = np.random.SeedSequence(seed).spawn(4)
    rng_batch, rng_neg, rng_miner = (np.random.default_rng(s) for s in ss[1:])
    if encoder is None:
        w = _input_weights(input_weights, dataset)
        enc = LinearDualEncoder(dataset.query_features.shape[1], dataset.target_features.shape[1], dim, beta=beta,
                                normalize=True, rng=np.random.default_rng(ss[0]), init_scale=init_scale,
                                init=init, tied=tied, query_weights=w, target_weights=w)
    else:
        enc = encoder.copy()
    Xq_all, Xt_all = dataset.query_features, dataset.target_features
    ib_log_q = _in_batch_log_q(dataset)
    ctx = MinerContext(enc, Xt_all, rng=rng_miner, in_batch_log_q=ib_log_q)
    opt = Adam(enc.params, lr, warmup_steps=lr_warmup, total_steps=steps if lr_decay else None)
    warm = Uniform(max(miner.k, 1), per_example=bool(getattr(miner, "per_example", False)))
    use_in_batch = in_batch or miner.in_batch
    batches = _Batches(dataset.train_ids, batch_size, rng_batch)
    res = TrainResult(encoder=enc, config={
        "miner": miner.config(), "steps": steps, "batch_size": batch_size, "dim": enc.dim, "beta": enc.beta,
        "lr": lr, "lr_warmup": lr_warmup, "lr_decay": lr_decay, "uniform_warmup": uniform_warmup,
        "n_uniform": n_uniform, "uniform_per_example": bool(uniform_per_example), "in_batch": use_in_batch,
        "log_q_correction": log_q_correction, "probe_every": probe_every, "seed": seed, "n_targets": n,
        "init": init, "tied": enc.tied, "sparse_updates": bool(sparse_updates), "input_weights": input_weights})
    bar = None
    if progress:
        bar = tqdm(total=steps, desc=desc or miner.name, leave=False, file=sys.stderr, mininterval=0.5)
    t_setup = time.perf_counter()
    miner.setup(ctx)
    t_train = time.perf_counter() - t_setup
    if eval_every:
        res.evals.append({"step": 0, **evaluate(enc, dataset)})
    started = False
    for t in range(steps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        ctx.step = t
        qids = batches.next()
        Xq = Xq_all[qids]
        Q = enc.encode_queries(Xq)
        pos = [dataset.positives[q] for q in qids]
        batch = Batch(step=t, query_ids=qids, Xq=Xq, Q=Q, positives=pos, positive_ids=np.unique(np.concatenate(pos)))
        mining = t >= uniform_warmup or not miner.warmup
        if mining and not started:
            miner.start(ctx)
            started = True
        negs = miner.mine(ctx, batch) if mining else warm.mine(ctx, batch)
        if not isinstance(negs, Negatives):
            raise TypeError(f"miner.mine: expected Negatives, got {type(negs).__name__}")
        if log_q_correction and not negs.full and negs.ids.size and negs.log_q is None:
            raise ValueError(f"log_q_correction: miner {miner.name!r} returned negatives without log_q")
        dt_mine = time.perf_counter() - t0
        cpu_mine = time.process_time() - c0
        probe = probe_every and t % probe_every == 0
        if probe:  # the miner's distribution at this step's state (not timed, no randomness)
            dist = miner.distribution(ctx, batch) if mining else warm.distribution(ctx, batch)
        t1 = time.perf_counter()
        c1 = time.process_time()
        if negs.full:
            T = ctx.encode_all_targets(purpose="loss")
            loss, dQ, dT = full_softmax_loss(Q, T, pos, beta=enc.beta)
            inv, Xt_rows = np.arange(n), Xt_all
            n_neg = n
        else:
            parts = [(negs.ids, negs.log_q)]
            if n_uniform:
                shape = (len(qids), n_uniform) if uniform_per_example else (n_uniform,)
                parts.append((rng_neg.integers(0, n, size=shape).astype(np.int64), np.full(shape, -np.log(n))))
            if use_in_batch:
                ib = np.concatenate(pos)
                parts.append((ib, ib_log_q[ib]))
            # rows of T before the shared groups are tiled (a unique over B k ids, not B^2 k)
            inv = np.unique(np.concatenate([batch.positive_ids] + [p[0].reshape(-1) for p in parts]))
            nrow, neg_lq = _combine([(np.searchsorted(inv, ids), lq) for ids, lq in parts], len(qids))
            Xt_rows = Xt_all[inv]
            cached = ctx._all_cache is not None and ctx._all_cache[0] == ctx.version
            T = ctx.encode_targets(inv, purpose="loss") if not cached else ctx._all_cache[1][inv]
            prow = [np.searchsorted(inv, p) for p in pos]
            loss, dQ, dT = sampled_softmax_loss(Q, T, prow, nrow, beta=enc.beta,
                                                log_expected_count=neg_lq if log_q_correction else None)
            n_neg = int(nrow.shape[-1])
        grads = enc.gradients(Xq, dQ, Xt_rows, dT, sparse=bool(sparse_updates))
        dt_loss = time.perf_counter() - t1
        cpu_loss = time.process_time() - c1
        if probe:
            dA, dB = enc.query_vjp(Xq, dQ), enc.target_vjp(Xt_rows, dT)
            E = enc.encode_targets(Xt_all)
            S = enc.beta * (Q @ E.T)
            P = np.exp(S - S.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            _, fA, fB = full_softmax_grad(enc, Xq, Xt_all, pos)
            res.probes.append({"step": t, "grad_rel_error": gradient_relative_error((dA, dB), (fA, fB)),
                               "tv": float("nan") if dist is None else float(0.5 * np.abs(P - dist).sum(axis=1).mean())})
        t2 = time.perf_counter()
        c2 = time.process_time()
        lr_used = opt.step(grads)
        ctx.advance()
        ids_enc = inv if not negs.full else np.arange(n)
        miner.observe(ctx, batch, ids_enc, T)
        t_train += dt_mine + dt_loss + (time.perf_counter() - t2)
        res.history.append({"step": t, "loss": float(loss), "lr": lr_used, "mining": bool(mining),
                            "n_negatives": n_neg, "cpu_mine": cpu_mine, "cpu_loss": cpu_loss,
                            "cpu_optimizer": time.process_time() - c2})
        if eval_every and (t + 1) % eval_every == 0 and t + 1 < steps:
            res.evals.append({"step": t + 1, **evaluate(enc, dataset)})
        if bar is not None:
            bar.update(1)
            if t % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    final = evaluate(enc, dataset)
    res.evals.append({"step": steps, **final})
    tail = max(1, steps // 10)
    calls_m = ctx.encoder_calls.get("mining", 0)
    calls_l = ctx.encoder_calls.get("loss", 0)
    final.update({
        "final_loss": float(np.mean([h["loss"] for h in res.history[-tail:]])),
        "grad_rel_error": float(np.mean([p["grad_rel_error"] for p in res.probes])) if res.probes else float("nan"),
        "tv": float(np.nanmean([p["tv"] for p in res.probes])) if res.probes and not all(
            np.isnan(p["tv"]) for p in res.probes) else float("nan"),
        "encoder_calls_mining": int(calls_m), "encoder_calls_loss": int(calls_l),
        "encoder_calls": int(calls_m + calls_l),
        "mem_percent": 100.0 * miner.memory_embeddings(ctx) / n,
        "wall_time": t_train, "time_per_step": t_train / steps,
    })
    res.final = final
    return res
