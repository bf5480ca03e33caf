"""DeepSeek-VL2: its config, processor (chat template, dynamic tiling), SigLIP tower and projector, model and
parity trace; FAMILY (family.py) is what the loader and the reader use."""
