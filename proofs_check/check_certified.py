"""Our certified bounds (PAPER.md §3 "certified form"; refimpl.sampling.bounds, refimpl.sampling.clustering.certify): for ANY norms,
with eps_C = beta ||q|| rho(C) and rho(C) >= max_{i in C} ||t_i - t_r(C)||,

  Z_lo = sum_C |C| e^{s_r - eps_C} <= Z <= Z_hi = sum_C |C| e^{s_r + eps_C},
  max_i P(i)/Q(i) <= e^{max eps_C} Zhat / Z_lo for Q of Eq. 7,  max_i P(i)/Q+(i) <= Z_hi/Z_lo for Q+ ∝ e^{s_r+eps_C},
  ||P - Q||_TV <= 1 - 1/gamma_cert.

Checked against brute force (log space) on random and adversarial instances: targets of every kind, rescaled to
norms spanning 1e-3..1e3 per row (not unit), exact duplicates, beta in {1e-3, 1, 20, 1e3}, ||q|| in
{1e-6, 1, 1e3}, clusterings: tree levels C_(l) (every level), Alg. 2 (with and without refinement), and
arbitrary partitions (random labels, ArrayClustering with exact radii). Tolerances: 1e-9 relative on logs; the TV
comparison allows the oracle's own rounding (probabilities from logits of magnitude up to 1e14 carry an absolute log
error of ~2^-52 max|s|).
"""
from __future__ import annotations

import math

import numpy as np

from proofs_check import _instances as I
from proofs_check._framework import Budget, Outcome, Verdict, claim
from refimpl.sampling.clustering import ArrayClustering, certify, find_clustering, level_clustering


def _rel(x):
    return 1e-9 * max(1.0, abs(x))


@claim("certified_bounds", paper_ref="certified form (ours; paper §3.1-3.3)", order=40,
       perturbation="the certificate computed on radii halved (premise rho(C) >= true extent broken)",
       statement="For any norms, Z_lo <= Z <= Z_hi, the certified gamma >= max P/Q (Eq. 7) and >= max P/Q+, and the TV "
                 "bound >= ||P - Q||_TV, with eps_C = beta ||q|| rho(C).")
def check(budget: Budget, rng) -> Outcome:
    n_inst = budget.cases(60, minimum=8)
    cases = bad = 0
    worst_g = worst_z = 0.0
    cex = None
    for t in range(n_inst):
        kind = I.KINDS[t % len(I.KINDS)]
        n = int(rng.integers(2, 250))
        dim = int(rng.choice([2, 3, 8]))
        base = float(rng.choice([1.05, 1.3, 2.0]))
        X = I.points(kind, n, dim, rng)
        if t % 3:
            X = X * np.exp(rng.uniform(math.log(1e-3), math.log(1e3), size=(n, 1)))
        tree = I.build(X, base, rng)
        beta = float([1e-3, 1.0, 20.0, 1e3][t % 4])
        qn = float([1.0, 1e-6, 1e3][(t // 4) % 3])
        q = qn * (X[int(rng.integers(n))] / max(np.linalg.norm(X[int(rng.integers(n))]), 1e-300)
                  if t % 2 else I.unit_rows(rng.normal(size=(1, dim)))[0])
        s = beta * X @ q
        lz = float(np.logaddexp.reduce(s))
        lp = I.log_softmax(s)
        lo, hi = tree.level_range()
        cls = [(f"C_({L})", ("tree", L)) for L in range(lo, hi + 2, max(1, (hi - lo + 2) // 6))]
        cls += [("alg2", ("alg2", False)), ("alg2+refine", ("alg2", True)), ("random labels", ("labels", None))]
        for name, spec in cls:
            if spec[0] == "tree":
                cl = level_clustering(tree, spec[1])
                members = [cl.members(j) for j in range(len(cl))]
            elif spec[0] == "alg2":
                cl = find_clustering(tree, q, beta=beta, gamma=4.0, refine=spec[1], max_refine_clusters=500)
                members = [cl.members(j) for j in range(len(cl))]
            else:
                labels = rng.integers(0, int(rng.integers(1, 6)), size=n)
                cl = ArrayClustering.from_labels(X, labels)
                members = [cl.members_of(j) for j in range(len(cl))]
            lab = I.labels_from_members(n, members)
            true_rad = np.array([np.linalg.norm(X[m] - X[r], axis=1).max() for m, r in zip(members, cl.reps)])
            if budget.perturb:
                cl.radii = cl.radii * 0.5
            cert = certify(tree if spec[0] != "labels" else X, q, cl, beta=beta)
            eps = beta * np.linalg.norm(q) * cl.radii
            lq = I.log_softmax(s[cl.reps][lab])
            lq_up = I.log_softmax((s[cl.reps] + eps)[lab])
            lg_true = float(np.max(lp - lq))
            lg_up_true = float(np.max(lp - lq_up))
            tv = I.tv(np.exp(lp), np.exp(lq))
            checks = {
                "radius": bool(np.all(true_rad <= cl.radii * (1 + 1e-9) + 1e-300)),
                "Z_lo": cert.log_z_lo <= lz + _rel(lz),
                "Z_hi": lz <= cert.log_z_hi + _rel(lz),
                "gamma": lg_true <= cert.log_gamma + _rel(cert.log_gamma),
                "gamma_upper": lg_up_true <= cert.log_gamma_upper + _rel(cert.log_gamma_upper),
                # the oracle's probabilities carry an absolute log error ~ 2^-52 max|s| (logits up to 1e14 here)
                "tv": tv <= cert.tv_bound + 1e-9 + 2.0 ** -50 * float(np.max(np.abs(s))),
            }
            cases += 1
            if not all(checks.values()):
                bad += 1
                cex = cex or (f"{kind} n={n} D={dim} b={base} beta={beta} ||q||={qn:g} {name}: failed "
                              f"{[k for k, v in checks.items() if not v]} (log Z={lz:.6g}, cert [{cert.log_z_lo:.6g}, "
                              f"{cert.log_z_hi:.6g}], log gamma true {lg_true:.6g} vs cert {cert.log_gamma:.6g})")
            if cert.log_gamma > 1e-12:
                worst_g = max(worst_g, lg_true / cert.log_gamma)
            if cert.log_z_hi - cert.log_z_lo > 1e-12:
                worst_z = max(worst_z, max(lz - cert.log_z_lo, cert.log_z_hi - lz) / (cert.log_z_hi - cert.log_z_lo))
    return Outcome(Verdict.HOLDS if bad == 0 else Verdict.FAILS, cases=cases, violations=bad, counterexample=cex,
                   tightness=worst_g,
                   details=f"{cases} (instance, clustering) cases over {n_inst} instances; {bad} with any bound violated. "
                           f"Tightness: worst true log max P/Q / certified log gamma = {worst_g:.3g}; worst position of "
                           f"log Z inside [log Z_lo, log Z_hi] (distance to the far end / width) = {worst_z:.3g}.")
