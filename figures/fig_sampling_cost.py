"""Sampling cost against the number of targets N: inner products per draw and time per query for every sampler
of ``refimpl.sampling.samplers`` against the brute-force ``sample_exact``.

Targets are nested prefixes of one planted hierarchical data set (unit norm, D = 16, beta = 20); each sampler draws
k negatives for a handful of queries with its library defaults: ``sample_rejection`` (Alg. 1, exact, default start
level), ``sample_flat_rejection`` (Eq. 3-5, exact, same level), ``sample_mh`` (Eq. 14 on Alg. 2 + certified
refinement to gamma = 4, chain length from Eq. 6 for TV 0.01) and the experiments' procedure (``sample_paper``)
(biased, not a softmax sampler). Inner products are the samplers' own ``stats["inner_products"]`` (start clustering
+ proposals; Alg. 1 counts distinct child logits); times are single-threaded, min over repeats, tree build excluded
(shown separately, amortised over many queries in training).
"""
from __future__ import annotations

import numpy as np

from figures import _common as C

CAPTION = ("Cost per query against N: brute force grows like N; the exact tree samplers (Alg. 1, flat rejection) "
           "need ~N^0.3 inner products per draw (slope in the box) and catch up with vectorised brute force in wall "
           "time at the top of the range; MH with its certified-TV default and the experiments' procedure stay ~linear in N.")


def _samplers():
    from types import SimpleNamespace

    from refimpl.sampling.engine import MiningEngine
    from refimpl.sampling.samplers import sample_exact, sample_flat_rejection, sample_mh, sample_rejection

    def paper(tree, q, k, b, g):  # the experiments' procedure (DyNNIBAL sampler="paper"), one query
        r = MiningEngine("paper").run(tree, q[None, :], k, beta=b, rng=g)
        return SimpleNamespace(stats={"inner_products": int(r.inner_products[0])})

    return [
        ("sample_exact (brute force)", lambda T, tree, q, k, b, g: sample_exact(T, q, k, beta=b, rng=g)),
        ("sample_rejection (Alg. 1, exact)", lambda T, tree, q, k, b, g: sample_rejection(tree, q, k, beta=b, rng=g)),
        ("sample_flat_rejection (Eq. 3-5, exact)",
         lambda T, tree, q, k, b, g: sample_flat_rejection(tree, q, k, beta=b, rng=g)),
        ("sample_mh (Eq. 14, TV<=0.01 certified)", lambda T, tree, q, k, b, g: sample_mh(tree, q, k, beta=b, rng=g)),
        ("experiments' procedure (biased)", lambda T, tree, q, k, b, g: paper(tree, q, k, b, g)),
    ]


def compute(rng, quick):
    from refimpl.index.sgtree import SGTree

    Ns = [500, 2000] if quick else [1000, 3000, 10000, 30000, 100000]
    nq, dim, k, beta = (2, 16, 16, 20.0) if quick else (5, 16, 64, 20.0)
    reps = 1 if quick else 3
    T_all, Q = C.planted(max(Ns), nq, dim, rng)
    SGTree.build(T_all[:50], rng=rng)  # compile outside the timings
    samplers = _samplers()
    res = {name: [] for name, _ in samplers}
    builds = []
    for N in Ns:
        T = np.ascontiguousarray(T_all[:N])
        tb, tree = C.min_time(lambda: SGTree.build(T, rng=rng), 1)
        builds.append(tb)
        for name, fn in samplers:
            fn(T, tree, Q[0], 2, beta, rng)  # compile / warm caches outside the timings
            ip, ts = [], []
            for q in Q:
                t, r = C.min_time(lambda: fn(T, tree, q, k, beta, rng), reps)
                st = r.stats if "inner_products" in r.stats else r.stats["per_query"][0]
                ip.append(st["inner_products"] / k)
                ts.append(t)
            res[name].append((float(np.mean(ip)), float(np.median(ts))))
    return np.array(Ns), {n: np.array(v) for n, v in res.items()}, np.array(builds), dict(nq=nq, dim=dim, k=k,
                                                                                              beta=beta)


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    Ns, res, builds, p = compute(rng, quick)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    styles = ["-o", "-s", "-^", "-D", ":v"]
    for j, (name, v) in enumerate(res.items()):
        col = "k" if j == 0 else C.COLORS[j - 1]
        a1.loglog(Ns, v[:, 0], styles[j], color=col, ms=5, label=name)
        a2.loglog(Ns, v[:, 1] * 1e3, styles[j], color=col, ms=5, label=name)
    a2.loglog(Ns, builds * 1e3, "--", color="0.6", lw=1, label="SGTree.build (once, amortised)")
    for ax in (a1, a2):
        ax.set_xlabel("number of targets N")
    a1.set_ylabel("inner products per draw")
    a1.set_title(f"Inner products per draw (k={p['k']} draws per query)")
    a2.set_ylabel("ms per query (single thread, min of repeats)")
    a2.set_title(f"Time per query (k={p['k']} draws)")
    slope = lambda v: np.polyfit(np.log(Ns), np.log(v), 1)[0]  # noqa: E731
    txt = "log-log slope of inner products vs N:\n" + "\n".join(
        f"  {name.split(' (')[0]}: {slope(v[:, 0]):.2f}" for name, v in res.items())
    a1.text(0.02, 0.98, txt, transform=a1.transAxes, va="top", fontsize=7, family="monospace",
            bbox=dict(fc="white", ec="0.8", alpha=0.9))
    a2.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Sampling cost vs N: planted hierarchical unit-norm targets (nested prefixes), D={p['dim']}, "
                 f"beta={p['beta']:g}, mean over {p['nq']} queries", fontsize=10)
    fig.tight_layout()
    return C.save(fig, out_dir, "sampling_cost")
