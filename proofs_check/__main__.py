"""``python -m proofs_check [--thorough] [--only KEY ...] [--report PATH] [--seed N] [--self-test]``.

Exit status 0 when every claim's verdict is the documented one (confirmed, the known documented failure, or "not
covered by any proposition"); 1 when any verdict is unexpected (a new violation, a crash, or an erratum that no
longer reproduces). The report goes to ``proofs_check_out/REPORT.md`` (untracked) unless ``--report`` names another
path; ``--report proofs_check/REPORT.md`` regenerates the committed one. A run never modifies tracked files otherwise.

``--self-test`` runs every check with its premise or input flipped (the perturbation registered with the claim, at a
small case scale) and exits 0 only when every verdict then DIFFERS from the documented one: no row is fixed in code.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from refimpl._env import single_threaded_blas

single_threaded_blas()  # before NumPy is imported (see refimpl._env)

from refimpl.cliargs import ArgumentParser, integer, out_dir, out_file, real  # noqa: E402
from proofs_check import load_all  # noqa: E402
from proofs_check._framework import Budget, run_claim  # noqa: E402
from proofs_check._report import print_self_test, print_table, write_markdown  # noqa: E402

DEFAULT_REPORT = Path("proofs_check_out") / "REPORT.md"
SELF_TEST_SCALE = 0.25


def _report_path(text):
    """'' (no report) or a file path whose directory exists or can be created and is writable."""
    if text == "":
        return text
    out_dir(str(Path(text).parent))
    return out_file(text)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m proofs_check", description=__doc__.splitlines()[0])
    ap.add_argument("--thorough", action="store_true", help="10x the cases of every check")
    ap.add_argument("--scale", type=real(0.0, 1e4, strict_low=True), default=None,
                    help="multiply every check's number of cases")
    ap.add_argument("--only", nargs="*", default=None, help="run only these claim keys")
    ap.add_argument("--seed", type=integer(0, 2**62), default=20230415)
    ap.add_argument("--report", type=_report_path, default=str(DEFAULT_REPORT),
                    help="Markdown report path ('' to skip)")
    ap.add_argument("--self-test", action="store_true",
                    help="flip every row's premise; expect every verdict to change")
    args = ap.parse_args(argv)
    scale = args.scale if args.scale is not None else (SELF_TEST_SCALE if args.self_test else
                                                       10.0 if args.thorough else 1.0)
    budget = Budget(scale=scale, thorough=args.thorough, perturb=args.self_test)
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
    if args.self_test:
        bad = [r for r in results if not r.flipped]
        print_self_test(results)
        print(f"\n{len(results) - len(bad)} rows failed as they must under their perturbation, {len(bad)} did not, "
              f"{total:.1f} s")
        return 1 if bad else 0
    print_table(results)
    if args.report:
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(results, path, budget=budget, seed=args.seed, seconds=total)
        print(f"\nreport written to {args.report}")
    bad = [r for r in results if not r.as_expected]
    print(f"\n{len(results) - len(bad)} as expected, {len(bad)} unexpected, {total:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
