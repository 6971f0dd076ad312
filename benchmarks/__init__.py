"""Benchmarks: every stage measured against this machine's own limits (ratios).

Run them all with ``python -m benchmarks`` (``make bench``) or one with
``python -m benchmarks.bench_<name> [--smoke|--quick]``; see benchmarks/README.md.
"""
