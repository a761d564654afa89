"""``python -m refimpl bench tree``: the SG tree (issue 3) against NumPy brute force, in one run.

For each N in ``--sizes`` (default 1e4, 1e5, 1e6; D = 64, ``refimpl.data.hierarchical_points``; queries are fresh
draws of the same distribution):

* build time (batch build), depth, explicit nodes, memory per target and its ratio to the raw float32 matrix;
* exact top-``k`` per query: :func:`refimpl.index.search.topk` (ball and linear bounds) time and inner products, against
  NumPy brute force (batched ``Q @ T.T`` + ``argpartition`` + sort of the k, chunks of queries) and its GEMM alone;
  the tree's answers are checked equal to brute force;
* dynamics: ``update_points`` of 1% of the targets (a random drift of norm ~0.05, renormalised) + ``maintain(U)``
  (Alg. 3, ``granularity`` "cluster" as printed and our "child" refinement) for U = 0 and U = 2 x the largest move,
  against the full build (CPU seconds). With U > 0 Alg. 3 demands a margin U at every level, so a drift bound of the
  size of the moves rebuilds most of the tree: U = 0 (the statistics are exact after update_points) is the
  meaningful repair.

``--bases`` instead compares bases at one N (build time, depth, top-k inner products, and certified bound
tightness: log Z_hi - log Z_lo and the certified log max P/Q at beta = 20 over the clustering with about
``--clusters`` clusters). Single thread: BLAS thread variables are set to 1 before NumPy loads when possible, and
OpenBLAS is told through ctypes; the JSON records what was achieved. Timings on this shared machine are noisy:
compare the ratios measured in the same run.
"""
from __future__ import annotations

import os
import sys

_NUMPY_PRELOADED = "numpy" in sys.modules
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from refimpl.sampling.bounds import certified_log_max_ratio, cluster_eps, log_partition_bounds  # noqa: E402
from refimpl.data import hierarchical_points  # noqa: E402
from refimpl.index.search import brute_force_topk, topk  # noqa: E402
from refimpl.index.sgtree import DEFAULT_BASE, SGTree  # noqa: E402


def _openblas_one_thread():
    """Ask every loaded OpenBLAS for one thread (ctypes); returns the libraries that accepted."""
    import ctypes

    done = []
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        return done
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                done.append(os.path.basename(path))
                break
    return done


CPU = {}  # CPU seconds of the last _timed call (process_time: robust to the other processes on a shared machine)


def _timed(f, *a, **kw):
    t, c = time.perf_counter(), time.process_time()
    out = f(*a, **kw)
    CPU["last"] = time.process_time() - c
    return out, time.perf_counter() - t


def numpy_topk(T, Q, k, chunk=16):
    """Brute force as a NumPy user writes it: batched GEMM, argpartition, sort of the k by (-score, id)."""
    ids = np.empty((Q.shape[0], k), dtype=np.int64)
    for s in range(0, Q.shape[0], chunk):
        S = Q[s:s + chunk] @ T.T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        sc = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-sc, axis=1, kind="stable")
        ids[s:s + chunk] = np.take_along_axis(part, order, axis=1)
    return ids


def gemm_only(T, Q, chunk=16):
    for s in range(0, Q.shape[0], chunk):
        Q[s:s + chunk] @ T.T


def bench_size(n, *, dim, nq, k, base, seed, check):
    P = hierarchical_points(n + nq, dim, rng=seed)
    T, Q = np.ascontiguousarray(P[:n]), np.ascontiguousarray(P[n:])
    warm = SGTree.build(T[:200], base=base, rng=seed)  # load the compiled kernels outside the timing
    for gran in ("cluster", "child"):
        w2 = warm.copy()
        w2.update_points(np.arange(20), T[200:220], repair=False)
        w2.maintain(0.0, granularity=gran)
    tree, t_build = _timed(SGTree.build, T, base=base, rng=seed)
    c_build = CPU["last"]
    row = {"N": n, "D": dim, "base": base, "build_s": t_build, "build_cpu_s": c_build, "depth": tree.depth(),
           "nodes": tree.n_nodes,
           "levels": list(tree.level_range()), "bytes_per_target": tree.memory_bytes() / n,
           "memory_vs_float32": tree.memory_bytes() / (n * dim * 4.0)}
    topk(tree, Q[:2], k)  # warm-up (compilation is cached, page faults are not)
    for bound in ("ball", "linear"):
        nql = nq if bound == "ball" else max(10, nq // 5)
        res, t = _timed(topk, tree, Q[:nql], k, bound=bound)
        row[f"topk_{bound}_ms"] = 1e3 * t / nql
        row[f"topk_{bound}_cpu_ms"] = 1e3 * CPU["last"] / nql
        row[f"topk_{bound}_inner_products"] = float(res.stats["inner_products"].mean())
        if bound == "ball":
            best = res
    numpy_topk(T, Q[:2], k)
    np_ids, t_np = _timed(numpy_topk, T, Q, k)
    row["numpy_topk_cpu_ms"] = 1e3 * CPU["last"] / nq
    _, t_gemm = _timed(gemm_only, T, Q)
    row["numpy_gemm_cpu_ms"] = 1e3 * CPU["last"] / nq
    row["numpy_topk_ms"] = 1e3 * t_np / nq
    row["numpy_gemm_ms"] = 1e3 * t_gemm / nq
    for bound in ("ball", "linear"):  # ratios of wall times and of CPU times, measured in this run
        row[f"ratio_{bound}_vs_numpy"] = row[f"topk_{bound}_ms"] / row["numpy_topk_ms"]
        row[f"ratio_{bound}_vs_numpy_cpu"] = row[f"topk_{bound}_cpu_ms"] / row["numpy_topk_cpu_ms"]
    # exactness: equal to brute force with the same arithmetic; and to NumPy's ids up to exact score ties
    m = min(nq, check)
    ref = brute_force_topk(T, Q[:m], k)
    row["exact_equal_brute_force"] = bool(np.array_equal(best.ids[:m], ref.ids))
    row["same_sets_as_numpy"] = float(np.mean([set(a) == set(b) for a, b in zip(best.ids, np_ids)]))
    # dynamics: 1% moved + maintain vs full rebuild (the same moves for every variant, each on a fresh copy)
    rng = np.random.default_rng(seed + 1)
    sel = rng.choice(n, max(1, n // 100), replace=False)
    new = T[sel] + rng.normal(size=(sel.size, dim)) * (0.05 / np.sqrt(dim))
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    move = float(np.linalg.norm(new - T[sel], axis=1).max())
    for U_name, U, gran in (("0", 0.0, "cluster"), ("0", 0.0, "child"), ("2max", 2 * move, "cluster"),
                            ("2max", 2 * move, "child")):
        t2 = tree.copy()
        _, t_up = _timed(t2.update_points, sel, new, repair=False)
        c_up = CPU["last"]
        st, t_m = _timed(t2.maintain, U, granularity=gran)
        c_m = CPU["last"]
        row[f"update1pct_U{U_name}_{gran}"] = {
            "U": U, "update_s": t_up, "maintain_s": t_m, "update_cpu_s": c_up, "maintain_cpu_s": c_m, **st,
            "speedup_vs_build": t_build / (t_up + t_m), "speedup_vs_build_cpu": c_build / (c_up + c_m)}
        if n <= 20000:
            assert t2.check_invariants() == []
        del t2
    return row


def bench_bases(n, bases, *, dim, nq, k, seed, n_clusters):
    P = hierarchical_points(n + nq, dim, rng=seed)
    T, Q = np.ascontiguousarray(P[:n]), np.ascontiguousarray(P[n:])
    topk(SGTree.build(T[:200], rng=seed), Q[:2], k)  # load the compiled kernels outside the timing
    rows = []
    for b in bases:
        tree, t = _timed(SGTree.build, T, base=b, rng=seed)
        c_build = CPU["last"]
        res, _ = _timed(topk, tree, Q, k)
        c_q = 1e3 * CPU["last"] / Q.shape[0]
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
        rows.append({"base": b, "build_s": t, "build_cpu_s": c_build, "topk_cpu_ms": c_q, "depth": tree.depth(),
                     "levels": [lo, hi],
                     "topk_ip": float(res.stats["inner_products"].mean()), "level": best, "clusters": len(C),
                     "mean_radius": float(C.radii.mean()), "logZ_gap": float(np.mean(gaps)),
                     "cert_log_max_ratio": float(np.mean(cert))})
        print(f"base {b:5.2f}: build {t:6.2f}s ({c_build:6.2f}s CPU) depth {rows[-1]['depth']:3d} top-{k} "
              f"{c_q:6.3f} ms CPU, ip {rows[-1]['topk_ip']:8.0f}"
              f"  level {best:4d} ({len(C)} clusters, mean radius {C.radii.mean():.3f}): log Z gap "
              f"{np.mean(gaps):7.2f}, certified log max P/Q {np.mean(cert):7.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refimpl bench tree", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated N (default 1e4,1e5,1e6)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--base", type=float, default=DEFAULT_BASE)
    ap.add_argument("--bases", default=None, help="compare these bases at N = the first size instead")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=int, default=20, help="queries checked against brute force")
    ap.add_argument("--out", default="bench_tree.json")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    env = {"numpy_preloaded": _NUMPY_PRELOADED, "openblas_one_thread": _openblas_one_thread(),
           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "cpus": os.cpu_count(),
           "loadavg_start": os.getloadavg()}
    out = {"benchmark": "tree", "env": env, "args": vars(args)}
    if args.bases:
        out["bases"] = bench_bases(sizes[0], [float(b) for b in args.bases.split(",")], dim=args.dim,
                                   nq=args.queries, k=args.k, seed=args.seed, n_clusters=args.clusters)
    else:
        rows = []
        hdr = (f"{'N':>8} {'build s':>8} {'cpu s':>6} {'depth':>5} {'nodes':>8} {'B/tgt':>6} {'mem/f32':>7} "
               f"{'topk ms':>8} {'ip/q':>8} {'lin ms':>7} {'lin ip':>8} {'np ms':>7} {'gemm ms':>7} {'ratio':>6} "
               f"{'exact':>5} {'upd+mnt s':>9} {'x faster':>8}")
        print("times: CPU ms per query (process_time, single thread); ratio = tree / NumPy brute force in CPU time")
        print(hdr, flush=True)
        for n in sizes:
            r = bench_size(n, dim=args.dim, nq=args.queries, k=args.k, base=args.base, seed=args.seed,
                           check=args.check)
            rows.append(r)
            u = r["update1pct_U0_cluster"]
            print(f"{n:8d} {r['build_s']:8.2f} {r['build_cpu_s']:6.2f} {r['depth']:5d} {r['nodes']:8d} "
                  f"{r['bytes_per_target']:6.0f} {r['memory_vs_float32']:7.2f} {r['topk_ball_cpu_ms']:8.3f} "
                  f"{r['topk_ball_inner_products']:8.0f} {r['topk_linear_cpu_ms']:7.2f} "
                  f"{r['topk_linear_inner_products']:8.0f} {r['numpy_topk_cpu_ms']:7.2f} {r['numpy_gemm_cpu_ms']:7.2f} "
                  f"{r['ratio_ball_vs_numpy_cpu']:6.3f} {str(r['exact_equal_brute_force']):>5} "
                  f"{u['update_cpu_s'] + u['maintain_cpu_s']:9.3f} {u['speedup_vs_build_cpu']:8.1f}", flush=True)
            print(f"{'':8} wall: build {r['build_s']:.2f}s, tree/NumPy ratio {r['ratio_ball_vs_numpy']:.3f}",
                  flush=True)
            for key in ("update1pct_U0_cluster", "update1pct_U0_child", "update1pct_U2max_cluster",
                        "update1pct_U2max_child"):
                u = r[key]
                print(f"{'':8} update 1% + maintain(U={u['U']:.3g}, {key.split('_')[-1]:7s}): "
                      f"{u['update_cpu_s'] + u['maintain_cpu_s']:7.3f}s CPU = {u['speedup_vs_build_cpu']:6.1f}x "
                      f"faster than the build; {u['clusters_rebuilt']} clusters + {u['subtrees_reinserted']} "
                      f"subtrees, {u['points_reinserted']} points reinserted", flush=True)
        out["sizes"] = rows
    env["loadavg_end"] = os.getloadavg()
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
