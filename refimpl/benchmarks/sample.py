"""``python -m refimpl bench sample``: every softmax sampler against the best batched NumPy float32 sampler, with
each sampler's physical floor (paper §3: Eq. 3-5, Alg. 1, Eq. 14).

Data sets (``--data``):

* ``hierarchical``: :func:`refimpl.data.hierarchical_points` (unit norms, D = ``--dim``).
* ``text``: target embeddings of an encoder trained by refimpl on a real text task: ``--text-data DIR`` (the GCIDE
  reverse dictionary written by ``python -m refimpl data gcide DIR``), trained as ``python -m refimpl train --data
  DIR --miner uniform`` does (the text defaults: D = 256 whatever ``--dim``; ``--train-steps``); ``--text-cache``
  keeps the embeddings between runs. The M real target embeddings give N <= M; a larger N tiles them, copy c >= 1
  perturbed by N(0, (0.05)^2 I / D) and renormalised (synthetic beyond M). Without ``--text-data`` the data set is
  skipped with a message.

Queries: ``--queries`` rows near random targets (a target plus N(0, 0.1^2 I / D), normalised), answered as ONE batch
by every sampler, once (a cold run: no repetition warms the caches with the queries' neighbourhoods), with a
``numpy.random.Generator`` made outside the timed region, as the baseline's. Per N, per k in ``--ks``, reported per
sampler: CPU ms per query (time.process_time of the whole batch / B), inner products per query and per draw, the
floor = inner products x the measured cost of one random-row inner product (a Numba loop over random rows with a
vectorised float64 dot, measured on the same points; inner products computed by a GEMM (``stats
["gemm_inner_products"]``: the baseline's and ``exact``'s N, the adaptive sampler's start level and its batched
brute force) at the measured cost of a GEMM inner product instead, float32 for those of ``stats
["gemm32_inner_products"]`` (the baseline's, ``exact``'s and the adaptive sampler's screened brute force on the
float32 rows), float64 for the others), the distance to it, and the speedup over the baseline. Baseline: what a
NumPy user writes: float32 targets, queries in blocks of B_b (best of ``--baseline-batches`` reported), one GEMM
per block of 65,536 targets, exp(s - beta ||q|| max ||t||) (no max pass needed), masses per chunk of 4,096 targets
(only the (B_b, N / 4,096) chunk masses are kept), then each draw picks a chunk by its mass and a row inside it by
exp/cumsum over that chunk's recomputed logits (exact up to float32 rounding).

Targets are generated and stored as float32 (the tree's storage is the same array; every sampler accumulates its
logits in float64). Samplers: ``exact`` (brute force, ``sample_exact`` on the float32 rows), ``rejection`` (Alg. 1,
auto level), ``flat`` (Eq. 3-5, auto level), ``astar`` (A* sampling over the tree's Gumbel process),
``adaptive`` (Eq. 3-5 on an envelope refined per query from a start level scored by one GEMM, shared by its draws),
``mh`` (Alg. 2 + certified refinement + Eq. 6 chains; approximate). For Alg. 1 the acceptance rate per attempt and
the proposal-weighted beta ||q|| rho of its start clusters (what sets it: acceptance ~ e^{-beta rho}) are printed.
A JSON file with every number is written (``--json``).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
from numba import njit

from refimpl.benchmarks import write_json
from refimpl.cliargs import (ArgumentParser, choice_list, in_dir, integer, integer_list, out_file, real, size,
                             size_list)
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree
from refimpl.mining import make_miner
from refimpl.sampling import samplers as S
from refimpl.index.search import preorder
from refimpl.sampling.clustering import level_clustering, suffix_radii
from refimpl.text import load_text_pairs
from refimpl.training import TEXT_DEFAULTS, train

SAMPLERS = ("exact", "rejection", "flat", "astar", "adaptive", "mh")
DATA = ("hierarchical", "text")
BLOCK = 1 << 16  # targets per GEMM
CHUNK = 1 << 12  # targets per mass entry: a draw recomputes one chunk


# ----------------------------------------------------------------------------------------------------------------
# the floor: measured cost of one random-row inner product


@njit(cache=True, fastmath={"contract", "reassoc"})
def _random_dots(points, idx, q):
    s = 0.0
    for j in range(idx.shape[0]):
        i = idx[j]
        acc = 0.0
        for d in range(q.shape[0]):
            acc += points[i, d] * q[d]
        s += acc
    return s


def _random_read_ns(points, rng, m=2_000_000):
    """CPU ns per inner product with a random row (best of 3)."""
    idx = rng.integers(0, points.shape[0], m)
    q = rng.normal(size=points.shape[1])
    _random_dots(points, idx[:10], q)
    best = math.inf
    for _ in range(3):
        t = time.process_time()
        _random_dots(points, idx, q)
        best = min(best, time.process_time() - t)
    return 1e9 * best / m


def _gemm_ns(points, rng, dtype, b=64, m=1 << 16):
    """CPU ns per inner product of a GEMM in ``dtype`` of ``b`` queries against ``m`` rows (best of 3): float64 for
    the adaptive sampler's start level, float32 for brute force on float32 rows."""
    m = min(m, points.shape[0])
    R = np.ascontiguousarray(points[:m], dtype)
    Q = rng.normal(size=(b, points.shape[1])).astype(dtype)
    best = math.inf
    for _ in range(3):
        t = time.process_time()
        Q @ R.T
        best = min(best, time.process_time() - t)
    return 1e9 * best / (b * m)


# ----------------------------------------------------------------------------------------------------------------
# the baseline a NumPy user writes


def _numpy_float32_sampler(X32, norms_max, Q, k, beta, bs, rng):
    """k draws per query (with replacement), float32, blocks of ``bs`` queries x BLOCK targets; returns ids (B, k).

    When the (bs, N) logits fit in 256 MB: one GEMM, exp, cumsum and a row-wise inverse CDF. Otherwise pass 1: one
    GEMM per block, exp(s - beta ||q|| max ||t||), masses per CHUNK of targets; pass 2: each draw picks a chunk by
    its mass (inverse CDF) and a row in it by exp/cumsum over that chunk's recomputed logits."""
    n = X32.shape[0]
    out = np.empty((Q.shape[0], k), np.int64)
    if bs * n <= 1 << 26:  # the whole (bs, N) logit block fits in 256 MB: one pass, row-wise inverse CDF
        for b0 in range(0, Q.shape[0], bs):
            Qb = Q[b0:b0 + bs].astype(np.float32)
            shift = (beta * np.linalg.norm(Qb, axis=1) * norms_max).astype(np.float32)[:, None]
            S = Qb @ X32.T
            S *= np.float32(beta)
            S -= shift
            np.exp(S, out=S)
            c = np.cumsum(S, axis=1, dtype=np.float64)
            rows = np.arange(Qb.shape[0])[:, None]
            u = rng.random((Qb.shape[0], k)) + rows
            pos = np.searchsorted((c / c[:, -1:] + rows).ravel(), u, side="right") - rows * n
            out[b0:b0 + Qb.shape[0]] = np.clip(pos, 0, n - 1)
        return out
    nch = (n + CHUNK - 1) // CHUNK
    for b0 in range(0, Q.shape[0], bs):
        Qb = Q[b0:b0 + bs].astype(np.float32)
        nb = Qb.shape[0]
        shift = (beta * np.linalg.norm(Qb, axis=1) * norms_max).astype(np.float32)[:, None]
        mass = np.zeros((nb, nch), np.float64)
        for j0 in range(0, n, BLOCK):
            S = Qb @ X32[j0:j0 + BLOCK].T
            S *= np.float32(beta)
            S -= shift
            np.exp(S, out=S)
            w = S.shape[1]
            full = w // CHUNK * CHUNK
            mass[:, j0 // CHUNK:(j0 + full) // CHUNK] = S[:, :full].reshape(nb, -1, CHUNK).sum(axis=2, dtype=np.float64)
            if full < w:
                mass[:, (j0 + full) // CHUNK] = S[:, full:].sum(axis=1, dtype=np.float64)
        cm = np.cumsum(mass, axis=1)
        u = rng.random((nb, k)) * cm[:, -1:]
        ch = np.minimum((cm[:, None, :] <= u[:, :, None]).sum(axis=2), nch - 1)
        for r in range(nb):
            for t in range(k):
                j = ch[r, t] * CHUNK
                c = np.cumsum(np.exp(beta * (X32[j:j + CHUNK] @ Qb[r]) - shift[r]), dtype=np.float64)
                out[b0 + r, t] = j + min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), c.size - 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# data


def _text_embeddings(data_dir, steps, seed, cache):
    """Unit-norm target embeddings of the encoder ``python -m refimpl train --data DIR --miner uniform`` trains (the
    text defaults, :data:`refimpl.training.TEXT_DEFAULTS`, ``steps`` steps) on DIR/targets.tsv + queries.tsv (the
    GCIDE reverse dictionary: ``python -m refimpl data gcide DIR``); loaded from ``cache`` (.npz) when it holds
    them, else trained and written there. Returns (embeddings (M, dim) float64, description)."""
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            return np.asarray(z["T"], np.float64), str(z["info"])
    d = TEXT_DEFAULTS
    ds = load_text_pairs(os.path.join(data_dir, "targets.tsv"), os.path.join(data_dir, "queries.tsv"),
                         n_features=d["n_features"])
    res = train(ds, make_miner("uniform", k=d["k"]), steps=steps, batch_size=min(d["batch_size"], ds.train_ids.size),
                dim=d["dim"], beta=20.0, lr=d["lr"], in_batch=d["in_batch"], init=d["init"], tied=d["tied"],
                init_scale=d["init_scale"], input_weights=d["input_weights"],
                log_q_correction=d["log_q_correction"], sparse_updates=True, seed=seed,
                progress=False)
    T = np.ascontiguousarray(res.encoder.encode_targets(ds.target_features), dtype=np.float64)
    f = res.final
    info = (f"{data_dir}: {T.shape[0]} targets, D = {T.shape[1]}, text defaults with uniform negatives, {steps} steps, "
            f"test R@1 {f.get('R@1', 0):.3f} R@10 {f.get('R@10', 0):.3f} R@100 {f.get('R@100', 0):.3f}")
    if cache:
        np.savez(cache, T=T, info=info)
    return T, info


def _tile(T, n, rng):
    """n unit rows: T tiled, copies after the first perturbed by N(0, 0.05^2 I / D) and renormalised."""
    reps = -(-n // T.shape[0])
    X = np.tile(T, (reps, 1))[:n]
    if reps > 1:
        X[T.shape[0]:] += 0.05 / math.sqrt(T.shape[1]) * rng.normal(size=(n - T.shape[0], T.shape[1]))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def _queries(X, n, rng):
    idx = rng.choice(X.shape[0], size=n, replace=False)
    Q = X[idx] + 0.1 * rng.normal(size=(n, X.shape[1])) / math.sqrt(X.shape[1])
    return Q / np.linalg.norm(Q, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# runs


def _sampler(name, X, tree, Q, k, beta, seed):
    if name == "exact":
        return S.sample_exact(X, Q, k, beta=beta, rng=seed)
    if name == "rejection":
        return S.sample_rejection(tree, Q, k, beta=beta, rng=seed)
    if name == "flat":
        return S.sample_flat_rejection(tree, Q, k, beta=beta, rng=seed)
    if name == "astar":
        return S.sample_astar(tree, Q, k, beta=beta, rng=seed)
    if name == "adaptive":
        return S.sample_adaptive(tree, Q, k, beta=beta, rng=seed)
    return S.sample_mh(tree, Q, k, beta=beta, rng=seed, max_refine_clusters=2000)


def _beta_rho(tree, Q, beta, levels):
    """Mean over queries of the proposal-mass-weighted beta ||q|| rho(C) of the start clusters C_(level)."""
    out = []
    for q, L in zip(Q, levels):
        cl = level_clustering(tree, int(L))
        s = beta * (tree.points[cl.reps] @ q)
        eps = beta * np.linalg.norm(q) * cl.radii
        w = np.log(cl.sizes) + s + eps
        w = np.exp(w - w.max())
        out.append(float(np.sum(w * eps) / np.sum(w)))
    return float(np.mean(out))


def _parse(argv):
    ap = ArgumentParser(prog="python -m refimpl bench sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=integer_list(2), default="1e5,1e6", help="comma-separated N (default 1e5,1e6)")
    ap.add_argument("--ks", type=size_list, default="10,64", help="draws per query (default 10,64)")
    ap.add_argument("--data", type=choice_list(DATA), default="hierarchical,text", help=f"data sets among {DATA}")
    ap.add_argument("--dim", type=integer(1, 4096), default=64)
    ap.add_argument("--beta", type=real(0.0, 1e4, strict_low=True), default=20.0)
    ap.add_argument("--queries", type=size, default=64, help="queries, answered as one batch (default 64)")
    ap.add_argument("--baseline-batches", type=size_list, default="16,64,256",
                    help="query block sizes tried for the baseline")
    ap.add_argument("--samplers", type=choice_list(SAMPLERS), default=",".join(SAMPLERS))
    ap.add_argument("--text-data", type=in_dir, default=None,
                    help="the text data set's DIR (python -m refimpl data gcide DIR); without it 'text' is skipped")
    ap.add_argument("--text-cache", default=None, help="an .npz holding the trained text embeddings (written when "
                    "absent, read when present)")
    ap.add_argument("--train-steps", type=size, default=TEXT_DEFAULTS["steps"], help="text encoder training steps")
    ap.add_argument("--seed", type=integer(0, 2**62), default=0)
    ap.add_argument("--json", type=out_file, default="bench_sample.json", help="output JSON path")
    args = ap.parse_args(argv)
    if args.queries > min(args.sizes):
        ap.error(f"argument --queries: {args.queries} exceeds the smallest size {min(args.sizes)}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    rng = np.random.default_rng(args.seed)
    out = {"config": vars(args), "results": []}
    Xw = hierarchical_points(2000, args.dim, rng=1)  # warm-up: Numba compilation, not timed
    tw = SGTree.build(Xw, rng=1, dtype=np.float32)
    for name in args.samplers:
        _sampler(name, Xw, tw, Xw[:2], 2, args.beta, 0)
    _numpy_float32_sampler(Xw.astype(np.float32), 1.0, Xw[:2], 2, args.beta, 2, rng)
    for data in args.data:
        base_T = None
        if data == "text":
            t0 = time.process_time()
            if args.text_data is None:
                print("\n[text] skipped: no --text-data DIR (python -m refimpl data gcide DIR)")
                continue
            base_T, info = _text_embeddings(args.text_data, args.train_steps, args.seed, args.text_cache)
            print(f"\n[text] {info} ({time.process_time() - t0:.0f} s CPU; N above {base_T.shape[0]} tiles them "
                  "with perturbed copies)")
        for n in args.sizes:
            if base_T is None:
                X = hierarchical_points(n, args.dim, rng=args.seed + n, dtype=np.float32)
            else:
                X = _tile(base_T, n, rng).astype(np.float32)
            t0 = time.process_time()
            tree = SGTree.build(X, rng=args.seed, dtype=np.float32, copy=False)  # X is the tree's storage
            build_s = time.process_time() - t0
            t0 = time.process_time()  # per tree version, cached: the suffix radii, the pre-order, the adaptive start
            suffix_radii(tree)
            preorder(tree)
            for c in S.START_SQRT:  # the adaptive sampler's candidate start levels
                S.adaptive_start(tree, c * math.sqrt(n))
            pre_s = time.process_time() - t0
            ns_ip = _random_read_ns(X, rng)
            ns_gemm = _gemm_ns(X, rng, np.float64)
            ns_gemm32 = _gemm_ns(X, rng, np.float32)
            X32 = X
            nmax = float(np.linalg.norm(X32, axis=1).max())
            Q = _queries(X, args.queries, rng)
            entry = {"data": data, "N": n, "build_cpu_s": build_s, "per_version_precompute_cpu_s": pre_s,
                     "ns_per_random_inner_product": ns_ip, "ns_per_gemm_inner_product": ns_gemm,
                     "ns_per_gemm32_inner_product": ns_gemm32,
                     "tree_levels": list(tree.level_range()), "by_k": []}
            print(f"\n[{data}] N = {n:,}: tree build {build_s:.1f} s CPU (+ {pre_s:.2f} s once per tree version: "
                  f"suffix radii, pre-order, the adaptive sampler's start level), levels {tree.level_range()}, "
                  f"{ns_ip:.1f} ns per random-row inner product, {ns_gemm:.2f} / {ns_gemm32:.2f} ns per float64 / "
                  f"float32 GEMM inner product, "
                  f"beta {args.beta}, D {X.shape[1]}, "
                  f"{args.queries} queries in one batch")
            for k in args.ks:
                base = {}
                for bs in args.baseline_batches:
                    t = time.process_time()
                    _numpy_float32_sampler(X32, nmax, Q, k, args.beta, bs, rng)
                    base[bs] = 1e3 * (time.process_time() - t) / args.queries
                best_bs = min(base, key=base.get)
                t_base = base[best_bs]
                rows = [{"sampler": f"numpy float32 (B={best_bs})", "ms_per_query": t_base,
                         "baseline_ms_by_batch": base, "ip_per_query": float(n), "gemm_ip_per_query": float(n),
                         "gemm32_ip_per_query": float(n)}]
                for name in args.samplers:
                    gen = np.random.default_rng(args.seed + 7)  # made outside the timed region, as the baseline's
                    t = time.process_time()
                    r = _sampler(name, X, tree, Q, k, args.beta, gen)
                    ms = 1e3 * (time.process_time() - t) / args.queries
                    ip = float(np.mean(r.stats["inner_products"]))
                    row = {"sampler": name, "ms_per_query": ms, "ip_per_query": ip,
                           "gemm_ip_per_query": float(np.mean(r.stats.get("gemm_inner_products", 0))),
                           "gemm32_ip_per_query": float(np.mean(r.stats.get("gemm32_inner_products", 0)))}
                    if name in ("rejection", "flat", "adaptive"):
                        row["acceptance"] = float(np.sum(r.stats["accepted"]) / max(np.sum(r.stats["attempts"]), 1))
                        row["attempts_per_draw"] = float(np.mean(r.stats["attempts"])) / max(k, 1)
                        row["levels"] = np.asarray(r.stats["level"]).tolist()
                        row["exact_fallbacks"] = int(np.sum(r.stats["exact_fallbacks"]))
                        row["selection_ip_per_query"] = float(np.mean(r.stats["selection_inner_products"]))
                    if name == "rejection":
                        row["beta_rho_weighted"] = _beta_rho(tree, Q, args.beta, r.stats["level"])
                    if name == "mh":
                        row["tv_bound_eq6_max"] = float(np.max(r.stats["tv_bound"]))
                    rows.append(row)
                for row in rows:
                    row["ip_per_draw"] = row["ip_per_query"] / k
                    g, g32 = row["gemm_ip_per_query"], row["gemm32_ip_per_query"]
                    row["floor_ms"] = ((row["ip_per_query"] - g) * ns_ip + (g - g32) * ns_gemm + g32 * ns_gemm32) * 1e-6
                    row["x_floor"] = row["ms_per_query"] / row["floor_ms"]
                    row["speedup_vs_baseline"] = t_base / row["ms_per_query"]
                entry["by_k"].append({"k": k, "rows": rows})
                print(f"  k = {k} draws per query (baseline by query block: "
                      + ", ".join(f"B={b}: {v:.2f} ms" for b, v in base.items()) + ")")
                print(f"  {'sampler':22s} {'ms/query':>9s} {'x baseline':>10s} {'ip/query':>10s} {'ip/draw':>9s} "
                      f"{'floor ms':>9s} {'x floor':>8s}  notes")
                for row in rows:
                    note = ""
                    if "acceptance" in row:
                        note = (f"acceptance {row['acceptance']:.3f}, selection ip "
                                f"{row['selection_ip_per_query']:.0f}, attempts/draw {row['attempts_per_draw']:.1f}")
                    if "beta_rho_weighted" in row:
                        note += f", weighted beta*rho {row['beta_rho_weighted']:.2f}"
                    if "tv_bound_eq6_max" in row:
                        note = f"approximate: Eq. 6 TV <= {row['tv_bound_eq6_max']:.3g}"
                    print(f"  {row['sampler']:22s} {row['ms_per_query']:9.3f} {row['speedup_vs_baseline']:10.2f} "
                          f"{row['ip_per_query']:10.0f} {row['ip_per_draw']:9.1f} {row['floor_ms']:9.3f} "
                          f"{row['x_floor']:8.2f}  {note}")
            out["results"].append(entry)
            del tree, X, X32
            write_json(args.json, out)
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
