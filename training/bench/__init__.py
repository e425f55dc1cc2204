"""Benchmark suites behind ``robustserve bench``: each module has a frozen ``BenchConfig`` and ``run(cfg) -> int``."""
