"""The machinery every claim check shares: a registry, a result record, verdicts, the report.

A *check* is a function ``check(budget: Budget, rng: numpy.random.Generator) -> Outcome`` registered with
:func:`claim`. It states the paper's claim, searches for violations on random and adversarial instances, and
returns what it found: cases tried, violations, the smallest counterexample, the tightness (observed / bound,
worst case), and a verdict. The registration also records the *expected* verdict: the known, documented
outcome (e.g. Prop. 1 as printed is expected to ``FAIL``; PAPER.md lists it as an erratum). The run exits
non-zero exactly when some verdict differs from its expectation: an unexpected violation, or an erratum that
no longer reproduces.
"""
from __future__ import annotations

import dataclasses
import enum
import time
import traceback
from typing import Callable

import numpy as np

__all__ = ["Verdict", "Budget", "Outcome", "Claim", "claim", "REGISTRY", "run_claim"]


class Verdict(str, enum.Enum):
    HOLDS = "holds"
    HOLDS_CORRECTED = "holds only corrected"
    FAILS = "fails"
    NOT_COVERED = "not covered by any proposition"
    ERROR = "error"


@dataclasses.dataclass(frozen=True)
class Budget:
    """How hard to look. ``scale`` multiplies every check's default number of cases (1 default, 10 thorough).

    ``perturb`` (the self-test): the check flips its own premise or input (the perturbation registered with the
    claim) and must then return a verdict different from the documented one, showing that the row can fail."""

    scale: float = 1.0
    thorough: bool = False
    perturb: bool = False

    def cases(self, default: int, minimum: int = 1) -> int:
        return max(minimum, int(round(default * self.scale)))


@dataclasses.dataclass
class Outcome:
    """What a check found.

    verdict         HOLDS, HOLDS_CORRECTED (true only with the corrected constant/assumption named in ``correction``)
                    or FAILS.
    cases           instances tried.
    violations      instances on which the statement *as printed in the paper* was violated.
    counterexample  the smallest violating instance, human-readable (None if none).
    tightness       worst observed / bound for the statement that holds (1.0 = tight; None if not meaningful).
    correction      the corrected statement, when the printed one fails.
    details         free text: what was searched, extra numbers.
    """

    verdict: Verdict
    cases: int
    violations: int = 0
    counterexample: str | None = None
    tightness: float | None = None
    correction: str | None = None
    details: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
    key: str
    paper_ref: str
    statement: str
    expected: Verdict
    func: Callable[[Budget, np.random.Generator], Outcome]
    order: int
    perturbation: str = ""


REGISTRY: dict[str, Claim] = {}


def claim(key: str, *, paper_ref: str, statement: str, perturbation: str, expected: Verdict = Verdict.HOLDS,
          order: int = 100):
    """Register a check. ``expected`` is the documented outcome (HOLDS unless PAPER.md lists an erratum);
    ``perturbation`` says what the check changes when ``budget.perturb`` is set (the self-test)."""
    if not perturbation:
        raise ValueError(f"claim {key!r}: a perturbation is required (every row must be shown to fail)")

    def deco(func):
        if key in REGISTRY:
            raise ValueError(f"claim {key!r} registered twice")
        REGISTRY[key] = Claim(key, paper_ref, statement, expected, func, order, perturbation)
        return func

    return deco


@dataclasses.dataclass
class Result:
    claim: Claim
    outcome: Outcome
    seconds: float

    @property
    def as_expected(self) -> bool:
        return self.outcome.verdict == self.claim.expected

    @property
    def flipped(self) -> bool:
        """Self-test: the perturbed run gave another (non-error) verdict than the documented one."""
        return self.outcome.verdict not in (self.claim.expected, Verdict.ERROR)


def run_claim(c: Claim, budget: Budget, seed: int) -> Result:
    """Run one check with its own seeded stream (independent of the order checks run in)."""
    rng = np.random.default_rng([seed, sum(map(ord, c.key))])
    t0 = time.perf_counter()
    try:
        out = c.func(budget, rng)
    except Exception:  # a crash is reported as an unexpected result, never swallowed silently
        out = Outcome(Verdict.ERROR, cases=0, details=traceback.format_exc(limit=8))
    return Result(c, out, time.perf_counter() - t0)
