"""proofs_check runs end to end with a small budget and exits 0 only when every verdict is the documented one."""
import subprocess
import sys

import numpy as np

from proofs_check._framework import Budget, Claim, Outcome, Verdict, run_claim


def test_proofs_check_small_budget_passes(tmp_path):
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "proofs_check", "--scale", "0.1", "--report", str(report)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = report.read_text()
    assert "| claim | paper | verdict |" in text
    assert "table_memory_ratio" in text and "**NO**" not in text


def test_unexpected_verdicts_and_crashes_are_flagged():
    def fails(budget, rng):
        return Outcome(Verdict.FAILS, cases=1, violations=1)

    def crashes(budget, rng):
        raise RuntimeError("boom")

    c1 = Claim("x", "Prop. 0", "a claim expected to hold", Verdict.HOLDS, fails, 0)
    c2 = Claim("y", "Prop. 0", "a claim expected to hold", Verdict.HOLDS, crashes, 0)
    r1, r2 = run_claim(c1, Budget(), 0), run_claim(c2, Budget(), 0)
    assert not r1.as_expected
    assert not r2.as_expected and r2.outcome.verdict == Verdict.ERROR and "boom" in r2.outcome.details


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
