"""Exact log-softmax, and the full / sampled / in-batch / Monte Carlo softmax losses with their gradients.

Paper §2: logits ``s_i = beta <q, t_i>``, softmax ``P(i|x) = exp(s_i)/Z`` (Eq. 1), loss
``L(x, i*) = -s_{i*} + log Z`` (Eq. 2), whose gradient is ``-grad s_{i*} + E_{i~P}[grad s_i]``.

Every loss works on embeddings and returns ``(loss, dQ, dT)``: the mean loss and its exact gradient w.r.t. the
query embeddings ``Q`` (B x D) and target embeddings ``T`` (n_rows x D). The ``*_grad`` wrappers push these through a
:class:`refimpl.encoders.LinearDualEncoder` and return ``(loss, dA, dB)``.

Several positives per query (binding semantics of the project): ``positives[i]`` lists the positive rows of query
``i``; each (query, positive) pair is one example; the negatives of an example exclude that query's *other*
positives (its own positive is its numerator term); the loss is the mean over pairs. With one positive per query
this is exactly Eq. 2. The pair order is the flattening of ``positives`` (see :func:`flatten_positives`).
A repeated id inside ``positives[i]`` is a repeated example (counted twice); the exclusion uses the set.

Numerical stability: every log-partition is computed relative to its maximum, so logits of magnitude 1e4 and more
give finite, correct losses and gradients (probabilities underflow to exactly 0, never NaN).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from refimpl._validate import check_ids, check_matrix, check_positive

__all__ = [
    "logsumexp", "log_softmax", "flatten_positives", "pair_log_probs",
    "full_softmax_loss", "sampled_softmax_loss", "in_batch_softmax_loss", "monte_carlo_softmax_loss",
    "encoder_loss_grad", "full_softmax_grad", "sampled_softmax_grad", "in_batch_softmax_grad",
    "monte_carlo_softmax_grad", "gradient_relative_error",
]


# ------------------------------------------------------------------------------------------- log-softmax
def _check_logits(x, name: str = "x") -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot be converted to a float64 array ({exc})") from None
    if np.isnan(a).any() or np.isposinf(a).any():
        raise ValueError(f"{name}: contains NaN or +Inf (-Inf is allowed and means 'masked')")
    return a


def _shifted(a: np.ndarray, axis: int):
    """``(x - m, log sum exp(x - m))`` with ``m`` the (finite) maximum along ``axis``, both keepdims."""
    if a.ndim == 0:
        raise ValueError("x: expected at least a 1-D array")
    if a.shape[axis] == 0:
        raise ValueError(f"x: axis {axis} is empty")
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    d = a - m
    with np.errstate(divide="ignore"):
        return m, d, np.log(np.sum(np.exp(d), axis=axis, keepdims=True))


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``log sum exp(x)`` along ``axis``, stable for any finite magnitude (max-shifted).

    ``-inf`` entries are allowed (masked terms); a slice that is entirely ``-inf`` gives ``-inf``.
    """
    m, _, ls = _shifted(_check_logits(x), axis)
    out = m + ls
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x, axis: int = -1) -> np.ndarray:
    """The log of Eq. 1 along ``axis``: ``(x - max) - log sum exp(x - max)`` (no cancellation at large ``|x|``).

    A slice must contain a finite entry.
    """
    _, d, ls = _shifted(_check_logits(x), axis)
    if np.isneginf(ls).any():
        raise ValueError("x: a slice is entirely -inf; its softmax is undefined")
    return d - ls


# -------------------------------------------------------------------------------------------- positives
def _as_id_lists(positives, n_queries: int) -> list:
    if isinstance(positives, np.ndarray):
        if positives.ndim == 1:
            positives = positives.reshape(-1, 1)
        elif positives.ndim != 2:
            raise ValueError(f"positives: expected a list of 1-D id arrays or a 1-/2-D int array, got shape "
                             f"{positives.shape}")
        positives = list(positives)
    elif not isinstance(positives, (list, tuple)):
        raise TypeError(f"positives: expected a list of 1-D int arrays (one per query), got "
                        f"{type(positives).__name__}")
    if len(positives) != n_queries:
        raise ValueError(f"positives: expected one entry per query ({n_queries}), got {len(positives)}")
    return positives


def flatten_positives(positives, n_queries: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pair_query, pair_positive)``: the examples (query, positive row) in order, each an int64 array (E,).

    ``positives``: a list of ``n_queries`` 1-D int arrays (or scalars), or an int array of shape (n_queries,) (one
    positive each) or (n_queries, m). Every query needs at least one positive; ids must be in ``[0, n_rows)``.
    """
    lists = _as_id_lists(positives, n_queries)
    qs, ps = [], []
    for i, p in enumerate(lists):
        ids = check_ids(f"positives[{i}]", p, n_rows, allow_empty=False)
        qs.append(np.full(ids.size, i, dtype=np.int64))
        ps.append(ids)
    return np.concatenate(qs), np.concatenate(ps)


def _membership(pair_q: np.ndarray, pair_p: np.ndarray, n_rows: int):
    """Sorted keys ``q * n_rows + p`` of the positive sets, for vectorised 'is row r a positive of query q?'."""
    return np.unique(pair_q * np.int64(n_rows) + pair_p)


def _positive_matrix(pair_q: np.ndarray, pair_p: np.ndarray, n_queries: int, n_rows: int) -> np.ndarray:
    """Dense (n_queries x n_rows) bool: ``M[i, r]`` iff row r is a positive of query i."""
    M = np.zeros((n_queries, n_rows), dtype=bool)
    M[pair_q, pair_p] = True
    return M


def _is_positive(keys: np.ndarray, q: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    return np.isin(q * np.int64(n_rows) + rows, keys)


# -------------------------------------------------------------------------------------------- the core
def _pair_softmax(s_pos: np.ndarray, C: np.ndarray):
    """Per example e: ``loss_e = -s_pos[e] + log(exp(s_pos[e]) + sum_j exp(C[e, j]))``.

    ``C`` (E x K) holds the (corrected) logits of the example's negatives, ``-inf`` where excluded. Returns
    ``(loss (E,), dloss/ds_pos (E,), dloss/dC (E x K))``. Max-shifted (the positive is always present, so the shift
    is finite), and written as ``(m - s_pos) + log1p(rest)`` with ``rest`` the sum of the shifted terms other than
    the maximal one, and ``dloss/ds_pos = -sum_j exp(C_j - m) / z``: no cancellation, so a loss or gradient of
    1e-12 keeps full relative precision (it matters when the positive dominates).
    """
    E, K = C.shape
    m = s_pos.copy()
    neg_max = np.zeros(E, dtype=bool)
    if K:
        jmax = np.argmax(C, axis=1)
        cmax = C[np.arange(E), jmax]
        neg_max = cmax > s_pos
        m[neg_max] = cmax[neg_max]
    e_c = C - m[:, None]
    np.exp(e_c, out=e_c)
    e_pos = np.exp(s_pos - m)
    sum_c = e_c.sum(axis=1)
    rest = sum_c.copy()                          # z - 1, when the positive is the maximal term
    if neg_max.any():                            # ... else drop the maximal negative's 1 without subtracting:
        r = np.flatnonzero(neg_max)              # zero it in place, sum, restore (exp(0) = 1 exactly)
        e_c[r, jmax[r]] = 0.0
        rest[r] = e_pos[r] + e_c.sum(axis=1)[r]
        e_c[r, jmax[r]] = 1.0
    z = 1.0 + rest
    loss = (m - s_pos) + np.log1p(rest)
    e_c /= z[:, None]
    return loss, -sum_c / z, e_c


# |logit| limit: beyond it beta <q, t> (or a difference of two logits) can overflow float64
_LOG_MAX_LOGIT = 690.0


def _check_qt(Q, T, beta):
    """Validated (Q, T, beta); a ValueError naming Q and T when |beta <q, t>| <= beta D max|Q| max|T| could exceed
    e^690 (the logits, and their differences inside the softmax, would overflow float64 into NaN)."""
    Q = check_matrix("Q", Q)
    T = check_matrix("T", T, n_cols=Q.shape[1])
    beta = check_positive("beta", beta)
    mq, mt = float(np.abs(Q).max()), float(np.abs(T).max())
    if mq > 0.0 and mt > 0.0 and (math.log(beta) + math.log(mq) + math.log(mt) + math.log(Q.shape[1])
                                  > _LOG_MAX_LOGIT):
        raise ValueError(f"Q, T: logits beta <q, t> can reach {beta:.3g} * {Q.shape[1]} * {mq:.3g} * {mt:.3g}, "
                         f"beyond float64's range (e^{_LOG_MAX_LOGIT:.0f}); rescale the embeddings")
    return Q, T, beta


def _to_embedding_grads(W, Q: np.ndarray, T: np.ndarray, beta: float):
    """``dQ = beta W T`` and ``dT = beta W^T Q`` for the logit-gradient matrix ``W`` (B x n_rows; dense or CSR)."""
    dQ = np.asarray(W @ T) * beta
    dT = np.asarray(W.T @ Q) * beta
    return dQ, dT


def full_softmax_loss(Q, T, positives, *, beta: float):
    """Full softmax loss over all rows of ``T`` (Eq. 2) and its exact gradient: the gold standard.

    For example (i, p): ``L = -s_ip + log(exp(s_ip) + sum_{j not in positives[i]} exp(s_ij))`` with
    ``s_ij = beta <Q_i, T_j>``; the loss is the mean over examples. Returns ``(loss, dQ, dT)``.
    """
    Q, T, beta = _check_qt(Q, T, beta)
    n_rows = T.shape[0]
    pq, pp = flatten_positives(positives, Q.shape[0], n_rows)
    E = pq.size
    S = beta * (Q @ T.T)
    C = S[pq]                                                  # (E, n_rows): every row is a candidate ...
    C[_positive_matrix(pq, pp, Q.shape[0], n_rows)[pq]] = -np.inf   # ... except the query's positives
    loss, g_pos, g_c = _pair_softmax(S[pq, pp], C)
    R = sp.csr_matrix((np.full(E, 1.0 / E), (pq, np.arange(E))), shape=(Q.shape[0], E))
    W = np.asarray(R @ g_c)                                    # (B, n_rows): sum over each query's examples
    np.add.at(W, (pq, pp), g_pos / E)
    dQ, dT = _to_embedding_grads(W, Q, T, beta)
    return float(loss.mean()), dQ, dT


def pair_log_probs(Q, T, positives, *, beta: float) -> np.ndarray:
    """``log P_e(j)`` (E x n_rows): the softmax of example e = (i, p) of :func:`full_softmax_loss`.

    ``P_e`` is the softmax of the logits ``s_ij`` over ``{p}`` and the rows that are not positives of query i
    (other positives get ``-inf``). Its expectation of ``grad s`` is the negative part of the gradient of Eq. 2,
    so these are the distributions from which :func:`monte_carlo_softmax_loss` expects its samples.
    """
    Q, T, beta = _check_qt(Q, T, beta)
    n_rows = T.shape[0]
    pq, pp = flatten_positives(positives, Q.shape[0], n_rows)
    C = beta * (Q[pq] @ T.T)
    mask = _positive_matrix(pq, pp, Q.shape[0], n_rows)[pq]
    mask[np.arange(pq.size), pp] = False
    C[mask] = -np.inf
    return log_softmax(C, axis=1)


def _check_offsets(name: str, values, shape, *, upper: float | None):
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot be converted to float64 ({exc})") from None
    if a.shape != shape:
        raise ValueError(f"{name}: expected the shape of negatives {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or Inf (a sampled negative must have probability > 0)")
    if upper is not None and a.size and a.max() > upper:
        raise ValueError(f"{name}: log-probabilities must be <= 0, got {a.max()}")
    return a


def _check_negatives(negatives, log_q, n_queries: int, n_rows: int):
    neg = np.asarray(negatives)
    if neg.ndim not in (1, 2):
        raise ValueError(f"negatives: expected a 1-D (shared) or 2-D (one row per query) array, got shape "
                         f"{neg.shape}")
    if neg.ndim == 2 and neg.shape[0] != n_queries:
        raise ValueError(f"negatives: a 2-D array needs one row per query ({n_queries}), got {neg.shape[0]}")
    if neg.size and not np.issubdtype(neg.dtype, np.integer):
        raise TypeError(f"negatives: ids must be integers, got dtype {neg.dtype}")
    flat = check_ids("negatives", neg.reshape(-1), n_rows)
    neg = flat.reshape(neg.shape)
    lq = None if log_q is None else _check_offsets("log_q", log_q, neg.shape, upper=1e-6)
    return neg, lq


def _dense_scores(n_queries: int, n_rows: int, n_cand: int, dim: int) -> bool:
    """Which way :func:`_sampled_core` computes the candidate logits: the dense (B x n_rows) score matrix when it
    holds no more than a third of the gathered (E x K x D) candidate embeddings (then it is also the faster way:
    GEMMs instead of a gather of E K D floats), else the gather."""
    return 3 * n_queries * n_rows <= n_cand * dim


def _sampled_core(Q, T, pq, pp, cand, offset, excl_keys, beta):
    """Shared by the sampled and in-batch losses: example e = (pq[e], pp[e]) against the candidate rows
    ``cand[e]`` (E x K; a broadcast view when the negatives are shared) with logit offsets ``offset`` (E x K or
    None); the candidate (query q, row r) is masked when ``q * n_rows + r`` is in the sorted ``excl_keys``.

    Two ways to the same numbers (equal up to rounding; tests/test_softmax.py checks it): when the negatives
    overlap across the batch (shared negatives, tiled or not), ONE score matrix ``S = beta Q T^T`` (B x n_rows), the
    logits gathered from it, and the gradients as two GEMMs ``dQ = beta W T``, ``dT = beta W^T Q`` with the dense
    logit-gradient matrix W; otherwise (few candidates against many rows) the candidates' embeddings are gathered
    and W is sparse. See :func:`_dense_scores`.
    """
    E, K = cand.shape
    B, n_rows = Q.shape[0], T.shape[0]
    if _dense_scores(B, n_rows, E * K, Q.shape[1]):
        S = (Q @ T.T) * beta                                            # (B, n_rows)
        s_pos = S[pq, pp]
        S.reshape(-1)[excl_keys] = -np.inf
        flat = (pq * np.int64(n_rows))[:, None] + cand                  # (E, K) indices into S.reshape(-1)
        C = np.take(S.reshape(-1), flat)
        if offset is not None:
            C -= offset
        loss, g_pos, g_c = _pair_softmax(s_pos, C)
        W = np.bincount(flat.reshape(-1), weights=g_c.reshape(-1), minlength=B * n_rows)
        np.add.at(W, pq * np.int64(n_rows) + pp, g_pos)
        W = W.reshape(B, n_rows)
        W *= beta / E
        return float(loss.mean()), W @ T, W.T @ Q
    s_pos = beta * np.einsum("ed,ed->e", Q[pq], T[pp])
    C = beta * np.einsum("ed,ekd->ek", Q[pq], T[cand])
    if offset is not None:
        C -= offset
    if excl_keys.size:
        C[_is_positive(excl_keys, pq[:, None], cand, n_rows)] = -np.inf
    loss, g_pos, g_c = _pair_softmax(s_pos, C)
    rows = np.concatenate([np.repeat(pq, K), pq])
    cols = np.concatenate([cand.reshape(-1), pp])
    vals = np.concatenate([g_c.reshape(-1), g_pos]) / E
    W = sp.csr_matrix((vals, (rows, cols)), shape=(B, n_rows))   # duplicates are summed
    dQ, dT = _to_embedding_grads(W, Q, T, beta)
    return float(loss.mean()), dQ, dT


def sampled_softmax_loss(Q, T, positives, negatives, *, beta: float, log_q=None,
                         remove_accidental_hits: bool = True, log_expected_count=None):
    """Sampled softmax (Alg. 4 lines 9-10) over given negatives, with optional log-Q correction.

    For example (i, p) with negatives ``n_1..n_k`` (``negatives`` if 1-D, shared by the batch; ``negatives[i]`` if
    2-D), ``L_hat = -s_ip + log(exp(s_ip) + sum_j exp(s_{i n_j} - c_j))`` where ``c_j = log(k q(n_j))`` when
    ``log_q`` (log proposal probabilities, same shape as ``negatives``) is given and ``c_j = 0`` otherwise (the
    paper's Alg. 4, which applies no correction). With the correction and ``q`` the proposal the negatives were
    drawn from (with replacement, over all targets) and accidental hits removed,
    ``exp(s_p) + sum_j exp(s_nj)/(k q_nj)`` is an unbiased estimate of the example's partition function, so ``L_hat``
    is consistent for Eq. 2 as ``k`` grows (its gradient bias is O(1/k); tests/test_softmax.py measures it).

    ``T`` holds the embeddings of the targets involved; ``positives`` and ``negatives`` are row indices into it
    (same target = same row). ``remove_accidental_hits`` (default) drops a negative that is one of the query's
    positives (its own positive or, per the multi-positive semantics, another one); ``k`` in the correction is
    still the number drawn. With ``False`` nothing is masked. ``k = 0`` gives loss 0 and zero gradients. Returns
    ``(loss, dQ, dT)``, ``dT`` for every row of ``T``.

    ``log_expected_count`` (same shape as ``negatives``, instead of ``log_q``) gives ``c_j`` directly: the log of
    the expected number of times target ``n_j`` appears among the negatives. Use it when the negatives come from
    several sources (e.g. k_1 mined + k_2 uniform): the textbook correction is then
    ``c_j = log(sum_s k_s q_s(n_j))``, which ``log(k q)`` with a per-source ``q`` does not give.

    Cost: when the negatives overlap across the batch (shared, 1-D or tiled into the 2-D array, as with the
    experiments' 64 shared + 64 per-example negatives), the logits come from one (B x n_rows) score matrix and the
    gradients are two GEMMs; few per-query negatives against many rows are gathered instead. Same loss and
    gradients either way (to rounding).
    """
    Q, T, beta = _check_qt(Q, T, beta)
    n_rows = T.shape[0]
    pq, pp = flatten_positives(positives, Q.shape[0], n_rows)
    neg, lq = _check_negatives(negatives, log_q, Q.shape[0], n_rows)
    k = neg.shape[-1]
    if log_expected_count is not None:
        if lq is not None:
            raise ValueError("log_expected_count: give either log_q or log_expected_count, not both")
        c = _check_offsets("log_expected_count", log_expected_count, neg.shape, upper=None)
    else:
        c = None if lq is None else lq + np.log(max(k, 1))
    if neg.ndim == 1:
        cand = np.broadcast_to(neg, (pq.size, k))
        offset = None if c is None else np.broadcast_to(c, (pq.size, k))
    else:
        cand = neg[pq]
        offset = None if c is None else c[pq]
    keys = _membership(pq, pp, n_rows) if remove_accidental_hits else np.zeros(0, dtype=np.int64)
    return _sampled_core(Q, T, pq, pp, cand, offset, keys, beta)


def in_batch_softmax_loss(Q, T_pos, *, beta: float, target_ids=None, positives=None):
    """In-batch negatives: query i's positive is ``T_pos[i]``, its negatives are the other rows of ``T_pos``.

    A row ``j != i`` is dropped from query i's negatives when it is the same target as one of i's positives:
    ``target_ids`` (length B) gives the target id of each row (default: all distinct), ``positives`` (a list of
    B id arrays, in the id space of ``target_ids``) gives every positive of each query (default:
    ``{target_ids[i]}``). Uncorrected, as in-batch training is in the paper's baselines. Returns ``(loss, dQ,
    dT_pos)``.
    """
    Q, T, beta = _check_qt(Q, T_pos, beta)
    B = Q.shape[0]
    if T.shape[0] != B:
        raise ValueError(f"T_pos: expected one row per query ({B}), got {T.shape[0]}")
    if target_ids is None:
        if positives is not None:
            raise ValueError("positives: requires target_ids (the target id of each row of T_pos)")
        tid = np.arange(B, dtype=np.int64)
    else:
        tid = np.asarray(target_ids)
        if tid.shape != (B,):
            raise ValueError(f"target_ids: expected shape ({B},), got {tid.shape}")
        if not np.issubdtype(tid.dtype, np.integer):
            raise TypeError(f"target_ids: ids must be integers, got dtype {tid.dtype}")
        tid = tid.astype(np.int64)
    pq = np.arange(B, dtype=np.int64)
    cand = np.broadcast_to(pq, (B, B))
    same = tid[None, :] == tid[:, None]
    if positives is not None:
        lists = _as_id_lists(positives, B)
        for i, p in enumerate(lists):
            ids = np.asarray(p).reshape(-1)
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(f"positives[{i}]: ids must be integers, got dtype {ids.dtype}")
            same[i] |= np.isin(tid, ids)
    np.fill_diagonal(same, True)
    return _sampled_core(Q, T, pq, pq, cand, None, np.flatnonzero(same), beta)


def monte_carlo_softmax_loss(Q, T, positives, samples, *, beta: float):
    """The Monte Carlo gradient of Eq. 2: ``-grad s_ip + (1/k) sum_j grad s_{i n_j}`` with ``n_j ~ P_e``.

    Paper §2: ``grad log Z = E_{i~P}[grad s_i]``; with ``samples[e]`` drawn from the exact softmax of example
    ``e`` (:func:`pair_log_probs`), the returned gradient is an unbiased estimate of the full-softmax gradient.
    ``samples``: (E, k) row ids, one row per example in :func:`flatten_positives` order. A sample that is another
    positive of the query has probability 0 under ``P_e`` and raises ``ValueError``.

    Returns ``(surrogate, dQ, dT)``; ``surrogate = mean_e(-s_ip + mean_j s_{i n_j})`` is the function whose
    gradient this is, NOT an estimate of the loss (a loss estimate needs ``log Z``).
    """
    Q, T, beta = _check_qt(Q, T, beta)
    n_rows = T.shape[0]
    pq, pp = flatten_positives(positives, Q.shape[0], n_rows)
    E = pq.size
    smp = np.asarray(samples)
    if smp.ndim != 2 or smp.shape[0] != E or smp.shape[1] == 0:
        raise ValueError(f"samples: expected shape ({E}, k) with k >= 1 (one row per example), got {smp.shape}")
    if not np.issubdtype(smp.dtype, np.integer):
        raise TypeError(f"samples: ids must be integers, got dtype {smp.dtype}")
    smp = check_ids("samples", smp.reshape(-1), n_rows).reshape(smp.shape)
    other = _is_positive(_membership(pq, pp, n_rows), pq[:, None], smp, n_rows) & (smp != pp[:, None])
    if other.any():
        e = int(np.argwhere(other)[0, 0])
        raise ValueError(f"samples: example {e} sampled another positive of query {int(pq[e])} (probability 0)")
    k = smp.shape[1]
    s_pos = beta * np.einsum("ed,ed->e", Q[pq], T[pp])
    s_smp = beta * np.einsum("ed,ekd->ek", Q[pq], T[smp])
    surrogate = float(np.mean(-s_pos + s_smp.mean(axis=1)))
    rows = np.concatenate([np.repeat(pq, k), pq])
    cols = np.concatenate([smp.reshape(-1), pp])
    vals = np.concatenate([np.full(E * k, 1.0 / (k * E)), np.full(E, -1.0 / E)])
    W = sp.csr_matrix((vals, (rows, cols)), shape=(Q.shape[0], n_rows))
    dQ, dT = _to_embedding_grads(W, Q, T, beta)
    return surrogate, dQ, dT


# ------------------------------------------------------------------------------------ through the encoder
def encoder_loss_grad(encoder, Xq, Xt, loss_fn, *args, **kwargs):
    """``(loss, dA, dB)`` of ``loss_fn(encoder.encode_queries(Xq), encoder.encode_targets(Xt), *args,
    beta=encoder.beta, **kwargs)``, through the encoder's normalisation (chain rule via its vjps)."""
    Q = encoder.encode_queries(Xq)
    T = encoder.encode_targets(Xt)
    loss, dQ, dT = loss_fn(Q, T, *args, beta=encoder.beta, **kwargs)
    return loss, encoder.query_vjp(Xq, dQ), encoder.target_vjp(Xt, dT)


def full_softmax_grad(encoder, Xq, Xt, positives):
    """Gold standard: :func:`full_softmax_loss` (Eq. 2) over all targets ``Xt``, as ``(loss, dA, dB)``."""
    return encoder_loss_grad(encoder, Xq, Xt, full_softmax_loss, positives)


def sampled_softmax_grad(encoder, Xq, Xt_rows, positives, negatives, *, log_q=None,
                         remove_accidental_hits: bool = True, log_expected_count=None):
    """:func:`sampled_softmax_loss` (Alg. 4 lines 9-10) as ``(loss, dA, dB)``.

    ``Xt_rows``: features of the targets involved (positives and negatives); ``positives`` / ``negatives`` are row
    indices into it.
    """
    return encoder_loss_grad(encoder, Xq, Xt_rows, sampled_softmax_loss, positives, negatives, log_q=log_q,
                             remove_accidental_hits=remove_accidental_hits,
                             log_expected_count=log_expected_count)


def in_batch_softmax_grad(encoder, Xq, Xt_pos, *, target_ids=None, positives=None):
    """:func:`in_batch_softmax_loss` as ``(loss, dA, dB)``; row i of ``Xt_pos`` is query i's positive."""
    return encoder_loss_grad(encoder, Xq, Xt_pos, in_batch_softmax_loss, target_ids=target_ids,
                             positives=positives)


def monte_carlo_softmax_grad(encoder, Xq, Xt, positives, samples):
    """:func:`monte_carlo_softmax_loss` as ``(surrogate, dA, dB)``."""
    return encoder_loss_grad(encoder, Xq, Xt, monte_carlo_softmax_loss, positives, samples)


def gradient_relative_error(est, ref) -> float:
    """``||est - ref||_F / ||ref||_F``; ``est``/``ref`` are arrays or tuples of arrays (e.g. ``(dA, dB)``), in
    which case the norms are over the concatenation. ``0`` if both are zero, ``inf`` if only ``ref`` is."""
    est_t = tuple(est) if isinstance(est, (tuple, list)) else (est,)
    ref_t = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    if len(est_t) != len(ref_t):
        raise ValueError(f"est: expected {len(ref_t)} arrays like ref, got {len(est_t)}")
    parts = []
    for j, (e, r) in enumerate(zip(est_t, ref_t)):
        e = np.asarray(e, dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if e.shape != r.shape:
            raise ValueError(f"est[{j}]: shape {e.shape} differs from ref[{j}] shape {r.shape}")
        if not (np.all(np.isfinite(e)) and np.all(np.isfinite(r))):
            raise ValueError(f"est[{j}]/ref[{j}]: contains NaN or Inf")
        parts.append((e, r))
    # scaled by the largest magnitude so that the squares cannot overflow (gradients near 1e308)
    scale = max((max(float(np.abs(e).max(initial=0.0)), float(np.abs(r).max(initial=0.0))) for e, r in parts),
                default=0.0)
    if scale == 0.0:
        return 0.0
    num = sum(float(np.sum((e / scale - r / scale) ** 2)) for e, r in parts)
    den = sum(float(np.sum((r / scale) ** 2)) for _, r in parts)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))
