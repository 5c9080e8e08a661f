"""HF directory -> GGUF: checkpoint reading, type recipe, streaming pipeline, calibration."""
