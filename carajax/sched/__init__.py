"""Rank-aware scheduling: step-latency cost models (and, later, the profiler, router and simulator)."""
