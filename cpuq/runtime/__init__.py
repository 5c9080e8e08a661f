"""The runtime: a GGUF model on CPU — weights, forward pass, tokenizer, chat template,
sampling and the generation loop behind cpuq.load()."""
