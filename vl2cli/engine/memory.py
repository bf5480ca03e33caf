"""Parameter and memory arithmetic for the published variants, from the config alone (nothing is built)."""

from __future__ import annotations

from vl2cli.engine.config import PRESETS, LanguageConfig, VisionConfig, VL2Config, preset_config

# NF4 with double quantization: 4-bit codes, one 8-bit absmax per 64 weights, one float32 scale per 256 absmax.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight
GIB = 1024**3


def _vision_params(v: VisionConfig) -> int:
    w, m = v.width, v.mlp_dim
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    return 3 * v.patch_size**2 * w + w + v.grid**2 * w + v.layers * block + 2 * w


def _attention_params(lc: LanguageConfig) -> tuple[int, int]:
    """(all attention parameters of one layer, those in linears that NF4 quantizes)."""
    d, h, bias = lc.hidden_size, lc.num_attention_heads, int(lc.attention_bias)
    if not lc.use_mla:
        q, kv = h * lc.head_dim, lc.num_key_value_heads * lc.head_dim
        linear = d * q + 2 * d * kv + q * d + bias * (q + 2 * kv + d)
        return linear, linear
    rank, rope, q_dim = lc.kv_lora_rank or 0, lc.qk_rope_head_dim, h * (lc.qk_nope_head_dim + lc.qk_rope_head_dim)
    if lc.q_lora_rank is None:
        q_linear, q_norm = d * q_dim, 0
    else:
        q_linear, q_norm = d * lc.q_lora_rank + bias * lc.q_lora_rank + lc.q_lora_rank * q_dim, lc.q_lora_rank
    kv_a = d * (rank + rope) + bias * (rank + rope)
    kv_b = rank * h * (lc.qk_nope_head_dim + lc.v_head_dim)  # stays 16-bit (absorbed decode needs it)
    out = h * lc.v_head_dim * d + bias * d
    quantizable = q_linear + kv_a + out
    return quantizable + q_norm + rank + kv_b, quantizable


def param_counts(cfg: VL2Config) -> dict[str, int]:
    """total, quantizable (language linears NF4 replaces), experts (routed), active (what one token uses)."""
    lc, p = cfg.language, cfg.projector
    d = lc.hidden_size
    width = p.n_embed * p.mlp_ratio
    projector = (p.input_dim * p.downsample_ratio**2 * width + width + (p.depth - 2) * (width * width + width)
                 + width * p.n_embed + p.n_embed + 2 * p.n_embed)  # + image_newline, view_seperator
    attn_total, attn_quant = _attention_params(lc)
    total = _vision_params(cfg.vision) + projector + 2 * lc.vocab_size * d + d
    quantizable = experts = inactive = 0
    expert = 3 * d * lc.moe_intermediate_size
    for index in range(lc.num_hidden_layers):
        total += attn_total + 2 * d
        quantizable += attn_quant
        if lc.is_moe_layer(index):
            n, k = lc.n_routed_experts or 0, lc.num_experts_per_tok or 0
            shared = expert * (lc.n_shared_experts or 0)
            gate = n * d + (n if lc.topk_method == "noaux_tc" else 0)
            total += gate + n * expert + shared
            quantizable += n * expert + shared
            experts += n * expert
            inactive += (n - k) * expert
        else:
            total += 3 * d * lc.intermediate_size
            quantizable += 3 * d * lc.intermediate_size
    return {"total": total, "quantizable": quantizable, "experts": experts, "active": total - inactive}


def kv_bytes_per_token(cfg: VL2Config, dtype_bytes: int = 2) -> int:
    lc = cfg.language
    per_layer = ((lc.kv_lora_rank or 0) + lc.qk_rope_head_dim) if lc.use_mla else 2 * lc.num_key_value_heads * lc.head_dim
    return per_layer * lc.num_hidden_layers * dtype_bytes


def estimate_vram(name: str, context: int = 4096) -> dict[str, float]:
    """GiB of the weights alone, and of weights + KV cache at `context` + ~1 GiB workspace, at nf4 and bf16."""
    cfg = preset_config(name)
    c = param_counts(cfg)
    other = c["total"] - c["quantizable"]
    kv = kv_bytes_per_token(cfg) * context
    weights_nf4 = c["quantizable"] * NF4_BITS / 8 + other * 2
    weights_bf16 = c["total"] * 2
    return {"nf4": round((weights_nf4 + kv + GIB) / GIB, 2), "bf16": round((weights_bf16 + kv + GIB) / GIB, 2),
            "weights_nf4": round(weights_nf4 / GIB, 2), "weights_bf16": round(weights_bf16 / GIB, 2),
            "params": c["total"]}


def variant_table() -> list[dict]:
    """What `vl2 models` shows: sizes from the config arithmetic (milliseconds, no model built)."""
    rows = []
    for name, preset in PRESETS.items():
        counts = param_counts(preset_config(name))
        est = estimate_vram(name)
        rows.append({"name": name, "hub_id": preset["hub_id"], "total_params_b": counts["total"] / 1e9,
                     "active_params_b": counts["active"] / 1e9, "download_gb": counts["total"] * 2 / 1e9,
                     "vram_nf4_gib": est["nf4"], "vram_bf16_gib": est["bf16"]})
    return rows
