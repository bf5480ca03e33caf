"""Parameter and memory arithmetic for the published variants, from the config alone (nothing is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vl2cli.engine.vl2.config import PRESETS, VisionConfig, VL2Config, preset_config

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig, LanguageConfig

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


def kv_bytes_per_token(cfg: FamilyConfig, dtype_bytes: int = 2) -> int:
    lc = cfg.language
    per_layer = ((lc.kv_lora_rank or 0) + lc.qk_rope_head_dim) if lc.use_mla else 2 * lc.num_key_value_heads * lc.head_dim
    return per_layer * lc.num_hidden_layers * dtype_bytes


# What else a CUDA process holds besides the weights and the KV cache (measured figures would replace these):
CUDA_CONTEXT = 0.5 * GIB  # the CUDA context and cuBLAS/cuDNN workspaces
FRAGMENTATION = 1.10  # the caching allocator's slack on top of the live tensors
PAGE_PROMPT_TOKENS = 2100  # a fully tiled page: ~2,050 image tokens plus the prompt
CONTEXT = 4096
CARDS_GIB = (12, 16, 24)  # RTX 3060 / 4060 Ti 16 / T4 (16 GB) / 4090-class cards
MAX_AUTO_BATCH = 8


def weight_bytes(cfg: VL2Config, quant: str) -> float:
    """Weights on the device: NF4/int8 for the quantized language linears, 16-bit for the rest."""
    c = param_counts(cfg)
    other = c["total"] - c["quantizable"]
    bits = {"nf4": NF4_BITS, "int8": 8 + 32 / 4096, "none": 16}[quant]  # int8: one float32 scale per row of ~4k
    return c["quantizable"] * bits / 8 + other * 2


def working_bytes(cfg: FamilyConfig, batch: int, context: int = CONTEXT) -> float:
    """Everything a batch of pages needs besides the weights, at its peak (the prefill of full-size pages).

    KV cache for the whole context, counted twice: the fixed slot cache needs it once (a row that leaves copies
    one row, not the cache), the second is headroom kept until measured on cards; the MoE prefill's temporaries
    (tokens gathered per expert, their outputs, the float32 weighted sum: ~12 bytes per hidden value per routed
    slot); MLA's expanded keys and values during prefill; float32 logits over the vocabulary for every row.
    """
    lc = cfg.language
    tokens = batch * PAGE_PROMPT_TOKENS
    kv = 2 * kv_bytes_per_token(cfg) * context * batch
    moe = tokens * (lc.num_experts_per_tok or 1) * lc.hidden_size * 12
    heads = lc.num_attention_heads * (lc.qk_nope_head_dim + lc.v_head_dim + lc.q_head_dim) if lc.use_mla else 0
    attention = tokens * heads * 2 * 2
    logits = batch * lc.vocab_size * 4 * 2
    return kv + moe + attention + logits


def need_bytes(cfg: VL2Config, quant: str, batch: int) -> float:
    return (weight_bytes(cfg, quant) + working_bytes(cfg, batch)) * FRAGMENTATION + CUDA_CONTEXT


def largest_batch(cfg: VL2Config, quant: str, free_bytes: float) -> int:
    """The largest batch (up to MAX_AUTO_BATCH) whose peak fits in `free_bytes`; 0 when not even one page fits."""
    fitting = [b for b in range(1, MAX_AUTO_BATCH + 1) if need_bytes(cfg, quant, b) <= free_bytes]
    return max(fitting, default=0)


def batch_for_free(cfg: FamilyConfig, free_after_weights: float) -> int:
    """With the weights resident: the largest batch whose working set fits what the device has free (at least 1)."""
    fitting = [b for b in range(1, MAX_AUTO_BATCH + 1) if working_bytes(cfg, b) * FRAGMENTATION <= free_after_weights]
    return max(fitting, default=1)


def estimate_vram(name: str, context: int = CONTEXT) -> dict[str, float]:
    """GiB of the weights alone, and of everything one page needs, at nf4 and bf16."""
    cfg = preset_config(name)
    return {"nf4": round(need_bytes(cfg, "nf4", 1) / GIB, 2), "bf16": round(need_bytes(cfg, "none", 1) / GIB, 2),
            "weights_nf4": round(weight_bytes(cfg, "nf4") / GIB, 2),
            "weights_bf16": round(weight_bytes(cfg, "none") / GIB, 2),
            "params": param_counts(cfg)["total"], "context": context}


OCR_ENCODER_PARAMS = 401_372_160  # SAM ViT-B + CLIP-L at the sizes the official code fixes (parity-ocr's shapes)
OCR_HUB_ID = "deepseek-ai/DeepSeek-OCR"
OCR2_HUB_ID = "deepseek-ai/DeepSeek-OCR-2"


def sam_params(out_channels: int) -> int:
    """SAM ViT-B as DeepEncoder uses it: patch conv, 64x64 positions, 12 blocks (rel-pos tables for 14-wide windows,
    or the 64x64 grid in the global blocks 2, 5, 8, 11), the conv neck, then 256 -> 512 -> out_channels."""
    w, head = 768, 64
    total = 3 * 16 * 16 * w + w + 64 * 64 * w
    for index in range(12):
        rel = 2 * (2 * (64 if index in (2, 5, 8, 11) else 14) - 1) * head
        total += 4 * w + (w * 3 * w + 3 * w) + (w * w + w) + rel + (w * 4 * w + 4 * w) + (4 * w * w + w)
    return total + w * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256 + 256 * 512 * 9 + 512 * out_channels * 9


def qwen2_encoder_params() -> int:
    """DeepSeek-OCR 2's Qwen2-0.5B-shaped encoder: 24 layers (GQA 14/2 heads of 64, q/k/v biases, SwiGLU 4864), the
    final norm and the 144 + 256 learnable queries."""
    d, kv, mlp = 896, 2 * 64, 4864
    layer = 2 * d + (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * mlp
    return 24 * layer + d + (144 + 256) * d


def _encoder_swap_row(name: str, hub_id: str, vision: int) -> dict:
    """DeepSeek-OCR and DeepSeek-OCR 2: DeepSeek-VL2-tiny's decoder behind another encoder (`vision` parameters with
    the projector and layout rows; 16-bit, NF4 applies to the decoder only)."""
    tiny = preset_config("tiny")
    counts = param_counts(tiny)
    d, p = tiny.language.hidden_size, tiny.projector
    vl2_vision = _vision_params(tiny.vision) + (p.input_dim * p.downsample_ratio**2 * d + d) + (d * d + d) + 2 * d
    total = counts["total"] - vl2_vision + vision
    extra = (vision - vl2_vision) * 2 * FRAGMENTATION
    return {"name": name, "hub_id": hub_id, "total_params_b": total / 1e9,
            "active_params_b": (counts["active"] - vl2_vision + vision) / 1e9, "download_gb": total * 2 / 1e9,
            "vram_nf4_gib": round((need_bytes(tiny, "nf4", 1) + extra) / GIB, 2),
            "vram_bf16_gib": round((need_bytes(tiny, "none", 1) + extra) / GIB, 2),
            "nf4_batch_on": {f"{gib}GB": largest_batch(tiny, "nf4", gib * GIB - extra) for gib in CARDS_GIB}}


def ocr2_vision_params(hidden: int) -> int:
    """DeepSeek-OCR 2's vision side: SAM (896-channel neck), the Qwen2 encoder, projector 896 -> hidden, the
    separator row (no newline row)."""
    return sam_params(896) + qwen2_encoder_params() + 896 * hidden + hidden + hidden


def variant_table() -> list[dict]:
    """What `vl2 models` shows: sizes from the config arithmetic (milliseconds, no model built), and what fits
    on 12, 16 and 24 GB cards at NF4 (the largest batch; 0 = does not fit)."""
    rows = []
    for name, preset in PRESETS.items():
        cfg = preset_config(name)
        counts = param_counts(cfg)
        est = estimate_vram(name)
        rows.append({"name": name, "hub_id": preset["hub_id"], "total_params_b": counts["total"] / 1e9,
                     "active_params_b": counts["active"] / 1e9, "download_gb": counts["total"] * 2 / 1e9,
                     "vram_nf4_gib": est["nf4"], "vram_bf16_gib": est["bf16"],
                     "nf4_batch_on": {f"{gib}GB": largest_batch(cfg, "nf4", gib * GIB) for gib in CARDS_GIB}})
    d = PRESETS["tiny"]["language"].hidden_size
    return [*rows, _encoder_swap_row("ocr", OCR_HUB_ID, OCR_ENCODER_PARAMS + 2048 * d + d + 2 * d),
            _encoder_swap_row("ocr2", OCR2_HUB_ID, ocr2_vision_params(d))]
