"""Synthetic SEM lots for tests, the demo and benchmarks: layouts, defects, noise, manifests. Imports ``io``."""
