"""Benchmarks: the throughput harness (its own issue) and, under bench/perf, the scripts that measure each
performance target of the repo side by side with its baseline."""
