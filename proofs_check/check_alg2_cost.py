"""Eq. 7's cost and Alg. 2's output size (paper §3.2-3.3).

Eq. 7: the cluster proposal Q(i) ∝ exp(s_r(C(i))) needs the |C| representative logits and nothing else: |C| inner
products per query, then one inner product per MH proposal (the proposed target's logit, Eq. 14). Checked on level
clusterings and on Alg. 2's output: Q from the |C| representative logits alone equals Eq. 7 computed from all N
logits; the library's certificate of Q counts exactly |C|; k chains of s states count exactly k s proposals and
add exactly one inner product each (the library's counters, differenced between chain settings).

Alg. 2: the output is a partition of the targets whose clusters have levels in [m, l] (l = Prop. 2's start level),
so |C_(l)| <= |output| <= |C_(m)|, and the frontier walk costs at most sum_{k=m}^{l} |C_(k)| distance evaluations.
Reported: the output size and cost against gamma (through l) and against the tree level.

Adapters: proofs_check._library (alg2, level_clusters, eq7_inner_products, mh_on_clustering).
"""
from __future__ import annotations


import numpy as np

from proofs_check import _instances as I
from proofs_check import _library as lib
from proofs_check._framework import Budget, Outcome, Verdict, claim

GAMMAS = (1.2, 2.0, 4.0, 20.0, 1e3)


def _instance(rng, t):
    kind = ("hierarchical", "sphere", "clustered_tight", "duplicates", "line")[t % 5]
    n = int(rng.integers(80, 400))
    dim = int(rng.choice([3, 8]))
    base = float(rng.choice([1.05, 1.3, 2.0]))
    X = I.points(kind, n, dim, rng)
    tree = lib.build_tree(X, base, rng.integers(1 << 31))
    q = X[int(rng.integers(n))] if t % 2 else I.unit_rows(rng.normal(size=(1, dim)))[0]
    return kind, n, dim, base, X, tree, q


@claim("eq7_cost", paper_ref="Eq. 7 (cost |C|), Eq. 14", order=35,
       perturbation="the count compared with |C| of the clustering one level finer",
       statement="The cluster proposal Q of Eq. 7 costs |C| inner products (the representatives' logits); each MH "
                 "proposal (Eq. 14) adds one.")
def check_eq7(budget: Budget, rng) -> Outcome:
    cases = bad = 0
    beta = 20.0
    double = 0
    cex = None
    for t in range(budget.cases(15, minimum=4)):
        kind, n, dim, base, X, tree, q = _instance(rng, t)
        s = beta * X @ q
        lo, hi = tree.level_range()
        L = int(min(max(I.start_level(tree, beta), lo), hi))
        cls = [("C_(%d)" % L, L), ("alg2", None)]
        for name, L in cls:
            if L is None:
                reps, sizes, members, levels, st, obj = lib.alg2(tree, q, beta=beta, gamma=4.0)
            else:
                reps, sizes, _, members, obj = lib.level_clusters(tree, L, with_object=True)
            n_claim = len(reps)
            if budget.perturb:
                n_claim = lib.level_count(tree, int(np.min(getattr(obj, "levels", [L]))) - 1)
            lab = I.labels_from_members(n, members)
            q_reps = I.softmax(np.log(sizes) + s[reps])  # cluster law from the |C| representative logits alone
            q_full = np.bincount(lab, weights=I.proposal_eq7(s, lab, reps), minlength=len(reps))
            ok_formula = np.allclose(q_reps, q_full, rtol=1e-9, atol=1e-15)
            ip_cert = lib.eq7_inner_products(tree, q, obj, beta=beta)
            runs = {(k, c): lib.mh_on_clustering(tree, q, obj, k, beta=beta, chain_length=c,
                                                 rng=int(rng.integers(1 << 31))) for k, c in ((1, 1), (4, 3), (8, 6))}
            base_ip = runs[(1, 1)]["inner_products"] - runs[(1, 1)]["proposals"]
            ok_props = all(r["proposals"] == k * c for (k, c), r in runs.items())
            ok_incr = all(r["inner_products"] - r["proposals"] == base_ip for r in runs.values())
            double += base_ip == 2 * len(reps)
            cases += 1
            ok = ok_formula and ip_cert == n_claim and ok_props and ok_incr and base_ip % len(reps) == 0
            if not ok:
                bad += 1
                cex = cex or (f"{kind} n={n} b={base} {name}: |C| = {len(reps)} (claimed {n_claim}), certificate "
                              f"{ip_cert} inner products, formula ok {ok_formula}, proposals ok {ok_props}, "
                              f"+1 per proposal {ok_incr}, fixed part {base_ip}")
    return Outcome(Verdict.HOLDS if bad == 0 else Verdict.FAILS, cases=cases, violations=bad, counterexample=cex,
                   details=f"{cases} (instance, clustering) cases; Q from the representatives alone = Eq. 7 from all "
                           f"logits, certificate = |C| inner products, k chains of s states = k s proposals of one inner "
                           f"product each: {bad} mismatches. Library overhead (not the paper's claim): sample_mh with a "
                           f"given clustering computes the |C| representative logits twice (certificate for the chain "
                           f"length, then the proposal) in {double}/{cases} cases: 2|C| + proposals.")


@claim("alg2_output_size", paper_ref="Alg. 2 (output size, cost)", order=36,
       perturbation="one cluster removed from Alg. 2's output",
       statement="Alg. 2 returns a partition of the targets into clusters of levels in [m, l] (l = Prop. 2's level), "
                 "so |C_(l)| <= |output| <= |C_(m)|, at a cost of at most sum_{k=m}^{l} |C_(k)| distance evaluations.")
def check_output(budget: Budget, rng) -> Outcome:
    beta = 20.0
    cases = bad = 0
    cex, lines = None, []
    for t in range(budget.cases(12, minimum=3)):
        kind, n, dim, base, X, tree, q = _instance(rng, t)
        row = []
        for g in GAMMAS:
            reps, sizes, members, levels, st, _ = lib.alg2(tree, q, beta=beta, gamma=g)
            if budget.perturb:
                reps, members, levels = reps[1:], members[1:], levels[1:]
            L, m = int(st["start_level"]), int(st["m"])
            n_l, n_m = lib.level_count(tree, L), lib.level_count(tree, m)
            cover = np.concatenate(members) if members else np.zeros(0, np.int64)
            partition = cover.size == n and np.unique(cover).size == n
            lo_hi = levels.size == 0 or (levels.min() >= m and levels.max() <= L)
            cost_cap = sum(lib.level_count(tree, k) for k in range(m, L + 1))
            ok = partition and lo_hi and n_l <= len(reps) <= n_m and st["distance_evals"] <= cost_cap
            cases += 1
            if not ok:
                bad += 1
                cex = cex or (f"{kind} n={n} b={base} gamma={g}: partition {partition}, levels in [m, l] {lo_hi}, "
                              f"|C_l| = {n_l} <= {len(reps)} <= |C_m| = {n_m}, distance evals {st['distance_evals']} "
                              f"<= {cost_cap}")
            row.append(f"gamma={g:g}: l={L} m={m} |C_l|={n_l} out={len(reps)} |C_m|={n_m} dist={st['distance_evals']}")
        if len(lines) < 6:
            lines.append(f"{kind} n={n} b={base}: " + "; ".join(row))
    return Outcome(Verdict.HOLDS if bad == 0 else Verdict.FAILS, cases=cases, violations=bad, counterexample=cex,
                   details=f"{cases} (instance, gamma in {GAMMAS}) cases, beta = {beta:g}, m = the library's default "
                           f"(l - ceil(log_b 16)); {bad} violations. Output size and cost against gamma:\n"
                           + "\n".join(lines))
