"""Runnable scripts: training CLI, speed benchmark, learning curves and per-benchmark presets."""
