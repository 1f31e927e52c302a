"""Simulated infrastructure for tests and benchmarks (the SSH node farm)."""
