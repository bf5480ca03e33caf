"""The DeepSeek-VL2 engine: config, tokenizer and tiling, vision tower, DeepSeek-V2 decoder, loading, generation."""
