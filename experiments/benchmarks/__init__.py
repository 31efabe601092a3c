"""Benchmarks: `make bench` (run.py), the GPU script (gpu.sh, gpu.py) and the every_k accuracy
study (every_k_accuracy.py); the shared pieces are harness.py, measure.py and report.py."""
