"""``python -m refimpl bench scale``: the SG tree side of DyNNIBAL at the NQ scale (2.1e7 targets, d' = 64).

One run, one process, CPU seconds (``time.process_time``) and peak resident memory (``ru_maxrss``):

1. data: ``--n`` float32 points from :func:`refimpl.data.hierarchical_points` (``--branching``, ``--scales``; the
   defaults are that function's, the distribution of ``bench tree``), standing for the d'-dim representations;
2. build: :meth:`refimpl.index.SGTree.build` (float32 storage, the points adopted without a copy);
3. re-encode: a move of every representation as Alg. 5 makes it, ``z' = M z`` with one d' x d' matrix
   ``M = I + move G / sqrt(d')`` (G standard normal), computed in chunks into a new float32 array;
4. tree update: :func:`refimpl.nystrom.update_tree` with the tree's own rows as the old ones (every target moved:
   its rebuild path) and the new array adopted by the tree; or, with ``--update inplace`` (no second copy of the
   points: for a machine without room for it), the new rows in chunks through ``update_points(repair=False)`` and
   then :meth:`~refimpl.index.SGTree.rebuild` (more work: the statistics of every moved node are updated first);
5. mining: DyNNIBAL's batched engine (:class:`refimpl.sampling.engine.MiningEngine`, built by
   :class:`refimpl.mining.DyNNIBAL` with its defaults) on ``--batch`` queries near random targets: "paper" with one
   draw per query (the shared negatives, >= 64 per batch) and with ``--k`` draws per query (the paper's
   per-example count), and "mh" with one draw per query. The first call after the update includes the work done
   once per tree version; the second is a steady step. Both are reported.

Output: a table on stdout and JSON (``--json``). The tree's bytes per target beyond the points are reported too.
Memory: the points (N d' 4 bytes; twice during a "copy" update), the tree's arrays and the build's scratch.
"""
from __future__ import annotations

import resource
import time

import numpy as np

from refimpl.benchmarks import write_json
from refimpl.cliargs import ArgumentParser, integer, out_file, real, real_list, size, size_list
from refimpl.data import hierarchical_points
from refimpl.index import SGTree
from refimpl.mining import DyNNIBAL
from refimpl.nystrom import update_tree

CHUNK = 1 << 18  # rows per chunk of the re-encode product


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu(f, *a, **kw):
    c = time.process_time()
    out = f(*a, **kw)
    return out, time.process_time() - c


def reencode_like(points, move: float, rng) -> np.ndarray:
    """``z' = M z`` for every row (float32 out, float64 product), ``M = I + move G / sqrt(d')``: Alg. 5's one
    d' x d' product per target."""
    d = points.shape[1]
    M = np.eye(d) + move * rng.standard_normal((d, d)) / np.sqrt(d)
    out = np.empty(points.shape, dtype=np.float32)
    for s in range(0, points.shape[0], CHUNK):
        out[s:s + CHUNK] = points[s:s + CHUNK] @ M.T
    return out


def _update_in_place(tree, move, rng, seed):
    """The re-encode and tree update without a second copy of the points: each chunk of new rows goes to the tree
    by ``update_points(repair=False)`` (statistics kept valid), then ``rebuild``. Returns (stats, re-encode CPU s,
    tree update CPU s)."""
    n, d = tree.n_targets, tree.dim
    M = np.eye(d) + move * rng.standard_normal((d, d)) / np.sqrt(d)
    t_re = t_up = 0.0
    max_move = 0.0
    for s in range(0, n, CHUNK):
        ids = np.arange(s, min(n, s + CHUNK), dtype=np.int64)
        c = time.process_time()
        rows = (tree.points[ids] @ M.T).astype(np.float32)
        max_move = max(max_move, float(np.sqrt(np.max(np.sum((rows - tree.points[ids]) ** 2, axis=1)))))
        t_re += time.process_time() - c
        c = time.process_time()
        tree.update_points(ids, rows, repair=False)
        t_up += time.process_time() - c
    c = time.process_time()
    tree.rebuild(rng=seed)
    t_up += time.process_time() - c
    return {"method": "update_points + rebuild", "max_move": max_move, "n_moved": n}, t_re, t_up


def _engines():
    """(label, engine, draws per query) of the mining rows (DyNNIBAL's own engine configuration)."""
    return [("paper, 1 draw/query", DyNNIBAL(64, sampler="paper").engine, 1),
            ("paper, k draws/query", DyNNIBAL(64, sampler="paper").engine, None),
            ("mh, 1 draw/query", DyNNIBAL(64, sampler="mh").engine, 1)]


def _warm_up(dprime, branching, scales):
    """Compile every kernel on a small instance (not timed)."""
    Z = hierarchical_points(3000, dprime, branching=branching, scales=scales, rng=1, dtype=np.float32)
    tree = SGTree.build(Z, rng=1, dtype=np.float32)
    update_tree(tree, None, reencode_like(tree.points[:3000], 0.1, np.random.default_rng(1)), rng=1)
    for _, eng, c in _engines():
        eng.run(tree, Z[:4].astype(np.float64), c or 2, beta=20.0, rng=1)


def run(n, dprime, *, branching, scales, batch, k, beta, move, seed, update="copy", log=print) -> dict:
    """The five steps of the module docstring; returns the record (CPU seconds, GiB)."""
    rng = np.random.default_rng(seed)
    rec = {"N": n, "dprime": dprime, "branching": list(branching), "scales": list(scales), "batch": batch, "k": k,
           "beta": beta, "move": move, "seed": seed}
    _warm_up(dprime, branching, scales)
    rec["rss_before_gib"] = peak_rss_gib()
    Z, rec["data_seconds"] = _cpu(hierarchical_points, n, dprime, branching=branching, scales=scales, rng=seed,
                                  dtype=np.float32)
    log(f"data: {rec['data_seconds']:.1f} s CPU", flush=True)
    tree, rec["build_seconds"] = _cpu(SGTree.build, Z, rng=seed, dtype=np.float32, copy=False)
    del Z  # the tree owns the rows
    rec["rss_after_build_gib"] = peak_rss_gib()
    rec["tree_bytes_per_target"] = (tree.memory_bytes() - tree.points.nbytes) / n
    rec["depth"] = tree.depth()
    log(f"build: {rec['build_seconds']:.1f} s CPU, peak RSS {rec['rss_after_build_gib']:.2f} GiB", flush=True)
    if update == "copy":
        new, rec["reencode_seconds"] = _cpu(reencode_like, tree.points[:n], move, rng)
        st, rec["tree_update_seconds"] = _cpu(update_tree, tree, None, new, rng=seed, copy=False)
        del new  # adopted by the tree
    else:
        st, rec["reencode_seconds"], rec["tree_update_seconds"] = _update_in_place(tree, move, rng, seed)
    rec.update(update=update, update_method=st["method"], max_move=st["max_move"], n_moved=st["n_moved"],
               rss_after_update_gib=peak_rss_gib())
    log(f"re-encode {rec['reencode_seconds']:.1f} s, tree update {rec['tree_update_seconds']:.1f} s CPU "
        f"({st['method']}), peak RSS {rec['rss_after_update_gib']:.2f} GiB", flush=True)
    Q = tree.points[rng.choice(n, size=batch, replace=False)].astype(np.float64)  # queries near targets
    Q += rng.normal(scale=0.05 / np.sqrt(dprime), size=Q.shape)
    rec["mining"] = []
    for label, eng, c in _engines():
        counts = k if c is None else c
        r1, t1 = _cpu(eng.run, tree, Q, counts, beta=beta, rng=seed)
        r2, t2 = _cpu(eng.run, tree, Q, counts, beta=beta, rng=seed + 1)
        row = {"procedure": label, "draws_per_query": counts, "first_seconds": t1, "steady_seconds": t2,
               "inner_products_per_query": float(np.sum(r2.inner_products)) / batch}
        rec["mining"].append(row)
        log(f"mining {label}: first {t1 * 1e3:.0f} ms, steady {t2 * 1e3:.0f} ms CPU", flush=True)
    rec["peak_rss_gib"] = peak_rss_gib()
    return rec


def table(rec) -> str:
    """Markdown table of a :func:`run` record."""
    lines = ["| N | d' | data s | build s | re-encode s | tree update s | tree B/target | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|",
             f"| {rec['N']:.3g} | {rec['dprime']} | {rec['data_seconds']:.1f} | {rec['build_seconds']:.1f} | "
             f"{rec['reencode_seconds']:.1f} | {rec['tree_update_seconds']:.1f} ({rec['update_method']}) | "
             f"{rec['tree_bytes_per_target']:.0f} | {rec['peak_rss_gib']:.2f} |",
             "", "| mining step (batch of %d queries) | first call ms | steady ms | inner products/query |"
             % rec["batch"], "|---|---|---|---|"]
    for m in rec["mining"]:
        lines.append(f"| {m['procedure']} ({m['draws_per_query']}) | {m['first_seconds'] * 1e3:.0f} | "
                     f"{m['steady_seconds'] * 1e3:.0f} | {m['inner_products_per_query']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m refimpl bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=integer(1000), default=21_000_000, help="targets (default 2.1e7, NQ)")
    p.add_argument("--dprime", type=integer(1, 4096), default=64, help="d', the representation dimension")
    p.add_argument("--branching", type=size_list, default=(16, 16), help="hierarchical_points branching")
    p.add_argument("--scales", type=real_list(0.0), default=(1.0, 0.35, 0.12),
                   help="hierarchical_points scales (one more than --branching)")
    p.add_argument("--batch", type=size, default=128, help="queries per mining step")
    p.add_argument("--k", type=size, default=64, help="draws per query of the per-example row")
    p.add_argument("--beta", type=real(0.0, strict_low=True), default=20.0)
    p.add_argument("--move", type=real(0.0), default=0.1, help="scale of the re-encode's matrix perturbation")
    p.add_argument("--seed", type=integer(0, 2**62), default=0)
    p.add_argument("--update", choices=("copy", "inplace"), default="copy",
                   help="copy: update_tree with the new array (two copies of the points at once); inplace: chunks "
                        "through update_points, then rebuild (one copy)")
    p.add_argument("--json", type=out_file, default=None, help="write the record to this JSON file")
    a = p.parse_args(argv)
    if len(a.scales) != len(a.branching) + 1:
        p.error(f"argument --scales: expected {len(a.branching) + 1} values (one more than --branching)")
    if a.batch > a.n:
        p.error(f"argument --batch: at most --n = {a.n}")
    rec = run(a.n, a.dprime, branching=tuple(a.branching), scales=tuple(a.scales), batch=a.batch, k=a.k,
              beta=a.beta, move=a.move, seed=a.seed, update=a.update)
    print()
    print(table(rec))
    print("\n(CPU seconds of this process, one BLAS thread; peak RSS = ru_maxrss)")
    if a.json:
        write_json(a.json, rec)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
