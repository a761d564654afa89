"""figures: ``python -m figures`` regenerates the PNGs kept in this folder (and embedded in the README).

One module per figure (``fig_*.py``), each defining ``CAPTION`` (one line: what to look at) and
``make(out_dir: pathlib.Path, rng: numpy.random.Generator, quick: bool) -> pathlib.Path``; every plotted number is
computed by refimpl during ``make``, never typed in. ``python -m figures --list`` lists them.
"""
import importlib
import pkgutil


def load_all() -> dict:
    """name -> module for every ``fig_*`` module, in name order."""
    mods = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name.startswith("fig_"):
            mods[m.name[4:]] = importlib.import_module(f"{__name__}.{m.name}")
    return mods
