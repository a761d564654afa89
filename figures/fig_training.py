"""Training curves and the Table 1 miniature (paper §5) from ``refimpl.experiments.run_table``.

Every miner of ``refimpl.experiments.default_methods`` (in-batch, uniform, DyNNIBAL, SNM at 1/3/10 % memory,
Negative Cache, brute-force top-k, full softmax) trains the same linear dual encoder on the same planted retrieval
task with the common recipe of ``refimpl.experiments`` (k = 64 mined + 64 uniform negatives, uniform warm-up of a
quarter of the steps, no log-Q correction). Left: test R@1 during training (exact re-encoding). Middle: the final
R@1 / R@10 against Mem % (the paper's Table 1 axes). Right: the probes of ``refimpl.training.train``: TV between the
miner's negative distribution and the exact softmax, and the relative error of the gradient against the full
softmax's, averaged over probe steps.
"""
from __future__ import annotations

import numpy as np

from figures import _common as C

CAPTION = ("Table 1 in miniature (planted task, every miner, same recipe): test R@1 during training, final R@1/R@10 "
           "against Mem %, and how far each miner's negatives are from the softmax (TV, gradient error); "
           "see the numbers on the bars.")

QUICK_METHODS = ("uniform", "DyNNIBAL", "brute force")


def compute(rng, quick):
    from refimpl.data import planted_dataset
    from refimpl.experiments import default_methods, run_table

    seed = int(rng.integers(0, 2**31))
    if quick:
        n, steps, branching, probe = 400, 16, (4, 4), 8
    else:
        n, steps, branching, probe = 3000, 200, (10, 12), 25
    ds = planted_dataset(n, n, branching=branching, rng=seed)
    methods = default_methods()
    if quick:
        methods = [m for m in methods if m[0] in QUICK_METHODS]
    res = run_table(ds, methods, steps=steps, probe_every=probe, eval_every=max(1, steps // 8), seed=seed,
                    progress=False)
    return res, dict(n=ds.n_targets, steps=steps, fine=int(np.prod(branching)), seed=seed,
                     n_test=int(ds.test_ids.size))


def make(out_dir, rng, quick):
    import matplotlib.pyplot as plt

    C.style()
    res, p = compute(rng, quick)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.6), gridspec_kw=dict(width_ratios=[1, 1.25, 1.05]))
    labels = [lab for lab, _ in res]
    palette = C.COLORS + ["#bcbd22", "#e377c2", "#000000"]
    cols = {lab: palette[i % len(palette)] for i, lab in enumerate(labels)}
    ls = {lab: ("-" if i < len(palette) else "--") for i, lab in enumerate(labels)}
    for lab, r in res:
        steps = [0] + [e["step"] for e in r.evals]
        a1.plot(steps[1:], [e["R@1"] for e in r.evals], ls[lab], marker="o", ms=3, color=cols[lab], label=lab,
                lw=2.2 if lab == "DyNNIBAL" else 1.2)
    warm = p["steps"] // 4
    a1.axvspan(0, warm, color="0.9", zorder=0)
    a1.text(warm / 2, a1.get_ylim()[0], "uniform\nwarm-up", ha="center", va="bottom", fontsize=7, color="0.4")
    a1.set_xlabel("training step")
    a1.set_ylabel(f"test R@1 ({p['n_test']} queries, exact re-encoding)")
    a1.set_title("Test R@1 during training")
    a1.legend(fontsize=7, loc="upper left")

    x = np.arange(len(res))
    r1 = np.array([r.final["R@1"] for _, r in res])
    r10 = np.array([r.final["R@10"] for _, r in res])
    mem = np.array([r.final["mem_percent"] for _, r in res])
    a2.bar(x - 0.2, r1, 0.4, color=[cols[lab] for lab in labels], label="R@1")
    a2.bar(x + 0.2, r10, 0.4, color=[cols[lab] for lab in labels], alpha=0.45, label="R@10 (light)")
    for i in range(len(res)):
        a2.text(x[i] - 0.2, r1[i] + 0.01, f"{r1[i]:.2f}", ha="center", va="bottom", fontsize=6.5, rotation=90)
    a2.set_xticks(x, [f"{lab}\nMem {m:.3g}%" for lab, m in zip(labels, mem)], rotation=45, ha="right", fontsize=7)
    a2.set_ylim(0, min(1.0, max(r10.max(), r1.max()) * 1.25))
    a2.set_ylabel("final test recall")
    a2.set_title("Final R@1 (dark) and R@10 (light), with Mem %")
    bf = dict(res).get("brute force")
    if bf is not None:
        a2.axhline(bf.final["R@1"], color="0.3", ls=":", lw=1)

    tv = np.array([r.final["tv"] for _, r in res])
    ge = np.array([r.final["grad_rel_error"] for _, r in res])
    a3.bar(x - 0.2, np.nan_to_num(tv, nan=0.0), 0.4, color="#4c72b0", label="TV(negatives, softmax)")
    a3.bar(x + 0.2, np.nan_to_num(ge, nan=0.0), 0.4, color="#dd8452", label="grad. rel. error vs full softmax")
    for i in range(len(res)):
        for dx, v in ((-0.2, tv[i]), (0.2, ge[i])):
            txt = "n/a" if not np.isfinite(v) else f"{v:.2f}"
            a3.text(x[i] + dx, (v if np.isfinite(v) else 0) + 0.01, txt, ha="center", va="bottom", fontsize=6,
                    rotation=90)
    a3.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    a3.set_title("Distance to the softmax (mean over probe steps)")
    a3.legend(fontsize=7, loc="upper right")
    a3.set_ylim(0, max(np.nanmax(tv), np.nanmax(ge)) * 1.3)
    fig.suptitle(f"Table 1 in miniature: planted task, N={p['n']} targets in {p['fine']} fine clusters, "
                 f"{p['steps']} steps per method, seed {p['seed']}", fontsize=10)
    fig.tight_layout()
    return C.save(fig, out_dir, "training")
