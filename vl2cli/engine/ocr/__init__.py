"""DeepSeek-OCR: its config and resolution modes, processor (raw prompts, views), CLIP-L, model and parity trace;
FAMILY (family.py) is what the loader and the reader use."""
