"""``python -m refimpl bench tree``: the SG tree and exact top-k against blocked NumPy float32 brute force, one run.

For each N in ``--sizes`` (D = ``--dim``, ``refimpl.data.hierarchical_points`` generated as float32, queries
fresh draws of the same distribution):

* build of a float32 tree (``--dtype``), CPU seconds, depth, nodes, bytes per target (beyond the points too),
  peak resident memory of the process so far (``resource.getrusage``);
* exact top-``k`` (:func:`refimpl.index.topk`, one call for all queries; also with ``scan=0``, pure branch and
  bound, and the one-off cost of the tree's pre-order): CPU ms and inner products per query, and
  equality with :func:`refimpl.index.brute_force_topk` on ``--check`` queries; its floor: inner products x the
  measured cost of one inner product with a random row (prefetched, vectorised);
* the strongest NumPy float32 top-k we could write: queries in batches of B (64, 128, 256: the best is reported),
  one GEMM per block of ``--block`` targets, ``argpartition`` per block, a final ``argpartition`` + sort of the
  candidates; CPU ms per query for each B, and the ratio best-NumPy / tree;
* dynamics (N <= ``--dynamics-max``): ``update_points`` of 1% of the targets + ``maintain`` (U = 0; granularity
  "cluster" as printed in Alg. 3 and our "child"), against the full build.

``--bases`` compares bases at the first N (build, depth, top-k inner products, certified log Z gap at beta = 20
over a clustering of about ``--clusters`` clusters). Times are CPU time of this process (one BLAS thread); compare
the ratios measured in the same run.
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np
from numba import njit

from refimpl.benchmarks import write_json
from refimpl.cliargs import ArgumentParser, integer, out_file, real, real_list, size, size_list
from refimpl.data import hierarchical_points
from refimpl.index import DEFAULT_BASE, MAX_BASE, MIN_BASE, SGTree, brute_force_topk, dot, prefetch_row, topk
from refimpl.index.search import preorder
from refimpl.sampling.bounds import certified_log_max_ratio, cluster_eps, log_partition_bounds

BATCHES = (64, 128, 256)


def _cpu(f, *a, **kw):
    """(result, CPU seconds of this process)."""
    c = time.process_time()
    out = f(*a, **kw)
    return out, time.process_time() - c


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def data(n, nq, dim, seed):
    """(targets (n, dim) float32, queries (nq, dim) float64 of float32 values) from the hierarchical mixture."""
    P = hierarchical_points(n + nq, dim, rng=seed, dtype=np.float32)
    Q = P[n:].astype(np.float64)
    return P[:n], Q


@njit(cache=True)
def _random_reads(P, Q, rows):
    """Sum of <Q[i % B], P[rows[i]]> over random rows, prefetched 8 ahead: the cost of one inner product with a
    random row, the unit of the tree's floor."""
    s = 0.0
    for i in range(rows.shape[0]):
        if i + 8 < rows.shape[0]:
            prefetch_row(P, rows[i + 8])
        s += dot(Q, i % Q.shape[0], P, rows[i])
    return s


def random_read_ns(P, Q, seed, m=200_000):
    """CPU nanoseconds per inner product of a query with a uniformly random row of P (rows read once each)."""
    rows = np.random.default_rng(seed).integers(0, P.shape[0], size=m)
    _random_reads(P, Q, rows[:10])
    _, c = _cpu(_random_reads, P, Q, rows)
    return 1e9 * c / m


def numpy_topk(T, Q, k, *, batch, block):
    """Blocked batched float32 top-k as a NumPy user writes it: for each batch of queries, one GEMM per block of
    targets, ``argpartition`` keeps each block's k best, a final ``argpartition`` + sort by (-score, id)."""
    nq, n = Q.shape[0], T.shape[0]
    out = np.empty((nq, k), dtype=np.int64)
    for s in range(0, nq, batch):
        Qb = Q[s:s + batch]
        cs, ci = [], []
        for t0 in range(0, n, block):
            S = Qb @ T[t0:t0 + block].T
            kk = min(k, S.shape[1])
            part = np.argpartition(S, S.shape[1] - kk, axis=1)[:, S.shape[1] - kk:]
            cs.append(np.take_along_axis(S, part, axis=1))
            ci.append(part + t0)
        S, I = np.concatenate(cs, axis=1), np.concatenate(ci, axis=1)
        part = np.argpartition(S, S.shape[1] - k, axis=1)[:, S.shape[1] - k:]
        sc, ids = np.take_along_axis(S, part, axis=1), np.take_along_axis(I, part, axis=1)
        order = np.lexsort((ids, -sc), axis=1)
        out[s:s + batch] = np.take_along_axis(ids, order, axis=1)
    return out


def _warm(dtype, dim, k):
    """Compile (or load from cache) every kernel outside the timings, on a small tree of the same dtype."""
    X = hierarchical_points(400, dim, rng=0)
    t = SGTree.build(X[:300], dtype=dtype, rng=0)
    topk(t, X[300:302], min(k, 300))
    brute_force_topk(t.points, X[300:302], min(k, 300))
    for gran in ("cluster", "child"):
        w = t.copy()
        w.update_points(np.arange(20), X[300:320], repair=False)
        w.maintain(0.0, granularity=gran)


def bench_size(n, *, dim, nq, k, base, seed, check, block, dtype, dynamics_max):
    T, Q = data(n, nq, dim, seed)
    row = {"N": n, "D": dim, "base": base, "dtype": np.dtype(dtype).name, "queries": nq, "k": k}
    row["peak_rss_gib_data"] = peak_rss_gib()
    T = T if dtype == T.dtype else T.astype(dtype)
    tree, c_build = _cpu(SGTree.build, T, base=base, rng=seed, dtype=dtype, copy=False)
    del T  # the tree owns the rows now
    P = tree.points
    mem = tree.memory_bytes()
    row.update(build_cpu_s=c_build, peak_rss_gib_build=peak_rss_gib(), depth=tree.depth(), nodes=tree.n_nodes,
               bytes_per_target=mem / n, bytes_per_target_beyond_points=(mem - P.nbytes) / n)
    _, row["preorder_cpu_s"] = _cpu(preorder, tree)  # once per tree version (cached): not in the top-k time
    res0, c = _cpu(topk, tree, Q, k, scan=0)
    row["topk_noscan_cpu_ms"] = 1e3 * c / nq
    row["topk_noscan_inner_products"] = float(res0.stats["inner_products"].mean())
    res, c = _cpu(topk, tree, Q, k)
    assert np.array_equal(res.ids, res0.ids)
    row["topk_cpu_ms"] = 1e3 * c / nq
    row["topk_inner_products"] = float(res.stats["inner_products"].mean())
    row["topk_inner_products_over_N"] = row["topk_inner_products"] / n
    row["random_read_ns"] = random_read_ns(P, Q, seed)
    row["topk_floor_ms"] = row["topk_inner_products"] * row["random_read_ns"] * 1e-6
    row["topk_over_floor"] = row["topk_cpu_ms"] / row["topk_floor_ms"]
    m = min(check, nq)
    ref = brute_force_topk(P, Q[:m], k)
    row["exact_equal_brute_force"] = bool(np.array_equal(res.ids[:m], ref.ids))
    Q32 = Q.astype(P.dtype)
    row["numpy_cpu_ms"] = {}
    for b in BATCHES:
        ids, c = _cpu(numpy_topk, P, Q32, k, batch=b, block=block)
        row["numpy_cpu_ms"][b] = 1e3 * c / nq
        if b == BATCHES[0]:
            row["same_sets_as_numpy"] = float(np.mean([set(x) == set(y) for x, y in zip(res.ids, ids)]))
    best = min(row["numpy_cpu_ms"], key=row["numpy_cpu_ms"].get)
    row["numpy_best_batch"] = best
    row["numpy_best_cpu_ms"] = row["numpy_cpu_ms"][best]
    row["speedup_vs_numpy"] = row["numpy_best_cpu_ms"] / max(row["topk_cpu_ms"], 1e-9)
    if n <= dynamics_max:
        rng = np.random.default_rng(seed + 1)
        sel = rng.choice(n, max(1, n // 100), replace=False)
        new = P[sel] + rng.normal(size=(sel.size, dim)) * (0.05 / np.sqrt(dim))
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        for gran in ("cluster", "child"):
            t2 = tree.copy()
            _, c_up = _cpu(t2.update_points, sel, new, repair=False)
            st, c_m = _cpu(t2.maintain, 0.0, granularity=gran)
            row[f"update1pct_{gran}"] = {"update_cpu_s": c_up, "maintain_cpu_s": c_m, **st,
                                         "speedup_vs_build": c_build / max(c_up + c_m, 1e-9)}
            if n <= 20000:  # the independent checker is O(N depth) Python: small N only
                row[f"update1pct_{gran}"]["tree_valid"] = t2.check_invariants() == []
            del t2
    row["peak_rss_gib"] = peak_rss_gib()
    return row


def bench_bases(n, bases, *, dim, nq, k, seed, n_clusters):
    P = hierarchical_points(n + nq, dim, rng=seed)
    T, Q = np.ascontiguousarray(P[:n]), np.ascontiguousarray(P[n:])
    rows = []
    for b in bases:
        tree, c_build = _cpu(SGTree.build, T, base=b, rng=seed)
        res, c = _cpu(topk, tree, Q, k)
        lo, hi = tree.level_range()
        best = min(range(lo, hi + 2), key=lambda lv: abs(len(tree.clustering(lv)) - n_clusters))
        C = tree.clustering(best)
        gaps, cert = [], []
        for q in Q:
            s = 20.0 * (T[C.reps] @ q)
            eps = cluster_eps(20.0, float(np.linalg.norm(q)), C.radii)
            zl, zh = log_partition_bounds(s, C.sizes, eps)
            gaps.append(zh - zl)
            cert.append(certified_log_max_ratio(s, C.sizes, eps))
        rows.append({"base": b, "build_cpu_s": c_build, "topk_cpu_ms": 1e3 * c / nq, "depth": tree.depth(),
                     "levels": [lo, hi], "topk_ip": float(res.stats["inner_products"].mean()), "level": best,
                     "clusters": len(C), "mean_radius": float(C.radii.mean()), "logZ_gap": float(np.mean(gaps)),
                     "cert_log_max_ratio": float(np.mean(cert))})
        r = rows[-1]
        print(f"base {b:5.2f}: build {c_build:6.2f} s CPU, depth {r['depth']:3d}, top-{k} {r['topk_cpu_ms']:6.3f} ms "
              f"CPU, {r['topk_ip']:8.0f} inner products; level {best} ({len(C)} clusters, mean radius "
              f"{r['mean_radius']:.3f}): log Z gap {r['logZ_gap']:7.2f}, certified log max P/Q "
              f"{r['cert_log_max_ratio']:7.2f}", flush=True)
    return rows


def _parse(argv):
    ap = ArgumentParser(prog="python -m refimpl bench tree", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=size_list, default="1e5,1e6", help="comma-separated N (default 1e5,1e6)")
    ap.add_argument("--dim", type=integer(1, 4096), default=64)
    ap.add_argument("--queries", type=size, default=256)
    ap.add_argument("--k", type=size, default=10)
    ap.add_argument("--base", type=real(MIN_BASE, MAX_BASE), default=DEFAULT_BASE)
    ap.add_argument("--bases", type=real_list(MIN_BASE), default=None,
                    help="compare these bases at N = the first size instead")
    ap.add_argument("--clusters", type=size, default=1000)
    ap.add_argument("--seed", type=integer(0, 2**62), default=0)
    ap.add_argument("--check", type=integer(0), default=8, help="queries checked against brute force (>= 0)")
    ap.add_argument("--block", type=size, default=65536, help="targets per GEMM block of the NumPy baseline")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="point storage of the tree")
    ap.add_argument("--dynamics-max", type=real(0.0), default=1e6, help="run the update/maintain part up to this N")
    ap.add_argument("--out", type=out_file, default="bench_tree.json")
    args = ap.parse_args(argv)
    for b in args.bases or []:
        if b > MAX_BASE:
            ap.error(f"argument --bases: {b} outside [{MIN_BASE}, {MAX_BASE}]")
    if args.k > min(args.sizes):
        ap.error(f"argument --k: {args.k} exceeds the smallest size {min(args.sizes)}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    dtype = np.dtype(args.dtype)
    out = {"benchmark": "tree", "args": vars(args), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
           "loadavg_start": os.getloadavg()}
    _warm(dtype, args.dim, args.k)
    if args.bases:
        out["bases"] = bench_bases(args.sizes[0], args.bases, dim=args.dim, nq=args.queries, k=args.k,
                                   seed=args.seed, n_clusters=args.clusters)
    else:
        print("CPU time of this process; top-k: ms per query (one call for all queries); NumPy: blocked float32 "
              "top-k, best batch B of " + ", ".join(map(str, BATCHES)))
        print(f"{'N':>9} {'build s':>8} {'peak GiB':>8} {'depth':>5} {'B/tgt':>6} {'B/tgt-pts':>9} {'topk ms':>8} "
              f"{'ip/query':>9} {'ip/N':>7} {'floor ms':>8} {'numpy ms':>8} {'B':>4} {'speedup':>7} {'exact':>5}",
              flush=True)
        rows = []
        for n in args.sizes:
            r = bench_size(n, dim=args.dim, nq=args.queries, k=args.k, base=args.base, seed=args.seed,
                           check=args.check, block=args.block, dtype=dtype, dynamics_max=args.dynamics_max)
            rows.append(r)
            print(f"{n:9d} {r['build_cpu_s']:8.1f} {r['peak_rss_gib']:8.2f} {r['depth']:5d} "
                  f"{r['bytes_per_target']:6.0f} {r['bytes_per_target_beyond_points']:9.0f} {r['topk_cpu_ms']:8.3f} "
                  f"{r['topk_inner_products']:9.0f} {r['topk_inner_products_over_N']:7.4f} {r['topk_floor_ms']:8.3f} "
                  f"{r['numpy_best_cpu_ms']:8.2f} {r['numpy_best_batch']:4d} {r['speedup_vs_numpy']:7.2f} "
                  f"{str(r['exact_equal_brute_force']):>5}", flush=True)
            print(f"{'':9} NumPy ms per query by batch: " + ", ".join(
                f"B={b}: {v:.2f}" for b, v in r["numpy_cpu_ms"].items()), flush=True)
            print(f"{'':9} top-k without range scans (scan=0): {r['topk_noscan_cpu_ms']:.3f} ms, "
                  f"{r['topk_noscan_inner_products']:.0f} inner products per query; pre-order (once per tree "
                  f"version) {r['preorder_cpu_s']:.2f} s CPU", flush=True)
            for gran in ("cluster", "child"):
                if f"update1pct_{gran}" in r:
                    u = r[f"update1pct_{gran}"]
                    print(f"{'':9} update 1% + maintain(U=0, {gran:7s}): {u['update_cpu_s'] + u['maintain_cpu_s']:7.3f}"
                          f" s CPU = {u['speedup_vs_build']:6.1f}x faster than the build; {u['clusters_rebuilt']} "
                          f"clusters + {u['subtrees_reinserted']} subtrees, {u['points_reinserted']} points "
                          "reinserted", flush=True)
        out["sizes"] = rows
    out["loadavg_end"] = os.getloadavg()
    write_json(args.out, out)
    print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
