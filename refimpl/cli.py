"""Command line: ``python -m refimpl {demo,train,reproduce,bench} ...``.

Each sub-command is implemented next to the code it exercises; this module only dispatches, so that importing it
is cheap and a sub-command's Numba kernels compile only when that sub-command runs.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

from refimpl._env import single_threaded_blas

_COMMANDS = {
    "demo": ("refimpl.experiments", "demo_main", "the main job: every miner on the default planted task (Table 1 in miniature)"),
    "train": ("refimpl.experiments", "train_main", "train a dual encoder on text pairs with one miner"),
    "reproduce": ("refimpl.experiments", "reproduce_main", "the larger miniatures behind the README's numbers"),
    "data": ("refimpl.experiments", "data_main", "build a packaged text task: python -m refimpl data gcide DIR"),
    "bench": (None, None, "benchmarks: python -m refimpl bench NAME (NAME in: {names})"),
}


def _bench_names() -> list[str]:
    import refimpl.benchmarks as b

    return sorted(m.name for m in pkgutil.iter_modules(b.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    single_threaded_blas()  # before any sub-command imports NumPy (see refimpl._env)
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _bench_names()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m refimpl COMMAND [options]\n\ncommands:")
        for cmd, (_, _, text) in _COMMANDS.items():
            print(f"  {cmd:10s} {text.format(names=', '.join(names))}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in _COMMANDS:
        print(f"error: unknown command {cmd!r}; choose from {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    if cmd == "bench":
        if not rest or rest[0] not in names:
            print(f"usage: python -m refimpl bench NAME [options]; NAME in: {', '.join(names)}", file=sys.stderr)
            return 2
        mod = importlib.import_module(f"refimpl.benchmarks.{rest[0]}")
        return int(mod.main(rest[1:]) or 0)
    module, func, _ = _COMMANDS[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
