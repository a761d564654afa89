"""``python -m refimpl bench train``: the CPU time of one steady training step of every miner, in one run.

For each N in ``--sizes`` (default 1e5 and 1e6) the planted task (:func:`refimpl.data.planted_dataset`, fine clusters
of ~25 near-duplicates) is generated once; each miner then trains the same linear dual encoder
(:func:`refimpl.training.train`, batch 128, the same seed) through ``--warmup`` uniform-only steps and
``--steps`` mining steps. From the loop's per-step CPU times (``history``: cpu_mine, cpu_loss, cpu_optimizer) the
benchmark reports the median over the steady mining steps (no start, no periodic work) of

* mining (the miner's ``mine``), loss (encoding the targets involved, the loss and its gradients), optimiser;
* for DyNNIBAL, per re-encode: Alg. 5 (``reencode_seconds``) and the tree update (``tree_seconds``), measured on
  the bench's own re-encodes (``reencode_every=2`` so that they fall inside the window) and amortised over the
  miner's default period w; for SNM, the pool refresh amortised over its default period;
* the start (the first mining step: Alg. 6 + tree build for DyNNIBAL, the pool for SNM), once.

Rows: in-batch, uniform, SNM 3%, Negative Cache, brute-force top-k, full softmax, DyNNIBAL with each procedure
("rejection", "mh", "paper"), and the paper's per-example negative counts (64 sampled per example shared by the
batch + 64 uniform per example + in-batch) for SNM 3% and DyNNIBAL "paper". The NQ scale (2.1e7 targets) has
its own benchmark, ``python -m refimpl bench scale``.

Output: a table on stdout (each row's steady and amortised step over SNM 3%'s, per-example rows over SNM 3%
per-example, and over brute force's), the :data:`ACCEPTANCE` targets checked on the steady steps, and JSON
(``--json``). Timings on a shared machine are noisy: compare ratios within a run.
"""
from __future__ import annotations

import time

import numpy as np

from refimpl.benchmarks import write_json
from refimpl.cliargs import ArgumentParser, integer, integer_list, out_file, size
from refimpl.data import planted_dataset
from refimpl.mining import (BruteForceTopK, DyNNIBAL, FullSoftmax, InBatch, NegativeCache, StochasticNegativeMining,
                            Uniform)
from refimpl.training import train

W_DEFAULT = 25  # DyNNIBAL's default re-encode period (mining steps)
SNM_PERIOD = 100  # SNM's default refresh period


def _rows(per_example_k: int):
    """(label, miner factory, train kwargs, period, periodic-work kind)."""
    pe = dict(n_uniform=64, uniform_per_example=True, in_batch=True)
    dyn = dict(reencode_every=2)
    return [
        ("in-batch", lambda: InBatch(), {}),
        ("uniform", lambda: Uniform(64), {}),
        ("snm 3%", lambda: StochasticNegativeMining(64, mem_percent=3.0, refresh_every=2), {}),
        ("negative-cache", lambda: NegativeCache(64), {}),
        ("brute-force", lambda: BruteForceTopK(64), {}),
        ("full-softmax", lambda: FullSoftmax(), {}),
        ("dynnibal rejection", lambda: DyNNIBAL(64, sampler="rejection", **dyn), {}),
        ("dynnibal mh", lambda: DyNNIBAL(64, sampler="mh", **dyn), {}),
        ("dynnibal paper", lambda: DyNNIBAL(64, sampler="paper", **dyn), {}),
        ("snm 3% per-example", lambda: StochasticNegativeMining(per_example_k, mem_percent=3.0, refresh_every=2,
                                                                per_example=True), pe),
        ("dynnibal paper per-example", lambda: DyNNIBAL(per_example_k, sampler="paper", per_example=True, **dyn),
         pe),
    ]


def _median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


def time_row(ds, make, kw, *, warmup, steps, batch_size, dim, seed):
    """Train one miner and return its per-phase CPU seconds (module docstring)."""
    miner = make()
    res = train(ds, miner, steps=warmup + steps, batch_size=batch_size, dim=dim, uniform_warmup=warmup,
                seed=seed, lr_warmup=0, lr_decay=False, **kw)
    hist = [h for h in res.history if h["mining"]]
    first = hist[0]["step"]
    # periodic work (DyNNIBAL's re-encodes and refreshes, SNM's pool refreshes) is reported apart; brute force's
    # table refresh (every step by default) is part of its step
    periodic = set()
    if isinstance(miner, (DyNNIBAL, StochasticNegativeMining)):
        periodic = set(getattr(miner, "reencoded_at", [])) | set(miner.refreshed_at)
    steady = [h for h in hist if h["step"] != first and h["step"] not in periodic]
    out = {"mining": _median([h["cpu_mine"] for h in steady]), "loss": _median([h["cpu_loss"] for h in steady]),
           "optimizer": _median([h["cpu_optimizer"] for h in steady]), "start": hist[0]["cpu_mine"],
           "steady_steps": len(steady), "n_negatives": int(np.median([h["n_negatives"] for h in steady]))}
    out["step"] = out["mining"] + out["loss"] + out["optimizer"]
    amort = 0.0
    if isinstance(miner, DyNNIBAL):
        ups = miner.tree_updates
        out["reencode"] = _median([u["reencode_seconds"] for u in ups])
        out["tree_update"] = _median([u["tree_seconds"] for u in ups])
        amort = (out["reencode"] + out["tree_update"]) / W_DEFAULT
        st = miner.last_stats
        out["mean_clusters"] = st.get("mean_clusters")
        out["inner_products_per_query"] = st["inner_products"] / max(st["queries"], 1)
        lg = np.asarray(st.get("log_gamma"), dtype=float)
        out["median_log_gamma"] = float(np.median(lg)) if lg.size else None
        tv = np.asarray(st.get("tv_bound"), dtype=float)
        out["median_tv_bound"] = float(np.nanmedian(tv)) if tv.size and np.isfinite(tv).any() else None
    elif isinstance(miner, StochasticNegativeMining):
        ref = [h["cpu_mine"] for h in hist if h["step"] in periodic]
        out["refresh"] = max(0.0, _median(ref) - out["mining"])
        amort = out["refresh"] / SNM_PERIOD
    out["amortised_step"] = out["step"] + amort
    return out


def _ratios(r, base):
    """``"a / b"``: the row's steady step and amortised step over those of ``base`` (``-`` without a base)."""
    if not base:
        return "-"
    return f"{r['step'] / base['step']:.3f}x / {r['amortised_step'] / base['amortised_step']:.3f}x"


# (row, reference row, limit on the step ratio at N = 1e5, at N >= 1e6): the targets the engine is measured against
ACCEPTANCE = (("dynnibal paper", "snm 3%", 4.0, 4.0),
              ("dynnibal paper per-example", "snm 3% per-example", None, 1.0),
              ("dynnibal mh", "brute-force", 1 / 3, 1 / 10),
              ("dynnibal rejection", "brute-force", 1 / 3, 1 / 10))


def acceptance(rows):
    """Each :data:`ACCEPTANCE` target whose two rows were measured at the same N: the steady-step ratio (and the
    amortised one, for information) against its limit."""
    ref = {(r["N"], r["row"]): r for r in rows}
    out = []
    for n in sorted({r["N"] for r in rows}):
        for row, base, lim_small, lim_large in ACCEPTANCE:
            lim = lim_small if n < 1_000_000 else lim_large
            r, b = ref.get((n, row)), ref.get((n, base))
            if lim is None or r is None or b is None:
                continue
            ratio = r["step"] / b["step"]
            out.append({"N": n, "claim": f"{row} step <= {lim:.3g} x {base} step", "ratio": ratio, "limit": lim,
                        "holds": bool(ratio <= lim), "amortised_ratio": r["amortised_step"] / b["amortised_step"]})
    return out


def _fmt(x, scale_=1e3):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x * scale_:.1f}"


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m refimpl bench train", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=integer_list(1000), default="100000,1000000",
                   help="comma-separated N >= 1000 (the NQ scale: python -m refimpl bench scale)")
    p.add_argument("--queries", type=size, default=20000, help="queries of the planted task")
    p.add_argument("--warmup", type=size, default=3, help="uniform-only steps before mining")
    p.add_argument("--steps", type=integer(4), default=7,
                   help="mining steps (>= 4: a start, re-encodes and steady steps)")
    p.add_argument("--batch-size", type=size, default=128)
    p.add_argument("--dim", type=integer(1, 4096), default=32, help="embedding dimension D")
    p.add_argument("--per-example-k", type=size, default=64, help="sampled negatives per example (per-example rows)")
    p.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--seed", type=integer(0, 2**62), default=0)
    p.add_argument("--json", type=out_file, default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    sizes = a.sizes
    labels = [r[0] for r in _rows(a.per_example_k)]
    want = [s.strip() for s in a.rows.split(",") if s.strip()] or labels
    bad = [w for w in want if w not in labels]
    if bad:
        p.error(f"argument --rows: unknown {bad}; choose from {labels}")
    out = {"sizes": sizes, "config": vars(a), "results": []}
    for n in sizes:
        c = time.process_time()
        n_fine = max(1, n // 25)
        branching = (min(50, n_fine), max(1, n_fine // min(50, n_fine)))
        ds = planted_dataset(n, a.queries, branching=branching, test_fraction=0.01, rng=a.seed)  # small final eval
        print(f"N = {n}: planted task generated in {time.process_time() - c:.1f} s CPU", flush=True)
        for label, make, kw in _rows(a.per_example_k):
            if label not in want:
                continue
            r = time_row(ds, make, kw, warmup=a.warmup, steps=a.steps, batch_size=a.batch_size, dim=a.dim,
                         seed=a.seed)
            out["results"].append({"N": n, "row": label, **r})
            print(f"  {label:28s} step {r['step'] * 1e3:9.1f} ms (mining {r['mining'] * 1e3:.1f})", flush=True)
        del ds
    rows = out["results"]
    ref = {(r["N"], r["row"]): r for r in rows}
    print()
    print("| N | miner | mining | re-encode | tree update | loss | optimiser | step | amortised step | "
          "vs SNM 3% (step / amortised) | vs brute force (step / amortised) | start (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        snm = ref.get((r["N"], "snm 3% per-example" if "per-example" in r["row"] else "snm 3%"))
        bf = ref.get((r["N"], "brute-force"))
        print(f"| {r['N']:.0e} | {r['row']} | {_fmt(r['mining'])} | {_fmt(r.get('reencode'))} | "
              f"{_fmt(r.get('tree_update'))} | {_fmt(r['loss'])} | {_fmt(r['optimizer'])} | {_fmt(r['step'])} | "
              f"{_fmt(r['amortised_step'])} | {_ratios(r, snm)} | {_ratios(r, bf)} | {r['start']:.1f} |")
    print("\n(ms of CPU per step; medians over the steady mining steps; re-encode / tree update per occurrence, "
          f"amortised over w = {W_DEFAULT} mining steps; SNM's refresh over {SNM_PERIOD}; per-example rows are "
          "compared with SNM 3% per-example)")
    checks = acceptance(rows)
    if checks:
        print("\nacceptance (steady step ratios, measured in this run):")
        for c in checks:
            print(f"  N = {c['N']:.0e}: {c['claim']}: {c['ratio']:.3f}x (limit {c['limit']:.3f}x) "
                  f"{'holds' if c['holds'] else 'FAILS'}; amortised {c['amortised_ratio']:.3f}x")
    out["acceptance"] = checks
    if a.json:
        write_json(a.json, out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
