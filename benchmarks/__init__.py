"""Benchmarks of the training backbone against the real stack, each figure next to a
baseline measured in the same run: `python -m benchmarks [--smoke]`."""
