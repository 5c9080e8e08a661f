"""Measuring models: speed (bench.py, `cpuq bench`). Perplexity/KL and quantization
comparisons belong here too (DESIGN.md); not written yet."""
