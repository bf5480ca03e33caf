"""DeepSeek-VL2 configuration: read the official config.json, validate it, and the real-size presets.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/configuration_deepseek.py` (commit 1d57bba) and the
VisionConfig/MlpProjectorConfig of `modeling_deepseek_vl_v2.py`. Missing language fields take the defaults
of the official DeepseekV2Config; values the model cannot honour raise ConfigError naming the field,
never a silent fallback. A config is input like any other file: every number is bounded before anything
is built from it (a hostile `n_routed_experts: 50000000` must not build 10^8 modules).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vl2cli.errors import ConfigError

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362

    @property
    def grid(self) -> int:  # patches per side: 384 // 14 = 27
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:  # timm truncates: int(1152 * 3.7362) = 4304
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ProjectorConfig:
    input_dim: int = 1152
    n_embed: int = 1280
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    use_mla: bool = True
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 100000
    eos_token_id: int = 100001

    @property
    def head_dim(self) -> int:  # plain MHA: whole head rotated
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:  # MLA: nope part + rotary part
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        dim = self.q_head_dim if self.use_mla else self.head_dim
        scale = dim**-0.5
        if self.use_mla and self.rope_scaling:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                from vl2cli.engine.rope import yarn_mscale  # here: config.py stays free of torch (vl2 --help)
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale *= m * m
        return scale


@dataclass(frozen=True)
class MlaShape:
    """Multi-head Latent Attention sizes, decided once from a validated config (no Optionals left)."""

    kv_lora_rank: int
    q_lora_rank: int | None  # None: queries come from one q_proj
    nope: int
    rope: int
    v: int


@dataclass(frozen=True)
class MoeShape:
    """Mixture-of-Experts routing, decided once from a validated config."""

    n_routed: int
    n_shared: int
    top_k: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def mla_shape(lc: LanguageConfig) -> MlaShape:
    if not lc.use_mla or not lc.kv_lora_rank:
        raise ConfigError("language_config: not an MLA config (use_mla false)")
    return MlaShape(lc.kv_lora_rank, lc.q_lora_rank, lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.v_head_dim)


def moe_shape(lc: LanguageConfig) -> MoeShape:
    if not lc.n_routed_experts or not lc.num_experts_per_tok:
        raise ConfigError("language_config: no routed experts (n_routed_experts null)")
    return MoeShape(lc.n_routed_experts, lc.n_shared_experts or 0, lc.num_experts_per_tok, lc.topk_method,
                    lc.scoring_func, lc.n_group or 1, lc.topk_group or 1, lc.norm_topk_prob, lc.routed_scaling_factor)


@dataclass(frozen=True)
class VL2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    candidate_resolutions: tuple[tuple[int, int], ...] = ()
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"

    @property
    def tokens_per_tile_side(self) -> int:  # ceil(27 / 2) = 14 merged tokens per side
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)


# Sane bounds for every number a config may set: far above any published model, far below what would
# exhaust memory while building modules or tiling a page.
_BOUNDS: dict[str, tuple[float, float]] = {
    "image_size": (14, 2048), "patch_size": (1, 64), "width": (1, 16384), "layers": (1, 256), "heads": (1, 256),
    "mlp_ratio": (0.1, 64), "input_dim": (1, 16384), "n_embed": (1, 65536), "depth": (1, 16),
    "downsample_ratio": (1, 16), "vocab_size": (2, 1_048_576), "hidden_size": (1, 65536),
    "intermediate_size": (1, 262144), "moe_intermediate_size": (1, 65536), "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "n_shared_experts": (0, 64),
    "n_routed_experts": (1, 1024), "num_experts_per_tok": (1, 64), "routed_scaling_factor": (0, 1000),
    "n_group": (1, 1024), "topk_group": (1, 1024), "moe_layer_freq": (1, 512), "first_k_dense_replace": (0, 512),
    "kv_lora_rank": (1, 65536), "q_lora_rank": (1, 65536), "qk_rope_head_dim": (0, 4096),
    "qk_nope_head_dim": (0, 4096), "v_head_dim": (0, 4096), "max_position_embeddings": (1, 1_048_576),
    "rms_norm_eps": (0, 1), "rope_theta": (1, 1e12), "bos_token_id": (0, 1_048_576), "eos_token_id": (0, 1_048_576),
}
MAX_CANVAS_SIDE = 6144  # px: 16 tiles of 384 (the published grids stop at 9 tiles, 3456 px)
MAX_CANVAS_TILES = 36

# Config keys vl2 reads past on purpose (training switches, bookkeeping); any other unknown key is warned about.
KNOWN_IGNORED = {
    "": {"architectures", "model_type", "torch_dtype", "transformers_version", "auto_map", "_name_or_path",
         "vision_config", "projector_config", "language_config", "tile_tag", "global_view_pos",
         "candidate_resolutions", "use_cache"},
    "vision_config": {"model_type", "model_name", "global_pool", "ignore_head", "class_token", "num_classes",
                      "use_checkpoint", "weight_init", "select_layer", "select_feature", "deterministic",
                      "num_recomputing_layers", "torch_dtype"},
    "projector_config": {"model_type", "projector_type", "token_pooling", "torch_dtype"},
    "language_config": {"model_type", "lm_head", "rm_head", "torch_dtype", "aux_loss_alpha", "seq_aux", "ep_size",
                        "pretraining_tp", "use_cache", "initializer_range", "attention_dropout", "pad_token_id",
                        "_attn_implementation", "architectures", "auto_map", "transformers_version", "num_nextn_predict_layers"},
}


def _warn_unknown(section: str, raw: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(raw) - known - KNOWN_IGNORED.get(section, set()))
    if unknown:
        where = f"{section}." if section else ""
        warnings.warn(f"config.json: unknown key(s) {', '.join(where + k for k in unknown)} ignored", stacklevel=3)


def _checked_number(where: str, name: str, value: Any, kind: str) -> Any:
    wants_int = kind == "int" or kind.startswith("int ")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (wants_int and not float(value).is_integer()):
        raise ConfigError(f"{where}.{name} = {value!r}: expected {'an integer' if wants_int else 'a number'}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}.{name} = {value!r}: expected a finite number")
    low, high = _BOUNDS.get(name, (-math.inf, math.inf))
    if not low <= value <= high:
        raise ConfigError(f"{where}.{name} = {value!r}: outside the sane range {low:g}..{high:g}")
    return int(value) if wants_int else float(value)


def _pick(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r}: expected an object")
    nullable = _NULLABLE.get(cls, ())
    known = {f.name for f in fields(cls)}
    _warn_unknown(where, raw, known)
    values = {}
    for f in fields(cls):
        if f.name not in raw or (raw[f.name] is None and f.name not in nullable):
            continue
        value = raw[f.name]
        if value is not None and f.type in ("int", "float", "int | None", "float | None"):
            value = _checked_number(where, f.name, value, str(f.type))
        elif value is not None and f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{f.name} = {value!r}: expected true or false")
        elif value is not None and f.type == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}.{f.name} = {value!r}: expected a string")
        values[f.name] = value
    return cls(**values)


_NULLABLE = {
    LanguageConfig: ("q_lora_rank", "kv_lora_rank", "n_shared_experts", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "rope_scaling"),
}


def _fail(lc: LanguageConfig, name: str, why: str) -> ConfigError:
    return ConfigError(f"language_config.{name} = {getattr(lc, name)!r}: {why}")


def _validate_language(lc: LanguageConfig) -> None:
    if lc.hidden_act != "silu":
        raise _fail(lc, "hidden_act", "only 'silu' is supported")
    if lc.tie_word_embeddings:
        raise _fail(lc, "tie_word_embeddings", "DeepSeek-VL2 checkpoints carry their own lm_head; tied embeddings "
                    "are not supported")
    if lc.num_attention_heads <= 0 or lc.hidden_size % lc.num_attention_heads:
        raise _fail(lc, "num_attention_heads", "must divide hidden_size")
    if lc.bos_token_id >= lc.vocab_size or lc.eos_token_id >= lc.vocab_size:
        raise _fail(lc, "eos_token_id", f"begin/end token ids must lie inside vocab_size {lc.vocab_size}")
    if lc.use_mla:
        _validate_mla(lc)
    elif lc.num_attention_heads % lc.num_key_value_heads:
        raise _fail(lc, "num_key_value_heads", "must divide num_attention_heads")
    _validate_rope_scaling(lc)
    if lc.n_routed_experts is not None:
        _validate_moe(lc, lc.n_routed_experts)


def _validate_mla(lc: LanguageConfig) -> None:
    if not lc.kv_lora_rank or lc.kv_lora_rank <= 0:
        raise _fail(lc, "kv_lora_rank", "MLA (use_mla true) needs a positive kv_lora_rank")
    if lc.qk_rope_head_dim <= 0 or lc.qk_rope_head_dim % 2:
        raise _fail(lc, "qk_rope_head_dim", "must be a positive even number under MLA")
    if lc.v_head_dim <= 0:
        raise _fail(lc, "v_head_dim", "must be positive under MLA")
    if lc.q_lora_rank is not None and lc.q_lora_rank <= 0:
        raise _fail(lc, "q_lora_rank", "must be null or positive")


def _validate_rope_scaling(lc: LanguageConfig) -> None:
    if lc.rope_scaling is None:
        return
    if not isinstance(lc.rope_scaling, dict):
        raise _fail(lc, "rope_scaling", "expected an object or null")
    kind = lc.rope_scaling.get("type", lc.rope_scaling.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"language_config.rope_scaling.type = {kind!r}: only YaRN scaling is supported")
    if not lc.use_mla:
        raise ConfigError("language_config.rope_scaling: YaRN is only defined for MLA attention (use_mla true)")
    factor = lc.rope_scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1024:
        raise ConfigError(f"language_config.rope_scaling.factor = {factor!r}: expected a number in (0, 1024]")


def _validate_moe(lc: LanguageConfig, n_routed: int) -> None:
    if lc.topk_method not in TOPK_METHODS:
        raise _fail(lc, "topk_method", f"expected one of {', '.join(TOPK_METHODS)}")
    if lc.scoring_func not in SCORING_FUNCS:
        raise _fail(lc, "scoring_func", f"expected one of {', '.join(SCORING_FUNCS)}")
    if not lc.num_experts_per_tok or not 0 < lc.num_experts_per_tok <= n_routed:
        raise _fail(lc, "num_experts_per_tok", "must be between 1 and n_routed_experts")
    if lc.moe_layer_freq <= 0:
        raise _fail(lc, "moe_layer_freq", "must be positive")
    if lc.topk_method == "greedy":
        return
    if not lc.n_group or n_routed % lc.n_group:
        raise _fail(lc, "n_group", f"{lc.topk_method} needs n_group dividing n_routed_experts")
    if not lc.topk_group or not 0 < lc.topk_group <= lc.n_group:
        raise _fail(lc, "topk_group", "must be between 1 and n_group")
    if lc.topk_method == "noaux_tc" and n_routed // lc.n_group < 2:
        raise _fail(lc, "n_group", "noaux_tc scores groups by their two best experts: need >= 2 experts per group")


def _candidates(raw: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """candidate_resolutions: a non-empty list of [w, h] pairs on the tile grid, each a bounded canvas."""
    if not isinstance(raw, list) or not raw or len(raw) > 1024:
        raise ConfigError(f"candidate_resolutions = {str(raw)[:80]}: expected a list of [width, height] pairs")
    out = []
    for entry in raw:
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry))
        if not ok:
            raise ConfigError(f"candidate_resolutions entry {entry!r}: expected [width, height] in pixels")
        w, h = entry
        if w <= 0 or h <= 0 or w % tile or h % tile:
            raise ConfigError(f"candidate_resolutions entry {[w, h]} is not a positive multiple of {tile}")
        if max(w, h) > MAX_CANVAS_SIDE or (w // tile) * (h // tile) > MAX_CANVAS_TILES:
            raise ConfigError(f"candidate_resolutions entry {[w, h]} is over the {MAX_CANVAS_SIDE}-pixel, "
                              f"{MAX_CANVAS_TILES}-tile bound (each tile costs ~200 image tokens)")
        out.append((w, h))
    return tuple(out)


def _triple(processor: dict[str, Any], key: str, default: tuple[float, float, float], positive: bool):
    value = processor.get(key, default)
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or (positive and min(value) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ConfigError(f"processor_config.{key} = {value!r}: expected {need}")
    return tuple(float(v) for v in value)


def _validate_vision_side(vision_raw: dict[str, Any], proj_raw: dict[str, Any], vision: VisionConfig,
                          projector: ProjectorConfig, language: LanguageConfig) -> None:
    if vision_raw.get("class_token"):
        raise ConfigError("vision_config.class_token = true: the SigLIP tower without class token is supported")
    ptype = proj_raw.get("projector_type", "downsample_mlp_gelu")
    if ptype != "downsample_mlp_gelu":
        raise ConfigError(f"projector_config.projector_type = {ptype!r}: only 'downsample_mlp_gelu' is supported")
    if proj_raw.get("token_pooling"):
        raise ConfigError("projector_config.token_pooling = true is not supported")
    if projector.input_dim != vision.width:
        raise ConfigError(f"projector_config.input_dim = {projector.input_dim} does not match vision width {vision.width}")
    if projector.n_embed != language.hidden_size:
        raise ConfigError(f"projector_config.n_embed = {projector.n_embed} does not match hidden_size {language.hidden_size}")
    if vision.grid < 1 or vision.width % vision.heads:
        raise ConfigError(f"vision_config: image_size {vision.image_size}, patch_size {vision.patch_size}, width "
                          f"{vision.width}, heads {vision.heads} do not make a vision tower")


def config_from_dict(raw: dict[str, Any], processor: dict[str, Any] | None = None) -> VL2Config:
    """Build a VL2Config from the official config.json (and optional processor_config.json) dicts."""
    if raw.get("model_type") not in (None, "deepseek_vl_v2"):
        raise ConfigError(f"model_type = {raw.get('model_type')!r}: not a DeepSeek-VL2 checkpoint")
    vision_raw = raw.get("vision_config") or {}
    proj_raw = raw.get("projector_config") or {}
    lang_raw = raw.get("language_config")
    if not isinstance(lang_raw, dict):
        raise ConfigError("config.json has no language_config section")
    vision = _pick(VisionConfig, vision_raw, "vision_config")
    projector = _pick(ProjectorConfig, proj_raw, "projector_config")
    language = _pick(LanguageConfig, lang_raw, "language_config")
    _validate_vision_side(vision_raw, proj_raw, vision, projector, language)
    _validate_language(language)
    tile_tag = raw.get("tile_tag", "2D")
    if tile_tag != "2D":
        raise ConfigError(f"tile_tag = {tile_tag!r}: only '2D' tiling is supported")
    view_pos = raw.get("global_view_pos", "head")
    if view_pos not in ("head", "tail"):
        raise ConfigError(f"global_view_pos = {view_pos!r}: expected 'head' or 'tail'")
    processor = processor or {}
    if not isinstance(processor, dict):
        raise ConfigError("processor_config.json: expected an object")
    _warn_unknown("", raw, set())
    cands = _candidates(processor.get("candidate_resolutions") or raw.get("candidate_resolutions")
                        or [[vision.image_size] * 2], vision.image_size)
    for key, size in (("patch_size", vision.patch_size), ("downsample_ratio", projector.downsample_ratio)):
        if key in processor and processor[key] != size:
            raise ConfigError(f"processor_config.{key} = {processor[key]} disagrees with config.json ({size})")
    return VL2Config(
        vision=vision,
        projector=projector,
        language=language,
        candidate_resolutions=cands,
        tile_tag=tile_tag,
        global_view_pos=view_pos,
        image_mean=_triple(processor, "image_mean", (0.5, 0.5, 0.5), positive=False),
        image_std=_triple(processor, "image_std", (0.5, 0.5, 0.5), positive=True),
        image_token=_token(processor, "image_token", "<image>"),
        pad_token=_token(processor, "pad_token", "<｜▁pad▁｜>"),
    )


def _token(processor: dict[str, Any], key: str, default: str) -> str:
    value = processor.get(key, default)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ConfigError(f"processor_config.{key} = {value!r}: expected a short token string")
    return value


OCR_ARCHITECTURE = "DeepseekOCRForCausalLM"
OCR_MODES: dict[str, tuple[int, int, bool]] = {  # name -> (global view, tile size, cropping): the official modes
    "tiny": (512, 512, False), "small": (640, 640, False), "base": (1024, 1024, False),
    "large": (1280, 1280, False), "gundam": (1024, 640, True),
}


@dataclass(frozen=True)
class OCRConfig:
    """DeepSeek-OCR: DeepSeek-VL2-tiny's decoder behind DeepEncoder (SAM ViT-B -> CLIP-L -> linear projector).

    The encoder's sizes are fixed by the official code (they are not read from config.json, which describes them
    only by name); the decoder is read and validated like DeepSeek-VL2's."""

    language: LanguageConfig = field(default_factory=LanguageConfig)
    projector_input: int = 2048  # CLIP-L 1024 + SAM 1024 channels, concatenated
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_crops: int = 2
    max_crops: int = 6


def is_ocr_config(raw: dict[str, Any]) -> bool:
    return OCR_ARCHITECTURE in (raw.get("architectures") or [])


OCR2_ARCHITECTURE = "DeepseekOCR2ForCausalLM"


@dataclass(frozen=True)
class OCR2Config:
    """DeepSeek-OCR 2: DeepSeek-VL2-tiny's decoder behind DeepEncoder V2 (SAM ViT-B -> a Qwen2-0.5B-shaped encoder
    with learnable queries -> linear projector), one resolution setting: 2-6 tiles of 768 px and a 1024 global view.

    As for DeepSeek-OCR, the encoder's sizes are the official code's (config.json names them only); the decoder is
    read and validated like DeepSeek-VL2's."""

    language: LanguageConfig = field(default_factory=LanguageConfig)
    projector_input: int = 896  # the Qwen2 encoder's width
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    global_size: int = 1024  # BASE_SIZE
    tile_size: int = 768  # IMAGE_SIZE
    min_crops: int = 2
    max_crops: int = 6


def is_ocr2_config(raw: dict[str, Any]) -> bool:
    return OCR2_ARCHITECTURE in (raw.get("architectures") or [])


def _ocr_language(raw: dict[str, Any], model: str, projector_input: int) -> LanguageConfig:
    """The decoder of a DeepSeek-OCR family checkpoint, once its linear projector is known to map the encoder's
    `projector_input` channels to the decoder's width."""
    if raw.get("model_type") not in (None, "deepseek_vl_v2"):
        raise ConfigError(f"model_type = {raw.get('model_type')!r}: not a {model} checkpoint")
    language = _pick(LanguageConfig, raw.get("language_config"), "language_config")
    _validate_language(language)
    projector = raw.get("projector_config") or {}
    if not isinstance(projector, dict) or projector.get("projector_type", "linear") != "linear":
        raise ConfigError(f"projector_config.projector_type = {projector.get('projector_type')!r}: {model}'s "
                          "projector is 'linear'")
    if (projector.get("input_dim", projector_input) != projector_input
            or projector.get("n_embed", language.hidden_size) != language.hidden_size):
        raise ConfigError(f"projector_config: input_dim {projector.get('input_dim')} / n_embed "
                          f"{projector.get('n_embed')}: {model} projects {projector_input} channels to hidden_size "
                          f"{language.hidden_size}")
    return language


def ocr2_config_from_dict(raw: dict[str, Any]) -> OCR2Config:
    return OCR2Config(language=_ocr_language(raw, "DeepSeek-OCR 2", OCR2Config.projector_input))


def ocr_config_from_dict(raw: dict[str, Any]) -> OCRConfig:
    return OCRConfig(language=_ocr_language(raw, "DeepSeek-OCR", OCRConfig.projector_input))


def load_config(folder: str | Path) -> VL2Config:
    folder = Path(folder)
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json in the checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if is_ocr_config(raw) or is_ocr2_config(raw):
        raise ConfigError(f"{path}: a DeepSeek-OCR checkpoint (load it with load_any_config)")
    proc_path = folder / "processor_config.json"
    processor = None
    if proc_path.exists():
        try:
            processor = json.loads(proc_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{proc_path}: cannot read ({exc})") from None
    try:
        return config_from_dict(raw, processor)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _all_candidates(max_tiles: int = 9, tile: int = 384) -> tuple[tuple[int, int], ...]:
    # The published order: by tile count, then (w, h) pairs as the official configs list them.
    out: list[tuple[int, int]] = []
    for n in range(1, max_tiles + 1):
        for a in range(1, math.isqrt(n) + 1):
            if n % a == 0:
                out.append((a * tile, n // a * tile))
                if a != n // a:
                    out.append((n // a * tile, a * tile))
    return tuple(out)


_VISION = VisionConfig()
_LANG_COMMON: dict[str, Any] = {
    "first_k_dense_replace": 1, "n_shared_experts": 2, "num_experts_per_tok": 6, "max_position_embeddings": 4096,
    "bos_token_id": 0, "eos_token_id": 1,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hub_id": "deepseek-ai/deepseek-vl2-tiny", "total_params": 3.37e9, "active_params": 1.0e9,
        "language": LanguageConfig(
            vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
            num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64,
            use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_rope_head_dim=0, qk_nope_head_dim=0,
            v_head_dim=0, **_LANG_COMMON),
    },
    "small": {
        "hub_id": "deepseek-ai/deepseek-vl2-small", "total_params": 16.1e9, "active_params": 2.8e9,
        "language": LanguageConfig(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
            use_mla=True, kv_lora_rank=512, q_lora_rank=None, **_LANG_COMMON),
    },
    "base": {
        "hub_id": "deepseek-ai/deepseek-vl2", "total_params": 27.5e9, "active_params": 4.5e9,
        "language": LanguageConfig(
            vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_routed_experts=72,
            use_mla=True, kv_lora_rank=512, q_lora_rank=None, topk_method="noaux_tc", scoring_func="sigmoid",
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, **_LANG_COMMON),
    },
}


def preset_config(name: str, **language_overrides: Any) -> VL2Config:
    """A real-size config of a published variant (random weights measure speed and memory exactly)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown variant {name!r}: expected one of {', '.join(PRESETS)}")
    lang = replace(PRESETS[name]["language"], **language_overrides)
    _validate_language(lang)
    return VL2Config(
        vision=_VISION,
        projector=ProjectorConfig(input_dim=_VISION.width, n_embed=lang.hidden_size),
        language=lang,
        candidate_resolutions=_all_candidates(),
    )


def load_any_config(folder: str | Path) -> VL2Config | OCRConfig | OCR2Config:
    """A checkpoint folder's config: DeepSeek-VL2, DeepSeek-OCR or DeepSeek-OCR 2 (told apart by `architectures`)."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return load_config(folder)  # the same error, said once
    for is_family, from_dict in ((is_ocr_config, ocr_config_from_dict), (is_ocr2_config, ocr2_config_from_dict)):
        if isinstance(raw, dict) and is_family(raw):
            try:
                return from_dict(raw)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    return load_config(folder)
