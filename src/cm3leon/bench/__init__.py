"""Micro-benchmarks of the project's hot paths (called from `src/bench.py`), one per file."""
