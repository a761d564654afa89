"""``python -m proofs_check [--thorough] [--only KEY ...] [--report PATH] [--seed N]``.

Exit status 0 when every claim's verdict is the expected one (confirmed, or the known documented failure);
1 when any verdict is unexpected (a new violation, a crash, or an erratum that no longer reproduces).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from refimpl._env import single_threaded_blas

single_threaded_blas()  # before NumPy is imported (see refimpl._env)

from proofs_check import load_all  # noqa: E402
from proofs_check._framework import Budget, run_claim
from proofs_check._report import print_table, write_markdown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proofs_check", description=__doc__.splitlines()[0])
    ap.add_argument("--thorough", action="store_true", help="10x the cases of every check")
    ap.add_argument("--scale", type=float, default=None, help="multiply every check's number of cases")
    ap.add_argument("--only", nargs="*", default=None, help="run only these claim keys")
    ap.add_argument("--seed", type=int, default=20230415)
    ap.add_argument("--report", default=str(Path(__file__).with_name("REPORT.md")),
                    help="Markdown report path ('' to skip)")
    args = ap.parse_args(argv)
    scale = args.scale if args.scale is not None else (10.0 if args.thorough else 1.0)
    if scale <= 0:
        ap.error("--scale must be > 0")
    budget = Budget(scale=scale, thorough=args.thorough)
    registry = load_all()
    claims = sorted(registry.values(), key=lambda c: (c.order, c.key))
    if args.only:
        unknown = set(args.only) - set(registry)
        if unknown:
            ap.error(f"unknown claim keys: {sorted(unknown)}; known: {sorted(registry)}")
        claims = [c for c in claims if c.key in args.only]
    t0 = time.perf_counter()
    results = []
    for c in claims:
        print(f"[{len(results) + 1}/{len(claims)}] {c.key} ...", file=sys.stderr, flush=True)
        results.append(run_claim(c, budget, args.seed))
    total = time.perf_counter() - t0
    print_table(results)
    if args.report:
        write_markdown(results, Path(args.report), budget=budget, seed=args.seed, seconds=total)
        print(f"\nreport written to {args.report}")
    bad = [r for r in results if not r.as_expected]
    print(f"\n{len(results) - len(bad)} as expected, {len(bad)} unexpected, {total:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
