"""The engine, in plain torch: each model family a package (vl2/, ocr/, ocr2/: config, processor, model, trace) behind
engine.family's interface; what the families share (the DeepSeek-V2 decoder, attention, MoE, rope, cache, generation,
scheduler, grammar, quantization, memory arithmetic, the hub, loading) in the modules beside them."""
