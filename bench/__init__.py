"""Benchmark suite for dicomwatch: synthetic corpus, floor measurements, runner.

Kept as a package so ``python -m bench.run`` and ``python bench/run.py`` both work and
so a later test can import the helpers; none of it ships with the ``dicomwatch`` wheel.
"""
