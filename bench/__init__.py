"""Benchmarks of kosmos-annotate, each run from the repository root as `python -m bench.<name>`."""
