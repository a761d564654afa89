"""``python -m figures [--only NAME ...] [--out DIR] [--quick] [--list]``: regenerate the figures.

Writes ``NAME.png`` for every figure module (or those named by ``--only``) and ``CAPTIONS.md`` (every figure ->
its one-line caption) into the output folder (default: this folder).
"""
from __future__ import annotations


# Timings in the figures are single-threaded for every method: a multi-threaded BLAS matvec on a loaded machine
# can be 100x slower than a single-threaded one (measured here: 20 ms vs 0.1 ms for 30000 x 16), which would
# flatter the tree samplers against sample_exact. Must be set before numpy is imported.
from refimpl._env import single_threaded_blas  # noqa: E402

single_threaded_blas()

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from figures import load_all  # noqa: E402
from refimpl.cliargs import ArgumentParser, integer, out_dir  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m figures", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=out_dir, default=str(Path(__file__).parent))
    ap.add_argument("--quick", action="store_true", help="small sizes (for tests); the committed PNGs use the default")
    ap.add_argument("--seed", type=integer(0, 2**62), default=0)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    mods = load_all()
    if args.list:
        for name, mod in mods.items():
            print(f"{name:24s} {mod.CAPTION}")
        return 0
    names = list(mods) if not args.only else args.only
    unknown = [n for n in names if n not in mods]
    if unknown:
        ap.error(f"unknown figures {unknown}; known: {list(mods)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    for name in names:
        t0 = time.perf_counter()
        print(f"figure {name} ...", file=sys.stderr, flush=True)
        path = mods[name].make(out, np.random.default_rng([args.seed, sum(map(ord, name))]), args.quick)
        print(f"  wrote {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if Path(path).name != f"{name}.png":
            raise RuntimeError(f"figure {name}: make() wrote {path}, expected {name}.png")
    # captions are module constants: always list every figure (also after --only)
    lines = ["# Figures", "", "Regenerate with `python -m figures` (one module per figure in `figures/fig_*.py`).", ""]
    lines += [f"- [`{name}.png`]({name}.png): {mod.CAPTION}" for name, mod in mods.items()]
    (out / "CAPTIONS.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
