"""Measuring what quantization cost: distribution and per-sample quality metrics."""
