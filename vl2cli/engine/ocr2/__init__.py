"""DeepSeek-OCR 2: its config, processor (raw prompts, its one setting of views), Qwen2-shaped query encoder, model
and parity trace; FAMILY (family.py) is what the loader and the reader use."""
