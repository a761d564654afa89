"""Adam with warm-up and linear decay (refimpl/optim.py)."""
import math

import numpy as np
import pytest

from refimpl.encoders import LinearDualEncoder
from refimpl.optim import Adam, ColumnGrad
from refimpl.softmax import full_softmax_grad


def _reference_adam(x0, grads, lrs, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba (2015), Algorithm 1, scalar by scalar with Python floats."""
    x = [float(v) for v in x0]
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for j in range(len(x)):
            m[j] = b1 * m[j] + (1 - b1) * g[j]
            v[j] = b2 * v[j] + (1 - b2) * g[j] ** 2
            x[j] -= lr * (m[j] / (1 - b1 ** t)) / (math.sqrt(v[j] / (1 - b2 ** t)) + eps)
    return np.array(x)


def test_matches_reference_adam_with_schedule():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((2, 3))
    q = rng.standard_normal(4)
    x0 = np.concatenate([p.ravel(), q])
    opt = Adam([p, q], 0.1, betas=(0.8, 0.99), eps=1e-6, warmup_steps=3, total_steps=10)
    grads, lrs = [], []
    for _ in range(12):
        g = [rng.standard_normal((2, 3)), rng.standard_normal(4)]
        grads.append(np.concatenate([g[0].ravel(), g[1]]))
        lrs.append(opt.step(g))
    np.testing.assert_allclose(np.concatenate([p.ravel(), q]),
                               _reference_adam(x0, grads, lrs, 0.8, 0.99, 1e-6), rtol=1e-12, atol=1e-14)
    assert opt.t == 12


def test_schedule():
    opt = Adam([np.zeros(1)], 1.0, warmup_steps=4, total_steps=12)
    assert [opt.lr_at(t) for t in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert opt.lr_at(8) == pytest.approx(0.5) and opt.lr_at(12) == 0.0 and opt.lr_at(20) == 0.0
    assert opt.current_lr == 0.25
    lrs = [opt.step([np.ones(1)]) for _ in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert np.all(np.diff(lrs[3:12]) < 0) and lrs[11] == 0.0
    p = opt.params[0].copy()
    opt.step([np.ones(1)])                        # past total_steps: lr 0, no movement
    assert np.array_equal(p, opt.params[0])
    const = Adam([np.zeros(1)], 0.3)
    assert const.lr_at(1) == 0.3 and const.lr_at(10**6) == 0.3
    decay = Adam([np.zeros(1)], 1.0, total_steps=4)
    assert [decay.lr_at(t) for t in (1, 2, 3, 4)] == [0.75, 0.5, 0.25, 0.0]


def test_first_step_is_lr_times_sign():
    p = np.array([1.0, -2.0, 3.0])
    Adam([p], 0.01).step([np.array([5.0, -0.1, 1e3])])       # |g| >> eps
    np.testing.assert_allclose(p, [0.99, -1.99, 2.99], rtol=1e-9, atol=2e-9)


def test_updates_encoder_in_place_and_reduces_loss():
    """Adam on the full-softmax loss (Eq. 2) of a tiny planted problem lowers the loss a lot."""
    rng = np.random.default_rng(1)
    enc = LinearDualEncoder(8, 8, 4, beta=5.0, rng=0)
    Xt = rng.standard_normal((30, 8))
    pos = rng.integers(0, 30, size=20)
    Xq = Xt[pos] + 0.1 * rng.standard_normal((20, 8))
    A_id = id(enc.A)
    opt = Adam(enc.params, 0.05, warmup_steps=5, total_steps=150)
    first = full_softmax_grad(enc, Xq, Xt, pos)[0]
    for _ in range(150):
        loss, dA, dB = full_softmax_grad(enc, Xq, Xt, pos)
        opt.step([dA, dB])
    assert id(enc.A) == A_id
    assert loss < 0.3 * first, (first, loss)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: Adam(np.zeros(3), 0.1), TypeError, "params"),
    (lambda: Adam([], 0.1), ValueError, "params: is empty"),
    (lambda: Adam([np.zeros(3, dtype=np.float32)], 0.1), TypeError, r"params\[0\]"),
    (lambda: Adam([[0.0, 1.0]], 0.1), TypeError, r"params\[0\]"),
    (lambda: Adam([np.zeros(3)], 0.0), ValueError, "lr"),
    (lambda: Adam([np.zeros(3)], float("nan")), ValueError, "lr"),
    (lambda: Adam([np.zeros(3)], 0.1, betas=(1.0, 0.9)), ValueError, "betas"),
    (lambda: Adam([np.zeros(3)], 0.1, betas=(0.9,)), ValueError, "betas"),
    (lambda: Adam([np.zeros(3)], 0.1, eps=0.0), ValueError, "eps"),
    (lambda: Adam([np.zeros(3)], 0.1, warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: Adam([np.zeros(3)], 0.1, warmup_steps=5, total_steps=5), ValueError, "total_steps"),
    (lambda: Adam([np.zeros(3)], 0.1, total_steps=0), ValueError, "total_steps"),
])
def test_bad_constructor_args(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_grads():
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        Adam([ro], 0.1)
    opt = Adam([np.zeros(2), np.zeros((2, 2))], 0.1)
    with pytest.raises(ValueError, match="grads: expected 2 arrays"):
        opt.step([np.zeros(2)])
    with pytest.raises(ValueError, match=r"grads\[1\]: expected shape"):
        opt.step([np.zeros(2), np.zeros(4)])
    with pytest.raises(ValueError, match=r"grads\[0\]: contains NaN"):
        opt.step([np.array([np.nan, 0.0]), np.zeros((2, 2))])
    with pytest.raises(TypeError, match="grads"):
        opt.step(np.zeros(2))
    assert opt.t == 0                              # failed steps do not advance the schedule


# ------------------------------------------------------------------------------------------------ lazy (sparse) Adam
def _reference_lazy_adam(p0, steps, b1=0.9, b2=0.999, eps=1e-8):
    """The lazy update of refimpl.optim's docstring, transcribed scalar by scalar: per column j its own count t_j;
    ``steps`` is a list of (lr, cols, values (dim, len(cols)))."""
    p = p0.copy()
    dim, F = p.shape
    m, v, cnt = np.zeros_like(p), np.zeros_like(p), [0] * F
    for lr, cols, vals in steps:
        for c, j in enumerate(cols):
            cnt[j] += 1
            t = cnt[j]
            for d in range(dim):
                g = vals[d, c]
                m[d, j] = b1 * m[d, j] + (1 - b1) * g
                v[d, j] = b2 * v[d, j] + (1 - b2) * g * g
                p[d, j] -= lr * (m[d, j] / (1 - b1 ** t)) / (math.sqrt(v[d, j] / (1 - b2 ** t)) + eps)
    return p, cnt


def test_lazy_equals_dense_when_every_column_is_touched():
    rng = np.random.default_rng(1)
    p_dense, p_lazy = rng.standard_normal((3, 6)), None
    p_lazy = p_dense.copy()
    dense = Adam([p_dense], 0.05, warmup_steps=2, total_steps=9)
    lazy = Adam([p_lazy], 0.05, warmup_steps=2, total_steps=9)
    perm = np.arange(6)
    for _ in range(10):
        g = rng.standard_normal((3, 6))
        dense.step([g])
        perm = rng.permutation(6)                      # the column order of a ColumnGrad does not matter
        lazy.step([ColumnGrad(perm, g[:, perm])])
    np.testing.assert_allclose(p_lazy, p_dense, rtol=1e-13, atol=1e-15)
    assert np.array_equal(lazy.counts[0], np.full(6, 10)) and np.array_equal(dense.counts[0], lazy.counts[0])


def test_lazy_semantics_per_column_counts_and_untouched_columns_frozen():
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((2, 8))
    p = p0.copy()
    opt = Adam([p], 0.1, betas=(0.8, 0.99), eps=1e-6, warmup_steps=3, total_steps=20)
    steps = []
    for _ in range(12):
        cols = np.sort(rng.choice(8, size=rng.integers(0, 5), replace=False))
        vals = rng.standard_normal((2, cols.size))
        lr = opt.step([ColumnGrad(cols, vals)])
        steps.append((lr, cols, vals))
    ref, cnt = _reference_lazy_adam(p0, steps, 0.8, 0.99, 1e-6)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14)
    assert list(opt.counts[0]) == cnt and opt.t == 12
    never = [j for j in range(8) if cnt[j] == 0]
    assert np.array_equal(p[:, never], p0[:, never])
    # and it differs from dense Adam on the zero-padded gradients (momentum moves untouched columns there)
    q = p0.copy()
    d = Adam([q], 0.1, betas=(0.8, 0.99), eps=1e-6, warmup_steps=3, total_steps=20)
    for _, cols, vals in steps:
        g = np.zeros((2, 8))
        g[:, cols] = vals
        d.step([g])
    assert not np.allclose(q, p)


def test_lazy_on_a_1d_parameter_and_mixed_with_dense():
    p = np.zeros(4)
    opt = Adam([p], 1.0)
    opt.step([ColumnGrad(np.array([2]), np.array([3.0]))])     # first step of a column moves it by lr * sign
    np.testing.assert_allclose(p, [0, 0, -1.0, 0], atol=1e-7)
    opt.step([np.ones(4)])
    assert list(opt.counts[0]) == [1, 1, 2, 1]


@pytest.mark.parametrize("g, match", [
    ((np.array([0, 0]), np.zeros((2, 2))), "distinct"),
    ((np.array([5]), np.zeros((2, 1))), r"in \[0, 5\)"),
    ((np.array([-1]), np.zeros((2, 1))), r"in \[0, 5\)"),
    ((np.array([1]), np.zeros((3, 1))), "values must have shape"),
    ((np.array([1.5]), np.zeros((2, 1))), "integer"),
    ((np.array([1]), np.array([[np.nan], [0.0]])), "NaN"),
    ((np.array([1]),), "pair"),
])
def test_bad_column_grads(g, match):
    opt = Adam([np.zeros((2, 5))], 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\]: .*" + match):
        opt.step([g])
