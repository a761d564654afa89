"""``python -m refimpl bench sample``: cost per draw of every sampler against brute force (issue 4).

On the planted hierarchical data (:func:`refimpl.data.hierarchical_points`, unit norms, D = 64) at beta = 20 (the
paper's regime), for each N in ``--sizes``: build the SG tree, draw ``--queries`` queries near random targets
(a target plus N(0, 0.1^2 I/D) noise, normalised), and for each query ask every sampler for ``--k`` draws, one
call per query (as a training loop would). Reported per sampler: time per query (mean, and its ratio to
``sample_exact`` measured in the same run), inner products per draw (and as % of N), attempts (proposals) per
draw, the acceptance rate per attempt, the start level and the number of start clusters.

``--levels`` adds the U-shaped cost of Prop. 3 for Alg. 1: the same measurements for fixed start levels around
the automatic choice, with the proposal-mass-weighted beta*rho of the start clusters, which sets the acceptance
rate (each attempt succeeds with probability Z / Z_hi(l) = 1 / E_Q+[e^{eps_C} e^{s_r - s_i} ...] ~ e^{-beta rho}).

Timings on a shared machine are noisy: compare ratios within one run. BLAS threads are not pinned by this script
(set OMP_NUM_THREADS=1 / OPENBLAS_NUM_THREADS=1 in the environment for one-thread figures, as the reference
figures of the issue were). A JSON file with every number is written (``--json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

SAMPLERS = ("exact", "rejection", "flat", "mh", "heuristic")


def _queries(X, n, rng):
    idx = rng.choice(X.shape[0], size=n, replace=False)
    Q = X[idx] + 0.1 * rng.normal(size=(n, X.shape[1])) / math.sqrt(X.shape[1])
    return Q / np.linalg.norm(Q, axis=1, keepdims=True)


def _run(name, X, tree, q, k, beta, seed, level=None, mh_budget=2000):
    from refimpl.sampling import samplers as S
    from refimpl.sampling.clustering import find_clustering, refine_clustering

    t = time.perf_counter()
    if name == "exact":
        r = S.sample_exact(X, q, k, beta=beta, rng=seed)
    elif name == "rejection":
        r = S.sample_rejection(tree, q, k, beta=beta, rng=seed, level="auto" if level is None else level)
    elif name == "flat":
        r = S.sample_flat_rejection(tree, q, k, beta=beta, rng=seed, level="auto" if level is None else level)
    elif name == "mh":
        # Alg. 2 from Prop. 2's level for gamma = e^12, certified refinement of the "upper" proposal to gamma = 20
        # (budget mh_budget clusters), chain length from Eq. 6 for TV 0.01 with the certified gamma
        cl = find_clustering(tree, q, beta=beta, gamma=math.exp(12))
        cl = refine_clustering(tree, q, cl, beta=beta, gamma=20.0, proposal="upper", max_clusters=mh_budget)
        r = S.sample_mh(tree, q, k, beta=beta, rng=seed, clustering=cl, proposal="upper", tv=0.01, max_steps=10**7)
        r.stats["inner_products"] += cl.stats.get("distance_evals", 0)  # Alg. 2 distances (sample_mh adds the rest)
    else:
        r = S.sample_cluster_topk_heuristic(tree, q, k, beta=beta, rng=seed, gamma=math.exp(12), max_clusters=100)
    return time.perf_counter() - t, r


def _row(name, times, results, n, k):
    ip = np.array([r.stats["inner_products"] for r in results], float)
    att = np.array([r.stats.get("attempts", r.stats.get("proposals", 0)) for r in results], float)
    acc = np.array([r.stats.get("accepted", k) for r in results], float)
    row = {
        "sampler": name,
        "time_per_query_ms": 1e3 * float(np.mean(times)),
        "time_per_query_median_ms": 1e3 * float(np.median(times)),
        "inner_products_per_draw": float(np.mean(ip) / k),
        "inner_products_per_draw_pct_of_N": float(100 * np.mean(ip) / k / n),
        "attempts_per_draw": float(np.mean(att) / k) if name != "exact" else 0.0,
        "acceptance_rate": float(np.sum(acc) / max(np.sum(att), 1)) if name in ("rejection", "flat") else None,
        "level": [r.stats.get("level") for r in results] if name in ("rejection", "flat") else None,
        "n_clusters": float(np.mean([r.stats.get("n_clusters", 0) for r in results])),
    }
    if name == "mh":
        row["chain_length"] = float(np.mean([r.stats["chain_length"] for r in results]))
        row["tv_bound_eq6"] = float(np.max([r.stats["tv_bound"] for r in results]))
        row["log_gamma_certified"] = float(np.mean([r.stats["log_gamma"] for r in results]))
    return row


def _beta_rho(tree, q, beta, level):
    """Proposal-mass-weighted eps_C = beta ||q|| rho(C) of C_(level) (what sets the acceptance rate)."""
    from refimpl.sampling.clustering import level_clustering

    cl = level_clustering(tree, level)
    s = beta * (tree.points[cl.reps] @ q)
    eps = beta * np.linalg.norm(q) * cl.radii
    w = np.log(cl.sizes) + s + eps
    w = np.exp(w - w.max())
    return float(np.sum(w * eps) / np.sum(w)), len(cl)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refimpl bench sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated N (default 1e4,1e5,1e6)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--beta", type=float, default=20.0)
    ap.add_argument("--k", type=int, default=10, help="draws per query (default 10)")
    ap.add_argument("--queries", type=int, default=10, help="queries per size (default 10)")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--levels", action="store_true", help="also sweep Alg. 1's start level (Prop. 3's U-shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_sample.json", help="output JSON path")
    args = ap.parse_args(argv)

    from refimpl.data import hierarchical_points
    from refimpl.index.sgtree import SGTree

    sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    names = [x.strip() for x in args.samplers.split(",") if x.strip()]
    bad = [x for x in names if x not in SAMPLERS]
    if bad:
        ap.error(f"--samplers: unknown {bad}; choose from {SAMPLERS}")
    out = {"config": {**vars(args), "sizes": sizes, "blas_threads_env": {
        v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}},
        "results": []}
    rng = np.random.default_rng(args.seed)
    # warm-up (Numba compilation) on a small instance, not timed
    Xw = hierarchical_points(2000, args.dim, rng=1)
    tw = SGTree.build(Xw, rng=1)
    for name in names:
        _run(name, Xw, tw, Xw[0], args.k, args.beta, 0)
    for n in sizes:
        X = hierarchical_points(n, args.dim, rng=args.seed + n)
        t0 = time.perf_counter()
        tree = SGTree.build(X, rng=args.seed)
        build_s = time.perf_counter() - t0
        Q = _queries(X, args.queries, rng)
        rows = []
        for name in names:
            times, results = [], []
            for j, q in enumerate(Q):
                dt, r = _run(name, X, tree, q, args.k, args.beta, 1000 * j + 7)
                times.append(dt)
                results.append(r)
            rows.append(_row(name, times, results, n, args.k))
        t_exact = next((r["time_per_query_ms"] for r in rows if r["sampler"] == "exact"), None)
        for r in rows:
            r["speedup_vs_exact"] = (t_exact / r["time_per_query_ms"]) if t_exact else None
        entry = {"N": n, "build_s": build_s, "tree_levels": list(tree.level_range()), "base": tree.base,
                 "samplers": rows}
        print(f"\nN = {n:,}  (tree build {build_s:.1f} s, levels {tree.level_range()}, base {tree.base}, "
              f"beta {args.beta}, D {args.dim}, k {args.k}, {args.queries} queries)")
        print(f"{'sampler':10s} {'ms/query':>9s} {'x exact':>8s} {'ip/draw':>10s} {'% of N':>8s} {'att/draw':>9s} "
              f"{'accept':>7s} {'clusters':>9s}")
        for r in rows:
            acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.4f}"
            print(f"{r['sampler']:10s} {r['time_per_query_ms']:9.2f} {r['speedup_vs_exact'] or 0:8.2f} "
                  f"{r['inner_products_per_draw']:10.1f} {r['inner_products_per_draw_pct_of_N']:8.3f} "
                  f"{r['attempts_per_draw']:9.1f} {acc:>7s} {r['n_clusters']:9.0f}")
            if r["sampler"] == "mh":
                print(f"{'':10s} MH: chain length {r['chain_length']:.0f}, certified log gamma "
                      f"{r['log_gamma_certified']:.2f}, Eq. 6 TV bound <= {r['tv_bound_eq6']:.3g}")
        if args.levels:
            from refimpl.sampling import samplers as S

            auto = [lv for r in rows if r["sampler"] == "rejection" for lv in (r["level"] or [])]
            centre = int(np.median(auto)) if auto else S.default_level(tree, args.beta)
            sweep = []
            print(f"  Alg. 1 start-level sweep (Prop. 3's U-shape; auto level median {centre}):")
            print(f"  {'level':>6s} {'clusters':>9s} {'beta*rho':>9s} {'att/draw':>9s} {'accept':>8s} "
                  f"{'ip/query':>9s} {'ms/query':>9s}")
            for L in range(centre - 4, centre + 5):
                times, results = [], []
                try:
                    for j, q in enumerate(Q):
                        dt, r = _run("rejection", X, tree, q, args.k, args.beta, 1000 * j + 7, level=L)
                        times.append(dt)
                        results.append(r)
                except Exception as exc:  # attempt budget exhausted at coarse levels
                    print(f"  {L:6d}  {type(exc).__name__}: {exc}")
                    sweep.append({"level": L, "error": str(exc)})
                    break
                br = float(np.mean([_beta_rho(tree, q, args.beta, L)[0] for q in Q]))
                att = float(np.mean([r.stats["attempts"] for r in results]) / args.k)
                ipq = float(np.mean([r.stats["inner_products"] for r in results]))
                row = {"level": L, "n_clusters": results[0].stats["n_clusters"], "beta_rho_weighted": br,
                       "attempts_per_draw": att, "acceptance_rate": 1.0 / att, "inner_products_per_query": ipq,
                       "time_per_query_ms": 1e3 * float(np.mean(times))}
                sweep.append(row)
                print(f"  {L:6d} {row['n_clusters']:9d} {br:9.2f} {att:9.1f} {1 / att:8.4f} {ipq:9.0f} "
                      f"{row['time_per_query_ms']:9.2f}")
            entry["level_sweep"] = sweep
        out["results"].append(entry)
        del tree, X
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1, default=float)
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
