"""proofs_check: every claim of the paper confronted with numbers.

One module per claim (``check_*.py``); each registers itself with :func:`proofs_check._framework.claim`.
``python -m proofs_check`` runs all of them with the default budget and prints the verdict table;
``--thorough`` looks deeper. Both write a Markdown report (``proofs_check/REPORT.md`` by default).
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
