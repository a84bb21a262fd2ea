"""Benchmarks: performance, accuracy, security and finished studies; results as JSON."""
