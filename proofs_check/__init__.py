"""proofs_check: every claim of the paper confronted with numbers.

One module per claim (``check_*.py``); each registers itself with :func:`proofs_check._framework.claim`, with the
perturbation that must make it fail. ``python -m proofs_check`` runs all of them with the default budget, prints the
verdict table and writes a Markdown report to the untracked ``proofs_check_out/REPORT.md`` (``--report
proofs_check/REPORT.md`` regenerates the committed one); ``--thorough`` looks deeper; ``--self-test`` flips every
row's premise and expects every verdict to change. The newer checks call refimpl only through the adapters of
:mod:`proofs_check._library`.
"""
import importlib
import pkgutil

from proofs_check._framework import REGISTRY, Budget, Outcome, Verdict, claim  # noqa: F401


def load_all() -> dict:
    """Import every ``check_*`` module so that its claims register; return the registry."""
    for m in pkgutil.iter_modules(__path__):
        if m.name.startswith("check_"):
            importlib.import_module(f"{__name__}.{m.name}")
    return REGISTRY
