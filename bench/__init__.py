"""Benchmarks: `python -m bench.run NAME --model M --device cpu|cuda --json FILE` (see bench/RESULTS.md)."""
