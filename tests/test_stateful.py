"""Stateful property test of the SG tree and everything derived from it (paper §3-4: Alg. 1, Alg. 2, Alg. 3 and the
certified bounds must hold after ANY sequence of mutations).

A hypothesis ``RuleBasedStateMachine`` applies random sequences of insert, remove, update_points (with and without
repair), rebuild_level, maintain (both granularities), save + load and copy to a small tree (2-4 dimensions, unit or
free norms, exact duplicates, tiny and large scales) and checks after EVERY step:

* ``check_invariants()`` is empty; every live id is in exactly one node and in exactly one cluster of C_(l);
* exact ``topk`` equals brute force;
* ``certify``'s log Z interval contains the brute-force log Z, for a fresh C_(l) and a fresh Alg. 2 clustering;
* a clustering computed before the last mutation is refused (ValueError) by certify, the samplers and
  cluster_labels: never a stale answer;
* Alg. 1, flat rejection and MH draw only live, non-excluded ids; excluding every live id is a ValueError.

Sequences: the default profile runs 20 sequences of up to 12 steps (seconds); ``HYPOTHESIS_PROFILE=thorough`` runs
10,000 sequences of up to 15 steps (``STATEFUL_SEQUENCES=n`` to change the count).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from refimpl.index.search import topk
from refimpl.index.sgtree import SGTree
from refimpl.sampling import samplers as S
from refimpl.sampling.clustering import certify, cluster_labels, find_clustering, level_clustering

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
BETA = 3.0


def _points(seed, n, dim, scale, unit, pool=None):
    """n points from a seed: Gaussian (or unit-norm) at ``scale``; with a pool, a third are exact duplicates."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim))
    if unit:
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
    X *= scale
    if pool is not None and pool.shape[0] and n:
        dup = rng.random(n) < 1 / 3
        X[dup] = pool[rng.integers(0, pool.shape[0], dup.sum())]
    return X


class TreeMachine(RuleBasedStateMachine):
    """Model: ``self.X`` maps live ids to their points (a dict), kept in step with the tree."""

    @initialize(seed=st.integers(0, 2**31), n=st.integers(1, 40), dim=st.integers(2, 4),
                scale=st.sampled_from([1.0, 1e-3, 50.0]), unit=st.booleans(), base=st.sampled_from([1.2, 1.5, 2.0]))
    def build(self, seed, n, dim, scale, unit, base):
        self.dim, self.scale, self.unit = dim, scale, unit
        P = _points(seed, n, dim, scale, unit)
        P[n // 2:] = np.where(np.random.default_rng(seed).random((n - n // 2, 1)) < 0.2, P[: n - n // 2], P[n // 2:])
        self.tree = SGTree.build(P, base=base, rng=seed)
        self.X = {i: P[i].copy() for i in range(n)}
        self.stale = None
        self.unrepaired = False  # update_points(repair=False) may break covering/separation until maintain
        self.rng = np.random.default_rng(seed + 1)

    # ------------------------------------------------------------------ helpers
    def _pool(self):
        return np.array(list(self.X.values()))

    def _live(self):
        return np.array(sorted(self.X), np.int64)

    def _before_mutation(self):
        """Keep a clustering of the current state: after the mutation it must be refused."""
        lo, hi = self.tree.level_range()
        self.stale = level_clustering(self.tree, int(self.rng.integers(lo, hi + 2)))

    # ------------------------------------------------------------------ mutations
    @rule(seed=st.integers(0, 2**31), n=st.integers(1, 8))
    def insert(self, seed, n):
        self._before_mutation()
        P = _points(seed, n, self.dim, self.scale, self.unit, self._pool())
        ids = self.tree.insert(P)
        assert ids.shape == (n,)
        for i, p in zip(ids.tolist(), P):
            assert i not in self.X
            self.X[i] = p.copy()

    @precondition(lambda self: len(self.X) > 1)
    @rule(data=st.data())
    def remove(self, data):
        self._before_mutation()
        live = self._live()
        m = data.draw(st.integers(1, len(live) - 1))
        ids = self.rng.choice(live, m, replace=False)
        self.tree.remove(ids)
        for i in ids.tolist():
            del self.X[i]

    @rule(seed=st.integers(0, 2**31), frac=st.floats(0.05, 1.0), step=st.sampled_from([0.01, 0.3, 2.0]),
          repair=st.booleans())
    def update_points(self, seed, frac, step, repair):
        self._before_mutation()
        rng = np.random.default_rng(seed)
        live = self._live()
        ids = rng.choice(live, max(1, int(frac * len(live))), replace=False)
        P = np.array([self.X[i] for i in ids.tolist()]) + step * self.scale * rng.normal(size=(ids.size, self.dim))
        self.tree.update_points(ids, P, repair=repair)
        self.unrepaired |= not repair
        for i, p in zip(ids.tolist(), P):
            self.X[i] = p.copy()

    @rule(shift=st.integers(-2, 2), seed=st.integers(0, 2**31))
    def rebuild_level(self, shift, seed):
        self._before_mutation()
        lo, hi = self.tree.level_range()
        self.tree.rebuild_level(int(np.clip((lo + hi) // 2 + shift, lo, hi + 1)), rng=seed)

    @rule(U=st.sampled_from([0.0, 0.01, 0.3]), granularity=st.sampled_from(["child", "cluster"]))
    def maintain(self, U, granularity):
        self._before_mutation()
        self.tree.maintain(U * self.scale, granularity=granularity)
        self.unrepaired = False

    @rule()
    def save_load(self):
        self._before_mutation()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tree.npz")
            self.tree.save(path)
            self.tree = SGTree.load(path)

    @rule()
    def copy(self):
        self._before_mutation()
        old = self.tree
        self.tree = old.copy()
        old.insert(np.zeros((1, self.dim)))  # mutating the original must not touch the copy
        self.stale = None  # a copy has the same structure: its clustering stays valid (checked below)

    # ------------------------------------------------------------------ checks after every step
    @invariant()
    def tree_is_valid(self):
        if not hasattr(self, "tree"):
            return
        t = self.tree
        # documented: after update_points(repair=False) only covering and separation may fail until maintain
        assert t.check_invariants(geometry=not self.unrepaired) == []
        live = self._live()
        np.testing.assert_array_equal(t.live_ids(), live)
        assert len(t) == live.size
        nodes = np.asarray(t.node_point[: t.n_nodes])
        np.testing.assert_array_equal(np.sort(nodes[nodes >= 0]), live)  # one node per live id
        np.testing.assert_allclose(t.points[live], self._pool()[np.argsort(np.argsort(live))], rtol=0, atol=0)
        lo, hi = t.level_range()
        cl = level_clustering(t, int(self.rng.integers(lo - 1, hi + 2)))
        lab = cluster_labels(t, cl)
        assert np.all(lab[live] >= 0) and np.all(np.delete(lab, live) == -1)
        np.testing.assert_array_equal(np.bincount(lab[live], minlength=len(cl)), cl.sizes)

    @invariant()
    def topk_is_exact(self):
        if not hasattr(self, "tree"):
            return
        live = self._live()
        q = self.rng.normal(size=self.dim)
        k = min(3, live.size)
        s = self.tree.points[live] @ q
        order = np.lexsort((live, -s))[:k]
        r = topk(self.tree, q, k)
        np.testing.assert_allclose(self.tree.points[r.ids] @ q, s[order], rtol=1e-12, atol=1e-300)

    @invariant()
    def certificates_hold(self):
        if not hasattr(self, "tree"):
            return
        t = self.tree
        live = self._live()
        q = self.rng.normal(size=self.dim) / self.scale
        s = BETA * (t.points[live] @ q)
        lz = float(np.logaddexp.reduce(s))
        lo, hi = t.level_range()
        fresh = [level_clustering(t, int(self.rng.integers(lo - 1, hi + 2))),
                 find_clustering(t, q, beta=BETA, gamma=4.0)]
        for cl in fresh:
            c = certify(t, q, cl, beta=BETA)
            tol = 1e-9 * max(1.0, abs(lz))
            assert c.log_z_lo - tol <= lz <= c.log_z_hi + tol, (c.log_z_lo, lz, c.log_z_hi)
        if self.stale is not None and self.stale.tree_version == t.version:
            # the "mutation" changed nothing (e.g. maintain with nothing to repair): the clustering is current
            np.testing.assert_array_equal(self.stale.nodes, level_clustering(t, self.stale.level).nodes)
        elif self.stale is not None:
            for call in (lambda: certify(t, q, self.stale, beta=BETA),
                         lambda: S.sample_flat_rejection(t, q, 2, beta=BETA, rng=0, clustering=self.stale),
                         lambda: S.sample_mh(t, q, 2, beta=BETA, rng=0, clustering=self.stale),
                         lambda: cluster_labels(t, self.stale)):
                try:
                    call()
                except ValueError as e:
                    assert "version" in str(e)
                else:
                    raise AssertionError("a clustering computed before the last mutation was accepted")

    @invariant()
    def samplers_draw_live_non_excluded(self):
        if not hasattr(self, "tree"):
            return
        t = self.tree
        live = self._live()
        q = self.rng.normal(size=self.dim) / self.scale
        ex = self.rng.choice(live, int(self.rng.integers(0, live.size)), replace=False)
        ok = np.setdiff1d(live, ex)
        seed = int(self.rng.integers(2**31))
        try:  # MH refuses (SamplerError) when Eq. 6's certified chain length exceeds its step budget
            mh = [S.sample_mh(t, q, 5, beta=BETA, rng=seed, exclude=ex, max_refine_clusters=50)]
        except S.SamplerError as e:
            assert "chain length" in str(e)
            mh = []
        for r in [S.sample_rejection(t, q, 5, beta=BETA, rng=seed, exclude=ex),
                  S.sample_flat_rejection(t, q, 5, beta=BETA, rng=seed, exclude=ex),
                  S.sample_rejection(t, q, ok.size, beta=BETA, rng=seed, exclude=ex, replace=False)] + mh:
            assert np.isin(r.ids, ok).all()
            assert np.all(np.isfinite(r.log_q)) and np.all(r.log_q <= 1e-9)
        for f in (S.sample_rejection, S.sample_flat_rejection, S.sample_mh):
            try:
                f(t, q, 1, beta=BETA, rng=seed, exclude=live)
            except ValueError as e:
                assert "exclude" in str(e)
            else:
                raise AssertionError("excluding every live target was accepted")


TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = settings(
    max_examples=int(os.environ.get("STATEFUL_SEQUENCES", 10_000)) if THOROUGH else 20,
    stateful_step_count=15 if THOROUGH else 12,
    deadline=None,
    derandomize=not THOROUGH,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
