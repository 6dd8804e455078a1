"""Benchmarks: ``python -m pnmf.benchmarks --help``."""
