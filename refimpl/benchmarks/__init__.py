"""Benchmarks behind ``python -m refimpl bench NAME``: one module per benchmark, each with ``main(argv)``.

Timings are measured in one run on this machine and reported as JSON plus a printed table; ratios against a
baseline measured in the same run are what a reader should compare (the machine is shared and noisy).
"""
