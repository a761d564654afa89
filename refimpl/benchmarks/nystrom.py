"""``python -m refimpl bench nystrom``: the error of Nyström + regression re-encoding (paper §4, Alg. 5-6).

Task: ``planted_dataset`` (dense hierarchical features) and a :class:`~refimpl.encoders.LinearDualEncoder`
trained with Adam on the full softmax (Eq. 2). After ``--pretrain`` steps the targets are encoded exactly (Alg. 6);
training continues and, at ``w`` steps since that exact encoding, the approximate target representations are
compared with the exact embeddings of the current encoder on held-out test queries:

* logit error ``|beta <z_q, z_t> - beta <q, t>|`` (mean, max), softmax TV and max log-ratio to the true softmax,
  R@k of the approximate logits (R@k of the exact logits for reference);
* as functions of d' (``dprime``), of s' (``sprime``), of w (``steps``: stale cache / one regression re-encode at w /
  chained re-encodes every ``--interval`` steps / exact Nyström with fresh embeddings), of the ridge (``ridge``),
  and the landmark ablation 64/128/256 x selection method (``landmarks``);
* cost accounting reported by :class:`~refimpl.nystrom.RegressionReEncoder` (encoder calls, flops) and the wall
  time ratio of a regression re-encode vs a full re-encode measured in this run;
* geometry of the two splits (``split``): how much the certified ``eps = beta ||z_q|| rho`` is inflated by the
  representation (``||z_q|| * ||z_a - z_b||`` vs ``<z_q, z_a - z_b>``), and, when ``refimpl.index.sgtree`` exists, SG-tree
  radii and certified bounds over the representations.

Writes JSON (path printed) and prints a table. ``--quick`` is a small smoke configuration.
"""
from __future__ import annotations

import copy
import ctypes
import os
import time

import numpy as np
import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, so that _limit_blas_threads sets it too)

from refimpl.benchmarks import write_json
from refimpl.cliargs import ArgumentParser, integer, integer_list, out_file, real, real_list, size_list
from refimpl.data import planted_dataset
from refimpl.encoders import LinearDualEncoder
from refimpl.nystrom import (LANDMARK_METHODS, SPLITS, RegressionReEncoder, build_tree, cluster_assignment,
                             default_level, query_report, softmax_gap, update_tree)
from refimpl.optim import Adam
from refimpl.softmax import full_softmax_grad

KS = (1, 10, 100)


def _limit_blas_threads(n):
    """Set the thread count of every loaded OpenBLAS (NumPy's and SciPy's) through ctypes. On this shared 2-core
    machine multi-threaded LAPACK (SVD of a 128 x 384 matrix) was measured 10-100x slower than single-threaded
    because of oversubscription; returns the libraries changed."""
    done = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return done
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, sym):
                getattr(lib, sym)(int(n))
                done.append(os.path.basename(path))
                break
    return done


def _parse(argv):
    p = ArgumentParser(prog="python -m refimpl bench nystrom", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke configuration")
    p.add_argument("--out", type=out_file, default=os.path.join("bench_results", "nystrom.json"))
    p.add_argument("--seed", type=integer(0, 2**62), default=0)
    p.add_argument("--n-targets", type=integer(16), default=4096)
    p.add_argument("--n-features", type=integer(1, 2**20), default=512)
    p.add_argument("--dim", type=integer(1, 4096), default=384, help="student embedding dimension D")
    p.add_argument("--batch", type=integer(1), default=256)
    p.add_argument("--lr", type=real(0.0, 1e3, strict_low=True), default=1e-3)
    p.add_argument("--pretrain", type=integer(0), default=40, help="Adam steps before the exact encoding (Alg. 6)")
    p.add_argument("--steps", type=integer_list(0), default="0,5,10,20,40",
                   help="checkpoints w (steps since the exact encoding)")
    p.add_argument("--interval", type=integer(1), default=5, help="re-encode interval of the chained regression")
    p.add_argument("--dprimes", type=size_list, default="16,32,64,128,256")
    p.add_argument("--sprimes", type=size_list, default="32,128,512,2048")
    p.add_argument("--ridges", type=real_list(0.0), default="0,1e-6,1e-4,1e-3,1e-2,1e-1,1")
    p.add_argument("--d-default", type=integer(1), default=128)
    p.add_argument("--s-default", type=integer(1), default=512)
    p.add_argument("--n-eval", type=integer(1), default=1000, help="test queries used for the metrics")
    p.add_argument("--positives", default="argmax", choices=("argmax", "sample"),
                   help="planted positives: the teacher's argmax (R@1 ceiling 1) or a softmax sample")
    p.add_argument("--blas-threads", type=integer(0, 64), default=1, help="OpenBLAS threads (0: leave as is)")
    if "--quick" in argv:  # smaller defaults; options given explicitly still win
        p.set_defaults(n_targets=1024, n_features=128, dim=96, batch=128, pretrain=10, steps="0,4,8",
                       dprimes="16,32,64", sprimes="32,128", ridges="0,1e-3,1e-1", d_default=32, s_default=128,
                       interval=4, n_eval=200)
    a = p.parse_args(argv)
    a.steps = sorted(set(a.steps))
    return a


def _recall(logits, pos):
    """R@k: fraction of eval queries whose positive ranks in the top k (rank = #targets with a larger logit)."""
    rank = (logits > logits[np.arange(len(pos)), pos][:, None]).sum(axis=1)
    return {f"R@{k}": float((rank < k).mean()) for k in KS}


def _overlap(approx, true, k=10):
    """Mean fraction of the exact top-k targets that are also in the approximate top-k."""
    ta = np.argpartition(-approx, k, axis=1)[:, :k]
    tt = np.argpartition(-true, k, axis=1)[:, :k]
    return float(np.mean([np.intersect1d(x, y).size / k for x, y in zip(ta, tt)]))


def _metrics(approx, true, pos):
    m = softmax_gap(approx, true)
    m["overlap@10"] = _overlap(approx, true)
    m["logit_err_rel"] = float(np.linalg.norm(approx - true) / np.linalg.norm(true - true.mean(axis=1, keepdims=True)))
    m.update(_recall(approx, pos))
    return m


class _Trainer:
    """Full-softmax Adam training of a linear dual encoder on the planted task (the gold-standard gradient)."""

    def __init__(self, a):
        self.ds = ds = planted_dataset(n_targets=a.n_targets, n_queries=max(2000, a.n_targets // 2),
                                       n_features=a.n_features, dim=32, positives=a.positives, rng=a.seed)
        self.enc = LinearDualEncoder(a.n_features, a.n_features, a.dim, beta=20.0, rng=a.seed + 1)
        params = self.enc.params() if callable(self.enc.params) else self.enc.params
        self.opt = Adam(list(params), a.lr)
        self.rng = np.random.default_rng(a.seed + 2)
        self.batch = a.batch
        self.step_count = 0
        self.losses = []
        ev = ds.test_ids[: a.n_eval]
        self.Xq_eval = ds.query_features[ev]
        self.pos_eval = np.array([ds.positives[i][0] for i in ev], dtype=np.int64)

    def step(self):
        ds = self.ds
        b = self.rng.choice(ds.train_ids, size=min(self.batch, ds.train_ids.size), replace=False)
        loss, dA, dB = full_softmax_grad(self.enc, ds.query_features[b], ds.target_features,
                                         [ds.positives[i] for i in b])
        self.opt.step([dA, dB])
        self.step_count += 1
        self.losses.append(float(loss))

    def snapshot(self):
        enc = self.enc.copy()
        T = enc.encode_targets(self.ds.target_features)
        Q = enc.encode_queries(self.Xq_eval)
        return {"enc": enc, "T": T, "Q": Q, "true": enc.beta * (Q @ T.T), "step": self.step_count}


def _eval(re, snap):
    return _metrics(re.approximate_logits(snap["Q"], beta=snap["enc"].beta), snap["true"], _EVAL_POS[0])


_EVAL_POS = [None]


def _initial(trainer_snap, X, d, s, *, ridge=1e-3, method="uniform", split="paper", seed=0):
    re = RegressionReEncoder(d, s, ridge=ridge, method=method, split=split, rng=seed)
    re.initial_encode(trainer_snap["enc"], X)
    return re


def _regressed(re0, snap, s=None, ridge=None):
    re = copy.deepcopy(re0)
    if s is not None:
        re.n_samples = s
    if ridge is not None:
        re.ridge = ridge
    re.reencode(snap["enc"])
    return re


def _fresh(re0, snap):
    re = copy.deepcopy(re0)
    re.exact_reencode(snap["enc"])
    return re


def _geometry(re, snap, rng, n_pairs=2000):
    """How loose Cauchy-Schwarz is in representation space: for random target pairs (a, b) and eval queries,
    the certified logit-gap bound ``beta ||z_q|| ||z_a - z_b||`` divided by the same bound in embedding space
    ``beta ||q|| ||a - b||`` (median), and the median ratio of bound to the actual gap ``|<z_q, z_a - z_b>|``."""
    Z = re.representations
    Zq = re.query_representations(snap["Q"])
    a, b = rng.integers(0, Z.shape[0], size=(2, n_pairs))
    qi = rng.integers(0, Zq.shape[0], size=n_pairs)
    dz = np.linalg.norm(Z[a] - Z[b], axis=1)
    dt = np.linalg.norm(snap["T"][a] - snap["T"][b], axis=1)
    bound_z = np.linalg.norm(Zq[qi], axis=1) * dz
    bound_t = np.linalg.norm(snap["Q"][qi], axis=1) * dt
    gap = np.abs(np.einsum("ij,ij->i", Zq[qi], Z[a] - Z[b]))
    ok = (dt > 0) & (gap > 0)
    return {"median_bound_inflation": float(np.median(bound_z[ok] / bound_t[ok])),
            "median_bound_over_gap": float(np.median(bound_z[ok] / gap[ok])),
            "mean_target_rep_norm": float(np.linalg.norm(Z, axis=1).mean()),
            "mean_query_rep_norm": float(np.linalg.norm(Zq, axis=1).mean())}


def _tree_section(res_by_split, s0, sl, beta, base=None, n_queries=50):
    """SG tree over each split's representations: cluster radii, certified vs measured bounds (median over eval
    queries, at the level with >= sqrt(N) clusters), then one regression re-encode to w = wmax followed by
    update_tree (update_points + Alg. 3 maintain) and the same report."""
    n = next(iter(res_by_split.values())).n_targets
    targets = sorted({max(2, int(np.sqrt(n) / 2)), int(np.ceil(np.sqrt(n))), int(4 * np.sqrt(n))})

    def summary(tree, re, snap):
        """Medians over eval queries at the levels with >= K clusters, K in ``targets`` (comparable budgets)."""
        out = []
        for level in sorted({default_level(tree, K) for K in targets}, reverse=True):
            cl = tree.clustering(level)
            asg = cluster_assignment(tree, cl)
            rows = [query_report(tree, re, snap["Q"][i], snap["T"], beta=beta, clustering=cl, assignment=asg)
                    for i in range(min(n_queries, len(snap["Q"])))]
            out.append({k: float(np.median([r[k] for r in rows])) for k in rows[0]})
        return out

    out = {"status": "done"}
    warm = copy.deepcopy(next(iter(res_by_split.values())))  # compile the tree kernels before timing anything
    warm.representations = warm.representations[:64]
    wt = build_tree(warm, base=base, rng=0)
    update_tree(wt, warm.representations, warm.representations * 1.01, rng=0)
    for split, re0 in res_by_split.items():
        re = copy.deepcopy(re0)
        t0 = time.perf_counter()
        tree = build_tree(re, base=base, rng=0)
        t_build = time.perf_counter() - t0
        rec = {"build_s": t_build, "depth": int(tree.depth()), "w0": summary(tree, re, s0)}
        old = re.representations.copy()
        re.reencode(sl["enc"])
        t0 = time.perf_counter()
        stats = update_tree(tree, old, re.representations, rng=0)
        rec["update_s"] = time.perf_counter() - t0
        rec["update"] = stats
        rec["violations_after_update"] = len(tree.check_invariants())
        t0 = time.perf_counter()
        fresh = build_tree(re, base=base, rng=0)
        rec["rebuild_s"] = time.perf_counter() - t0
        rec["after_reencode"] = summary(tree, re, sl)
        rec["after_rebuild"] = summary(fresh, re, sl)
        out[split] = rec
    return out


def main(argv=None) -> int:
    a = _parse(list(argv or []))
    t_start = time.time()
    blas = _limit_blas_threads(a.blas_threads) if a.blas_threads > 0 else []
    tr = _Trainer(a)
    X = tr.ds.target_features
    _EVAL_POS[0] = tr.pos_eval
    for _ in range(a.pretrain):
        tr.step()
    snaps = {0: tr.snapshot()}
    s0 = snaps[0]
    seed = a.seed
    d0, sd = a.d_default, a.s_default
    re_base = _initial(s0, X, d0, sd, seed=seed)
    chain = copy.deepcopy(re_base)
    chained = {0: _eval(chain, s0)}
    t_reg, t_full = [], []
    for w in range(1, max(a.steps) + 1):
        tr.step()
        if w % a.interval == 0 or w in a.steps:
            snap = tr.snapshot()
            if w % a.interval == 0:
                t0 = time.perf_counter()
                chain.reencode(snap["enc"])
                t_reg.append(time.perf_counter() - t0)
                probe = copy.deepcopy(chain)
                t0 = time.perf_counter()
                probe.exact_reencode(snap["enc"])
                t_full.append(time.perf_counter() - t0)
            if w in a.steps:
                snaps[w] = snap
                chained[w] = _eval(chain, snap)
    wmax = max(a.steps)
    sl = snaps[wmax]
    beta = s0["enc"].beta
    out = {"config": {k: v for k, v in vars(a).items()}, "blas_limited": blas, "losses": tr.losses,
           "exact_recall": {w: _recall(s["true"], tr.pos_eval) for w, s in snaps.items()},
           "drift": {w: float(np.linalg.norm(s["T"] - s0["T"], axis=1).mean()) for w, s in snaps.items()}}

    timing = {"train_and_chain": time.time() - t_start}
    t_sec = time.time()

    def lap(name):
        nonlocal t_sec
        timing[name] = time.time() - t_sec
        t_sec = time.time()

    # steps since the last exact encoding
    rows = []
    for w, snap in snaps.items():
        rows.append({"w": w, "stale": _eval(re_base, snap), "regression": _eval(_regressed(re_base, snap), snap),
                     "chained": chained[w], "exact_nystrom": _eval(_fresh(re_base, snap), snap)})
    out["steps"] = rows
    lap("steps")

    # d' sweep (uniform landmarks): Nyström alone at w=0, and stale / regression / exact at w = wmax
    rows = []
    for d in a.dprimes:
        re0 = _initial(s0, X, d, sd, seed=seed)
        rows.append({"dprime": d, "rank": re0.nystrom.rank, "w0_exact": _eval(re0, s0), "stale": _eval(re0, sl),
                     "regression": _eval(_regressed(re0, sl), sl), "exact_nystrom": _eval(_fresh(re0, sl), sl)})
    out["dprime"] = rows
    lap("dprime")

    # s' sweep at d' default, every checkpoint
    rows = []
    for s in a.sprimes:
        for w, snap in snaps.items():
            if w == 0:
                continue
            rows.append({"sprime": s, "w": w, "regression": _eval(_regressed(re_base, snap, s=s), snap)})
    out["sprime"] = rows
    lap("sprime")

    # ridge sweep at d' default, w = wmax, several s'
    rows = []
    for s in sorted({min(a.sprimes), sd, max(a.sprimes)}):
        for lam in a.ridges:
            rows.append({"sprime": s, "ridge": lam, "regression": _eval(_regressed(re_base, sl, s=s, ridge=lam), sl)})
    out["ridge"] = rows
    lap("ridge")

    # landmark ablation 64/128/256 x selection method (the paper's ablation in miniature)
    rows = []
    for d in [x for x in (64, 128, 256) if x in a.dprimes] or a.dprimes[-2:]:
        for method in LANDMARK_METHODS:
            re0 = _initial(s0, X, d, sd, method=method, seed=seed)
            rows.append({"dprime": d, "method": method, "w0_exact": _eval(re0, s0),
                         "regression": _eval(_regressed(re0, sl), sl)})
    out["landmarks"] = rows
    lap("landmarks")

    # splits: identical inner products, different geometry
    geo, res_by_split = {}, {}
    for split in SPLITS:
        re0 = _initial(s0, X, d0, sd, split=split, seed=seed)
        res_by_split[split] = re0
        geo[split] = _geometry(re0, s0, np.random.default_rng(seed))
        geo[split]["w0_logit_err_mean"] = _eval(re0, s0)["logit_err_mean"]
    out["split"] = geo
    lap("split")
    out["tree"] = _tree_section(res_by_split, s0, sl, beta)
    lap("tree")
    out["timing_s"] = timing

    # cost accounting (from the code) and wall-time ratio (this run)
    cost_reg = chain.history[-1] if chain.history[-1]["kind"] == "regression" else None
    out["cost"] = {"regression": cost_reg, "full": chain.full_reencode_cost(s0["enc"]),
                   "wall_regression_s": float(np.median(t_reg)) if t_reg else None,
                   "wall_full_s": float(np.median(t_full)) if t_full else None}
    out["runtime_s"] = time.time() - t_start
    write_json(a.out, out)
    _print(out, a)
    print(f"\nJSON written to {os.path.abspath(a.out)}")
    return 0


def _fmt(m):
    return (f"{m['logit_err_mean']:8.3f} {m['logit_err_max']:8.2f} {m['tv_mean']:6.3f} {m['log_ratio_mean']:7.2f} "
            f"{m['R@1']:5.3f} {m['R@10']:5.3f} {m['R@100']:5.3f} {m['overlap@10']:6.3f}")


HDR = f"{'logit|e|':>8} {'max|e|':>8} {'TV':>6} {'maxLR':>7} {'R@1':>5} {'R@10':>5} {'R@100':>5} {'ov@10':>6}"


def _print(out, a):
    c = out["config"]
    print(f"planted task: N={c['n_targets']} F={c['n_features']} D={c['dim']} beta=20, full-softmax Adam lr={c['lr']}, "
          f"pretrain {c['pretrain']} steps (loss {out['losses'][0]:.2f} -> {out['losses'][c['pretrain'] - 1]:.2f}); "
          f"d'={a.d_default} s'={a.s_default} ridge=1e-3 unless varied")
    print("exact R@1/10/100 by w: " + ", ".join(f"w={w}: {r['R@1']:.3f}/{r['R@10']:.3f}/{r['R@100']:.3f}"
                                              for w, r in out["exact_recall"].items()))
    print("\n== steps since the last exact encoding (drift = mean ||t_w - t_0||) ==")
    print(f"{'w':>3} {'drift':>6} {'variant':>14} " + HDR)
    for r in out["steps"]:
        for v in ("stale", "regression", "chained", "exact_nystrom"):
            print(f"{r['w']:>3} {out['drift'][r['w']]:6.3f} {v:>14} " + _fmt(r[v]))
    print(f"\n== d' sweep (uniform landmarks; w=0 exact, then w={max(a.steps)}) ==")
    print(f"{'d':>4} {'rank':>4} {'variant':>14} " + HDR)
    for r in out["dprime"]:
        for v in ("w0_exact", "stale", "regression", "exact_nystrom"):
            print(f"{r['dprime']:>4} {r['rank']:>4} {v:>14} " + _fmt(r[v]))
    print(f"\n== s' sweep (d'={a.d_default}, one regression re-encode at w) ==")
    print(f"{'s':>5} {'w':>3} " + HDR)
    for r in out["sprime"]:
        print(f"{r['sprime']:>5} {r['w']:>3} " + _fmt(r["regression"]))
    print(f"\n== ridge (d'={a.d_default}, w={max(a.steps)}) ==")
    print(f"{'s':>5} {'ridge':>7} " + HDR)
    for r in out["ridge"]:
        print(f"{r['sprime']:>5} {r['ridge']:7.0e} " + _fmt(r["regression"]))
    print(f"\n== landmark ablation (w=0 exact Nyström; regression at w={max(a.steps)}) ==")
    print(f"{'d':>4} {'method':>10} {'variant':>10} " + HDR)
    for r in out["landmarks"]:
        for v in ("w0_exact", "regression"):
            print(f"{r['dprime']:>4} {r['method']:>10} {v:>10} " + _fmt(r[v]))
    print(f"\n== splits (d'={a.d_default}, w=0) ==")
    for s, g in out["split"].items():
        print(f"{s:>10}: " + ", ".join(f"{k}={v:.4g}" for k, v in g.items()))
    t = out["tree"]
    print(f"\n== SG tree over the representations (d'={a.d_default}; medians over eval queries) ==  {t['status']}")
    keys = ("n_clusters", "radius_mean", "eps_mean", "cert_log_gamma", "log_max_ratio_approx", "tv_q_approx",
            "tv_approx_true", "log_ratio_approx_true", "tv_q_true", "log_max_ratio_true")
    if t["status"] == "done":
        print(f"{'split':>10} {'when':>14} " + " ".join(f"{k[:12]:>12}" for k in keys))
        for split in SPLITS:
            for when in ("w0", "after_reencode", "after_rebuild"):
                for row in t[split][when]:
                    print(f"{split:>10} {when:>14} " + " ".join(f"{row[k]:12.4g}" for k in keys))
            r = t[split]
            print(f"{split:>10} build {r['build_s']:.2f}s, depth {r['depth']}, update_tree after re-encode "
                  f"{r['update_s']:.2f}s (U={r['update']['U']:.3g}, clusters rebuilt {r['update']['clusters_rebuilt']}, "
                  f"violations {r['violations_after_update']}), full rebuild {r['rebuild_s']:.2f}s")
    c = out["cost"]
    if c["regression"]:
        r, f = c["regression"], c["full"]
        print(f"\n== cost per re-encode (reported by RegressionReEncoder) ==\n"
              f"regression: {r['encoder_calls']} encoder calls, {r['encoder_flops']:.3g} encoder flops, "
              f"{r['linalg_flops']:.3g} linalg flops, total {r['total_flops']:.3g}\n"
              f"full:       {f['encoder_calls']} encoder calls, {f['encoder_flops']:.3g} encoder flops, "
              f"{f['linalg_flops']:.3g} linalg flops, total {f['total_flops']:.3g}\n"
              f"ratios full/regression: calls {f['encoder_calls'] / r['encoder_calls']:.1f}x, "
              f"flops {f['total_flops'] / r['total_flops']:.1f}x, wall (this run) "
              f"{c['wall_full_s'] / c['wall_regression_s']:.1f}x")
    print(f"runtime {out['runtime_s']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in out["timing_s"].items()) + ")")


if __name__ == "__main__":
    raise SystemExit(main())
