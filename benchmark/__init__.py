"""Benchmarks: `bench_common.py` / `bench_scripts.py` (speed and memory of the machinery) and `compare.py` (the
eight algorithms compared at an equal budget of reward queries; `analysis.py`, `evaluate.py` and `report.py`
are its parts)."""
