"""Benchmarks: speed against the official algorithm and DiT, and the floor analysis."""
