"""Speed benchmarks: registered units timed by one harness (benchmarks/harness.py); `python -m benchmarks`."""
