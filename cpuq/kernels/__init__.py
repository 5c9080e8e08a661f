"""Numba kernels of the forward pass: pure functions over arrays (quantized matmul and
row lookup, RMSNorm, RoPE, attention, SwiGLU). They know nothing of GGUF files,
metadata or models; shapes are in each docstring.

Imports only numpy, numba and cpuq.quants (the row decoders).
"""
