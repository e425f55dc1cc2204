"""Serving benchmarks: scripts that measure the compared things side by side in one run and write a results JSON
that ``robustserve bench render`` turns into a BENCHMARKS.md section."""
