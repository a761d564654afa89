"""proofs_check runs end to end with a small budget and exits 0 only when every verdict is the documented one; its
self-test (every row's premise flipped) changes every verdict; a default run writes no tracked file."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from proofs_check._framework import Budget, Claim, Outcome, Verdict, claim, run_claim

ROOT = Path(__file__).resolve().parents[1]


def test_proofs_check_small_budget_passes(tmp_path):
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "proofs_check", "--scale", "0.1", "--report", str(report)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = report.read_text()
    assert "| claim | paper | verdict |" in text
    assert "table_memory_ratio" in text and "**NO**" not in text


def test_self_test_flips_every_row():
    """--self-test perturbs each row's premise (small scale) and exits 0 only if every verdict changed."""
    proc = subprocess.run([sys.executable, "-m", "proofs_check", "--self-test", "--scale", "0.1"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " did not" in proc.stdout and "0 did not" in proc.stdout


def test_default_run_writes_only_the_untracked_folder(tmp_path):
    """Without --report the report goes to proofs_check_out/ under the working directory (ignored by git)."""
    proc = subprocess.run([sys.executable, "-m", "proofs_check", "--only", "table_error_halved"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "proofs_check_out" / "REPORT.md").exists()
    assert "proofs_check_out/" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_claim_without_a_perturbation_is_refused():
    with pytest.raises(ValueError, match="perturbation"):
        claim("no_perturbation_row", paper_ref="-", statement="-", perturbation="")


def test_unexpected_verdicts_and_crashes_are_flagged():
    def fails(budget, rng):
        return Outcome(Verdict.FAILS, cases=1, violations=1)

    def crashes(budget, rng):
        raise RuntimeError("boom")

    c1 = Claim("x", "Prop. 0", "a claim expected to hold", Verdict.HOLDS, fails, 0)
    c2 = Claim("y", "Prop. 0", "a claim expected to hold", Verdict.HOLDS, crashes, 0)
    r1, r2 = run_claim(c1, Budget(), 0), run_claim(c2, Budget(), 0)
    assert not r1.as_expected and r1.flipped
    assert not r2.as_expected and r2.outcome.verdict == Verdict.ERROR and "boom" in r2.outcome.details
    assert not r2.flipped  # a crash under perturbation is not a flipped verdict


def test_each_claim_gets_its_own_reproducible_stream():
    seen = []

    def grab(budget, rng):
        seen.append(rng.integers(1 << 40))
        return Outcome(Verdict.HOLDS, cases=1)

    c = Claim("z", "-", "-", Verdict.HOLDS, grab, 0)
    run_claim(c, Budget(), 7)
    run_claim(c, Budget(), 7)
    run_claim(c, Budget(), 8)
    assert seen[0] == seen[1] != seen[2]
    assert Budget(scale=0.1).cases(100) == 10 and Budget(scale=0.001).cases(100, minimum=3) == 3
    assert isinstance(np.random.default_rng(0), np.random.Generator)


# ---------------------------------------------------------------------------------------------------------------
# the oracles the checks rely on (independent of the library's kernels) must themselves be right


def test_mh_law_is_exact_and_converges():
    from proofs_check import _instances as I

    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(12))
    laws = I.mh_law(P, P, 4)  # proposal = target: every state is already P
    assert all(I.tv(law, P) < 1e-12 for law in laws)
    Q = rng.dirichlet(np.ones(12))
    laws = I.mh_law(P, Q, 60)
    gamma = float(np.max(P / Q))
    tvs = [I.tv(law, P) for law in laws]
    assert tvs[0] == I.tv(Q, P) and tvs[-1] < tvs[0]
    assert all(t <= np.exp(-(s - 1) / gamma) + 1e-12 for s, t in enumerate(tvs, start=1))
    assert all(abs(law.sum() - 1) < 1e-12 for law in laws)


def test_gof_has_power_and_accepts_exact_draws():
    """The chi-square helper rejects a law 0.05 away in TV with the sample size it prescribes, accepts exact draws."""
    from proofs_check import _instances as I

    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(200) * 0.3)
    n = I.required_n(I.bins_for(p)[1] - 1)
    exact = rng.choice(p.size, size=n, p=p)
    assert I.gof(exact, p)[0] > I.ALPHA
    q = p.copy()
    top = int(np.argmax(q))
    q[top] += 0.05
    q /= q.sum()
    assert I.tv(p, q) > 0.02
    assert I.gof(rng.choice(p.size, size=n, p=q), p)[0] < I.ALPHA
    assert I.required_n(10) < I.required_n(40)


def test_alg1_exact_law_corrected_is_exact_printed_is_not():
    from proofs_check import _instances as I
    from proofs_check.check_alg1_printed import exact_law

    rng = np.random.default_rng(2)
    X = I.points("hierarchical", 60, 3, rng)
    tree = I.build(X, 1.3, rng)
    q = X[0]
    beta = 20.0
    s = beta * X @ q
    P = I.softmax(s)
    top = tree.level_range()[1] + 1
    law, bad, succ = exact_law(tree, s, top, "corrected", bq=beta)
    assert bad == 0 and I.tv(law, P) < 1e-9 and 0 < succ <= 1
    law_p, bad_p, _ = exact_law(tree, s, top, "printed", X=1.0)
    assert bad_p > 0 and I.tv(law_p, P) > 1e-3
