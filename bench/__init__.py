"""Benchmarks: each prints its figures and the ratio to a baseline measured in the
same run. ``python -m bench`` (``make bench``) runs them all."""
