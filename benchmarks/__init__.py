"""Benchmark scripts (``python -m benchmarks.data``, ``python -m benchmarks.train``).

They are scripts, not timed tests: each prints a table and writes it into its own
section of ``BENCHMARKS.md``. Timings on a shared machine are noisy, so every script
measures its baseline in the same process, repeats, and reports medians and ratios.
"""
