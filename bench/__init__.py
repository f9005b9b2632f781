"""Benchmarks of the pipeline against the straightforward approach and the hardware.

Run ``python -m bench --help`` or ``make bench``. Every measurement that
loads a model runs in a fresh child process (:mod:`bench.child`), so each
side starts cold and its peak resident memory is its own.
"""
